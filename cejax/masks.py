"""Masks: grids, sliding windows, boxes, random RISE masks, and your own.

A mask has shape ``(h, w)`` with values in [0, 1]: 1 where the intervention replaces
the image, 0 where the image is kept; soft values blend. Every family is a *mask
source*: an object with ``num`` masks of spatial ``shape`` whose ``__call__(indices)``
makes masks ``indices`` on the device, inside the compiled program, so a set of
``num x h x w`` never exists at once. One builder per family (``grid``,
``sliding_windows``, ``boxes``, ``rise``); an array of masks is wrapped once, at the
entry of ``causal_effect`` or ``ce_map`` (``as_source``), so nothing inside asks what a
mask is. ``to_array`` makes every mask of a source, for plotting or small sets.

Sources are pytrees: arrays (box coordinates, RISE's key, a wrapped array) are leaves,
traced under ``jit``; sizes are static metadata. Mask ``i`` depends only on ``i`` (and
the key), never on the chunk or device that makes it.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Protocol, runtime_checkable

import jax
import jax.numpy as jnp
import numpy as np

from cejax._validation import check_mask_range
from cejax.types import Masks, PRNGKey


@runtime_checkable
class MaskSource(Protocol):
  """A set of masks: any object with these members can stand in for a mask array.

  ``num`` masks of spatial ``shape``; ``__call__(indices (b,)) -> (b, h, w)`` makes
  masks ``indices`` on the device. Indices past ``num`` (padding) may return anything
  in [0, 1]. Register it as a pytree with ``num``/``shape`` as static metadata to pass
  it through ``jax.jit`` as an argument (as the built-ins are), or make it hashable.
  """

  num: int
  shape: tuple[int, int]

  def __call__(self, indices: jax.Array) -> jax.Array: ...


def _source(*, data, meta):
  """A frozen dataclass registered as a pytree (``data`` leaves, ``meta`` static)."""

  def wrap(cls):
    cls = dataclasses.dataclass(frozen=True)(cls)
    return jax.tree_util.register_dataclass(cls, data_fields=list(data),
                                            meta_fields=list(meta))

  return wrap


def _check_shape(shape) -> tuple[int, int]:
  if len(shape) != 2 or min(shape) < 1:
    raise ValueError(f"shape must be (height, width) with positive sizes, got {shape}.")
  return int(shape[0]), int(shape[1])


# --- arrays ------------------------------------------------------------------------

@_source(data=("masks",), meta=())
class ArrayMasks:
  """An array of masks ``(m, h, w)`` as a source (``as_source`` wraps arrays in it); the
  one leaf is copied whole to every device of a mesh (large sets: use a lazy family)."""

  masks: jax.Array

  @property
  def num(self) -> int:
    return int(self.masks.shape[0])

  @property
  def shape(self) -> tuple[int, int]:
    return tuple(self.masks.shape[1:])

  def __call__(self, indices):
    return self.masks[indices]


def as_source(masks, shape=None) -> MaskSource:
  """``masks`` as a ``MaskSource``: a source as it is, an array ``(m, h, w)`` (checked
  to lie in [0, 1] when its values are known) wrapped as ``ArrayMasks``.

  Args:
    masks: a mask source or an array.
    shape: the image's ``(h, w)`` the masks must match, or None.

  Raises:
    ValueError: not ``(m, h, w)``, values outside [0, 1] or NaN, no masks, or a
      spatial shape other than ``shape``.
  """
  if not isinstance(masks, MaskSource) or isinstance(masks, (jax.Array, np.ndarray)):
    masks = jnp.asarray(masks)
    if masks.ndim != 3:
      raise ValueError(f"masks must be (m, h, w); got shape {masks.shape}.")
    check_mask_range(masks)
    masks = ArrayMasks(masks.astype(jnp.promote_types(masks.dtype, jnp.float32)))
  if shape is not None and tuple(masks.shape) != tuple(shape):
    raise ValueError(f"masks have spatial shape {tuple(masks.shape)} but the image is "
                     f"{tuple(shape)}.")
  if masks.num == 0:
    raise ValueError("masks is empty: pass at least one mask.")
  return masks


def to_array(masks) -> Masks:
  """Every mask of a source (or an array), float32 ``(m, h, w)``, by one compiled program."""
  return _materialize(as_source(masks))


_materialize = jax.jit(lambda source: jnp.asarray(source(jnp.arange(source.num)), jnp.float32))


# --- grids ---------------------------------------------------------------------------

def grid_cells(size: int, n: int) -> np.ndarray:
  """The grid cell (0 .. n-1) of each of ``size`` pixels along one axis: pixel ``i`` is
  in cell ``floor(i n / size)``, so cells differ in size by at most one pixel."""
  return np.minimum((np.arange(size) * n) // size, n - 1)


@_source(data=(), meta=("shape", "n"))
class Grid:
  """An ``n x n`` partition of the image into blocks, row-major over blocks."""

  shape: tuple[int, int]
  n: int

  @property
  def num(self) -> int:
    return self.n * self.n

  def __call__(self, indices):
    (h, w), n = self.shape, self.n
    block = jnp.asarray(grid_cells(h, n)[:, None] * n + grid_cells(w, n)[None, :])
    return (block[None] == indices[:, None, None]).astype(jnp.float32)

  def support_boxes(self) -> tuple[np.ndarray, tuple[int, int]]:
    """See ``support_boxes``: the blocks' corners and the largest block."""
    (h, w), n = self.shape, self.n
    rows, cols = grid_cells(h, n), grid_cells(w, n)
    r0 = np.array([np.flatnonzero(rows == i)[0] for i in range(n)])
    c0 = np.array([np.flatnonzero(cols == i)[0] for i in range(n)])
    size = (int(np.bincount(rows).max()), int(np.bincount(cols).max()))
    return np.stack(np.meshgrid(r0, c0, indexing="ij"), -1).reshape(-1, 2), size


def grid(*, shape, n: int = 10) -> Grid:
  """An ``n x n`` grid of blocks (the paper uses 10 x 10); see ``grid_cells``."""
  h, w = _check_shape(shape)
  if not 1 <= n <= min(h, w):
    raise ValueError(f"n must be in [1, {min(h, w)}] for shape {shape}, got {n}.")
  return Grid((h, w), int(n))


# --- sliding windows -------------------------------------------------------------------

def window_starts(size: int, window: int, stride: int) -> list[int]:
  """Window offsets along one axis, exactly as Captum's ``Occlusion``.

  ``1 + ceil((size - window) / stride)`` windows at ``0, stride, 2 stride, ...``; when
  the steps do not end flush with the far edge, the last window runs past it and is
  cut there (Captum adds no extra flush window).
  """
  count = 1 + -(-(size - window) // stride)
  return [i * stride for i in range(count)]


def _pair(value) -> tuple[int, int]:
  return (int(value), int(value)) if np.isscalar(value) else tuple(int(v) for v in value)


@_source(data=(), meta=("shape", "window", "stride"))
class SlidingWindows:
  """Windows slid over the image as Captum's ``Occlusion``, row-major over positions.

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

  def __call__(self, indices):
    (h, w), (wh, ww), (sh, sw) = self.shape, self.window, self.stride
    columns = len(window_starts(w, ww, sw))
    y0 = (indices // columns) * sh
    x0 = (indices % columns) * sw
    rows = jnp.arange(h)[None, :]
    cols = jnp.arange(w)[None, :]
    in_rows = (rows >= y0[:, None]) & (rows < y0[:, None] + wh)
    in_cols = (cols >= x0[:, None]) & (cols < x0[:, None] + ww)
    return (in_rows[:, :, None] & in_cols[:, None, :]).astype(jnp.float32)

  def support_boxes(self) -> tuple[np.ndarray, tuple[int, int]]:
    """See ``support_boxes``: the windows' corners and the window size."""
    (h, w), (wh, ww), (sh, sw) = self.shape, self.window, self.stride
    ys, xs = window_starts(h, wh, sh), window_starts(w, ww, sw)
    starts = np.stack(np.meshgrid(ys, xs, indexing="ij"), -1).reshape(-1, 2)
    return starts, (min(wh, h), min(ww, w))


def sliding_windows(*, shape, window, stride) -> SlidingWindows:
  """Square or rectangular windows at ``window_starts`` per axis; a window past the far
  edge is cut there, so every pixel is covered. As in Captum, ``stride`` may not exceed
  ``window``; ``ce_map`` averages overlapping windows.

  Raises:
    ValueError: a window larger than the image, a non-positive stride, or a stride
      larger than the window.
  """
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


# --- boxes ---------------------------------------------------------------------------

def _box_masks(coordinates, shape):
  def overlap(lo, hi, n):
    edges = jnp.arange(n, dtype=jnp.float32)
    return jnp.clip(jnp.minimum(edges + 1, hi[:, None]) - jnp.maximum(edges, lo[:, None]),
                    0.0, 1.0)

  ys = overlap(coordinates[:, 1], coordinates[:, 3], shape[0])
  xs = overlap(coordinates[:, 0], coordinates[:, 2], shape[1])
  return ys[:, :, None] * xs[:, None, :]


@_source(data=("coordinates",), meta=("shape",))
class Boxes:
  """``[x_min, y_min, x_max, y_max]`` pixel boxes, ``(m, 4)`` (the only leaf); each mask
  is the fraction of each pixel a box covers, soft at fractional edges."""

  coordinates: jax.Array
  shape: tuple[int, int]

  @property
  def num(self) -> int:
    return int(self.coordinates.shape[0])

  def __call__(self, indices):
    return _box_masks(self.coordinates[indices], self.shape)


def boxes(coordinates, *, shape) -> Boxes:
  """Masks of ``[x_min, y_min, x_max, y_max]`` pixel boxes (``(m, 4)`` or ``(4,)``)."""
  h, w = _check_shape(shape)
  return Boxes(jnp.asarray(coordinates, jnp.float32).reshape(-1, 4), (h, w))


# --- RISE ----------------------------------------------------------------------------

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
  kept = jax.random.bernoulli(grid_key, p, (cells, cells)).astype(jnp.float32)
  shift = jax.random.randint(shift_key, (2,), 0, jnp.asarray(cell_size))
  return kept, shift


def rise_upsample(kept, shift, *, shape) -> jax.Array:
  """A RISE grid upsampled and cropped as in Petsiuk et al.'s code, ``(h, w)`` kept mask.

  ``resize(kept, (cells + 1) * cell_size, order=1, mode="reflect")`` (scikit-image),
  cropped to ``shape`` at ``shift``: every cell spans ``(cells + 1) * cell / cells``
  upsampled pixels, and the crop hides the last partial one.
  """
  cells = kept.shape[0]
  (h, w), (ch, cw) = shape, rise_cell_size(shape, cells)
  rows = jnp.asarray(_linear_upsample_matrix(cells, (cells + 1) * ch))
  cols = jnp.asarray(_linear_upsample_matrix(cells, (cells + 1) * cw))
  rows = jax.lax.dynamic_slice_in_dim(rows, shift[0], h, 0)
  cols = jax.lax.dynamic_slice_in_dim(cols, shift[1], w, 0)
  hi = jax.lax.Precision.HIGHEST
  return jnp.matmul(jnp.matmul(rows, kept, precision=hi), cols.T, precision=hi)


@_source(data=("key",), meta=("num", "shape", "cells", "p"))
class RiseMasks:
  """``num`` random RISE masks (Petsiuk et al., 2018) as intervention masks.

  Mask ``i`` uses ``fold_in(key, i)``: a ``cells x cells`` grid of Bernoulli(p) *kept*
  cells, upsampled bilinearly to ``(cells + 1) * cell_size`` and cropped at a random
  shift in ``[0, cell_size)`` (``rise_grid``, ``rise_upsample``). RISE's masks mark
  what is **kept**; the intervention mask is ``1 - kept``, so the fraction of pixels
  left untouched is ``p`` on average.

  Attributes:
    key: PRNG key (the only leaf). num: number of masks. shape: ``(h, w)``.
    cells: coarse grid size (RISE's ``s``). p: probability that a cell is kept.
  """

  key: jax.Array
  num: int
  shape: tuple[int, int]
  cells: int = 8
  p: float = 0.5

  def grids(self, indices) -> tuple[jax.Array, jax.Array]:
    """The kept-cell grids ``(b, cells, cells)`` and shifts ``(b, 2)`` of masks
    ``indices``: ``1 - rise_upsample(grid, shift)`` is the mask."""
    size = rise_cell_size(self.shape, self.cells)
    return jax.vmap(lambda i: rise_grid(jax.random.fold_in(self.key, i), cells=self.cells,
                                        p=self.p, cell_size=size))(indices)

  def __call__(self, indices):
    kept, shifts = self.grids(indices)
    return 1.0 - jax.vmap(functools.partial(rise_upsample, shape=self.shape))(kept, shifts)

  def support_boxes(self):
    raise ValueError("RISE masks are not local (each covers the whole image).")


def rise(key: PRNGKey, *, num: int, shape, cells: int = 8, p: float = 0.5) -> RiseMasks:
  """``num`` RISE masks (see ``RiseMasks``); nothing is drawn until a chunk is asked for.

  Raises:
    ValueError: ``num < 1``, ``p`` outside (0, 1), or ``cells`` outside [1, min(h, w)].
  """
  h, w = _check_shape(shape)
  if num < 1:
    raise ValueError(f"num must be positive, got {num}.")
  if not 0.0 < p < 1.0:
    raise ValueError(f"p must be in (0, 1), got {p}.")
  if not 1 <= cells <= min(h, w):
    raise ValueError(f"cells must be in [1, {min(h, w)}], got {cells}.")
  return RiseMasks(key, int(num), (h, w), int(cells), float(p))


# --- patch subsets ---------------------------------------------------------------------

@_source(data=("key",), meta=("num", "shape", "patch_size", "dropped"))
class PatchSubsets:
  """``num`` masks that each intervene on exactly ``dropped`` patches of a ``patch_size``
  grid, chosen uniformly at random: RISE's random occlusion with a fixed count at patch
  granularity, the masks a ViT's token drop takes without padding (every mask keeps the
  same number of tokens).

  Mask ``i`` uses ``fold_in(key, i)``: a random permutation of the patches, whose first
  ``dropped`` are intervened on (1 on their pixels, 0 elsewhere).

  Attributes:
    key: PRNG key (the only leaf). num: number of masks. shape: ``(h, w)``.
    patch_size: the patch side in pixels. dropped: patches intervened on per mask.
  """

  key: jax.Array
  num: int
  shape: tuple[int, int]
  patch_size: int
  dropped: int

  def __call__(self, indices):
    rows, cols = self.shape[0] // self.patch_size, self.shape[1] // self.patch_size

    def one(i):
      order = jax.random.permutation(jax.random.fold_in(self.key, i), rows * cols)
      flags = jnp.zeros(rows * cols, jnp.float32).at[order[:self.dropped]].set(1.0)
      return jnp.repeat(jnp.repeat(flags.reshape(rows, cols), self.patch_size, 0),
                        self.patch_size, 1)

    return jax.vmap(one)(indices)


def patch_subsets(key: PRNGKey, *, num: int, shape, patch_size: int,
                  keep: float) -> PatchSubsets:
  """``num`` masks each keeping ``round(keep * patches)`` of the patches (see
  ``PatchSubsets``); nothing is drawn until a chunk is asked for.

  Raises:
    ValueError: ``num < 1``, ``keep`` outside [0, 1), or a shape that is not a whole
      number of ``patch_size`` patches.
  """
  h, w = _check_shape(shape)
  if num < 1:
    raise ValueError(f"num must be positive, got {num}.")
  if int(patch_size) < 1 or h % patch_size or w % patch_size:
    raise ValueError(f"shape {(h, w)} must be a whole number of patch_size x patch_size "
                     f"patches, got patch_size {patch_size}.")
  if not 0.0 <= keep < 1.0:
    raise ValueError(f"keep must be in [0, 1) (the fraction of patches left as they "
                     f"are), got {keep}.")
  patches = (h // patch_size) * (w // patch_size)
  dropped = patches - int(round(keep * patches))
  return PatchSubsets(key, int(num), (h, w), int(patch_size), int(dropped))


__all__ = ["ArrayMasks", "Boxes", "Grid", "MaskSource", "PatchSubsets", "RiseMasks",
           "SlidingWindows", "as_source", "boxes", "grid", "grid_cells", "patch_subsets",
           "rise", "rise_cell_size", "rise_grid",
           "rise_upsample", "sliding_windows", "to_array", "window_starts"]
