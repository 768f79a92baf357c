"""TorchRay's smooth masks and perturbation pyramid (Fong, Patrick and Vedaldi, ICCV
2019), as pure functions: the pieces ``cejax.optimised.extremal`` optimises over.

- ``smooth_masks``: a grid of parameters (one per ``step`` pixels) becomes a smooth mask
  by smooth-max pooling of bumps ``exp(-2 max(d / sigma - 1/2, 0)^2)`` (softmax pooling,
  coldness 20), computed on a margin of ``sigma`` pixels (``geometry``) and cropped;
- ``blur_pyramid`` / ``apply_pyramid``: the image blurred at 8 levels (TorchRay's
  ``imsmooth``: zero padding, ``sigma`` from ``max_blur`` down to none), a mask value
  picking two neighbouring levels and interpolating linearly (1 keeps the pixel);
- ``area_reference``: where the area constraint's step vector turns to 1;
- ``area_gap``: the area constraint, the sorted mask's squared distance from that step
  vector, computed without a sort.

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
  if any(out < int(z) + round(sigma) for out, z in zip(shape_out, shape, strict=True)):
    raise ValueError(f"sigma={sigma} is too small for step={step}: the smooth mask "
                     f"({shape_out}) would not cover the image {tuple(shape)} and its margin "
                     f"of sigma pixels; use a sigma of at least about the step (TorchRay: "
                     "step 7, sigma 21).")
  return Geometry(tuple(int(z) for z in shape), step, sigma, round(sigma), padding, radius,
                  shape_in, shape_mid, shape_out)


@functools.lru_cache(maxsize=32)
def _bump_weights(g: Geometry) -> np.ndarray:
  """``(side^2, out_h, out_w)``: the weight of parameter ``(ky, kx)`` of each output
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
  return np.stack(out).astype(np.float32)


def _upsampled(padded, g: Geometry):
  """The padded parameters repeated ``step`` times along both axes: channel ``(ky, kx)``
  of output pixel ``(y, x)`` (TorchRay's unfold, nearest upsampling and crop) is pixel
  ``(y + step ky, x + step kx)`` of it."""
  return jnp.repeat(jnp.repeat(padded, g.step, axis=1), g.step, axis=2)


def _bumps(up, g: Geometry):
  """The ``side^2`` bump values of every output pixel, one ``(b, out_h, out_w)`` slab per
  neighbour: crops of the upsampled parameters times the bump weights."""
  side = 2 * g.radius + 1
  s, (oh, ow) = g.step, g.shape_out
  weights = jnp.asarray(_bump_weights(g))
  return [weights[c] * up[:, (c // side) * s:(c // side) * s + oh,
                          (c % side) * s:(c % side) * s + ow] for c in range(side * side)]


def _pool_forward(padded, g, coldness):
  bumps = _bumps(_upsampled(padded, g), g)
  top = functools.reduce(jnp.maximum, bumps)
  e = [jnp.exp(coldness * (b - top)) for b in bumps]
  total = functools.reduce(jnp.add, e)
  pooled = functools.reduce(jnp.add, [b * x for b, x in zip(bumps, e, strict=True)]) / total
  return pooled, top, total


# Softmax pooling of the bumps over each pixel's neighbours, with a gradient of our own.
# The neighbours are separate slabs, not a stacked (..., side^2) axis: XLA:CPU writes and
# reduces a minor axis of 81 slices slowly (with area_gap below, an iteration of the demo's
# extremal perturbations went from 0.267 s to 0.153 s, benchmarks/optimised_cost.py). The
# backward runs the neighbours in a loop, each adding its slab's block sums at its offset
# (written out as one expression per neighbour, XLA:CPU re-read every input once per
# neighbour), in a fixed order: the same bits on one device or many.
@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _smooth_max(padded, g: Geometry, coldness: float):
  """``(b, out_h, out_w)``: ``sum_c b_c e_c / sum_c e_c``, ``e_c = exp(coldness b_c)``,
  over the bumps ``b_c`` of each output pixel's neighbours (not clamped)."""
  return _pool_forward(padded, g, coldness)[0]


def _smooth_max_fwd(padded, g, coldness):
  pooled, top, total = _pool_forward(padded, g, coldness)
  return pooled, (padded, pooled, top, total)


def _smooth_max_bwd(g, coldness, residuals, cotangent):
  # d pooled / d b_c = e_c / total (1 + coldness (b_c - pooled)); b_c = w_c up_c, and
  # up_c's transpose sums each parameter's step x step block at offset (ky, kx).
  padded, pooled, top, total = residuals
  side = 2 * g.radius + 1
  s, (oh, ow) = g.step, g.shape_out
  n = padded.shape[0]
  bh, bw = -(-oh // s), -(-ow // s)  # parameter rows and columns an output crop spans
  up = _upsampled(padded, g)
  weights = jnp.asarray(_bump_weights(g))
  scaled = cotangent / total

  def neighbour(c, grad):
    ky, kx = c // side, c % side
    w = weights[c]
    b = w * jax.lax.dynamic_slice(up, (0, ky * s, kx * s), (n, oh, ow))
    slab = scaled * jnp.exp(coldness * (b - top)) * (1 + coldness * (b - pooled)) * w
    slab = jnp.pad(slab, ((0, 0), (0, bh * s - oh), (0, bw * s - ow)))
    # Block sums as strided slices: XLA:CPU reduces a reshaped (.., s, .., s) slowly.
    blocks = functools.reduce(jnp.add, [slab[:, dy::s, dx::s]
                                        for dy in range(s) for dx in range(s)])
    here = jax.lax.dynamic_slice(grad, (0, ky, kx), (n, bh, bw))
    return jax.lax.dynamic_update_slice(grad, here + blocks, (0, ky, kx))

  return (jax.lax.fori_loop(0, side * side, neighbour, jnp.zeros_like(padded)),)


_smooth_max.defvjp(_smooth_max_fwd, _smooth_max_bwd)


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
  full = _clamp01(_smooth_max(padded, g, float(coldness)))
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


_UNSIGNED = {2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint64}


def _order_keys(x):
  """Unsigned integer keys of ``x``'s width whose order is its float order (sign flipped
  for positives, all bits for negatives: the radix-sort mapping); -0 and 0 are one key,
  as they compare equal (a stable sort keeps them in place), and every NaN the positive
  one (a sign bit would have put it first)."""
  x = jnp.where(x == 0, jnp.zeros_like(x), x)
  x = jnp.where(jnp.isnan(x), jnp.nan, x)  # one NaN, above +inf (last, as sorts put it)
  unsigned = _UNSIGNED[x.dtype.itemsize]
  width = 8 * x.dtype.itemsize
  bits = jax.lax.bitcast_convert_type(x, unsigned)
  return jnp.where(bits >> (width - 1) == 1, ~bits, bits | unsigned(1 << (width - 1)))


def _kth_smallest(keys, k):
  """The ``k``-th smallest (0-based) of ``keys (..., m)`` per row, ``k (...)``: bisection
  over the key values, counting (one round per bit)."""

  def halve(_, bounds):
    lo, hi = bounds
    mid = lo + (hi - lo) // 2
    enough = jnp.sum(keys <= mid[..., None], axis=-1) > k
    return jnp.where(enough, lo, mid + 1), jnp.where(enough, mid, hi)

  lo = jnp.zeros(keys.shape[:-1], keys.dtype)
  hi = jnp.full(keys.shape[:-1], jnp.iinfo(keys.dtype).max, keys.dtype)
  return jax.lax.fori_loop(0, 8 * keys.dtype.itemsize, halve, (lo, hi))[0]


TIES = ("stable", "symmetric")


def area_gap(masks, zeros, *, ties: str = "stable"):
  """``mean((sort(m) - r)^2)`` over the last axis of ``masks (..., m)``, ``r`` the step
  vector with ``zeros (...)`` leading zeros: TorchRay's area constraint.

  Its value is the same for either ``ties`` rule; they differ in the gradient where
  values tie at the step's edge. ``"stable"`` sends the step's 1s to the last of the
  tied entries in position order, as the gradient of a stable sort does (TorchRay's).
  ``"symmetric"`` gives every tied entry the mean of their gradients: the area term is
  symmetric in the entries, so this subgradient favours no position. The stable rule
  makes a flat mask (any constant start) grow from its last rows: on a linear model from
  a start of 0 the delete mask then settled 0.67 IoU from the optimal region, against
  0.91 with the symmetric rule (``tests/test_extremal.py``).

  Written without the sort (XLA:CPU sorts a 64 px batch slower than the network runs, and
  a sort's gradient is a scatter): entry ``i`` meets the step vector's ``r[rank_i]``,
  which is 1 where its rank in the stable ascending order is at least ``zeros`` -- above
  the ``zeros``-th smallest value, or equal to it and late enough among its ties. The
  value and gradient are the sorted form's (ties ranked by position, as a stable sort
  does); the mean is summed in the masks' order rather than the sorted one.
  """
  masks = jnp.asarray(masks)
  if not jnp.issubdtype(masks.dtype, jnp.floating):
    raise ValueError(f"masks must be floating point, got {masks.dtype}.")
  keys = _order_keys(masks)
  zeros = jnp.asarray(zeros, jnp.int32)
  threshold = _kth_smallest(keys, zeros)[..., None]
  ties_at_edge = keys == threshold
  below = jnp.sum(keys < threshold, axis=-1, keepdims=True, dtype=jnp.int32)
  tied_before = jnp.cumsum(ties_at_edge, axis=-1, dtype=jnp.int32) - ties_at_edge
  ones = (keys > threshold) | (ties_at_edge & (tied_before >= zeros[..., None] - below))
  if ties not in TIES:
    raise ValueError(f"ties must be one of {TIES}, got {ties!r}.")
  step = ones.astype(masks.dtype)
  if ties == "symmetric":  # the tied entries' share of the step's 1s
    share = (jnp.sum(ties_at_edge & ones, -1, keepdims=True, dtype=jnp.int32)
             / jnp.sum(ties_at_edge, -1, keepdims=True, dtype=jnp.int32)).astype(masks.dtype)
    target = jax.lax.stop_gradient(jnp.where(ties_at_edge, share, step))
    exact = jax.lax.stop_gradient(jnp.mean((masks - step) ** 2, axis=-1))
    symmetric = jnp.mean((masks - target) ** 2, axis=-1)
    return exact + (symmetric - jax.lax.stop_gradient(symmetric))
  step = jax.lax.stop_gradient(step)
  return jnp.mean((masks - step) ** 2, axis=-1)


@jax.jit  # one program, not an eager compile per sort and cast
def hard_region(masks, areas):
  """The ``round(a h w)`` pixels where each mask is largest (ties: first in row-major
  order): ``masks (..., h, w)``, ``areas (...)`` -> ``(..., h, w)`` in {0, 1}."""
  h, w = masks.shape[-2:]
  flat = masks.reshape(*masks.shape[:-2], h * w)
  count = jnp.round(jnp.asarray(areas) * h * w).astype(jnp.int32)
  order = jnp.argsort(-flat, axis=-1, stable=True)
  ranks = jnp.argsort(order, axis=-1, stable=True)
  return (ranks < count[..., None]).astype(masks.dtype).reshape(masks.shape)


__all__ = ["PYRAMIDS", "TIES", "Geometry", "apply_pyramid", "area_gap", "area_reference",
           "hard_region", "blur_pyramid", "correlation_matrix", "geometry", "smooth_masks",
           "torchray_gaussian"]
