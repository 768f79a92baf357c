"""The jobs under faults a user meets on shared machines: each ends in a clear error
naming the setting or file, or in a resume whose results equal an uninterrupted run's
bit for bit. README "Reliability" lists this table.

Kills (SIGKILL of a sweep process, an interrupted analysis and training run) are
tested where the resume logic lives: test_sweep, test_evaluators, test_training.
"""

import errno
import json
import os
import shutil
import stat
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest
from conftest import ROOT

from cejax.jobs import analysis, store, sweep, training
from cejax.jobs import config as config_lib

pytestmark = pytest.mark.xdist_group("trained_smoke")


def _config(trained_smoke):
  """A short sweep: grid masks of 3 images, one chunk per image."""
  config = trained_smoke[0].copy_and_resolve_references()
  s = config.sweep
  s.num_images, s.chunk_size, s.batch_size = 3, 1, 16
  s.families, s.interventions, s.estimands = ("grid",), ("zero",), ("expected",)
  config.masks.grid_cells = 4
  return config


def _run(config, workdir, out, **kw):
  return sweep.run(config, workdir, out=out, devices=jax.devices()[:1], progress=False, **kw)


def _same(out, reference):
  got, want = sweep.load(out), sweep.load(reference)
  assert got.ids == want.ids
  jax.tree.map(np.testing.assert_array_equal, got.maps, want.maps)


@pytest.fixture(scope="module")
def reference(trained_smoke, tmp_path_factory):
  """An uninterrupted sweep: ``(config, out)``."""
  config = _config(trained_smoke)
  out = tmp_path_factory.mktemp("reference")
  _run(config, trained_smoke[1], out)
  return config, out


def _copy(reference, tmp_path):
  out = tmp_path / "sweep"
  shutil.copytree(reference[1], out)
  return out


def test_data_the_model_was_not_trained_on_is_refused_naming_each_setting(
    trained_smoke, reference, tmp_path):
  workdir = trained_smoke[1]
  for key, value, shown in (("seed", 1, "data.seed: trained with 0, the config says 1"),
                            ("mean", (0.2,), r"data.mean: trained with \[0.45\], the config "
                                             r"says \[0.2\]"),
                            ("image_size", 48, "data.image_size: trained with 32, the "
                                               "config says 48")):
    config = _config(trained_smoke)
    config.data[key] = value
    with pytest.raises(ValueError, match=shown):
      _run(config, workdir, tmp_path / "new")
    assert not (tmp_path / "new").exists()  # nothing written
  # Asked for explicitly, other data runs, but never into results of the trained data.
  out = _copy(reference, tmp_path)
  (out / "chunks" / "00001.npz").unlink()
  config = _config(trained_smoke)
  config.data.seed, config.data.other_than_trained = 1, True
  with pytest.raises(ValueError, match=r"different settings \(\['data.seed'\]\): data.seed: "
                                       "0 there, 1 now. Pass --fresh"):
    _run(config, workdir, out)
  assert sorted(p.name for p in (out / "chunks").iterdir()) == ["00000.npz", "00002.npz"]


def test_the_data_settings_come_from_the_trained_run(trained_smoke, reference, tmp_path):
  config = _config(trained_smoke)
  base = config_lib.base_config().data
  with config.data.unlocked():  # every data setting at its default, but where the data are
    config.data = base.copy_and_resolve_references()
    config.data.data_dir = trained_smoke[0].data.data_dir
  assert config.data.image_size != 32 and config.data.num_train != 256
  out = tmp_path / "sweep"
  # The library call takes every setting that differs from the defaults as the user's;
  # the command line passes the keys it set (here none).
  _run(config, trained_smoke[1], out, explicit_data=())
  record = json.loads((out / "settings.json").read_text())
  trained = json.loads((trained_smoke[1] / "run.json").read_text())["data"]
  assert {k: record["data"][k] for k in trained} == trained
  assert record["data"]["image_size"] == 32 and record["data"]["split_sizes"]["test"] == 64
  _same(out, reference[1])


def test_damaged_duplicated_and_half_written_chunks_are_recomputed(reference, trained_smoke,
                                                                   tmp_path, caplog):
  out = _copy(reference, tmp_path)
  chunks = out / "chunks"
  shutil.copy(chunks / "00001.npz", chunks / "00002.npz")  # a chunk copied over another
  data = (chunks / "00000.npz").read_bytes()
  (chunks / "00000.npz").write_bytes(data[: len(data) // 2])  # truncated
  (chunks / ".00001.npz.x7k2").write_bytes(b"half")  # what a kill mid-write leaves
  with pytest.raises(ValueError, match="00000.npz is not a readable cejax results file"):
    sweep.load(out)
  (chunks / "00000.npz").unlink()
  shutil.copy(chunks / "00001.npz", chunks / "00000.npz")
  with pytest.raises(ValueError, match=r"00000.npz holds chunk 1 where this run expects 0"):
    sweep.load(out)  # never read back twice
  (chunks / "00000.npz").write_bytes(b"")  # zero bytes
  with caplog.at_level("WARNING"):
    summary = _run(reference[0], trained_smoke[1], out)
  assert summary["chunks_recomputed"] == ["00000.npz", "00002.npz"]
  assert summary["masks_computed"] == 2 * 16
  warned = [r.getMessage() for r in caplog.records]
  assert any("Recomputing chunk 0: " in m and "00000.npz is not a readable" in m
             for m in warned), warned
  assert any("00002.npz holds chunk 1 where this run expects 2" in m for m in warned)
  _same(out, reference[1])
  # Each run that computed something appended its record; one that computed nothing
  # appends none and rewrites nothing.
  log = out / "throughput-p0.jsonl"
  assert [json.loads(line)["masks_computed"] for line in log.read_text().splitlines()] == [
      3 * 16, 2 * 16]
  before = {p.name: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
  again = _run(reference[0], trained_smoke[1], out)
  assert again["masks_computed"] == 0 and "fraction_of_peak" not in again
  assert {p.name: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == before


def test_a_retrained_model_is_refused_by_the_sweep_and_the_analysis(trained_smoke, reference,
                                                                    tmp_path):
  workdir = tmp_path / "run"
  shutil.copytree(trained_smoke[1], workdir)
  config = _config(trained_smoke)
  config.sweep.num_images = 2
  _run(config, workdir, tmp_path / "sweep")
  config.analysis.evaluators, config.analysis.methods = ("maps",), ("gradient",)
  config.analysis.num_images, config.analysis.chunk_size = 2, 1
  report = analysis.analyze(config, workdir, progress=False)
  metrics = report.parent / "metrics.json"
  kept = metrics.stat().st_mtime_ns
  # A rerun that computes nothing leaves the analysis's records alone.
  assert analysis.analyze(config, workdir, progress=False) == report
  assert metrics.stat().st_mtime_ns == kept
  # The same model retrained in the same workdir, with another seed. Its best step (by
  # validation accuracy) may be another one too; the weights' fingerprint is what must
  # tell them apart (a run id or the step alone would not, at the same step).
  retrain = trained_smoke[0].copy_and_resolve_references()
  retrain.train.seed = 1
  training.train_and_evaluate(retrain, workdir, fresh=True, devices=jax.devices()[:1])
  (tmp_path / "sweep" / "chunks" / "00001.npz").unlink()
  with pytest.raises(ValueError, match=r"different settings \(\[('model.step', )?"
                                       r"'model.weights'\]\): .*model.weights: '\w+' there, "
                                       r"'\w+' now"):
    _run(config, workdir, tmp_path / "sweep")
  (report.parent / "chunks" / "0001.npz").unlink()
  with pytest.raises(ValueError, match=r"different settings \(\[('model.step', )?"
                                       r"'model.weights'\]\)"):
    analysis.analyze(config, workdir, progress=False)


def test_train_py_refuses_a_workdir_of_other_data_untouched(trained_smoke, tmp_path):
  workdir = tmp_path / "run"
  shutil.copytree(trained_smoke[1], workdir)
  config = trained_smoke[0].copy_and_resolve_references()
  before = (workdir / "test_metrics.json").read_bytes()
  for key, value, shown in (("image_size", 48, "data.image_size: 32 there, 48 now"),
                            ("num_train", 512, "data.num_train: 256 there, 512 now")):
    other = config.copy_and_resolve_references()
    other.data[key] = value
    with pytest.raises(ValueError, match=f"another model or other data \\({shown}\\).*"
                                         "--fresh"):
      training.train_and_evaluate(other, workdir)
  assert (workdir / "test_metrics.json").read_bytes() == before


def test_a_failed_start_writes_nothing_that_blocks_the_corrected_run(trained_smoke,
                                                                    reference, tmp_path):
  out = tmp_path / "sweep"
  bad = _config(trained_smoke)
  bad.sweep.families, bad.masks.window = ("sliding",), 200
  with pytest.raises(ValueError, match=r"config.masks does not fit \(32, 32\) images"):
    _run(bad, trained_smoke[1], out)
  bad = _config(trained_smoke)
  bad.sweep = ml_collections.ConfigDict(dict(bad.sweep.to_dict(), batch_size="auto",
                                             memory_budget_gb=1e-6))
  with pytest.raises(ValueError, match="memory_budget_gb"):
    _run(bad, trained_smoke[1], out)
  bad = _config(trained_smoke)
  bad.sweep.families, bad.masks.patch_size = ("patches",), 5
  with pytest.raises(ValueError, match=r"config.masks does not fit \(32, 32\) images.*"
                                       r"patch_size 5"):
    _run(bad, trained_smoke[1], out)
  for key, value in (("grid_cells", 0), ("rise_p", 1.5), ("patch_keep", 1.0)):
    bad = _config(trained_smoke)
    bad.masks[key] = value
    with pytest.raises(ValueError, match=f"config.masks.{key} must be"):
      _run(bad, trained_smoke[1], out)
  bad = _config(trained_smoke)
  bad.sweep.num_images = -5
  with pytest.raises(ValueError, match=r"num_images must be an integer >= 0 \(0: the whole "
                                       "split\\), got -5"):
    _run(bad, trained_smoke[1], out)
  assert not out.exists()
  bad = _config(trained_smoke)
  bad.analysis.num_images = -5
  with pytest.raises(ValueError, match="config.analysis.num_images must be an integer >= 1"):
    analysis.analyze(bad, trained_smoke[1], out=out, progress=False)
  assert not out.exists()
  # An older version's failed start left settings.json and an empty chunks/: no block.
  out.mkdir()
  (out / "chunks").mkdir()
  (out / "settings.json").write_text('{"batch_size": "auto"}')
  _run(reference[0], trained_smoke[1], out)
  _same(out, reference[1])


def test_a_full_disk_names_the_file_removes_the_temporary_and_resumes(
    trained_smoke, reference, tmp_path, monkeypatch):
  out = _copy(reference, tmp_path)
  (out / "chunks" / "00001.npz").unlink()
  real_fsync = os.fsync

  def full_for_chunks(fd):  # the disk fills up as the chunk is written
    if ".npz." in os.readlink(f"/proc/self/fd/{fd}"):
      raise OSError(errno.ENOSPC, "No space left on device")
    real_fsync(fd)

  monkeypatch.setattr(os, "fsync", full_for_chunks)
  with pytest.raises(OSError, match=r"Could not write .*chunks/00001.npz: No space left on "
                                    "device \\(nothing was replaced"):
    _run(reference[0], trained_smoke[1], out)
  monkeypatch.setattr(os, "fsync", real_fsync)
  assert sorted(p.name for p in (out / "chunks").iterdir()) == ["00000.npz", "00002.npz"]
  _run(reference[0], trained_smoke[1], out)
  _same(out, reference[1])


def test_files_get_the_mode_of_the_umask(tmp_path):
  old = os.umask(0o022)
  try:
    store.write_json_atomic(tmp_path / "a.json", {"x": 1})
    store.save_tree(tmp_path / "t.npz", {"a": np.zeros(2)})
  finally:
    os.umask(old)
  for name in ("a.json", "t.npz"):
    assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o644, name


def test_command_line_mistakes_end_in_one_clear_message(tmp_path):
  def run(*args):
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)

  proc = run("analyze.py", "--config=configs/smoke.py", "--config.analysis.rise_mask=10",
             f"--workdir={tmp_path}")
  assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
  assert ("Unknown config key config.analysis.rise_mask. Did you mean "
          "config.analysis.rise_masks? It is now config.masks.rise_masks.") in proc.stderr
  proc = run("-m", "cejax.jobs.sweep", "--config=configs/smoke.py", f"--workdir={tmp_path}",
             "--distributed")
  assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
  assert "--distributed found no cluster to join" in proc.stderr
  assert "--coordinator_address=HOST:PORT" in proc.stderr
  # A job's own errors: the message, status 2, no traceback.
  proc = run("analyze.py", "--config=configs/smoke.py", f"--workdir={tmp_path}")
  assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
  assert f"error: {tmp_path}/run.json not found" in proc.stderr
  # DenseNet arguments on the command line are declared keys; a typo is named.
  config_lib.check_argv(["train.py", "--config.model.overrides.growth_rate=8"])
  with pytest.raises(SystemExit, match="Did you mean config.model.overrides.growth_rate"):
    config_lib.check_argv(["train.py", "--config.model.overrides.growth=8"])
  assert config_lib.explicit_keys(["x", "--config.data.seed=1", "--config.data.mean",
                                   "(0.2,)", "--config.sweep.seed=3"], "data") == {"seed",
                                                                                  "mean"}


def test_an_older_run_json_is_checked_for_what_it_records(tmp_path, caplog):
  from cejax.jobs import checkpoint

  run = {"preset": "tiny", "num_classes": 5, "in_channels": 1, "dtype": "float32",
         "overrides": {}}
  (tmp_path / "run.json").write_text(json.dumps(dict(run, data="synthetic")))
  with caplog.at_level("WARNING"):
    checkpoint.check_or_write_run(tmp_path, dict(run, data={"name": "synthetic", "seed": 0}))
  assert "records only the data set's name" in caplog.text
  with pytest.raises(ValueError, match="data: 'synthetic' there, 'chestxray14' now"):
    checkpoint.check_or_write_run(tmp_path, dict(run, data={"name": "chestxray14"}))
  assert json.loads((tmp_path / "run.json").read_text())["data"] == "synthetic"
