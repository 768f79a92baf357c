"""Localization of attribution maps against ground-truth boxes: the pointing game, mass
in box, IoU at half range and T(IoU). Pure JAX, batched over images (maps ``(n, h, w)``,
boolean box masks ``(n, h, w)``); maps are "larger = more important"."""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from cejax.types import BoxMasks, Maps

# The ChestX-ray14 localization protocol (Wang et al., 2017): T(IoU) at these levels.
IOU_THRESHOLDS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7)


def _check_maps(maps, boxes):
  maps = jnp.asarray(maps, jnp.float32)
  boxes = jnp.asarray(boxes).astype(bool)
  if maps.ndim != 3 or boxes.shape != maps.shape:
    raise ValueError(f"maps and box masks must both be (n, h, w); got {maps.shape} and "
                     f"{boxes.shape}.")
  return maps, boxes


POINTING_TOLERANCE_224 = 15.0  # Zhang et al.'s tolerance, in pixels at 224 x 224
POINTING_TIES = ("first", "any", "majority", "strict")


def pointing_tolerance(shape) -> float:
  """Zhang et al.'s 15 px at 224 px, scaled with the shorter image side."""
  return POINTING_TOLERANCE_224 * min(shape) / 224.0


def _dilate(boxes, radius: float):
  """Pixels whose centre lies closer than ``radius`` (Euclidean) to a box pixel."""
  if radius <= 1:
    return boxes  # no other pixel centre is closer than 1
  r = math.ceil(radius) - 1
  t = np.arange(-r, r + 1)
  disk = ((t[:, None] ** 2 + t[None, :] ** 2) < radius**2).astype(np.float32)
  x = boxes.astype(jnp.float32)[:, :, :, None]
  hits = jax.lax.conv_general_dilated(x, jnp.asarray(disk)[:, :, None, None], (1, 1),
                                      [(r, r), (r, r)],
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"))
  return hits[..., 0] > 0.5


def pointing_game(maps: Maps, boxes: BoxMasks, *,
                  tolerance: float | None = None, ties: str = "first",
                  rtol: float = 0.0):
  """The pointing game of Zhang et al. (2016), ``(n,)`` bool.

  Standard form (the defaults): the map's maximum is a hit when it lies inside the
  box or closer than ``tolerance`` pixels to it (Euclidean distance between pixel
  centres, strictly less, as in TorchRay's ``PointingGame``). ``tolerance=None`` is
  Zhang et al.'s 15 px at 224 px scaled to the image (``pointing_tolerance``);
  ``tolerance=0`` asks for the box itself.

  Ties: ``"first"`` (default) points at the first maximal pixel in row-major order,
  ``numpy.argmax``'s and ``torch.argmax``'s choice. Documented alternatives: the tied
  peak (every pixel within ``rtol`` of the maximum, relative to the map's range) hits
  when ``"any"`` of it hits (Quantus' ``PointingGame``), a ``"majority"`` of it hits,
  or all of it (``"strict"``). With any rule a flat map (max == min) is a miss, and an
  image without a box is a miss.

  Args:
    maps: ``(n, h, w)``, larger = more important.
    boxes: ``(n, h, w)`` bool ground-truth regions.
    tolerance: pixels; ``None`` for the scaled standard.
    ties: one of ``POINTING_TIES``.
    rtol: peak width for the tie rules other than ``"first"``.
  """
  maps, boxes = _check_maps(maps, boxes)
  if ties not in POINTING_TIES:
    raise ValueError(f"ties must be one of {POINTING_TIES}, got {ties!r}.")
  n, h, w = maps.shape
  tolerance = pointing_tolerance((h, w)) if tolerance is None else float(tolerance)
  if tolerance < 0:
    raise ValueError(f"tolerance must be >= 0 pixels, got {tolerance}.")
  accept = _dilate(boxes, tolerance)
  hi = maps.max((1, 2), keepdims=True)
  lo = maps.min((1, 2), keepdims=True)
  if ties == "first":
    first = jnp.argmax(maps.reshape(n, -1), -1)
    hit = jnp.take_along_axis(accept.reshape(n, -1), first[:, None], 1)[:, 0]
  else:
    peak = maps >= hi - rtol * (hi - lo)
    inside = (peak & accept).sum((1, 2))
    total = peak.sum((1, 2))
    hit = {"any": inside > 0, "majority": inside * 2 > total,
           "strict": inside == total}[ties]
  return hit & (hi[:, 0, 0] > lo[:, 0, 0]) & boxes.any((1, 2))


def mass_in_box(maps: Maps, boxes: BoxMasks) -> Float[Array, " n"]:
  """Fraction of the positive attribution mass inside the box, ``(n,)``; 0 if none."""
  maps, boxes = _check_maps(maps, boxes)
  pos = jax.nn.relu(maps)
  total = pos.sum((1, 2))
  return jnp.where(total > 0, (pos * boxes).sum((1, 2)) / jnp.where(total > 0, total, 1), 0.0)


def normalize_maps(maps):
  """Min-max scaling of each map to [0, 1] (flat maps become 0)."""
  maps = jnp.asarray(maps, jnp.float32)
  lo = maps.min((1, 2), keepdims=True)
  span = maps.max((1, 2), keepdims=True) - lo
  return jnp.where(span > 0, (maps - lo) / jnp.where(span > 0, span, 1), 0.0)


def iou(maps: Maps, boxes: BoxMasks, *, level: float = 0.5) -> Float[Array, " n"]:
  """IoU of the region where the min-max-normalised map is >= ``level`` with the box."""
  maps, boxes = _check_maps(maps, boxes)
  region = (normalize_maps(maps) >= level) & (maps.max((1, 2), keepdims=True)
                                              > maps.min((1, 2), keepdims=True))
  inter = (region & boxes).sum((1, 2))
  union = (region | boxes).sum((1, 2))
  return jnp.where(union > 0, inter / jnp.where(union > 0, union, 1), 0.0)


def localization_accuracy(ious, thresholds: Sequence[float] = IOU_THRESHOLDS):
  """T(IoU): the fraction of images whose IoU exceeds each threshold, ``(t,)``."""
  ious = jnp.asarray(ious, jnp.float32)
  return (ious[None, :] > jnp.asarray(thresholds)[:, None]).mean(1)
