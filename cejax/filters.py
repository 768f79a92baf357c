"""Image filters shared by interventions and metrics, each equal to a named reference.

Images are ``(..., h, w, c)``; filters act on the two spatial axes, per channel.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def _kernel_1d(sigma: float, truncate: float) -> np.ndarray:
  # The kernel scipy.ndimage.gaussian_filter uses: radius int(truncate * sigma + 0.5).
  radius = int(truncate * sigma + 0.5)
  t = np.arange(-radius, radius + 1, dtype=np.float64)
  k = np.exp(-0.5 * (t / sigma) ** 2)
  return k / k.sum()


def _correlate(x, kernel: np.ndarray, axis: int, mode: str):
  """1-D correlation of ``x`` with ``kernel`` along ``axis``, 'same' size."""
  radius = len(kernel) // 2
  pad = [(0, 0)] * x.ndim
  pad[axis] = (radius, radius)
  padded = jnp.pad(x, pad, mode="edge" if mode == "nearest" else "constant")
  n = x.shape[axis]
  out = jnp.zeros_like(x)
  # Static slices, not jnp.take of an index range: a gather per tap kept each tap in a
  # fusion of its own (17 per axis at sigma 2), which made every program holding a blur
  # several times larger to compile. Same products, same order of the sum.
  for j, weight in enumerate(kernel):  # static, short: 2 * radius + 1 shifted slices
    out = out + jnp.asarray(weight, x.dtype) * jax.lax.slice_in_dim(padded, j, j + n,
                                                                     axis=axis)
  return out


def gaussian_blur(images, *, sigma: float, truncate: float = 4.0):
  """Gaussian blur of each channel, equal to ``scipy.ndimage.gaussian_filter``.

  Matches ``gaussian_filter(image, sigma=(sigma, sigma, 0), mode="nearest",
  truncate=truncate)`` on ``(h, w, c)`` (and per image on ``(n, h, w, c)``).

  Args:
    images: ``(..., h, w, c)`` floating point.
    sigma: standard deviation in pixels, > 0.
    truncate: the kernel reaches ``int(truncate * sigma + 0.5)`` pixels each side.

  Returns:
    The blurred images, same shape and dtype.
  """
  if not sigma > 0:
    raise ValueError(f"sigma must be positive, got {sigma}.")
  images = jnp.asarray(images)
  if images.ndim < 3:
    raise ValueError(f"images must be (..., h, w, c), got shape {images.shape}.")
  kernel = _kernel_1d(float(sigma), float(truncate))
  out = _correlate(images, kernel, images.ndim - 3, "nearest")
  return _correlate(out, kernel, images.ndim - 2, "nearest")


def petsiuk_kernel(size: int = 11, sigma: float = 5.0) -> np.ndarray:
  """``gkern(klen, nsig)`` of Petsiuk et al.'s RISE code: a Gaussian-filtered delta.

  ``scipy.ndimage.gaussian_filter`` of a ``size x size`` delta (scipy's default
  'reflect' edges fold the tails back in), so it sums to 1.
  """
  import scipy.ndimage  # here, not at import: the kernel is made once per metric

  delta = np.zeros((size, size))
  delta[size // 2, size // 2] = 1.0
  return scipy.ndimage.gaussian_filter(delta, sigma)


def petsiuk_blur(images, *, size: int = 11, sigma: float = 5.0):
  """The blurred substrate of Petsiuk et al.'s insertion metric.

  Their ``conv2d(x, gkern(size, sigma), padding=size // 2)``: per channel, zero
  padding at the borders (so edges darken), on the model's input space.

  Args:
    images: ``(..., h, w, c)``.

  Returns:
    Same shape and dtype.
  """
  images = jnp.asarray(images)
  if images.ndim < 3:
    raise ValueError(f"images must be (..., h, w, c), got shape {images.shape}.")
  shape = images.shape
  x = images.reshape((-1,) + shape[-3:])
  c = shape[-1]
  kernel = np.broadcast_to(petsiuk_kernel(size, sigma)[:, :, None, None], (size, size, 1, c))
  r = size // 2
  out = jax.lax.conv_general_dilated(
      x, jnp.asarray(kernel, x.dtype), (1, 1), [(r, r), (r, r)],
      dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=c,
      precision=jax.lax.Precision.HIGHEST)
  return out.reshape(shape)
