"""The CE estimator against independent references (loops, closed forms, 1 device)."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.ndimage
from compile_count import Compilations as _Compilations
from flax import nnx
from jax import test_util as jtu
from random_networks import random_densenet

from cejax import effects, estimands, interventions, masks
from cejax.forwards import latent
from cejax.jobs import checkpoint
from cejax.models import densenet

H = W = 12
C = 2
K = 4


def make_logits_fn(seed=0):
  """A small nonlinear CNN: conv 3x3 -> tanh -> mean pool -> dense."""
  rng = np.random.default_rng(seed)
  kernel = jnp.asarray(rng.normal(0, 0.5, (3, 3, C, 6)), jnp.float32)
  dense = jnp.asarray(rng.normal(0, 1.0, (6, K)), jnp.float32)
  bias = jnp.asarray(rng.normal(0, 0.1, (K,)), jnp.float32)

  def logits_fn(x):
    y = jax.lax.conv_general_dilated(x, kernel, (1, 1), "SAME",
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return jnp.tanh(y).mean((1, 2)) @ dense * 3 + bias

  return logits_fn


@pytest.fixture(scope="module")
def setup():
  image = jax.random.normal(jax.random.key(1), (H, W, C))
  mask_set = jnp.concatenate([
      masks.to_array(masks.grid(shape=(H, W), n=3)),
      masks.to_array(masks.sliding_windows(shape=(H, W), window=5, stride=4)),
      jax.random.uniform(jax.random.key(2), (3, H, W)),  # soft masks
  ])
  return make_logits_fn(), image, mask_set


def reference_fill(name, image, key):
  """What each intervention writes, from its definition (never the library's ``fill``):
  scipy for the blur; the documented draws (``fold_in(fold_in(key, i), d)``) for the
  random ones."""
  image = np.asarray(image, np.float64)
  if name == "zero":
    return np.zeros_like(image)
  if name == "pixel":
    return np.broadcast_to((0.2 - np.array([0.5, 0.4])) / np.array([0.25, 0.2]), image.shape)
  if name == "mean":
    return np.broadcast_to(image.mean((0, 1)), image.shape)
  if name == "blur":
    return scipy.ndimage.gaussian_filter(image, (1.5, 1.5, 0), mode="nearest")
  if name == "reference":
    return np.asarray(INTERVENTIONS["reference"].image, np.float64)
  if name == "noise":
    return 0.7 * np.asarray(jax.random.normal(key, image.shape), np.float64)
  pool = np.asarray(INTERVENTIONS["imageset"].images, np.float64)
  return pool[int(jax.random.randint(key, (), 0, len(pool)))]


def reference_effect(logits_fn, image, mask, name, estimand, target, activation, key,
                     index):
  """One mask, straight numpy where possible: the definition, written out."""
  intervention = INTERVENTIONS[name]
  image = np.asarray(image, np.float64)
  mask = np.asarray(mask, np.float64)[..., None]
  act = (lambda z: np.exp(z - z.max()) / np.exp(z - z.max()).sum()) if activation == "softmax" \
      else (lambda z: 1 / (1 + np.exp(-z)))
  clean = np.asarray(logits_fn(jnp.asarray(image[None], jnp.float32))[0], np.float64)
  p = act(clean)
  t = int(np.argmax(clean)) if target is None else target
  do_logits, do_probs = [], []
  for d in range(intervention.num_draws):
    k = jax.random.fold_in(jax.random.fold_in(key, index), d)
    v = reference_fill(name, image, k)
    x = image * (1 - mask) + v * mask
    z = np.asarray(logits_fn(jnp.asarray(x[None], jnp.float32))[0], np.float64)
    do_logits.append(z)
    do_probs.append(act(z))
  z, q = np.mean(do_logits, 0), np.mean(do_probs, 0)
  if estimand == "expected" and activation == "softmax":
    return np.sum(p * (q - p))
  if estimand == "expected":  # each finding a binary variable: sum_y p(y)(q(y) - p(y))
    return np.sum(p * (q - p) + (1 - p) * ((1 - q) - (1 - p)))
  if estimand == "probability":
    return q[t] - p[t]
  if estimand == "logit":
    return z[t] - clean[t]
  if estimand == "per_class":
    return q - p
  if activation == "softmax":
    return np.sum(p * (np.log(p) - np.log(q)))
  return np.sum(p * np.log(p / q) + (1 - p) * np.log((1 - p) / (1 - q)))


INTERVENTIONS = {
    "zero": interventions.Constant(),
    "pixel": interventions.Constant(0.2, space="pixel", mean=[0.5, 0.4], std=[0.25, 0.2]),
    "mean": interventions.ImageMean(),
    "blur": interventions.Blur(sigma=1.5),
    "reference": interventions.Reference(np.linspace(-1, 1, H * W * C).reshape(H, W, C)),
    "noise": interventions.GaussianNoise(std=0.7, num_draws=3),
    "imageset": interventions.ImageSet(np.random.default_rng(0).normal(size=(5, H, W, C)),
                                       num_draws=3),
}


@pytest.mark.parametrize("name", sorted(INTERVENTIONS))
@pytest.mark.parametrize("estimand", estimands.ESTIMANDS)
def test_sweep_equals_python_loop(setup, name, estimand):
  logits_fn, image, mask_set = setup
  intervention = INTERVENTIONS[name]
  sigmoid_cases = ("per_class", "kl", "expected", "probability")
  activation = "sigmoid" if estimand in sigmoid_cases and name == "zero" else "softmax"
  key = jax.random.key(7)
  result = effects.causal_effect(logits_fn, image, mask_set, intervention=intervention,
                                 estimand=estimand, batch_size=4, key=key,
                                 activation=activation)
  expected = np.stack([
      reference_effect(logits_fn, image, m, name, estimand, None, activation, key, i)
      for i, m in enumerate(mask_set)])
  np.testing.assert_allclose(result.effects, expected, rtol=1e-5, atol=1e-6)
  assert int(result.target) == int(np.argmax(logits_fn(image[None])[0]))


def test_empty_mask_is_zero_and_full_mask_replaces_the_image(setup):
  logits_fn, image, _ = setup
  two = jnp.stack([jnp.zeros((H, W)), jnp.ones((H, W))])
  ref = jnp.asarray(INTERVENTIONS["reference"].image, jnp.float32)
  for estimand in estimands.ESTIMANDS:
    r = effects.causal_effect(logits_fn, image, two,
                              intervention=interventions.Reference(ref), estimand=estimand,
                              target=1)
    np.testing.assert_allclose(r.effects[0], 0.0, atol=1e-6)
    whole = estimands.ESTIMANDS[estimand](
        logits_fn(image[None])[0], logits_fn(ref[None])[0],
        jax.nn.softmax(logits_fn(ref[None])[0]), 1, "softmax")
    np.testing.assert_allclose(r.effects[1], whole, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("batch_size", [1, 3, 7, 13, 100])
def test_every_batch_size_gives_the_same_result(setup, batch_size):
  logits_fn, image, mask_set = setup
  kw = dict(intervention=interventions.GaussianNoise(num_draws=2), estimand="probability",
            key=jax.random.key(3))
  base = effects.causal_effect(logits_fn, image, mask_set, batch_size=len(mask_set), **kw)
  other = effects.causal_effect(logits_fn, image, mask_set, batch_size=batch_size, **kw)
  np.testing.assert_allclose(other.effects, base.effects, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("num_devices", [1, 4, 8])
def test_sharded_sweep_equals_one_device(setup, num_devices):
  logits_fn, image, mask_set = setup
  mesh = jax.make_mesh((num_devices,), ("masks",), devices=jax.devices()[:num_devices])
  kw = dict(intervention=interventions.GaussianNoise(num_draws=2), estimand="expected",
            key=jax.random.key(3), batch_size=2)
  base = effects.causal_effect(logits_fn, image, mask_set, **kw)
  sharded = jax.jit(lambda im: effects.causal_effect(logits_fn, im, mask_set, mesh=mesh,
                                                     **kw))(image)
  np.testing.assert_allclose(sharded.effects, base.effects, rtol=1e-6, atol=1e-7)


def test_rise_recipe_sharded_equals_materialized(setup):
  logits_fn, image, _ = setup
  recipe = masks.rise(jax.random.key(5), num=37, shape=(H, W), cells=3, p=0.5)
  materialized = masks.to_array(recipe)
  mesh = jax.make_mesh((8,), ("masks",))
  a = effects.causal_effect(logits_fn, image, recipe, batch_size=3, mesh=mesh)
  b = effects.causal_effect(logits_fn, image, materialized, batch_size=5)
  np.testing.assert_allclose(a.effects, b.effects, rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(effects.ce_map(a.effects, recipe, batch_size=4),
                             effects.ce_map(b.effects, materialized), rtol=1e-5, atol=1e-7)


def test_sweep_is_traced_once(setup):
  logits_fn, image, mask_set = setup

  @jax.jit
  @chex.assert_max_traces(n=1)
  def run(im, ms):
    return effects.causal_effect(logits_fn, im, ms, batch_size=4).effects

  for s in range(3):
    run(image + s, mask_set)


def test_vmap_over_images_equals_loop(setup):
  logits_fn, image, mask_set = setup
  images = jnp.stack([image, -image, image * 0.5])
  f = lambda im: effects.causal_effect(logits_fn, im, mask_set, estimand="logit",
                                       batch_size=4).effects
  batched = jax.jit(jax.vmap(f))(images)
  for i in range(3):
    np.testing.assert_allclose(batched[i], f(images[i]), rtol=1e-5, atol=1e-6)


def test_gradient_matches_finite_differences(setup):
  logits_fn, image, mask_set = setup
  f = lambda im: effects.causal_effect(logits_fn, im, mask_set[:5], estimand="expected",
                                       intervention=interventions.Blur(sigma=1.0),
                                       batch_size=2).effects.sum()
  jtu.check_grads(f, (image,), order=1, modes=["rev"], atol=1e-2, rtol=1e-2)


def test_ce_map_coverage_and_sliding_borders():
  sliding = masks.to_array(masks.sliding_windows(shape=(10, 10), window=4, stride=4))
  # Captum's placement: starts 0, 4, 8; the last window is cut at the edge (no extra
  # window flush with it).
  assert masks.window_starts(10, 4, 4) == [0, 4, 8]
  assert masks.window_starts(10, 4, 3) == [0, 3, 6]
  coverage = np.asarray(sliding.sum(0))
  np.testing.assert_array_equal(coverage, np.ones((10, 10)))
  np.testing.assert_array_equal(sliding[2].sum(0), [0] * 8 + [4, 4])
  with pytest.raises(ValueError, match="larger than window"):
    masks.to_array(masks.sliding_windows(shape=(10, 10), window=3, stride=4))
  effects_ = jnp.arange(len(sliding), dtype=jnp.float32)
  cmap = effects.ce_map(effects_, sliding, batch_size=4)
  loop = sum(e * m for e, m in zip(np.asarray(effects_), np.asarray(sliding))) / coverage
  np.testing.assert_allclose(cmap, loop, rtol=1e-6)
  # grid blocks partition the image
  grid = masks.to_array(masks.grid(shape=(10, 7), n=3))
  np.testing.assert_array_equal(grid.sum(0), np.ones((10, 7)))


def test_ce_map_rise_weighting_is_the_kept_weighted_sum():
  recipe = masks.rise(jax.random.key(2), num=23, shape=(9, 7), cells=3, p=0.3)
  values = np.asarray(jax.random.normal(jax.random.key(3), (23, 2)))
  kept = 1 - np.asarray(masks.to_array(recipe), np.float64)
  ref = np.einsum("mk,mhw->hwk", values, kept) / (23 * 0.3)
  np.testing.assert_allclose(effects.ce_map(values, recipe, weighting="rise", batch_size=5),
                             ref, rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match="needs the RiseMasks source"):
    effects.ce_map(values[:, 0], masks.to_array(recipe), weighting="rise")


def test_blur_equals_scipy_gaussian_filter():
  image = np.asarray(jax.random.normal(jax.random.key(4), (13, 11, 2)))
  for sigma in (0.8, 2.0, 5.0):
    ref = scipy.ndimage.gaussian_filter(image.astype(np.float64), (sigma, sigma, 0),
                                        mode="nearest")
    fill = jax.jit(interventions.Blur(sigma=sigma).fill)
    np.testing.assert_allclose(fill(jnp.asarray(image), None), ref, rtol=1e-5, atol=1e-6)
    # Shifted slices, not gathers: a gather per tap made every program that holds a
    # blur twice as large to compile (128 fusions against 63 for a grid CE program).
    assert "gather" not in str(jax.make_jaxpr(fill)(jnp.asarray(image), None))


def test_rise_masks_keep_fraction_p():
  for p in (0.3, 0.5, 0.8):
    recipe = masks.rise(jax.random.key(0), num=400, shape=(32, 32), cells=6, p=p)
    kept = 1.0 - jax.jit(lambda r, i: r(i))(recipe, jnp.arange(400))
    assert float(kept.mean()) == pytest.approx(p, abs=0.03)
    assert float(kept.min()) >= 0.0 and float(kept.max()) <= 1.0


def test_materializing_a_mask_source_is_one_compiled_program():
  # Found: masks.to_array ran a source eagerly, so a RISE recipe compiled each of its
  # operations (about 25 programs) on first use.
  recipe = masks.rise(jax.random.key(11), num=9, shape=(13, 11), cells=3, p=0.4)
  with _Compilations() as compiled:
    dense = masks.to_array(recipe)
  assert compiled.count == 1 and dense.shape == (9, 13, 11)


def test_box_masks_cover_fractional_pixels():
  m = masks.to_array(masks.boxes([[1.5, 0, 3, 2]], shape=(3, 4)))
  np.testing.assert_allclose(m[0], [[0, .5, 1, 0], [0, .5, 1, 0], [0, 0, 0, 0]])


def test_bad_input_raises_clear_errors(setup):
  logits_fn, image, mask_set = setup
  ce = lambda **kw: effects.causal_effect(logits_fn, kw.pop("image", image),
                                          kw.pop("masks", mask_set), **kw)
  with pytest.raises(ValueError, match="spatial shape"):
    ce(masks=jnp.zeros((2, H + 1, W)))
  with pytest.raises(ValueError, match="empty"):
    ce(masks=jnp.zeros((0, H, W)))
  with pytest.raises(ValueError, match="NaN or infinite"):
    ce(image=image.at[0, 0, 0].set(jnp.inf))
  with pytest.raises(ValueError, match="batch_size must be a positive"):
    ce(batch_size=0)
  with pytest.raises(ValueError, match="target must be a class index in \\[0, 4\\)"):
    ce(target=4, estimand="probability")
  with pytest.raises(ValueError, match="valid estimands"):
    ce(estimand="ate")
  with pytest.raises(ValueError, match="Unknown intervention"):
    ce(intervention="gray")
  with pytest.raises(ValueError, match="pass key="):
    ce(intervention=interventions.GaussianNoise())
  with pytest.raises(ValueError, match="floating point"):
    ce(image=jnp.round(image * 10).astype(jnp.int32))
  with pytest.raises(ValueError, match=r"masks must lie in \[0, 1\]"):
    ce(masks=mask_set * 2)
  with pytest.raises(ValueError, match=r"masks must lie in \[0, 1\]"):
    interventions.intervene(image, -mask_set[0], 0.0)
  with pytest.raises(ValueError, match="Unknown activation"):
    ce(activation="softmx")


def test_bad_values_under_jit_are_nan_never_silent(setup):
  """Traced values cannot raise: the documented contract is a NaN result."""
  logits_fn, image, mask_set = setup
  ce = jax.jit(lambda im, m, t: effects.causal_effect(
      logits_fn, im, m, estimand="probability", target=t, batch_size=4).effects)
  good = np.asarray(ce(image, mask_set, 1))
  assert np.isfinite(good).all()
  for bad_target in (4, -1, 100):  # out of range: never clamped, never wrapped
    assert np.isnan(np.asarray(ce(image, mask_set, bad_target))).all()
  assert np.isnan(np.asarray(ce(image.at[3, 4, 1].set(jnp.nan), mask_set, 1))).all()
  out = np.asarray(ce(image, mask_set.at[2, 0, 0].set(1.5), 1))
  assert np.isnan(out[2]) and np.isfinite(np.delete(out, 2)).all()
  np.testing.assert_allclose(np.delete(out, 2), np.delete(good, 2))
  # vmap over images: the bad image only.
  images = jnp.stack([image, image.at[0, 0, 0].set(jnp.inf)])
  out = jax.vmap(lambda im: effects.causal_effect(logits_fn, im, mask_set,
                                                  batch_size=4).effects)(images)
  assert np.isfinite(np.asarray(out[0])).all() and np.isnan(np.asarray(out[1])).all()


# --- latent --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_stage():
  # The tiny preset cut to two blocks of two layers (the smoke runs' network).
  model = random_densenet(lambda: densenet.DenseNetTiny(num_classes=5, in_channels=1,
                                                      block_config=(2, 2),
                                                      rngs=nnx.Rngs(0)))
  graphdef, params, stats = nnx.split(model, nnx.Param, nnx.BatchStat)
  return graphdef, nnx.to_pure_dict(params), nnx.to_pure_dict(stats)


def test_latent_prefix_reuse_equals_full_recomputation(tiny_stage):
  graphdef, params, stats = tiny_stage
  stage = "block2"
  prefix, suffix = checkpoint.make_stage_fns(graphdef, params, stats, stage)
  image = jax.random.normal(jax.random.key(4), (32, 32, 1))
  h_shape = prefix(image[None]).shape[1:]
  regions = masks.to_array(masks.grid(shape=h_shape[:2], n=2))
  inter = latent.latent_interventions(channels=[0, 5, 17], values=[0.0, 2.0],
                                      regions=regions)
  mesh = jax.make_mesh((4,), ("masks",), devices=jax.devices()[:4])
  result = effects.causal_effect(latent.forward(prefix, suffix), image, inter,
                                 estimand="probability", batch_size=5, mesh=mesh)
  model = nnx.merge(graphdef, params, stats)

  @jax.jit  # one program (run eagerly, each operation would compile on its own)
  def reference(channel, value, region):
    h = model.forward_to(image[None], stage)[0]  # recomputed every time
    h = h.at[..., channel].set(h[..., channel] * (1 - region) + value * region)
    clean = model(image[None])[0]
    return clean, jax.nn.softmax(clean), jax.nn.softmax(model.forward_from(h[None], stage)[0])

  t = int(result.target)
  for i in range(len(inter.channels)):
    clean, p, q = reference(inter.channels[i], inter.values[i], inter.regions[i])
    np.testing.assert_allclose(result.effects[i], q[t] - p[t], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(result.clean_logits, clean, rtol=1e-5, atol=1e-6)


def test_latent_sweep_under_jit_and_bad_channels(tiny_stage):
  graphdef, params, stats = tiny_stage
  prefix, suffix = checkpoint.make_stage_fns(graphdef, params, stats, "transition1")
  image = jax.random.normal(jax.random.key(4), (32, 32, 1))
  inter = latent.latent_interventions(channels=[1, 2, 3], values=[0.0, 1.0])
  eager = effects.causal_effect(latent.forward(prefix, suffix), image, inter, batch_size=4)
  jitted = jax.jit(lambda im: effects.causal_effect(latent.forward(prefix, suffix), im,
                                                    inter, batch_size=4))(image)
  np.testing.assert_allclose(jitted.effects, eager.effects, rtol=1e-5, atol=1e-7)
  with pytest.raises(ValueError, match="channels must be in"):
    effects.causal_effect(latent.forward(prefix, suffix), image,
                          latent.latent_interventions(channels=[999]))
  with pytest.raises(ValueError, match="valid stages"):
    checkpoint.make_stage_fns(graphdef, params, stats, "block7")


# --- compile once, open protocols ------------------------------------------------------

def test_repeated_eager_calls_compile_once(setup, tiny_stage):
  logits_fn, image, mask_set = setup
  grid = masks.to_array(masks.grid(shape=(H, W), n=3))
  other = jax.random.normal(jax.random.key(9), (H, W, C))
  noise = interventions.GaussianNoise(std=0.5, num_draws=2)
  calls = [
      lambda im: effects.causal_effect(logits_fn, im, grid, batch_size=4).effects,
      lambda im: effects.causal_effect(logits_fn, im, grid, intervention=noise,
                                       key=jax.random.key(1), batch_size=4).effects,
      lambda im: effects.ce_map(effects.causal_effect(logits_fn, im, grid).effects, grid),
  ]
  for call in calls:
    call(image)  # the first call compiles
    with _Compilations() as compiled:
      call(other)  # a new image with the same shapes and settings
    assert compiled.count == 0
  # New settings compile anew; a new intervention value of the same type does not.
  with _Compilations() as compiled:
    effects.causal_effect(logits_fn, other, grid, batch_size=4,
                          intervention=interventions.GaussianNoise(std=2.0, num_draws=2),
                          key=jax.random.key(2))
  assert compiled.count == 0
  with _Compilations() as compiled:
    effects.causal_effect(logits_fn, other, grid, batch_size=5)
  assert compiled.count >= 1
  graphdef, params, stats = tiny_stage
  prefix, suffix = checkpoint.make_stage_fns(graphdef, params, stats, "transition1")
  inter = latent.latent_interventions(channels=[0, 3], values=[0.0])
  x = jax.random.normal(jax.random.key(4), (32, 32, 1))
  effects.causal_effect(latent.forward(prefix, suffix), x, inter, batch_size=2)
  x2 = x + 1
  with _Compilations() as compiled:
    effects.causal_effect(latent.forward(prefix, suffix), x2, inter, batch_size=2)
  assert compiled.count == 0


def test_interventions_pass_through_jit_as_arguments(setup):
  logits_fn, image, mask_set = setup

  @jax.jit
  def run(intervention, key):
    return effects.causal_effect(logits_fn, image, mask_set, intervention=intervention,
                                 key=key, batch_size=4).effects

  key = jax.random.key(3)
  for intervention in (interventions.Constant(0.3), interventions.Blur(sigma=1.0),
                       interventions.GaussianNoise(std=0.5, num_draws=2),
                       interventions.Constant(0.2, space="pixel", mean=[0.5, 0.4],
                                              std=[0.25, 0.2]),
                       interventions.ImageSet(np.zeros((2, H, W, C), np.float32),
                                              num_draws=2)):
    eager = effects.causal_effect(logits_fn, image, mask_set, intervention=intervention,
                                  key=key, batch_size=4).effects
    np.testing.assert_allclose(run(intervention, key), eager, rtol=1e-5, atol=1e-7)
  # Static fields stay static: num_draws and sigma are not leaves.
  assert jax.tree.leaves(interventions.GaussianNoise(std=0.5, num_draws=3)) == [0.5, 0.0]
  assert jax.tree.leaves(interventions.Blur(sigma=2.0)) == []


def test_user_defined_intervention_mask_source_and_estimand(setup):
  """Plugged in without touching the library: an object with fill/num_draws, a lazy mask
  recipe with num/shape/__call__, and a plain function as estimand."""
  import dataclasses

  logits_fn, image, _ = setup

  @dataclasses.dataclass(frozen=True)
  class Checkerboard:  # hashable, not a pytree: a static setting
    num_draws: int = 1

    def fill(self, im, key):
      del key
      board = (jnp.indices(im.shape[:2]).sum(0) % 2).astype(im.dtype)
      return jnp.broadcast_to(board[..., None], im.shape)

  @dataclasses.dataclass(frozen=True)
  class Rows:  # every row of the image, made on the device
    num: int = H
    shape: tuple = (H, W)

    def __call__(self, indices):
      return (jnp.arange(H)[None, :, None] == indices[:, None, None]).astype(
          jnp.float32) * jnp.ones((1, 1, W))

  def log_odds_drop(clean_logits, do_logits, do_probs, target, activation):
    del do_logits, activation
    p = jax.nn.softmax(clean_logits)[target]
    q = do_probs[..., target]
    return jnp.log(p / (1 - p)) - jnp.log(q / (1 - q))

  result = effects.causal_effect(logits_fn, image, Rows(), intervention=Checkerboard(),
                                 estimand=log_odds_drop, target=1, batch_size=5)
  board = (np.indices((H, W)).sum(0) % 2)[..., None]
  p = np.asarray(jax.nn.softmax(logits_fn(image[None])[0]))[1]
  for r in range(H):
    m = np.zeros((H, W, 1))
    m[r] = 1
    x = np.asarray(image) * (1 - m) + board * m
    q = np.asarray(jax.nn.softmax(logits_fn(jnp.asarray(x[None], jnp.float32))[0]))[1]
    np.testing.assert_allclose(result.effects[r], np.log(p / (1 - p)) - np.log(q / (1 - q)),
                               rtol=1e-4, atol=1e-5)
  with pytest.raises(ValueError, match="needs fill"):
    effects.causal_effect(logits_fn, image, Rows(), intervention=object())


@pytest.mark.parametrize("shape,window,stride", [((10, 10), 4, 3), ((32, 17), (7, 5), (5, 2)),
                                                 ((9, 9), 9, 1)])
def test_lazy_sliding_windows_and_grid_equal_the_dense_masks(shape, window, stride):
  recipe = masks.sliding_windows(shape=shape, window=window, stride=stride)
  dense = masks.to_array(masks.sliding_windows(shape=shape, window=window, stride=stride))
  assert recipe.num == len(dense)
  np.testing.assert_array_equal(recipe(jnp.arange(recipe.num)), dense)
  grid = masks.grid(shape=shape, n=3)
  np.testing.assert_array_equal(grid(jnp.arange(9)), masks.to_array(masks.grid(shape=shape, n=3)))
  with pytest.raises(ValueError, match="larger than window"):
    masks.sliding_windows(shape=(10, 10), window=3, stride=4)


def test_sweep_over_a_lazy_recipe_equals_the_dense_masks_and_passes_jit(setup):
  logits_fn, image, _ = setup
  recipe = masks.sliding_windows(shape=(H, W), window=5, stride=2)
  dense = masks.to_array(masks.sliding_windows(shape=(H, W), window=5, stride=2))
  lazy = effects.causal_effect(logits_fn, image, recipe, batch_size=7).effects
  # Masks made inside the program fuse differently: float32 round-off only.
  np.testing.assert_allclose(lazy, effects.causal_effect(logits_fn, image, dense,
                                                         batch_size=7).effects, atol=1e-7)
  as_arg = jax.jit(lambda m: effects.causal_effect(logits_fn, image, m, batch_size=7).effects)
  np.testing.assert_allclose(as_arg(recipe), lazy, atol=1e-7)
  np.testing.assert_allclose(effects.ce_map(lazy, recipe, batch_size=8),
                             effects.ce_map(lazy, dense, batch_size=8), atol=1e-7)


def test_lazy_boxes_equal_box_masks_and_pass_jit(setup):
  logits_fn, image, _ = setup
  coords = np.array([[0, 0, 4, 4], [2.5, 1, 9, 6.5], [6, 6, 12, 12]], np.float32)
  recipe = masks.boxes(coords, shape=(H, W))
  dense = masks.to_array(masks.boxes(coords, shape=(H, W)))
  np.testing.assert_array_equal(recipe(jnp.arange(3)), dense)
  lazy = jax.jit(lambda r: effects.causal_effect(logits_fn, image, r, batch_size=2).effects)
  np.testing.assert_allclose(lazy(recipe), effects.causal_effect(
      logits_fn, image, dense, batch_size=2).effects, atol=1e-7)


def test_what_a_user_hits_gets_a_clear_error(setup, tiny_stage):
  """Each of these passed silently or failed deep in XLA on the old code: a float target
  (used as class 2), an image too small for the network (every effect NaN), a 3-channel
  image on a 1-channel model, a NaN mask (reported as "values in [0, 1]"), and
  GaussianNoise(0.5, 4) (a mean of 4)."""
  from cejax import attacks, saliency

  logits_fn, image, mask_set = setup
  with pytest.raises(ValueError, match="target must be one integer class index"):
    effects.causal_effect(logits_fn, image, mask_set, estimand="probability", target=2.7)
  with pytest.raises(ValueError, match="targets must be integer class indices"):
    saliency.vanilla_gradient(logits_fn, image[None], np.array([2.7]))
  with pytest.raises(ValueError, match="labels must be integer class indices"):
    attacks.fgsm(logits_fn, jax.nn.sigmoid(image)[None], np.array([1.0]), eps=0.1,
                 space=attacks.PixelSpace())
  with pytest.raises(ValueError, match=r"got 1 NaN or infinite values"):
    effects.causal_effect(logits_fn, image, mask_set.at[0, 0, 0].set(jnp.nan))
  graphdef, params, stats = tiny_stage
  tiny = lambda x: nnx.merge(graphdef, params, stats)(x)  # noqa: E731
  small = jax.random.normal(jax.random.key(0), (4, 4, 1))
  with pytest.raises(ValueError, match="4 x 4 are too small.*at least 5 x 5"):
    effects.causal_effect(tiny, small, masks.grid(shape=(4, 4), n=2))
  with pytest.raises(ValueError, match="takes 1-channel images, got 3 channels"):
    effects.causal_effect(tiny, jnp.zeros((32, 32, 3)), masks.grid(shape=(32, 32), n=2))
  with pytest.raises(TypeError):
    interventions.GaussianNoise(0.5, 4)  # noqa: B018
  assert interventions.GaussianNoise(0.5, num_draws=4).mean == 0.0
