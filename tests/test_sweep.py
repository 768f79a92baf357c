"""The dataset-scale sweep: bit-identical on any device and process count, resumable,
read back by image id, and its stacked estimands equal one call per estimand/target."""

import functools
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time

import jax
import ml_collections
import numpy as np
import pytest
from conftest import ROOT

from cejax import effects, interventions
from cejax.data import pipeline
from cejax.jobs import checkpoint, sweep, throughput
from cejax.jobs import config as config_lib
from cejax.jobs.sweep import plan as sweep_plan

pytestmark = pytest.mark.xdist_group("trained_smoke")


def _config(trained_smoke):
  config, _ = trained_smoke
  config = config.copy_and_resolve_references()
  s = config.sweep
  s.num_images, s.chunk_size, s.batch_size = 3, 2, 4
  s.families = ("grid", "rise")
  m = config.masks
  m.grid_cells, m.rise_masks, m.rise_cells = 4, 10, 4
  # Blur on soft RISE masks is the case where rounding could depend on the program
  # layout (a non-zero fill blended by fractional masks); zero fills are exact anyway.
  s.interventions = ("blur",)
  s.estimands = ("expected", "probability", "kl")
  s.targets = "all"
  s.save_effects = True
  return config


def _assert_same(a, b):
  assert a.ids == b.ids
  jax.tree.map(np.testing.assert_array_equal, (a.maps, a.effects), (b.maps, b.effects))


@pytest.fixture(scope="module")
def one_device(trained_smoke, tmp_path_factory):
  config = _config(trained_smoke)
  out = tmp_path_factory.mktemp("sweep1")
  summary = sweep.run(config, trained_smoke[1], out=out, devices=jax.devices()[:1],
                      progress=False)
  return config, out, summary


def test_stacked_estimands_equal_one_call_per_estimand_and_target(trained_smoke,
                                                                   one_device):
  config, out, summary = one_device
  results = sweep.load(out)
  assert results.ids == ["test/0", "test/1", "test/2"]
  assert summary["masks_computed"] == 3 * (16 + 10) and summary["masks_per_s"] > 0
  # The rate is every mask over the time of every chunk (what the progress bar shows),
  # and the FLOPs are those of the path that ran: a fraction of a measured peak.
  assert summary["masks_per_s"] == summary["masks_computed"] / summary["seconds"]
  assert 0 < summary["fraction_of_peak"] <= 1
  flops = summary["flops_per_mask"]
  assert 0 < flops["grid"]["flops"] < flops["rise"]["flops"]  # incremental < full
  # Grid masks take the incremental recompute (exact to float32 round-off, 1e-5).
  assert summary["paths"] == {
      "grid": {"path": "incremental", "why": "measured faster on CPUs"},
      "rise": {"path": "full", "why": "incremental does not apply: RISE masks are not "
                                      "local (each covers the whole image)."}}
  assert summary["precision"] == "exact"
  logits_fn, _ = checkpoint.load_logits_fn(trained_smoke[1])
  image = pipeline.load_dataset(config.data).batch("test", [1])["image"][0]
  grid = sweep_plan.mask_sources(config, image.shape[:2])["grid"]
  got = results.by_id("test/1")["grid"]["blur"]
  blur = interventions.Blur(sigma=config.sweep.blur_sigma)
  for estimand in ("expected", "kl"):
    ref = effects.causal_effect(logits_fn, image, grid, intervention=blur, estimand=estimand,
                                batch_size=config.sweep.batch_size)
    np.testing.assert_allclose(results.effects["grid"]["blur"][estimand][1], ref.effects,
                               rtol=0, atol=1e-5)
    np.testing.assert_allclose(got[estimand], effects.ce_map(ref.effects, grid), rtol=0,
                               atol=1e-5)
  for target in range(5):  # "all": one column per class
    ref = effects.causal_effect(logits_fn, image, grid, intervention=blur,
                                estimand="probability", target=target,
                                batch_size=config.sweep.batch_size)
    np.testing.assert_allclose(got["probability"][..., target],
                               effects.ce_map(ref.effects, grid), rtol=0, atol=1e-5)
  with pytest.raises(KeyError, match="No image 'test/9'"):
    results.by_id("test/9")


AT_XLA_DEFAULTS = textwrap.dedent("""
    import json, sys
    import jax
    jax.config.update("jax_num_cpu_devices", 8)
    import ml_collections
    import numpy as np
    from cejax.jobs import sweep
    workdir, out, overrides = sys.argv[1:4]
    config = ml_collections.ConfigDict(json.loads(overrides))
    for n in (1, 8):
      sweep.run(config, workdir, out=f"{out}/{n}", devices=jax.devices()[:n],
                progress=False)
    a, b = sweep.load(f"{out}/1"), sweep.load(f"{out}/8")
    assert a.ids == b.ids
    jax.tree.map(np.testing.assert_array_equal, (a.maps, a.effects), (b.maps, b.effects))
    print("ok")
""")


def test_eight_devices_give_bit_identical_maps_at_xla_defaults(trained_smoke, tmp_path):
  # 2 devices, and 2 processes of 2 devices: bit for bit in the resume and auto tests
  # below. 8 devices run in a fresh interpreter at XLA's default flags: under the
  # suite's compile flags (XLA:CPU's legacy emitters, conftest.py) the 8-device program
  # rounds the clean forward pass's logits 1e-7 apart from the one-device program.
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  proc = subprocess.run([sys.executable, "-c", AT_XLA_DEFAULTS, str(trained_smoke[1]),
                         str(tmp_path), _config(trained_smoke).to_json()],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stdout.strip().endswith("ok")


def test_changed_settings_corrupt_chunks_and_bad_keys_are_refused(trained_smoke,
                                                                  one_device, tmp_path):
  config, out, _ = one_device
  shutil.copytree(out, tmp_path, dirs_exist_ok=True)
  changed = config.copy_and_resolve_references()
  changed.masks.rise_masks = 12
  with pytest.raises(ValueError, match=r"different settings \(\['masks.rise_masks'\]\): "
                                       "masks.rise_masks: 10 there, 12 now"):
    sweep.run(changed, trained_smoke[1], out=tmp_path, progress=False)
  changed.masks.rise_masks, changed.precision = 10, "bf16"
  with pytest.raises(ValueError, match=r"compute.precision: 'exact' there, 'bf16' now"):
    sweep.run(changed, trained_smoke[1], out=tmp_path, progress=False)
  chunk = tmp_path / "chunks" / "00000.npz"
  chunk.write_bytes(b"corrupt")
  with pytest.raises(ValueError, match="00000.npz is not a readable cejax results file"):
    sweep.load(tmp_path)
  bad = config.copy_and_resolve_references()
  bad.sweep.families = ("grid", "windows")
  with pytest.raises(ValueError, match=r"config.sweep.families has \['windows'\]"):
    sweep.run(bad, trained_smoke[1], out=tmp_path / "other", progress=False)
  bad.sweep.families, bad.precision = ("grid",), "float16"
  with pytest.raises(ValueError, match=r"config.precision: Unknown precision 'float16'; "
                                       "valid are"):
    config_lib.validate(bad, "sweep")


def test_bfloat16_compute_runs_the_network_in_bfloat16(trained_smoke):
  images = pipeline.load_dataset(trained_smoke[0].data).batch("test", [0, 1])["image"]
  logits = {}
  for dtype in ("float32", "bfloat16"):
    graphdef, params, stats, _ = checkpoint.load_model(trained_smoke[1], compute_dtype=dtype)
    fn = checkpoint.make_logits_fn(graphdef, params, stats)
    convs = [e for e in jax.make_jaxpr(fn)(images).eqns
             if e.primitive.name in ("conv_general_dilated", "dot_general")]
    assert convs and {str(e.invars[0].aval.dtype) for e in convs} == {dtype}
    assert all(str(leaf.dtype) == "float32" for leaf in jax.tree.leaves(params))
    logits[dtype] = np.asarray(jax.jit(fn)(images))
  # bf16 keeps 8 bits of mantissa: not equal to float32, and as far from it as the
  # float32 network with every operation's result rounded to 8 bits is (the emulation
  # of benchmarks/precision_study.py), within a factor of 4 either way.
  sys.path.insert(0, str(ROOT / "benchmarks"))
  from precision_study import round_products

  graphdef, params, stats, _ = checkpoint.load_model(trained_smoke[1])
  emulated = round_products(checkpoint.make_logits_fn(graphdef, params, stats),
                            mantissa_bits=7, every_output=True)
  scale = np.abs(np.asarray(jax.jit(emulated)(images)) - logits["float32"]).max()
  err = np.abs(logits["bfloat16"] - logits["float32"]).max()
  assert scale / 4 < err < 4 * scale, (err, scale)


WORKER = textwrap.dedent("""
    import sys
    import jax
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.config.update("jax_num_cpu_devices", 2)
    jax.config.update("jax_default_matmul_precision", "highest")
    port, pid, workdir, out, overrides, die = sys.argv[1:7]
    if pid == die:  # killed (SIGKILL) when about to write its first chunk
      import os, signal
      from cejax.jobs import store
      store.save_tree = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2,
                               process_id=int(pid), initialization_timeout=120)
    import json
    sys.path.insert(0, "tests")
    import ml_collections
    from cejax.jobs import sweep
    config = ml_collections.ConfigDict(json.loads(overrides))
    assert jax.process_count() == 2 and len(jax.local_devices()) == 2
    sweep.run(config, workdir, out=out, progress=False)
    jax.distributed.shutdown()
""")


def _launch(port, config, workdir, out, *, die=-1):
  return [subprocess.Popen([sys.executable, "-c", WORKER, str(port), str(i), str(workdir),
                            str(out), config.to_json(), str(die)],
                           cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           text=True) for i in range(2)]


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_killed_one_resume_and_equal_one_device(trained_smoke, one_device,
                                                              tmp_path):
  config, out, _ = one_device
  # Grid masks only (maps of one family do not depend on the others), to keep it short.
  grid_only = config.copy_and_resolve_references()
  grid_only.sweep.families = ("grid",)
  first = tmp_path / "chunks" / "00000.npz"  # process 0's chunk; chunk 1 is process 1's
  procs = _launch(_free_port(), grid_only, trained_smoke[1], tmp_path, die=1)
  procs[1].communicate(timeout=300)
  assert procs[1].returncode == -signal.SIGKILL
  deadline = time.monotonic() + 300
  while not first.exists() and procs[0].poll() is None and time.monotonic() < deadline:
    time.sleep(0.2)
  procs[0].kill()  # the scheduler ends the job once one of its processes died
  log, _ = procs[0].communicate()
  assert first.exists(), log[-3000:]
  assert [p.name for p in (tmp_path / "chunks").iterdir()] == ["00000.npz"]
  kept = first.stat().st_mtime_ns

  # The restart, here as one process of two devices: chunks are named by chunk, so a
  # run resumes with any process count.
  summary = sweep.run(grid_only, trained_smoke[1], out=tmp_path, devices=jax.devices()[:2],
                      progress=False)
  assert first.stat().st_mtime_ns == kept  # process 0's chunk was kept, not recomputed
  assert summary["masks_computed"] == 16  # only the image process 1 lost
  got, want = sweep.load(tmp_path), sweep.load(out)
  assert got.ids == want.ids and set(got.maps) == {"grid"}
  jax.tree.map(np.testing.assert_array_equal, (got.maps["grid"], got.effects["grid"]),
               (want.maps["grid"], want.effects["grid"]))


def test_auto_batch_size_is_the_largest_that_fits_by_memory_analysis(trained_smoke,
                                                                      tmp_path, capsys):
  logits_fn, _ = checkpoint.load_logits_fn(trained_smoke[1])

  @functools.cache
  def usage(batch):  # the compiled forward pass's own accounting, at that batch
    m = jax.jit(logits_fn).lower(jax.ShapeDtypeStruct((batch, 32, 32, 1), np.float32)
                                 ).compile().memory_analysis()
    return m.temp_size_in_bytes + m.argument_size_in_bytes + m.output_size_in_bytes

  budget = 3 * usage(8)
  batch = throughput.auto_batch_size(usage, budget_bytes=budget, limit=4096)
  assert usage(batch) <= budget < usage(batch + 1)
  assert throughput.auto_batch_size(usage, budget_bytes=budget, limit=5) == 5
  with pytest.raises(ValueError, match="One item needs"):
    throughput.auto_batch_size(usage, budget_bytes=100, limit=4096)
  from configs import smoke

  config = smoke.get_config()  # batch_size takes an int or "auto"
  config.sweep.batch_size = "big"
  with pytest.raises(ValueError, match="batch_size must be a positive int or 'auto'"):
    config_lib.validate(config, "sweep")
  config.sweep.batch_size = "auto"
  config_lib.validate(config, "sweep")
  # The job resolves "auto" per device before its first image, on the program it runs:
  # 16 grid masks on 2 devices take 8 each (a larger batch would only run padding).
  auto = _config(trained_smoke)
  auto.sweep = ml_collections.ConfigDict(dict(auto.sweep.to_dict(), batch_size="auto",
                                              families=("grid",), num_images=1))
  summary = sweep.run(auto, trained_smoke[1], out=tmp_path, devices=jax.devices()[:2])
  assert summary["batch_size"] == 8 and summary["masks_computed"] == 16
  record = sweep.load(tmp_path).settings
  assert record["job"]["batch_size"] == "auto" and record["compute"]["batch_size"] == 8
  bar = capsys.readouterr().err  # the progress bar: images done and masks/s
  assert "sweep (process 0)" in bar and "1/1" in bar
  shown = float(bar.rsplit("masks_per_s=", 1)[1].split("]")[0])
  # The bar's rate and the summary's are one measure (the bar's is taken a moment
  # before the end and shown to 0.1): within 5 %.
  assert abs(shown - summary["masks_per_s"]) <= 0.05 * summary["masks_per_s"] + 0.05


def test_optimised_masks_are_the_library_calls_and_changed_settings_are_refused(
    trained_smoke, tmp_path):
  """config.sweep.optimised: the chunks hold what extremal_perturbation, ce_optimal_mask
  and minimal_counterfactual return for the same images (called here directly), and
  changed optimised settings are refused. (Chunks are written, verified and resumed the
  same way whatever they hold: the resume tests above.)"""
  from cejax.optimised import ce_optimal, counterfactual, extremal

  config, workdir = trained_smoke
  config = config.copy_and_resolve_references()
  s = config.sweep
  s.num_images, s.chunk_size, s.families, s.interventions = 2, 2, ("grid",), ("zero",)
  s.estimands = ("expected", "per_class")  # ce_optimal takes the scalar one
  s.optimised = ("extremal", "ce_optimal", "counterfactual")
  o = config.optimised
  o.areas, o.iterations, o.step, o.sigma, o.counterfactual_bisection = (0.1, 0.3), 3, 4, 4.0, 0
  o.batch_size = 2
  config.masks.grid_cells = 4
  summary = sweep.run(config, workdir, out=tmp_path, devices=jax.devices()[:2],
                      progress=False)
  assert summary["optimised_seconds"] > 0 and summary["optimised_images_per_s"] > 0
  got = sweep.load(tmp_path)
  assert set(got.maps) == {"grid"}

  logits_fn, _ = checkpoint.load_logits_fn(workdir)
  data = pipeline.load_dataset(config.data)
  images = np.asarray(data.batch("test", [0, 1])["image"])
  targets = np.asarray(jax.jit(logits_fn)(images)).argmax(-1)
  np.testing.assert_array_equal(got.optimised["targets"], targets)
  # Two devices against one, at the sweep's per-device batch: the sweep optimises
  # optimised_batch_size images per device whatever the chunk and the mesh (the
  # network's rounding may depend on its batch; a chunk's batch once followed the device
  # count, and masks differed from a two-image batch's by 2.4e-7).
  assert len(jax.devices()) >= 2
  common = dict(areas=(0.1, 0.3), iterations=3, step=4, sigma=4.0, batch_size=2)
  want = extremal.extremal_perturbation(logits_fn, images, targets, **common)
  np.testing.assert_array_equal(got.optimised["extremal"]["masks"], want.masks)
  np.testing.assert_array_equal(got.optimised["extremal"]["final_reward"],
                                want.reward[..., -1])
  assert set(got.optimised["ce_optimal"]["zero"]) == {"expected"}
  want = ce_optimal.ce_optimal_mask(logits_fn, images, targets, intervention="zero",
                                  estimand="expected", **common)
  np.testing.assert_array_equal(got.optimised["ce_optimal"]["zero"]["expected"]["masks"],
                                want.masks)
  want = counterfactual.minimal_counterfactual(logits_fn, images, bisection_steps=0,
                                               intervention="zero", **common)
  cf = got.optimised["counterfactual"]["zero"]
  for name in ("area", "mask", "flipped_to", "found"):
    np.testing.assert_array_equal(cf[name], getattr(want, name), err_msg=name)

  changed = config.copy_and_resolve_references()
  changed.optimised.iterations = 5
  with pytest.raises(ValueError, match=r"job.optimised_settings.iterations: 3 there, 5 now"):
    sweep.run(changed, workdir, out=tmp_path, progress=False)


@pytest.mark.parametrize("change,optimised,message", [
    (dict(optimised=("extremal", "gradcam")), {}, r"config.sweep.optimised has \['gradcam'\]"),
    (dict(optimised=("extremal",), targets="all"), {}, "targets must be 'predicted'"),
    (dict(optimised=("ce_optimal",), estimands=("per_class",)), {}, "estimands has none"),
    (dict(optimised=("extremal",)), dict(areas=(0.1, 1.5)), "optimised.areas must be"),
    (dict(optimised=("extremal",)), dict(iterations=0), "optimised.iterations must be"),
    (dict(optimised=("extremal",)), dict(batch_size=0), "optimised.batch_size must be"),
    (dict(families=()), {}, r"config.sweep.families has nothing"),
    (dict(optimised=("counterfactual",), interventions=("token_drop",)), {},
     r"optimise a pixel intervention; config.sweep.interventions has none"),
])
def test_bad_optimised_settings_are_named(change, optimised, message):
  from cejax.jobs import config as config_lib

  config = config_lib.base_config()
  config.sweep.update(change)
  config.optimised.update(optimised)
  with pytest.raises(ValueError, match=message):
    config_lib.validate(config, "sweep")


def test_patch_subsets_and_rise_masks_draw_from_different_keys():
  """RISE mask ``i`` draws from ``fold_in(key, i)`` (its grid and shift from that key's
  split); the patch subsets of the same config draw from a key that is none of those.
  On the old code they used ``fold_in(key, 1)``, RISE mask 1's key."""
  import ml_collections

  from cejax.jobs import mask_spec

  spec = ml_collections.ConfigDict(dict(grid_cells=4, window=0, stride=0, rise_masks=64,
                                        rise_cells=4, rise_p=0.5, patch_masks=8,
                                        patch_size=8, patch_keep=0.5))
  key = jax.random.key(0)
  sources = mask_spec.mask_sources(spec, (32, 32), key=key, families=("rise", "patches"))
  patches = jax.random.key_data(sources["patches"].key)
  rise = [jax.random.key_data(k) for i in range(spec.rise_masks)
          for k in (jax.random.fold_in(key, i), *jax.random.split(jax.random.fold_in(key, i)))]
  assert not any(np.array_equal(patches, k) for k in rise)
