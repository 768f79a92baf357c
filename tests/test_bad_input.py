"""Bad input a new user gives, each answered early and clearly (every case here was
answered late, wrongly or not at all before: the test names say how), and long
optimisations that show their progress."""

import subprocess
import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from compile_count import Compilations
from conftest import ROOT

from cejax import attacks, effects, masks, metrics
from cejax.optimised import ce_optimal, counterfactual, extremal

K = 5


def _logits_fn(x):
  """5 classes from a 3-channel image (the mean of each channel and their products)."""
  m = x.mean((1, 2))
  return jnp.concatenate([m, m[:, :2] * m[:, 1:3]], -1)


@pytest.mark.parametrize("label", [9, -1, 100])
@pytest.mark.parametrize("attack", ["fgsm", "pgd"])
def test_attack_labels_outside_the_models_classes_are_refused(attack, label):
  """Once answered with success=[True, True]: the loss's gather clamped the class."""
  pixels = jnp.full((2, 8, 8, 3), 0.5)
  kwargs = dict(eps=0.1, space=attacks.PixelSpace())
  if attack == "pgd":
    kwargs.update(key=jax.random.key(0), steps=2)
  with pytest.raises(ValueError, match=r"labels must be classes in \[0, 5\) of the model's 5"):
    getattr(attacks, attack)(_logits_fn, pixels, jnp.array([0, label]), **kwargs)


def test_a_channels_first_image_is_named_as_such():
  """Once: 'masks have spatial shape (64, 64) but the image is (1, 64)'."""
  image = jnp.zeros((1, 64, 64))
  with pytest.raises(ValueError, match=r"looks channels-first .*moveaxis"):
    effects.causal_effect(_logits_fn, image, masks.grid(shape=(64, 64), n=4))
  with pytest.raises(ValueError, match="looks channels-first"):
    ce_optimal.ce_optimal_mask(_logits_fn, jnp.zeros((2, 3, 32, 32)), jnp.zeros(2, jnp.int32))
  with pytest.raises(ValueError, match="looks channels-first"):
    attacks.fgsm(_logits_fn, jnp.zeros((2, 3, 32, 32)), jnp.zeros(2, jnp.int32), eps=0.1,
                 space=attacks.PixelSpace())


def test_a_target_out_of_range_is_refused_before_the_model_compiles():
  """Once refused only after the model had compiled and run (13 s on DenseNet-121)."""
  image = jnp.ones((8, 8, 3))
  with Compilations() as compiled, pytest.raises(ValueError, match=r"\[0, 5\), got 7"):
    effects.causal_effect(_logits_fn, image, masks.grid(shape=(8, 8), n=2), target=7)
  assert compiled.count == 0
  with pytest.raises(ValueError, match=r"targets must be classes in \[0, 5\)"):
    metrics.deletion_insertion(_logits_fn, jnp.ones((2, 8, 8, 3)), jnp.ones((2, 8, 8)),
                               jnp.array([0, 5]))


def test_a_mistyped_sweep_estimand_lists_names_and_the_closest():
  """Once listed ``<function expected at 0x...>`` for the valid values."""
  from cejax.jobs import config as config_lib

  config = config_lib.base_config()
  config.sweep.estimands = ("expectd",)
  with pytest.raises(ValueError) as error:
    config_lib.validate(config, "sweep")
  message = str(error.value)
  assert "Did you mean 'expected'?" in message and "'probability'" in message
  assert "<function" not in message


@pytest.mark.parametrize("script", ["train.py", "analyze.py"])
def test_help_exits_with_status_zero(script):
  """absl's --help exits with 1, which a shell reads as a failure."""
  proc = subprocess.run([sys.executable, str(ROOT / script), "--help"], capture_output=True,
                        text=True, timeout=120, cwd=ROOT)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "--workdir" in proc.stdout + proc.stderr


def _box_model(size=16):
  box = np.zeros((size, size), np.float32)
  box[4:9, 8:13] = 1
  weights = jnp.asarray(box / box.sum())
  return lambda x: jnp.stack([25 * jnp.sum(x[..., 0] * weights, (1, 2)) - 10,
                              jnp.full(x.shape[0], 5.0)], -1)


@pytest.mark.heavy
def test_long_optimisations_show_progress_and_it_never_changes_the_result(capfd):
  """ce_optimal_mask and minimal_counterfactual ran 11 minutes on two images with no sign
  of progress; their bar counts every iteration of every chunk of images."""
  logits_fn, images = _box_model(), jnp.ones((2, 16, 16, 1))
  kwargs = dict(areas=(0.1,), iterations=100, step=2, sigma=3.0)  # whole segments
  shown = ce_optimal.ce_optimal_mask(logits_fn, images, jnp.zeros(2, jnp.int32), **kwargs)
  err = capfd.readouterr().err
  assert "optimised masks" in err and "200/200" in err  # 2 chunks x 100 iterations
  quiet = ce_optimal.ce_optimal_mask(logits_fn, images, jnp.zeros(2, jnp.int32),
                                   progress=False, **kwargs)
  assert "optimised masks" not in capfd.readouterr().err
  for got, want in zip(quiet, shown, strict=True):
    np.testing.assert_array_equal(got, want)
  counterfactual.minimal_counterfactual(logits_fn, images, areas=(0.1, 0.3),
                                        bisection_steps=1, iterations=50, step=2, sigma=3.0)
  err = capfd.readouterr().err
  assert "minimal counterfactual" in err and "200/200" in err  # 2 rounds x 2 x 50


def test_a_dead_objective_is_diagnosed_and_warned_about():
  """A confident model deleted whole: the probability's gradient vanishes against the
  area term's (the old default); the log-odds' does not."""
  logits_fn, images = _box_model(), jnp.ones((1, 16, 16, 1))
  kwargs = dict(areas=(0.1,), iterations=20, step=2, sigma=3.0, start=1.0)
  with pytest.warns(UserWarning, match="1 of 1 masks .* shaped by the area constraint"):
    dead = ce_optimal.ce_optimal_mask(logits_fn, images, jnp.zeros(1, jnp.int32),
                                    objective="probability", **kwargs)
  assert extremal.dead_objective(dead).all()
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    alive = ce_optimal.ce_optimal_mask(logits_fn, images, jnp.zeros(1, jnp.int32),
                                     objective="log_odds", **kwargs)
  assert not extremal.dead_objective(alive).any()
  assert extremal.gradient_ratio(alive)[0, 0, 0] > 1e3 * extremal.gradient_ratio(dead)[0, 0, 0]


def test_gradient_norms_equal_finite_differences_of_the_recorded_terms():
  """The diagnostics' norms against central differences of the first iteration's
  reward and area term (``reward[..., 0]``, ``area_term[..., 0]``: their values at
  ``init``), one parameter at a time."""
  logits_fn, image = _box_model(8), jnp.linspace(0.2, 1, 64).reshape(1, 8, 8, 1)
  kwargs = dict(areas=(0.2,), iterations=1, step=2, sigma=3.0, objective="log_odds",
                progress=False)
  init = np.random.default_rng(0).uniform(0.3, 0.7, (1, 1, 4, 4)).astype(np.float32)
  result = ce_optimal.ce_optimal_mask(logits_fn, image, jnp.zeros(1, jnp.int32), init=init,
                                    **kwargs)
  eps = 3e-3  # small: the area term has kinks where two mask values swap ranks
  reward_fd, area_fd = np.zeros(16), np.zeros(16)
  for i in range(16):
    step = np.zeros(16, np.float32)
    step[i] = eps
    ends = [ce_optimal.ce_optimal_mask(logits_fn, image, jnp.zeros(1, jnp.int32),
                                     init=init + sign * step.reshape(1, 1, 4, 4), **kwargs)
            for sign in (1, -1)]
    reward_fd[i] = (ends[0].reward[0, 0, 0] - ends[1].reward[0, 0, 0]) / (2 * eps)
    area_fd[i] = (ends[0].area_term[0, 0, 0] - ends[1].area_term[0, 0, 0]) / (2 * eps)
  np.testing.assert_allclose(result.reward_grad[0, 0, 0], np.linalg.norm(reward_fd),
                             rtol=2e-2)
  np.testing.assert_allclose(result.area_grad[0, 0, 0], np.linalg.norm(area_fd), rtol=2e-2)
