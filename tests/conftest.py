"""Test set-up: 8 fake CPU devices, and shared small data sets and trained runs.

The device count must be set before JAX initialises its backend, so it is set here,
at import time, before any test module imports JAX computations.
"""

import functools
import os
import sys
from pathlib import Path

# The suite is compile-bound (hundreds of small programs, each run a few times), so it
# trades XLA:CPU's code optimisation for compile time: no LLVM optimisation (about 30 %
# faster), and the legacy elemental emitters instead of the fusion emitters (a third
# less compile time again: the analysis run's 78 programs, 17/14/22 s -> 8/12/9 s side by
# side, 2026-11-30). Tests check values, never speed; benchmarks run without these
# flags. Subprocesses inherit them. Set before JAX starts its backend.
# CEJAX_TEST_XLA_FLAGS replaces them (e.g. empty, to run with XLA's defaults).
_TEST_FLAGS = os.environ.get("CEJAX_TEST_XLA_FLAGS", "--xla_backend_optimization_level=0 "
                             "--xla_llvm_disable_expensive_passes=true "
                             "--xla_cpu_use_fusion_emitters=false")
os.environ["XLA_FLAGS"] = " ".join(filter(None, [os.environ.get("XLA_FLAGS", ""),
                                                 _TEST_FLAGS]))

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
# Deterministic CPU math across runs (the resume and multi-device tests compare bitwise
# or near-bitwise results).
jax.config.update("jax_default_matmul_precision", "highest")

import pytest  # noqa: E402


def pytest_collection_modifyitems(items):
  """Tests marked ``heavy`` first, longest first (``heavy(seconds)``, 10 unless given),
  the rest in their order. xdist's loadgroup hands out the groups (largest first), then
  single tests in collection order: a long test collected last (test_vit.py's job test)
  kept one worker busy a minute after the other had finished. Every worker sorts alike."""

  def seconds(item):
    mark = item.get_closest_marker("heavy")
    return 0 if mark is None else (mark.args[0] if mark.args else 10)

  items.sort(key=lambda item: -seconds(item))


@pytest.hookimpl(trylast=True)  # after the tmpdir plugin has set up its factory
def pytest_configure(config):
  """JAX's persistent compilation cache, one per test run, shared by the xdist workers
  and the subprocesses they start: many tests (and train, resume and CLI runs) compile
  the same programs again. A cache entry is the same executable (its key covers the
  program, XLA flags, devices and JAX version); compile_count.py counts a hit as the
  compilation it replaces. Set before any test module compiles: JAX decides on its
  first compilation whether a process uses the cache. CEJAX_TEST_XLA_CACHE=0: off;
  CEJAX_TEST_XLA_CACHE_MIN_S: cache only programs that compiled for longer (default 0).
  Side by side on 2026-12-07 (2-core Xeon, alternating runs) the cache neither helped nor
  hurt beyond this host's run-to-run noise of about 15 %."""
  if os.environ.get("CEJAX_TEST_XLA_CACHE", "1") == "0":
    return
  base = config._tmp_path_factory.getbasetemp()
  if hasattr(config, "workerinput"):  # an xdist worker: basetemp is <run dir>/popen-gwN
    base = base.parent
  path = str(base / "xla_cache")
  os.environ["JAX_COMPILATION_CACHE_DIR"] = path
  minimum = os.environ.get("CEJAX_TEST_XLA_CACHE_MIN_S", "0")
  os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = minimum
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", float(minimum))


@functools.cache
def abstract_densenet(preset, num_classes):
  """A DenseNet preset built abstractly (shapes only, ``nnx.eval_shape``), once per
  worker: tracing DenseNet-201's construction takes about 7 s. Tests that use it share
  the xdist group "large_presets". Read-only."""
  from flax import nnx

  from cejax.models import densenet

  return nnx.eval_shape(lambda: densenet.create_densenet(preset, num_classes=num_classes,
                                                         rngs=nnx.Rngs(0)))


ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # configs/ is a plain directory of modules
SHARED_DATA = ROOT.parent / "shared" / "data"


def smoke_config(data_dir):
  from configs import smoke

  config = smoke.get_config()
  config.data.data_dir = str(data_dir)
  return config


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
  return tmp_path_factory.mktemp("tfds")


@pytest.fixture(scope="session")
def trained_smoke(tmp_path_factory, data_dir):
  """A smoke run trained once for the session, on one device: ``(config, workdir)``.
  (Data-parallel training is tested on its own, in test_training; on 2 cores, 8
  devices train this run in about 1.6 times the time of one.)"""
  from cejax.jobs import training

  workdir = tmp_path_factory.mktemp("smoke_run")
  config = smoke_config(data_dir)
  training.train_and_evaluate(config, workdir, devices=jax.devices()[:1])
  return config, workdir


@pytest.fixture(scope="session")
def trained_tiny(tmp_path_factory, data_dir):
  """A tiny DenseNet that classifies (24 of the 64 test images of 5 classes right):
  the smoke data at 32 px, 2048 training images, 2 epochs of batches of 64, on one
  device (the tests that use it need a trained model, not data parallelism; one device
  trains it for two thirds of the CPU time of eight). Returns ``(config, workdir)``."""
  from cejax.jobs import training

  workdir = tmp_path_factory.mktemp("tiny_run")
  config = smoke_config(data_dir)
  config.data.num_train = 2048
  config.train.num_epochs = 2
  config.train.batch_size = 64
  config.train.checkpoint_every_steps = 128
  config.train.log_every_steps = 64
  training.train_and_evaluate(config, workdir, devices=jax.devices()[:1])
  return config, workdir


@pytest.fixture(scope="session")
def chestxray_dir():
  path = SHARED_DATA / "chestxray14"
  if not (path / "images").is_dir():
    pytest.skip(f"real ChestX-ray14 samples not present at {path}")
  return path
