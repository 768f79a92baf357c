"""Any model, wrapped as a ``logits_fn`` in two lines: Flax NNX, Flax Linen, Equinox, and
an NCHW model through ``adapters.from_nchw``. Each runs a CE sweep (against a Python
loop), a saliency method (against ``jax.grad`` of the model itself) and an attack."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen, nnx

from cejax import adapters, attacks, effects, masks, saliency

SIZE, C, K = 8, 2, 3


class _NNXNet(nnx.Module):
  def __init__(self, rngs):
    self.conv = nnx.Conv(C, 4, (3, 3), rngs=rngs)
    self.head = nnx.Linear(4, K, rngs=rngs)

  def __call__(self, x):
    return self.head(jnp.tanh(self.conv(x)).mean((1, 2)))


class _LinenNet(linen.Module):
  @linen.compact
  def __call__(self, x):
    return linen.Dense(K)(jnp.tanh(linen.Conv(4, (3, 3))(x)).mean((1, 2)))


class _LinenNCHW(linen.Module):
  """Takes (n, c, h, w), as a PyTorch model would."""

  @linen.compact
  def __call__(self, x):
    return _LinenNet()(jnp.transpose(x, (0, 2, 3, 1)))


def _model(name):
  """The network of one library, as ``images -> logits`` (built only when asked for:
  initialising each eagerly compiles its operations)."""
  key = jax.random.key(0)
  x = jnp.zeros((1, SIZE, SIZE, C))
  if name == "nnx":
    graphdef, state = nnx.split(_NNXNet(nnx.Rngs(0)))
    return lambda images: nnx.merge(graphdef, state)(images)
  if name == "linen":
    return functools.partial(_LinenNet().apply, _LinenNet().init(key, x))
  if name == "nchw":
    nchw_vars = _LinenNCHW().init(key, jnp.zeros((1, C, SIZE, SIZE)))
    return adapters.from_nchw(functools.partial(_LinenNCHW().apply, nchw_vars))
  eqx = pytest.importorskip("equinox")
  keys = jax.random.split(key, 2)
  conv = eqx.nn.Conv2d(C, 4, 3, padding=1, key=keys[0])  # Equinox convs take (c, h, w)
  head = eqx.nn.Linear(4, K, key=keys[1])
  return jax.vmap(lambda image: head(jnp.tanh(conv(jnp.transpose(image, (2, 0, 1))))
                                     .mean((1, 2))))


@pytest.mark.parametrize("name", ["nnx", "linen", "equinox", "nchw"])
def test_ce_saliency_and_attack_run_on_any_model(name):
  logits_fn = _model(name)
  image = jax.random.normal(jax.random.key(1), (SIZE, SIZE, C))
  grid = masks.to_array(masks.grid(shape=(SIZE, SIZE), n=2))
  result = effects.causal_effect(logits_fn, image, grid, estimand="probability", target=1,
                                 batch_size=3)
  # Plain forward passes of the image and of each masked image (one compiled call).
  masked = np.concatenate([np.asarray(image)[None],
                           np.asarray(image) * (1 - np.asarray(grid)[..., None])])
  probs = jax.nn.softmax(jax.jit(logits_fn)(masked))[:, 1]
  np.testing.assert_allclose(result.effects, probs[1:] - probs[0], rtol=1e-5, atol=1e-6)
  images = jnp.stack([image, -image])
  targets = jnp.array([0, 2])
  grads = jax.jit(jax.grad(
      lambda x: jnp.take_along_axis(logits_fn(x), targets[:, None], 1).sum()))(images)
  np.testing.assert_allclose(saliency.vanilla_gradient(logits_fn, images, targets),
                             jnp.abs(grads).max(-1), rtol=1e-5, atol=1e-7)
  pixels = jax.nn.sigmoid(images)
  labels = jnp.argmax(logits_fn(pixels), -1)
  res = attacks.fgsm(logits_fn, pixels, labels, eps=0.05, space=attacks.PixelSpace())
  np.testing.assert_allclose(res.linf, 0.05, rtol=1e-5)
  assert bool(jnp.isfinite(res.logits).all())


def test_nchw_adapter_equals_the_nhwc_network_with_the_same_weights():
  nchw_vars = _LinenNCHW().init(jax.random.key(3), jnp.zeros((1, C, SIZE, SIZE)))
  logits_fn = adapters.from_nchw(functools.partial(_LinenNCHW().apply, nchw_vars))
  nhwc_vars = {"params": nchw_vars["params"]["_LinenNet_0"]}
  images = jax.random.normal(jax.random.key(2), (2, SIZE, SIZE, C))
  np.testing.assert_allclose(logits_fn(images), _LinenNet().apply(nhwc_vars, images),
                             rtol=1e-6, atol=1e-6)
