"""Mask generators: grids, sliding windows, boxes and random RISE masks.

A mask has shape ``(h, w)`` with values in [0, 1]: 1 where the intervention
replaces the image, 0 where the image is kept; soft values blend. Every generator
is a pure function; anything random takes an explicit ``key``.

Large random sets are never built on the host: ``RiseMasks`` is a *recipe* whose
``__call__(indices)`` draws masks ``indices`` on the device, one chunk at a time,
inside the sweep. Mask ``i`` depends only on ``(key, i)``.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np


def _check_shape(shape) -> tuple[int, int]:
  if len(shape) != 2 or min(shape) < 1:
    raise ValueError(f"shape must be (height, width) with positive sizes, got {shape}.")
  return int(shape[0]), int(shape[1])


def grid_masks(*, shape, n: int = 10) -> jax.Array:
  """An ``n x n`` partition of the image into blocks (the paper uses 10 x 10).

  Returns:
    float32 ``(n * n, h, w)``, row-major over blocks; block edges are
    ``round(i * h / n)``, so uneven sizes differ by at most one pixel.
  """
  h, w = _check_shape(shape)
  if not 1 <= n <= min(h, w):
    raise ValueError(f"n must be in [1, {min(h, w)}] for shape {shape}, got {n}.")
  rows = np.minimum((np.arange(h) * n) // h, n - 1)
  cols = np.minimum((np.arange(w) * n) // w, n - 1)
  block = rows[:, None] * n + cols[None, :]
  return jnp.asarray(block[None] == np.arange(n * n)[:, None, None], jnp.float32)


def sliding_window_masks(*, shape, window, stride) -> jax.Array:
  """Square or rectangular windows slid over the image (as Captum's Occlusion).

  Windows start at 0 and step by ``stride``; a last window is added flush with the
  far edge when the steps do not reach it, so every pixel is covered. Overlaps are
  averaged by ``ce_map``'s coverage normalisation.

  Returns:
    float32 ``(m, h, w)``.
  """
  h, w = _check_shape(shape)
  wh, ww = (window, window) if np.isscalar(window) else window
  sh, sw = (stride, stride) if np.isscalar(stride) else stride
  if not (0 < wh <= h and 0 < ww <= w) or sh < 1 or sw < 1:
    raise ValueError(
        f"window must fit in {shape} and stride be positive; got {window}, {stride}.")

  def starts(size, win, step):
    s = list(range(0, size - win + 1, step))
    if s[-1] != size - win:
      s.append(size - win)
    return s

  masks = np.zeros((len(starts(h, wh, sh)) * len(starts(w, ww, sw)), h, w), np.float32)
  k = 0
  for y in starts(h, wh, sh):
    for x in starts(w, ww, sw):
      masks[k, y:y + wh, x:x + ww] = 1.0
      k += 1
  return jnp.asarray(masks)


def box_masks(boxes, *, shape) -> jax.Array:
  """Masks of ``[x_min, y_min, x_max, y_max]`` pixel boxes, soft at fractional edges.

  Returns:
    float32 ``(m, h, w)``: the fraction of each pixel covered by each box.
  """
  h, w = _check_shape(shape)
  boxes = jnp.asarray(boxes, jnp.float32).reshape(-1, 4)

  def overlap(lo, hi, n):
    edges = jnp.arange(n, dtype=jnp.float32)
    return jnp.clip(jnp.minimum(edges + 1, hi[:, None]) - jnp.maximum(edges, lo[:, None]),
                    0.0, 1.0)

  ys = overlap(boxes[:, 1], boxes[:, 3], h)
  xs = overlap(boxes[:, 0], boxes[:, 2], w)
  return ys[:, :, None] * xs[:, None, :]


def rise_mask(key, *, shape, cells: int, p: float) -> jax.Array:
  """One RISE mask (Petsiuk et al., 2018).

  A ``cells x cells`` grid of Bernoulli(p) *kept* cells is upsampled bilinearly to
  ``(cells + 1) * cell_size`` and cropped at a random shift. RISE masks mark what is
  **kept**, so the returned intervention mask is ``1 - kept``: the fraction of
  pixels left untouched is ``p`` on average.

  Returns:
    float32 ``(h, w)`` intervention mask.
  """
  h, w = shape
  ch, cw = math.ceil(h / cells), math.ceil(w / cells)
  grid_key, shift_key = jax.random.split(key)
  grid = jax.random.bernoulli(grid_key, p, (cells, cells)).astype(jnp.float32)
  # Pad by one cell so the random shift never samples outside the grid.
  grid = jnp.pad(grid, ((0, 1), (0, 1)), mode="edge")
  up = jax.image.resize(grid, ((cells + 1) * ch, (cells + 1) * cw), "bilinear")
  dy, dx = jax.random.randint(shift_key, (2,), 0, jnp.array([ch, cw]))
  kept = jax.lax.dynamic_slice(up, (dy, dx), (h, w))
  return 1.0 - kept


@functools.partial(jax.tree_util.register_dataclass, data_fields=["key"],
                   meta_fields=["num", "shape", "cells", "p"])
@dataclasses.dataclass(frozen=True)
class RiseMasks:
  """``num`` random RISE masks, drawn chunk by chunk on the device.

  A pytree whose only leaf is ``key``: it can be passed through ``jit`` as an
  argument, and its size and shape stay static.

  Attributes:
    key: PRNG key; mask ``i`` uses ``fold_in(key, i)``.
    num: number of masks.
    shape: ``(h, w)``.
    cells: coarse grid size (RISE's ``s``).
    p: probability that a cell is kept.
  """

  key: jax.Array
  num: int
  shape: tuple[int, int]
  cells: int = 8
  p: float = 0.5

  def __call__(self, indices: jax.Array) -> jax.Array:
    """Masks ``indices`` (any integer array shape ``(b,)``) as ``(b, h, w)``."""
    return jax.vmap(lambda i: rise_mask(jax.random.fold_in(self.key, i), shape=self.shape,
                                        cells=self.cells, p=self.p))(indices)


def rise_masks(key, *, num: int, shape, cells: int = 8, p: float = 0.5) -> RiseMasks:
  """A recipe for ``num`` RISE masks (see ``RiseMasks``); nothing is drawn yet."""
  h, w = _check_shape(shape)
  if num < 1:
    raise ValueError(f"num must be positive, got {num}.")
  if not 0.0 < p < 1.0:
    raise ValueError(f"p must be in (0, 1), got {p}.")
  if not 1 <= cells <= min(h, w):
    raise ValueError(f"cells must be in [1, {min(h, w)}], got {cells}.")
  return RiseMasks(key, int(num), (h, w), int(cells), float(p))


def num_masks(masks) -> int:
  return masks.num if isinstance(masks, RiseMasks) else int(masks.shape[0])


def mask_shape(masks) -> tuple[int, int]:
  return tuple(masks.shape) if isinstance(masks, RiseMasks) else tuple(masks.shape[1:])
