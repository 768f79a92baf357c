"""Training end to end: checkpoints, resume, multi-device parity, bad input."""

import json

import jax
import numpy as np
import pytest
from conftest import smoke_config

from cejax import data
from cejax.jobs import checkpoint, training
from cejax.jobs import config as config_lib


def _params(workdir, step="latest"):
  graphdef, params, stats, run = checkpoint.load_model(workdir, step=step)
  return jax.tree.map(np.asarray, (params, stats)), run


@pytest.mark.xdist_group("trained_smoke")
def test_smoke_run_writes_checkpoints_and_metrics(trained_smoke):
  config, workdir = trained_smoke
  lines = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert [l["step"] for l in lines] == [8, 16]
  assert all(0.0 <= l["accuracy"] <= 1.0 and np.isfinite(l["loss"]) for l in lines)
  test = json.loads((workdir / "test_metrics.json").read_text())
  assert test["count"] == 64
  run = checkpoint.read_run(workdir)
  assert run["num_classes"] == 5 and run["preset"] == "tiny"


@pytest.mark.xdist_group("trained_smoke")
def test_load_logits_fn_reproduces_evaluation(trained_smoke):
  config, workdir = trained_smoke
  logits_fn, run = checkpoint.load_logits_fn(workdir)
  ds = data.load_dataset(config.data)
  batch = next(data.eval_batches(ds, "test", batch_size=64))
  logits = jax.jit(logits_fn)(batch["image"])
  acc = float((np.asarray(logits).argmax(1) == batch["label"]).mean())
  test = json.loads((workdir / "test_metrics.json").read_text())
  assert test["step"] == run["step"]
  assert acc == pytest.approx(test["accuracy"], abs=1e-6)


def test_checkpoint_roundtrip_is_exact(tmp_path):
  state = {"step": np.int32(3), "params": {"w": np.random.randn(3, 4).astype(np.float32)},
           "opt": (np.arange(5.0), {"m": np.float32(2.5)})}
  ckpt = checkpoint.Checkpointer(tmp_path, keep=1)
  ckpt.save(3, state)
  zeros = jax.tree.map(np.zeros_like, state)
  restored = ckpt.restore(3, zeros)
  jax.tree.map(np.testing.assert_array_equal, restored, state)
  with pytest.raises(ValueError, match="does not match"):
    ckpt.restore(3, {"params": {"w": np.zeros((5, 5), np.float32)}})


@pytest.mark.xdist_group("trained_smoke")
def test_killed_run_resumes_to_the_same_parameters(tmp_path, data_dir, trained_smoke):
  """Kill after step 6 (last checkpoint at 4), rerun: same final weights."""
  _, reference = trained_smoke
  config = smoke_config(data_dir)

  class Killed(Exception):
    pass

  def kill_at_6(step):
    if step == 6:
      raise Killed

  one = jax.devices()[:1]  # as the reference was trained
  with pytest.raises(Killed):
    training.train_and_evaluate(config, tmp_path, step_hook=kill_at_6, devices=one)
  assert checkpoint.Checkpointer(tmp_path).latest_step() == 4
  training.train_and_evaluate(config, tmp_path, devices=one)
  (p1, s1), _ = _params(tmp_path)
  (p2, s2), _ = _params(reference)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
               (p1, s1), (p2, s2))
  lines = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [l["step"] for l in lines] == [8, 16]


def test_four_devices_follow_the_one_device_loss_curve(tmp_path, data_dir):
  config = smoke_config(data_dir)
  config.train.num_epochs = 1
  # Data parallelism, not the network, is under test: one block of one layer (both
  # layouts' programs compile the whole training step).
  config.model.overrides.block_config = (1,)
  losses = {}
  for n in (1, 4):
    workdir = tmp_path / f"d{n}"
    training.train_and_evaluate(config, workdir, devices=jax.devices()[:n])
    losses[n] = json.loads((workdir / "metrics.jsonl").read_text().splitlines()[-1])["loss"]
    (losses[f"p{n}"], _), _ = _params(workdir)
  assert losses[1] == pytest.approx(losses[4], rel=1e-4)
  # Per tensor, relative to its norm: the batch mean's summation order differs between
  # layouts, and Adam's normalised step turns that round-off on a near-zero gradient
  # into a 2e-5 difference of single elements (seen on an AVX2 CPU, on a bias of norm
  # 0.02). A real fault (another batch per device, a missing all-reduce) changes the
  # updates themselves, by about lr x steps = 2e-2 per element: order 1 relative.
  def close(a, b):
    assert np.linalg.norm(a - b) <= 1e-2 * np.linalg.norm(a), (np.abs(a - b).max())
  jax.tree.map(close, losses["p1"], losses["p4"])


def test_nan_loss_stops_with_a_clear_error(tmp_path, data_dir):
  config = smoke_config(data_dir)
  config.train.learning_rate = 1e30
  config.train.optimizer = "sgd"
  with pytest.raises(FloatingPointError, match="Training loss is nan"):
    training.train_and_evaluate(config, tmp_path, devices=jax.devices()[:1])


@pytest.mark.xdist_group("trained_smoke")
def test_workdir_of_another_model_is_refused_untouched(tmp_path, data_dir, trained_smoke):
  _, workdir = trained_smoke
  config = smoke_config(data_dir)
  config.model.preset = "densenet121"
  before = (workdir / "run.json").read_text()
  steps = checkpoint.Checkpointer(workdir).manager.all_steps()
  with pytest.raises(ValueError, match="another model or other data "
                     r"\(preset: 'tiny' there, 'densenet121' now\)"):
    training.train_and_evaluate(config, workdir)
  assert (workdir / "run.json").read_text() == before
  assert checkpoint.Checkpointer(workdir).manager.all_steps() == steps


def test_unknown_config_key_lists_valid_ones(data_dir):
  config = smoke_config(data_dir)
  config.train.lerning_rate = 0.1  # a typo a user could make in a config file
  with pytest.raises(ValueError, match=r"lerning_rate\. Did you mean config\.train\."
                                       r"learning_rate\? Valid keys of config\.train"):
    config_lib.validate(config, "train")
