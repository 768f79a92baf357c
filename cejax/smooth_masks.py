"""TorchRay's smooth masks and perturbation pyramid (Fong, Patrick and Vedaldi, ICCV
2019), as pure functions: the pieces ``cejax.extremal`` optimises over.

- ``smooth_masks``: a grid of parameters (one per ``step`` pixels) becomes a smooth mask
  by smooth-max pooling of bumps ``exp(-2 max(d / sigma - 1/2, 0)^2)`` (softmax pooling,
  coldness 20), computed on a margin of ``sigma`` pixels (``geometry``) and cropped;
- ``blur_pyramid`` / ``apply_pyramid``: the image blurred at 8 levels (TorchRay's
  ``imsmooth``: zero padding, ``sigma`` from ``max_blur`` down to none), a mask value
  picking two neighbouring levels and interpolating linearly (1 keeps the pixel);
- ``area_reference``: where the area constraint's step vector turns to 1.

Each equals the PyTorch reference written from TorchRay's documented algorithm
(``tests/torch_extremal_reference.py``) to float32 round-off.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

PYRAMIDS = ("blur", "fade")


class Geometry(NamedTuple):
  """Sizes of TorchRay's mask generator for an image of ``shape`` (all static)."""

  shape: tuple[int, int]
  step: int
  sigma: float
  margin: int
  padding: int
  radius: int
  shape_in: tuple[int, int]
  shape_mid: tuple[int, int]
  shape_out: tuple[int, int]


def geometry(shape: Sequence[int], *, step: int = 7, sigma: float = 21.0) -> Geometry:
  """The parameter grid, margins and output size of smooth masks for ``shape (h, w)``.

  Raises:
    ValueError: ``step`` is not a positive integer or ``sigma`` not positive.
  """
  if int(step) != step or step < 1:
    raise ValueError(f"step must be a positive integer (pixels per parameter), got {step}.")
  if not sigma > 0:
    raise ValueError(f"sigma must be positive (pixels), got {sigma}.")
  step, sigma = int(step), float(sigma)
  padding = 1 + math.ceil(2 * sigma / step)  # margin + sigma, the margin being sigma
  radius = 1 + math.ceil(sigma / step)
  shape_in = tuple(math.ceil(z / step) for z in shape)
  shape_mid = tuple(z + 2 * padding - 2 * radius for z in shape_in)
  shape_out = tuple(step * z - step + 1 for z in shape_mid)
  return Geometry(tuple(int(z) for z in shape), step, sigma, round(sigma), padding, radius,
                  shape_in, shape_mid, shape_out)


@functools.lru_cache(maxsize=32)
def _bump_weights(g: Geometry) -> np.ndarray:
  """``(out_h, out_w, side^2)``: the weight of parameter ``(ky, kx)`` of each output
  pixel's neighbourhood, ``exp(-2 max(d / sigma - 1/2, 0)^2)``, ``d`` the pixel's
  distance from that parameter's centre (float32, as TorchRay computes it)."""
  side = 2 * g.radius + 1
  uy, ux = np.meshgrid(np.arange(g.shape_out[0]), np.arange(g.shape_out[1]), indexing="ij")
  sigma = np.float32(g.sigma)
  out = []
  for ky in range(side):
    for kx in range(side):
      iy = (uy // g.step + ky - g.padding).astype(np.float32)
      ix = (ux // g.step + kx - g.padding).astype(np.float32)
      dy = uy.astype(np.float32) - (sigma + np.float32(g.step) * iy)
      dx = ux.astype(np.float32) - (sigma + np.float32(g.step) * ix)
      z = np.sqrt(dy * dy + dx * dx) / sigma
      out.append(np.exp(-2 * np.maximum(z - np.float32(0.5), 0) ** 2))
  return np.stack(out, axis=-1).astype(np.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _unfold(padded, g: Geometry):
  """``(b, out_h, out_w, side^2)``: each output pixel's ``(2 r + 1)^2`` parameters
  (TorchRay's unfold, nearest upsampling and crop): channel ``(ky, kx)`` of output pixel
  ``(y, x)`` is parameter ``(y // step + ky, x // step + kx)`` of the padded grid.

  Written as crops of the parameters upsampled once, with a gradient of our own: the
  gradient of a gather is a scatter-add, which XLA:CPU runs as a serial loop. Ours sums
  each parameter's ``step x step`` block of each channel, then adds the channels'
  shifted blocks in a fixed order: the same bits on one device or many.
  """
  side = 2 * g.radius + 1
  s, (oh, ow) = g.step, g.shape_out
  up = jnp.repeat(jnp.repeat(padded, s, axis=1), s, axis=2)
  return jnp.stack([up[:, ky * s:ky * s + oh, kx * s:kx * s + ow]
                    for ky in range(side) for kx in range(side)], axis=-1)


def _unfold_fwd(padded, g):
  return _unfold(padded, g), padded.shape


def _unfold_bwd(g, shape, cotangent):
  side = 2 * g.radius + 1
  s, (oh, ow) = g.step, g.shape_out
  bh, bw = -(-oh // s), -(-ow // s)  # parameter rows and columns an output crop spans
  b = shape[0]
  padded = jnp.pad(cotangent, ((0, 0), (0, bh * s - oh), (0, bw * s - ow), (0, 0)))
  blocks = padded.reshape(b, bh, s, bw, s, side * side).sum((2, 4))  # (b, bh, bw, C)
  grad = jnp.zeros(shape, cotangent.dtype)
  for c in range(side * side):  # a fixed order of the channels' sums
    ky, kx = divmod(c, side)
    grad = grad + jnp.pad(blocks[..., c], ((0, 0), (ky, shape[1] - ky - bh),
                                           (kx, shape[2] - kx - bw)))
  return (grad,)


_unfold.defvjp(_unfold_fwd, _unfold_bwd)


def _clamp01(x):
  """``clip(x, 0, 1)`` whose gradient is 1 on the closed interval (``torch.clamp``'s),
  not the half that ``jnp.clip`` gives at the bounds."""
  return jnp.where((x >= 0) & (x <= 1), x, jnp.clip(x, 0, 1))


def smooth_masks(params, g: Geometry, *, coldness: float = 20.0):
  """Smooth masks from parameters ``(..., h_in, w_in)`` (``g.shape_in``).

  Returns:
    ``(cropped, full)``: ``(..., h, w)`` masks of the image's shape and the same with
    the margin, ``(..., out_h, out_w)`` (the area constraint is taken on this one).
  """
  lead = params.shape[:-2]
  p = params.reshape(-1, *g.shape_in)
  padded = jnp.pad(p, ((0, 0), (g.padding, g.padding), (g.padding, g.padding)))
  up = _unfold(padded, g)
  bumps = jnp.asarray(_bump_weights(g)) * up
  # Softmax pooling over the neighbours (last axis), written out: jax.nn.softmax's
  # gradient is summed in an order that differs between one device and several.
  top = jax.lax.stop_gradient(bumps.max(-1, keepdims=True))
  e = jnp.exp(coldness * (bumps - top))
  full = _clamp01(jnp.sum(bumps * e, -1) / jnp.sum(e, -1))
  h, w = g.shape
  cropped = full[:, g.margin:g.margin + h, g.margin:g.margin + w]
  return cropped.reshape(*lead, h, w), full.reshape(*lead, *g.shape_out)


def torchray_gaussian(sigma: float) -> np.ndarray:
  """TorchRay's ``imsmooth`` kernel: ``exp(-(i / (sqrt(2) sigma + eps))^2)`` for ``|i| <=
  ceil(4 sigma)``, normalised (float32; ``[1]`` for ``sigma = 0``)."""
  width = math.ceil(4 * float(sigma))
  scale = np.float32(math.sqrt(2)) * np.float32(sigma) + np.float32(1.19209290e-07)
  f = np.arange(-width, width + 1, dtype=np.float32) / scale
  f = np.exp(-f * f)
  return (f / f.sum()).astype(np.float32)


def correlation_matrix(n: int, kernel: np.ndarray) -> np.ndarray:
  """``(n, n)`` matrix of a 1-D correlation with zero padding (same size)."""
  width = len(kernel) // 2
  offsets = np.arange(n)[None, :] - np.arange(n)[:, None] + width
  inside = (offsets >= 0) & (offsets < len(kernel))
  return np.where(inside, kernel[np.clip(offsets, 0, len(kernel) - 1)], 0).astype(np.float32)


def blur_pyramid(image, *, num_levels: int = 8, max_blur: float = 20.0, kind: str = "blur"):
  """TorchRay's perturbation pyramid of one ``(h, w, c)`` image: ``(L, h, w, c)``.

  Level ``l`` is the image blurred with ``sigma = (1 - l / (L - 1)) max_blur`` (zero
  padding, separable, TorchRay's kernel) for ``kind="blur"``, or scaled by ``l / (L -
  1)`` for ``"fade"``: level ``L - 1`` is the image, level 0 the most perturbed.
  """
  if num_levels < 2:
    raise ValueError(f"num_levels must be at least 2, got {num_levels}.")
  if kind not in PYRAMIDS:
    raise ValueError(f"Unknown pyramid {kind!r}; valid are {list(PYRAMIDS)}.")
  levels = np.linspace(0, 1, num_levels, dtype=np.float32)
  h, w = image.shape[:2]
  out = []
  for s in levels:
    if kind == "fade":
      out.append(image * s)
      continue
    kernel = torchray_gaussian(float(np.float32(1 - s) * np.float32(max_blur)))
    rows = jnp.asarray(correlation_matrix(h, kernel))
    cols = jnp.asarray(correlation_matrix(w, kernel))
    hi = jax.lax.Precision.HIGHEST
    y = jnp.einsum("ij,jwc->iwc", rows, image, precision=hi)
    out.append(jnp.einsum("kw,iwc->ikc", cols, y, precision=hi))
  return jnp.stack(out)


def apply_pyramid(pyramid, masks):
  """Perturbed images ``(..., h, w, c)`` for masks ``(..., h, w)`` in [0, 1] (1 keeps):
  levels ``floor(m (L - 1))`` and the next, interpolated linearly."""
  num = pyramid.shape[0]
  w = masks * (num - 1)
  k = jnp.floor(jax.lax.stop_gradient(w))
  frac = (w - k)[..., None]
  k = k.astype(jnp.int32)
  # A gather, not a one-hot product: exact, and the same on any number of devices.
  flat = pyramid.reshape(num, -1, pyramid.shape[-1])  # (L, h w, c)
  index = k.reshape(*k.shape[:-2], -1)
  y0 = flat[index, jnp.arange(index.shape[-1])]
  y1 = flat[jnp.minimum(index + 1, num - 1), jnp.arange(index.shape[-1])]
  return (1 - frac) * y0.reshape(*masks.shape, -1) + frac * y1.reshape(*masks.shape, -1)


def area_reference(max_area: int, areas) -> np.ndarray:
  """Number of leading zeros of each area's step vector, ``int(max_area (1 - a))``
  (computed in float64 on the host, as TorchRay does)."""
  areas = np.asarray(areas, np.float64)
  if not np.all((areas > 0) & (areas <= 1)):
    raise ValueError(f"areas must lie in (0, 1] (fractions of the image), got {areas}.")
  return (max_area * (1 - areas)).astype(np.int64).astype(np.int32)


__all__ = ["PYRAMIDS", "Geometry", "apply_pyramid", "area_reference", "blur_pyramid",
           "correlation_matrix", "geometry", "smooth_masks", "torchray_gaussian"]
