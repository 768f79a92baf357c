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
from typing import Protocol, runtime_checkable

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from cejax.types import Masks, PRNGKey


def _check_shape(shape) -> tuple[int, int]:
  if len(shape) != 2 or min(shape) < 1:
    raise ValueError(f"shape must be (height, width) with positive sizes, got {shape}.")
  return int(shape[0]), int(shape[1])


def grid_cells(size: int, n: int) -> np.ndarray:
  """The grid cell (0 .. n-1) of each of ``size`` pixels along one axis (cell edges at
  ``round(i * size / n)``)."""
  return np.minimum((np.arange(size) * n) // size, n - 1)


def grid_masks(*, shape, n: int = 10) -> Masks:
  """An ``n x n`` partition of the image into blocks (the paper uses 10 x 10).

  Returns:
    float32 ``(n * n, h, w)``, row-major over blocks; block edges are
    ``round(i * h / n)``, so uneven sizes differ by at most one pixel.
  """
  h, w = _check_shape(shape)
  if not 1 <= n <= min(h, w):
    raise ValueError(f"n must be in [1, {min(h, w)}] for shape {shape}, got {n}.")
  block = grid_cells(h, n)[:, None] * n + grid_cells(w, n)[None, :]
  return jnp.asarray(block[None] == np.arange(n * n)[:, None, None], jnp.float32)


def window_starts(size: int, window: int, stride: int) -> list[int]:
  """Window offsets along one axis, exactly as Captum's ``Occlusion``.

  ``1 + ceil((size - window) / stride)`` windows at ``0, stride, 2 stride, ...``; when
  the steps do not end flush with the far edge, the last window runs past it and is
  cut there (Captum adds no extra flush window).
  """
  count = 1 + -(-(size - window) // stride)
  return [i * stride for i in range(count)]


def sliding_window_masks(*, shape, window, stride) -> Masks:
  """Square or rectangular windows slid over the image, as Captum's ``Occlusion``.

  Window positions follow ``window_starts`` per axis (row-major over positions); a
  window past the far edge is truncated, so every pixel is covered. As in Captum,
  ``stride`` may not exceed ``window`` (that would leave pixels uncovered), and
  overlapping windows are averaged by ``ce_map``'s coverage normalisation. For many
  windows use the lazy ``sliding_windows`` recipe: this builds them all at once.

  Returns:
    float32 ``(m, h, w)``.

  Raises:
    ValueError: a window larger than the image, a non-positive stride, or a stride
      larger than the window.
  """
  recipe = sliding_windows(shape=shape, window=window, stride=stride)
  return recipe(jnp.arange(recipe.num))


def _pair(value) -> tuple[int, int]:
  return (int(value), int(value)) if np.isscalar(value) else tuple(int(v) for v in value)


@functools.partial(jax.tree_util.register_dataclass, data_fields=[],
                   meta_fields=["shape", "window", "stride"])
@dataclasses.dataclass(frozen=True)
class SlidingWindows:
  """``sliding_window_masks`` as a lazy recipe: windows are made on the device, chunk
  by chunk inside the sweep, so 37,000 stride-1 windows at 224 x 224 never exist at
  once. A pytree with no leaves (everything is static), so it passes through ``jit``.

  Attributes:
    shape: ``(h, w)``; window: ``(wh, ww)``; stride: ``(sh, sw)``.
  """

  shape: tuple[int, int]
  window: tuple[int, int]
  stride: tuple[int, int]

  @property
  def num(self) -> int:
    return (len(window_starts(self.shape[0], self.window[0], self.stride[0]))
            * len(window_starts(self.shape[1], self.window[1], self.stride[1])))

  def __call__(self, indices: jax.Array) -> jax.Array:
    """Windows ``indices`` (row-major over positions, as ``sliding_window_masks``),
    float32 ``(b, h, w)``."""
    (h, w), (wh, ww), (sh, sw) = self.shape, self.window, self.stride
    columns = len(window_starts(w, ww, sw))
    y0 = (indices // columns) * sh
    x0 = (indices % columns) * sw
    rows = jnp.arange(h)[None, :]
    cols = jnp.arange(w)[None, :]
    in_rows = (rows >= y0[:, None]) & (rows < y0[:, None] + wh)
    in_cols = (cols >= x0[:, None]) & (cols < x0[:, None] + ww)
    return (in_rows[:, :, None] & in_cols[:, None, :]).astype(jnp.float32)


def sliding_windows(*, shape, window, stride) -> SlidingWindows:
  """A lazy recipe for ``sliding_window_masks(shape=, window=, stride=)`` (same masks,
  same order, same checks); nothing is built until the sweep asks for a chunk."""
  h, w = _check_shape(shape)
  wh, ww = _pair(window)
  sh, sw = _pair(stride)
  if not (0 < wh <= h and 0 < ww <= w) or sh < 1 or sw < 1:
    raise ValueError(
        f"window must fit in {shape} and stride be positive; got {window}, {stride}.")
  if sh > wh or sw > ww:
    raise ValueError(f"stride {stride} is larger than window {window}: pixels between "
                     "windows would never be intervened on (Captum refuses this too).")
  return SlidingWindows((h, w), (wh, ww), (sh, sw))


@functools.partial(jax.tree_util.register_dataclass, data_fields=[],
                   meta_fields=["shape", "n"])
@dataclasses.dataclass(frozen=True)
class Grid:
  """``grid_masks`` as a lazy recipe (same blocks, same order)."""

  shape: tuple[int, int]
  n: int

  @property
  def num(self) -> int:
    return self.n * self.n

  def __call__(self, indices: jax.Array) -> jax.Array:
    (h, w), n = self.shape, self.n
    block = jnp.asarray(grid_cells(h, n)[:, None] * n + grid_cells(w, n)[None, :])
    return (block[None] == indices[:, None, None]).astype(jnp.float32)


def grid(*, shape, n: int = 10) -> Grid:
  """A lazy recipe for ``grid_masks(shape=, n=)``."""
  h, w = _check_shape(shape)
  if not 1 <= n <= min(h, w):
    raise ValueError(f"n must be in [1, {min(h, w)}] for shape {shape}, got {n}.")
  return Grid((h, w), int(n))


def box_masks(boxes: Float[Array, "m 4"], *, shape) -> Masks:
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


@functools.partial(jax.tree_util.register_dataclass, data_fields=["boxes"],
                   meta_fields=["shape"])
@dataclasses.dataclass(frozen=True)
class Boxes:
  """``box_masks`` as a lazy recipe: the ``(m, 4)`` box coordinates are its only leaf
  (traced under ``jit``), each chunk of masks is drawn from them on the device."""

  boxes: jax.Array
  shape: tuple[int, int]

  @property
  def num(self) -> int:
    return int(self.boxes.shape[0])

  def __call__(self, indices: jax.Array) -> jax.Array:
    return box_masks(self.boxes[indices], shape=self.shape)


def boxes(coordinates, *, shape) -> Boxes:
  """A lazy recipe for ``box_masks(coordinates, shape=)``: ``[x_min, y_min, x_max,
  y_max]`` pixel boxes, soft at fractional edges."""
  h, w = _check_shape(shape)
  coordinates = jnp.asarray(coordinates, jnp.float32).reshape(-1, 4)
  return Boxes(coordinates, (h, w))


def _mirror(index: np.ndarray, size: int) -> np.ndarray:
  """scikit-image's ``mode="reflect"`` (scipy's 'mirror'): ``d c b | a b c d | c b a``."""
  if size == 1:
    return np.zeros_like(index)
  period = 2 * (size - 1)
  index = np.abs(index) % period
  return np.where(index >= size, period - index, index)


def _linear_upsample_matrix(cells: int, size: int) -> np.ndarray:
  """``(size, cells)`` rows of bilinear weights, equal to ``skimage.transform.resize``
  with ``order=1, mode="reflect", anti_aliasing=False`` (half-pixel centres)."""
  coord = (np.arange(size) + 0.5) * cells / size - 0.5
  lo = np.floor(coord).astype(np.int64)
  frac = coord - lo
  rows = np.arange(size)
  out = np.zeros((size, cells), np.float64)
  np.add.at(out, (rows, _mirror(lo, cells)), 1 - frac)
  np.add.at(out, (rows, _mirror(lo + 1, cells)), frac)
  return out.astype(np.float32)


def rise_cell_size(shape, cells: int) -> tuple[int, int]:
  """RISE's cell size ``ceil(shape / cells)`` per axis."""
  return math.ceil(shape[0] / cells), math.ceil(shape[1] / cells)


def rise_grid(key, *, cells: int, p: float, cell_size) -> tuple[jax.Array, jax.Array]:
  """The random parts of one RISE mask: a ``(cells, cells)`` 0/1 grid of *kept* cells
  (each kept with probability ``p``) and a shift ``(dy, dx)``, uniform in
  ``[0, cell_size)`` per axis."""
  grid_key, shift_key = jax.random.split(key)
  grid = jax.random.bernoulli(grid_key, p, (cells, cells)).astype(jnp.float32)
  shift = jax.random.randint(shift_key, (2,), 0, jnp.asarray(cell_size))
  return grid, shift


def rise_upsample(grid, shift, *, shape) -> jax.Array:
  """A RISE grid upsampled and cropped as in Petsiuk et al.'s code, ``(h, w)`` kept mask.

  ``resize(grid, (cells + 1) * cell_size, order=1, mode="reflect")`` (scikit-image),
  cropped to ``shape`` at ``shift``: every cell spans ``(cells + 1) * cell / cells``
  upsampled pixels, and the crop hides the last partial one.
  """
  cells = grid.shape[0]
  (h, w), (ch, cw) = shape, rise_cell_size(shape, cells)
  rows = jnp.asarray(_linear_upsample_matrix(cells, (cells + 1) * ch))
  cols = jnp.asarray(_linear_upsample_matrix(cells, (cells + 1) * cw))
  rows = jax.lax.dynamic_slice_in_dim(rows, shift[0], h, 0)
  cols = jax.lax.dynamic_slice_in_dim(cols, shift[1], w, 0)
  hi = jax.lax.Precision.HIGHEST
  return jnp.matmul(jnp.matmul(rows, grid, precision=hi), cols.T, precision=hi)


def rise_mask(key, *, shape, cells: int, p: float) -> jax.Array:
  """One RISE mask (Petsiuk et al., 2018), as an intervention mask.

  A ``cells x cells`` grid of Bernoulli(p) *kept* cells, upsampled bilinearly to
  ``(cells + 1) * cell_size`` and cropped at a random shift in ``[0, cell_size)``
  (``rise_grid``, ``rise_upsample``). RISE masks mark what is **kept**, so the
  returned intervention mask is ``1 - kept``: the fraction of pixels left untouched
  is ``p`` on average.

  Returns:
    float32 ``(h, w)`` intervention mask.
  """
  grid, shift = rise_grid(key, cells=cells, p=p, cell_size=rise_cell_size(shape, cells))
  return 1.0 - rise_upsample(grid, shift, shape=shape)


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

  def grids(self, indices: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The kept-cell grids ``(b, cells, cells)`` and shifts ``(b, 2)`` of masks
    ``indices``: ``1 - rise_upsample(grid, shift)`` is the mask."""
    size = rise_cell_size(self.shape, self.cells)
    return jax.vmap(lambda i: rise_grid(jax.random.fold_in(self.key, i), cells=self.cells,
                                        p=self.p, cell_size=size))(indices)


def rise_masks(key: PRNGKey, *, num: int, shape, cells: int = 8, p: float = 0.5) -> RiseMasks:
  """A recipe for ``num`` RISE masks (see ``RiseMasks``); nothing is drawn yet."""
  h, w = _check_shape(shape)
  if num < 1:
    raise ValueError(f"num must be positive, got {num}.")
  if not 0.0 < p < 1.0:
    raise ValueError(f"p must be in (0, 1), got {p}.")
  if not 1 <= cells <= min(h, w):
    raise ValueError(f"cells must be in [1, {min(h, w)}], got {cells}.")
  return RiseMasks(key, int(num), (h, w), int(cells), float(p))


@runtime_checkable
class MaskSource(Protocol):
  """A lazy set of masks: any object with these members can replace a mask array.

  ``num`` masks of spatial ``shape``; ``__call__(indices (b,)) -> (b, h, w)`` makes masks
  ``indices`` on the device, inside the sweep, so ``num x h x w`` never exists at once.
  Register it as a pytree with ``num``/``shape`` as static metadata to pass it through
  ``jax.jit`` as an argument (as ``RiseMasks``), or make it hashable.
  """

  num: int
  shape: tuple[int, int]

  def __call__(self, indices: jax.Array) -> jax.Array: ...


def is_recipe(masks) -> bool:
  """Whether ``masks`` is a lazy ``MaskSource`` rather than a ``(m, h, w)`` array."""
  return (not isinstance(masks, (jax.Array, np.ndarray)) and callable(masks)
          and hasattr(masks, "num") and hasattr(masks, "shape"))


def num_masks(masks) -> int:
  return int(masks.num) if is_recipe(masks) else int(masks.shape[0])


def mask_shape(masks) -> tuple[int, int]:
  return tuple(masks.shape) if is_recipe(masks) else tuple(masks.shape[1:])
