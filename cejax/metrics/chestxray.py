"""The localization metrics the chest X-ray field reports, on ``(n, h, w)`` maps and boxes.

- ``t_iobb``: Wang et al. (ChestX-ray8, CVPR 2017). The map is normalised to [0, 255],
  thresholded (they use 60 and 180), and a box is drawn around every connected region
  of each binary map (8-connected here; see below); an image is localised at
  ``T(IoBB)`` when some box's *intersection over the detected box* (the part of the
  box inside the ground truth) exceeds ``T`` (they report 0.1 to 0.9). A flat map
  detects no region and is a miss, counted in the denominator as Wang et al. count
  every image. The metric rewards small detections: uniform noise, whose isolated
  bright pixels inside the box are boxes wholly inside it, scores near 1 (the chance
  rows of ``metrics.chance_maps`` show it).
- ``otsu_iou``: CheXlocalize (Saporta et al., Nature Machine Intelligence 2022). The
  map is normalised to ``uint8`` [0, 255] (scaled to its range, truncated), Otsu's
  threshold splits it, and the region above it is scored by IoU with the ground truth;
  mIoU is the mean over images (an image whose map is flat gives NaN and is left out,
  as their ``true_pos_only`` evaluation leaves out empty segmentations).
- ``hit``: CheXlocalize's hit rate: the map's maximum (the first in row-major order,
  as ``np.argmax``) lies inside the ground truth (no tolerance, unlike the pointing
  game of ``metrics.pointing_game``).

Everything is pure JAX under ``jit`` (connected regions by label propagation, Otsu by a
256-bin histogram); the tests compare each with ``scipy.ndimage.label`` /
``find_objects`` and ``skimage.filters.threshold_otsu``. Ground truth is a boolean
``(n, h, w)`` mask (the union of an image's boxes).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from cejax.types import BoxMasks, Maps

WANG_THRESHOLDS = (60, 180)
WANG_LEVELS = (0.1, 0.25, 0.5)


def to_uint8_range(maps: Maps) -> Float[Array, "n h w"]:
  """Each map scaled to [0, 255] by its minimum and range, truncated to integers
  (CheXlocalize's ``np.uint8(255 * (m - min) / max(m - min))``); NaN for a flat map."""
  maps = jnp.asarray(maps, jnp.float32)
  low = maps.min((1, 2), keepdims=True)
  spread = (maps - low).max((1, 2), keepdims=True)
  scaled = 255 * (maps - low) / jnp.where(spread > 0, spread, jnp.nan)
  return jnp.floor(scaled)


def _components(binary):
  """Connected regions (8-connected) of one ``(h, w)`` boolean map: each foreground
  pixel's label is the smallest flat index of its region; background is ``h * w``."""
  h, w = binary.shape
  big = h * w
  labels = jnp.where(binary, jnp.arange(big).reshape(h, w), big)

  def step(labels):
    padded = jnp.pad(labels, 1, constant_values=big)
    shifted = [padded[1 + dy:1 + dy + h, 1 + dx:1 + dx + w]
               for dy in (-1, 0, 1) for dx in (-1, 0, 1)]
    return jnp.where(binary, jnp.min(jnp.stack(shifted), 0), big)

  def going(state):
    labels, previous = state
    return jnp.any(labels != previous)

  labels, _ = jax.lax.while_loop(going, lambda s: (step(s[0]), s[0]),
                                 (step(labels), labels))
  return labels


def region_boxes(binary) -> jax.Array:
  """Boxes ``(h * w, 4)`` (row0, col0, row1, col1, inclusive) around the connected
  regions of one ``(h, w)`` boolean map, indexed by region label; a label with no
  region has row0 > row1."""
  h, w = binary.shape
  labels = _components(binary).reshape(-1)
  rows, cols = jnp.divmod(jnp.arange(h * w), w)
  seg = lambda f, v, fill: f(jnp.where(labels < h * w, v, fill), labels,  # noqa: E731
                             num_segments=h * w + 1)[:h * w]
  return jnp.stack([seg(jax.ops.segment_min, rows, h), seg(jax.ops.segment_min, cols, w),
                    seg(jax.ops.segment_max, rows, -1), seg(jax.ops.segment_max, cols, -1)],
                   -1)


def _box_sums(mask, boxes):
  """How many pixels of ``mask (h, w)`` lie in each box ``(k, 4)`` (an integral image)."""
  integral = jnp.pad(jnp.cumsum(jnp.cumsum(mask.astype(jnp.float32), 0), 1), ((1, 0), (1, 0)))
  r0, c0, r1, c1 = (boxes[:, i] for i in range(4))
  r1, c1 = jnp.maximum(r1, r0 - 1), jnp.maximum(c1, c0 - 1)
  return (integral[r1 + 1, c1 + 1] - integral[r0, c1 + 1] - integral[r1 + 1, c0]
          + integral[r0, c0])


def best_iobb(maps: Maps, boxes: BoxMasks, *,
              thresholds: Sequence[int] = WANG_THRESHOLDS) -> Float[Array, " n"]:
  """Per image, the largest intersection over the detected box of any box drawn around
  a region of the map at any of ``thresholds`` (0 when no region, a flat map too)."""
  scaled = to_uint8_range(maps)
  boxes = jnp.asarray(boxes, bool)

  def one(m, gt):
    best = jnp.float32(0.0)
    for t in thresholds:
      regions = region_boxes(m >= t)
      r0, c0, r1, c1 = (regions[:, i] for i in range(4))
      area = ((r1 - r0 + 1) * (c1 - c0 + 1)).astype(jnp.float32)
      iobb = jnp.where(r1 >= r0, _box_sums(gt, regions) / jnp.maximum(area, 1), 0.0)
      best = jnp.maximum(best, iobb.max())
    return jnp.where(jnp.isfinite(m).all(), best, 0.0)  # flat: no detection, a miss

  return jax.vmap(one)(scaled, boxes)


def t_iobb(maps: Maps, boxes: BoxMasks, *, levels: Sequence[float] = WANG_LEVELS,
           thresholds: Sequence[int] = WANG_THRESHOLDS) -> dict[float, jax.Array]:
  """Wang et al.'s localization at each ``T(IoBB)`` level: ``{T: (n,)}``, 1.0 where some
  detected box's IoBB exceeds ``T`` (0.0 for a flat map: no detection)."""
  best = best_iobb(maps, boxes, thresholds=thresholds)
  return {t: (best > t).astype(jnp.float32) for t in levels}


def _otsu_on_host(values: np.ndarray) -> np.ndarray:
  """Otsu's threshold of each ``(h, w)`` map of integers in [0, 255] (any leading dims).

  The between-class variance ``(N S1 - S w1)^2 / (w1 w2)`` (Otsu's criterion times N^2)
  is formed from exact integers (int64) and rounded once to float64: float32 sums pick a
  neighbouring grey level on near-ties (2 of 1,600 random maps), float64 picks
  scikit-image's.
  """
  lead = values.shape[:-2]
  flat = values.reshape(-1, values.shape[-2] * values.shape[-1]).astype(np.int64)
  out = np.empty(len(flat), np.float32)
  levels = np.arange(256, dtype=np.int64)
  for i, v in enumerate(flat):
    if v.min() == v.max():  # scikit-image returns the single value
      out[i] = v[0]
      continue
    hist = np.bincount(v, minlength=256)
    w1 = np.cumsum(hist)[:-1]
    s1 = np.cumsum(hist * levels)[:-1]
    total, mass = w1[-1] + hist[-1], s1[-1] + 255 * hist[-1]
    spread = (total * s1 - mass * w1).astype(np.float64)
    both = w1 * (total - w1)
    between = np.where(both > 0, spread * spread / np.maximum(both, 1), 0.0)
    out[i] = np.argmax(between)
  return out.reshape(lead)


def otsu_threshold(values) -> jax.Array:
  """Otsu's threshold of integer values in [0, 255] (``skimage.filters.threshold_otsu``
  on the ``uint8`` map): the region above it is ``values > t``. Leading dims are maps.

  Computed on the host in exact integers (a ``jax.pure_callback``, so it runs under
  ``jit`` and ``vmap``; it has no gradient, as a threshold has none).
  """
  values = jnp.asarray(values)
  if values.ndim < 2:
    raise ValueError(f"otsu_threshold expects maps of shape (..., h, w), got {values.shape}")
  out = jax.ShapeDtypeStruct(values.shape[:-2], jnp.float32)
  return jax.pure_callback(lambda v: _otsu_on_host(np.asarray(v)), out,
                           jnp.clip(jnp.round(values), 0, 255), vmap_method="expand_dims")


def otsu_iou(maps: Maps, boxes: BoxMasks) -> Float[Array, " n"]:
  """CheXlocalize's IoU of the Otsu segmentation of each map with the ground truth
  (NaN for a flat map)."""
  scaled = to_uint8_range(maps)
  boxes = jnp.asarray(boxes, bool)

  def one(m, gt):
    region = m > otsu_threshold(jnp.nan_to_num(m))
    union = (region | gt).sum()
    iou = (region & gt).sum() / jnp.maximum(union, 1)
    return jnp.where(jnp.isfinite(m).all(), iou, jnp.nan)

  return jax.vmap(one)(scaled, boxes)


def hit(maps: Maps, boxes: BoxMasks) -> Float[Array, " n"]:
  """CheXlocalize's hit: 1.0 where the map's first maximum lies in the ground truth."""
  maps = jnp.asarray(maps, jnp.float32)
  n, h, w = maps.shape
  flat = jnp.argmax(maps.reshape(n, -1), -1)
  return jnp.asarray(boxes, bool).reshape(n, -1)[jnp.arange(n), flat].astype(jnp.float32)


__all__ = ["WANG_LEVELS", "WANG_THRESHOLDS", "best_iobb", "hit", "otsu_iou", "otsu_threshold",
           "region_boxes", "t_iobb", "to_uint8_range"]
