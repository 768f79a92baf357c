"""The dataset-scale sweep: bit-identical on any device and process count, resumable,
read back by image id, and its stacked estimands equal one call per estimand/target."""

import json
import socket
import subprocess
import sys
import textwrap

import jax
import ml_collections
import numpy as np
import pytest
from conftest import ROOT

from cejax import checkpoint, effects, sweep
from cejax.data import pipeline

pytestmark = pytest.mark.xdist_group("trained_smoke")


def _config(trained_smoke):
  config, _ = trained_smoke
  config = config.copy_and_resolve_references()
  s = config.sweep
  s.num_images, s.chunk_size, s.batch_size = 3, 2, 4
  s.families = ("grid", "rise")
  s.grid_cells, s.rise_masks, s.rise_cells = 4, 10, 4
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
  assert 0 < summary["fraction_of_peak"] < 1.5 and summary["forward_flops"] > 0
  logits_fn, _ = checkpoint.load_logits_fn(trained_smoke[1])
  image = pipeline.load_dataset(config.data).batch("test", [1])["image"][0]
  grid = sweep.mask_sources(config.sweep, image.shape[:2])["grid"]
  got = results.by_id("test/1")["grid"]["blur"]
  blur = effects.Blur(sigma=config.sweep.blur_sigma)
  for estimand in ("expected", "kl"):
    ref = effects.causal_effect(logits_fn, image, grid, intervention=blur, estimand=estimand,
                                batch_size=config.sweep.batch_size)
    np.testing.assert_allclose(results.effects["grid"]["blur"][estimand][1], ref.effects,
                               rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(got[estimand], effects.ce_map(ref.effects, grid), rtol=1e-6,
                               atol=1e-9)
  for target in range(5):  # "all": one column per class
    ref = effects.causal_effect(logits_fn, image, grid, intervention=blur,
                                estimand="probability", target=target,
                                batch_size=config.sweep.batch_size)
    np.testing.assert_allclose(got["probability"][..., target],
                               effects.ce_map(ref.effects, grid), rtol=1e-6, atol=1e-9)
  with pytest.raises(KeyError, match="No image 'test/9'"):
    results.by_id("test/9")


@pytest.mark.parametrize("num_devices", [4, 8])
def test_several_devices_give_bit_identical_maps(trained_smoke, one_device, tmp_path,
                                                 num_devices):
  config, out, _ = one_device
  sweep.run(config, trained_smoke[1], out=tmp_path, devices=jax.devices()[:num_devices],
            progress=False)
  _assert_same(sweep.load(tmp_path), sweep.load(out))


def test_killed_run_resumes_and_changed_settings_are_refused(trained_smoke, one_device,
                                                             tmp_path):
  config, out, _ = one_device
  sweep.run(config, trained_smoke[1], out=tmp_path, devices=jax.devices()[:1],
            progress=False)
  chunks = sorted((tmp_path / "chunks").glob("*.npz"))
  kept = chunks[0].stat().st_mtime_ns
  chunks[1].unlink()  # killed before its second chunk was written
  summary = sweep.run(config, trained_smoke[1], out=tmp_path, devices=jax.devices()[:1],
                      progress=False)
  assert summary["masks_computed"] == 16 + 10  # only the missing image
  assert chunks[0].stat().st_mtime_ns == kept
  _assert_same(sweep.load(tmp_path), sweep.load(out))
  changed = config.copy_and_resolve_references()
  changed.sweep.rise_masks = 12
  with pytest.raises(ValueError, match=r"different settings \(\['rise_masks'\]\)"):
    sweep.run(changed, trained_smoke[1], out=tmp_path, progress=False)
  chunks[0].write_bytes(b"corrupt")
  with pytest.raises(ValueError, match="00000.npz is not a readable cejax results file"):
    sweep.load(tmp_path)
  bad = config.copy_and_resolve_references()
  bad.sweep.families = ("grid", "windows")
  with pytest.raises(ValueError, match=r"config.sweep.families has \['windows'\]"):
    sweep.run(bad, trained_smoke[1], out=tmp_path / "other", progress=False)


WORKER = textwrap.dedent("""
    import sys
    import jax
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.config.update("jax_num_cpu_devices", 2)
    jax.config.update("jax_default_matmul_precision", "highest")
    port, pid, workdir, out, overrides = sys.argv[1:6]
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2,
                               process_id=int(pid), initialization_timeout=120)
    import json
    sys.path.insert(0, "tests")
    import ml_collections
    from cejax import sweep
    config = ml_collections.ConfigDict(json.loads(overrides))
    assert jax.process_count() == 2 and len(jax.local_devices()) == 2
    sweep.run(config, workdir, out=out, progress=False)
    jax.distributed.shutdown()
""")


def test_two_processes_equal_one_device(trained_smoke, one_device, tmp_path):
  config, out, _ = one_device
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  # Grid masks only (maps of one family do not depend on the others), to keep it short.
  grid_only = config.copy_and_resolve_references()
  grid_only.sweep.families = ("grid",)
  args = [str(port), None, str(trained_smoke[1]), str(tmp_path), grid_only.to_json()]
  procs = [subprocess.Popen([sys.executable, "-c", WORKER, *args[:1], str(i), *args[2:]],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True) for i in range(2)]
  for p in procs:
    log, _ = p.communicate(timeout=300)
    assert p.returncode == 0, log[-3000:]
  got, want = sweep.load(tmp_path), sweep.load(out)
  assert got.ids == want.ids and set(got.maps) == {"grid"}
  jax.tree.map(np.testing.assert_array_equal, (got.maps["grid"], got.effects["grid"]),
               (want.maps["grid"], want.effects["grid"]))
  summaries = [json.loads((tmp_path / f"throughput-p{i}.json").read_text()) for i in (0, 1)]
  assert [s["chunks"] for s in summaries] == [1, 1]  # chunk 0 and chunk 1


def test_auto_batch_size_is_the_largest_that_fits_by_memory_analysis(trained_smoke,
                                                                      tmp_path):
  logits_fn, _ = checkpoint.load_logits_fn(trained_smoke[1])

  def usage(batch):  # the compiled forward pass's own accounting, at that batch
    m = jax.jit(logits_fn).lower(jax.ShapeDtypeStruct((batch, 32, 32, 1), np.float32)
                                 ).compile().memory_analysis()
    return m.temp_size_in_bytes + m.argument_size_in_bytes + m.output_size_in_bytes

  budget = 3 * usage(8)
  batch = sweep.auto_batch_size(logits_fn, (32, 32, 1), budget_bytes=budget)
  assert usage(batch) <= budget < usage(batch + 1)
  with pytest.raises(ValueError, match="One mask needs"):
    sweep.auto_batch_size(logits_fn, (32, 32, 1), budget_bytes=100)
  from configs import smoke

  config = smoke.get_config()  # batch_size takes an int or "auto"
  config.sweep.batch_size = "big"
  with pytest.raises(ValueError, match="batch_size must be a positive int or 'auto'"):
    sweep.check_settings(config.sweep)
  config.sweep.batch_size = "auto"
  sweep.check_settings(config.sweep)
  # The job resolves "auto" before its first image (here: every mask in one batch).
  auto = _config(trained_smoke)
  auto.sweep = ml_collections.ConfigDict(dict(auto.sweep.to_dict(), batch_size="auto",
                                              families=("grid",), num_images=1))
  summary = sweep.run(auto, trained_smoke[1], out=tmp_path, devices=jax.devices()[:1],
                      progress=False)
  assert summary["batch_size"] == 16 and summary["masks_computed"] == 16
