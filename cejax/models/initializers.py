"""Weight initialisers equal to JAX's, bit for bit, that compile a few programs instead
of one per weight shape.

``jax.random.normal(key, shape)`` compiles a program for each ``shape``, and on XLA:CPU
one for a 4-D convolution kernel takes about 2 s (0.3-0.5 s for a vector): building the
tiny test DenseNet took 6.5 s, nearly all of it compiling initialisers. JAX's
counter-based random bits (``jax_threefry_partitionable``, the default) depend only on
the key and an element's flat index, so the draw for ``shape`` is the first ``size``
values of a longer vector's draw, reshaped. These initialisers draw vectors of
power-of-two lengths (one compilation per length) and take that prefix; the scale is
computed as JAX computes it. ``tests/test_models_init.py`` checks equality with JAX's
initialisers; a dtype or setting where that equality is not established draws as JAX
does.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

_MIN_LENGTH = 256
# The constant JAX divides by: the standard deviation of a standard normal truncated
# to (-2, 2) (jax.nn.initializers.variance_scaling).
_TRUNCATED_STD = .87962566103423978


def _draw(key, shape, dtype, distribution, bounds=(-2, 2)):
  """The draw of ``shape``: a prefix of a power-of-two draw (on the host when not
  traced), or JAX's own draw where that equality is not established."""
  # bounds as JAX's initialisers pass them (ints for variance scaling, floats for
  # truncated_normal): JAX compiles the two as different programs.
  def direct(shape):
    if distribution == "normal":
      return jax.random.normal(key, shape, dtype)
    return jax.random.truncated_normal(key, *bounds, shape, dtype)

  shape = tuple(int(d) for d in shape)
  size = math.prod(shape)
  bucketed = (jnp.dtype(dtype) == jnp.float32 and jax.config.jax_threefry_partitionable
              and size > 0)
  if not bucketed:
    return direct(shape)
  flat = direct((max(_MIN_LENGTH, 1 << (size - 1).bit_length()),))
  if isinstance(flat, jax.core.Tracer):  # under jit or eval_shape
    return flat[:size].reshape(shape)
  return np.asarray(flat)[:size].reshape(shape)


def _times(values, scale):
  # A float32 product is correctly rounded in NumPy as in XLA; on the host it compiles
  # nothing per shape. ``scale`` is a JAX scalar computed as JAX's initialiser does.
  if isinstance(values, np.ndarray) and not isinstance(scale, jax.core.Tracer):
    return jnp.asarray(values * np.asarray(scale))
  return values * scale


def _fans(shape):
  # jax.nn.initializers' _compute_fans with in_axis=-2, out_axis=-1, no batch axis.
  if len(shape) < 2:
    raise ValueError(f"variance scaling needs a shape of at least 2 dimensions, got {shape}")
  receptive = math.prod(shape[:-2])
  return shape[-2] * receptive, shape[-1] * receptive


def variance_scaling(scale: float, mode: str, distribution: str):
  """``jax.nn.initializers.variance_scaling(scale, mode, distribution)`` (default axes),
  for ``mode`` ``"fan_in"``/``"fan_out"``/``"fan_avg"`` and ``distribution``
  ``"normal"``/``"truncated_normal"``."""
  if mode not in ("fan_in", "fan_out", "fan_avg"):
    raise ValueError(f"mode must be 'fan_in', 'fan_out' or 'fan_avg', got {mode!r}")
  if distribution not in ("normal", "truncated_normal"):
    raise ValueError(f"distribution must be 'normal' or 'truncated_normal', got "
                     f"{distribution!r}")

  def init(key, shape, dtype=jnp.float32):
    fan_in, fan_out = _fans(tuple(shape))
    denominator = {"fan_in": fan_in, "fan_out": fan_out,
                   "fan_avg": (fan_in + fan_out) / 2}[mode]
    variance = jnp.array(scale / denominator, dtype=dtype)
    if distribution == "normal":
      return _times(_draw(key, shape, dtype, "normal"), jnp.sqrt(variance))
    stddev = jnp.sqrt(variance) / jnp.array(_TRUNCATED_STD, dtype)
    return _times(_draw(key, shape, dtype, "truncated_normal"), stddev)

  return init


def lecun_normal():
  """``jax.nn.initializers.lecun_normal()``: Flax's default kernel initialiser."""
  return variance_scaling(1.0, "fan_in", "truncated_normal")


def truncated_normal(stddev: float):
  """``jax.nn.initializers.truncated_normal(stddev)`` (truncated to two deviations)."""

  def init(key, shape, dtype=jnp.float32):
    return _times(_draw(key, shape, dtype, "truncated_normal", bounds=(-2.0, 2.0)),
                  jnp.array(stddev, dtype))

  return init


__all__ = ["lecun_normal", "truncated_normal", "variance_scaling"]
