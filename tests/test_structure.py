"""The library's structure: one engine that a new forward plugs into, one public home
per name, the core apart from the jobs, and the old paths for one release."""

import ast
import dataclasses
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from test_effects import C, H, W, make_logits_fn

import cejax
from cejax import effects, interventions, masks
from cejax.forwards import full

ROOT = Path(__file__).resolve().parents[1]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class OneAtATime:
  """A forward written against the protocol alone: each masked image through the model
  on its own (a ``lax.map`` over the chunk), zero fill only."""

  logits_fn: object = dataclasses.field(metadata=dict(static=True))
  masks: object = None

  @property
  def num(self):
    return self.masks.num

  def prepare(self, what, *, image, intervention):
    if intervention not in (None, "zero"):
      raise ValueError("OneAtATime fills with zero only.")
    return OneAtATime(self.logits_fn, masks.as_source(what, image.shape[:2]))

  def setup(self, image):
    return self.logits_fn(image[None])[0], image

  def logits(self, image, indices, keys):
    chunk = self.masks(indices)
    logits = jax.lax.map(lambda m: self.logits_fn((image * (1 - m[..., None]))[None])[0],
                         chunk)
    return logits, full.masks_ok(chunk, image)


def test_a_new_forward_plugs_into_the_engine_and_gets_everything_else():
  logits_fn = make_logits_fn()
  image = jax.random.normal(jax.random.key(1), (H, W, C))
  grid = masks.grid(shape=(H, W), n=3)
  mine = OneAtATime(logits_fn)
  assert isinstance(mine, effects.Forward)
  mesh = jax.make_mesh((4,), ("masks",), devices=jax.devices()[:4])
  for estimand in cejax.ESTIMANDS:
    got = effects.causal_effect(mine, image, grid, estimand=estimand, batch_size=2, mesh=mesh)
    want = effects.causal_effect(logits_fn, image, grid, estimand=estimand, batch_size=9)
    # One image per call against a batch of 9: float32 round-off of the convolution.
    np.testing.assert_allclose(got.effects, want.effects, rtol=1e-5, atol=1e-6)
  # The engine's checks and NaN contract apply to it unchanged.
  with pytest.raises(ValueError, match="target must be a class index"):
    effects.causal_effect(mine, image, grid, estimand="probability", target=9)
  with pytest.raises(ValueError, match="fills with zero only"):
    effects.causal_effect(mine, image, grid, intervention="blur")
  bad = jax.jit(lambda m: effects.causal_effect(mine, image, m, batch_size=4).effects)(
      masks.to_array(grid).at[3, 0, 0].set(2.0))
  assert np.isnan(bad[3]) and np.isfinite(np.delete(np.asarray(bad), 3)).all()


def test_a_users_random_intervention_works_or_gets_a_clear_error():
  logits_fn = make_logits_fn()
  image = jax.random.normal(jax.random.key(1), (H, W, C))
  grid = masks.grid(shape=(H, W), n=3)

  @dataclasses.dataclass(frozen=True)
  class Noise:  # fill and num_draws only, as a user might write it
    num_draws: int = 1

    def fill(self, image, key):
      return jax.random.normal(key, image.shape)

  with pytest.raises(ValueError, match="fill\\(image, key=None\\) failed.*declare random = "
                                       "True"):
    effects.causal_effect(logits_fn, image, grid, intervention=Noise())
  with pytest.raises(ValueError, match="num_draws=4 but does not declare random = True"):
    effects.causal_effect(logits_fn, image, grid, intervention=Noise(num_draws=4))

  @dataclasses.dataclass(frozen=True)
  class DeclaredNoise(Noise):
    random = True

  key = jax.random.key(3)
  got = effects.causal_effect(logits_fn, image, grid, intervention=DeclaredNoise(2), key=key)
  builtin = effects.causal_effect(logits_fn, image, grid, key=key,
                                  intervention=interventions.GaussianNoise(std=1.0,
                                                                           num_draws=2))
  np.testing.assert_allclose(got.effects, builtin.effects, rtol=1e-5, atol=1e-7)
  assert isinstance(Noise(), interventions.Intervention)
  assert isinstance(DeclaredNoise(), interventions.Intervention)


def test_the_core_imports_no_job_dependency():
  proc = subprocess.run([sys.executable, "-c", (
      "import sys, cejax; cejax.causal_effect; "
      "print(sorted({m.split('.')[0] for m in sys.modules} & "
      "{'orbax', 'tensorflow_datasets', 'matplotlib', 'ml_collections', 'tqdm'}))")],
      capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert proc.stdout.strip() == "[]"


def _modules():
  return sorted(p for p in (ROOT / "cejax").rglob("*.py"))


def test_each_public_name_has_one_public_home():
  """A public module's ``__all__`` lists only names it defines or takes from a private
  module (``cejax._*``); only the package itself gathers names from public modules."""
  for path in _modules():
    rel = path.relative_to(ROOT / "cejax")
    if path.name == "__init__.py" or any(part.startswith("_") for part in rel.parts):
      continue
    tree = ast.parse(path.read_text())
    imported = {}
    for node in ast.walk(tree):
      if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("cejax"):
        for alias in node.names:
          imported[alias.asname or alias.name] = node.module
    names = next((ast.literal_eval(n.value) for n in tree.body if isinstance(n, ast.Assign)
                  and any(getattr(t, "id", "") == "__all__" for t in n.targets)), [])
    borrowed = {n: imported[n] for n in names if n in imported
                and not any(p.startswith("_") for p in imported[n].split("."))}
    assert not borrowed, (str(rel), borrowed)


def test_no_file_has_undefined_or_unused_names_and_the_library_is_lint_clean():
  """Pyflakes' checks (ruff's F rules) on every Python file, scripts and benchmarks
  included (a renamed module once left a benchmark calling names it never imported),
  and the project's whole lint configuration on the library."""
  for args in (["--select", "F", "--ignore", "F722", str(ROOT)],
               [str(ROOT / "cejax"), str(ROOT / "train.py"), str(ROOT / "analyze.py")]):
    proc = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", *args],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-1000:]


def test_every_config_loads_and_passes_the_jobs_checks():
  """Each file in configs/ builds a config whose keys the jobs know and whose analysis
  and sweep settings pass their checks (nothing is run)."""
  import importlib

  from cejax.jobs import config as config_lib

  names = sorted(p.stem for p in (ROOT / "configs").glob("*.py") if p.stem != "__init__")
  assert "synthetic_eval_optimised" in names
  for name in names:
    config = importlib.import_module(f"configs.{name}").get_config()
    for job in ("train", "analysis", "sweep"):
      config_lib.validate(config, job)
