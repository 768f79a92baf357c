"""Evaluation metrics.

``auroc`` and the ROC helpers run on the host with numpy (once per evaluation).
The localization and faithfulness metrics for attribution maps are jax functions,
batched over images (maps ``(n, h, w)``, boolean box masks ``(n, h, w)``), for use
under ``jit`` with no per-image host loops. Maps are "larger = more important".
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

# The ChestX-ray14 localization protocol (Wang et al., 2017): T(IoU) at these levels.
IOU_THRESHOLDS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7)


def auroc(scores: np.ndarray, labels: np.ndarray) -> float:
  """Area under the ROC curve (Mann-Whitney U with tie correction).

  Args:
    scores: ``(n,)`` real scores, higher meaning more positive.
    labels: ``(n,)`` 0/1 ground truth.

  Returns:
    The AUROC, or NaN when only one class is present.
  """
  scores = np.asarray(scores, np.float64)
  labels = np.asarray(labels).astype(bool)
  n_pos, n_neg = labels.sum(), (~labels).sum()
  if n_pos == 0 or n_neg == 0:
    return float("nan")
  order = np.argsort(scores, kind="mergesort")
  ranks = np.empty(len(scores), np.float64)
  sorted_scores = scores[order]
  # Average ranks over ties.
  _, first, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
  avg = first + (counts - 1) / 2.0 + 1.0
  ranks[order] = np.repeat(avg, counts)
  u = ranks[labels].sum() - n_pos * (n_pos + 1) / 2.0
  return float(u / (n_pos * n_neg))


def roc_curve(scores, labels) -> tuple[np.ndarray, np.ndarray]:
  """``(fpr, tpr)`` at every distinct threshold, from (0, 0) to (1, 1)."""
  scores = np.asarray(scores, np.float64)
  labels = np.asarray(labels).astype(bool)
  order = np.argsort(-scores, kind="mergesort")
  s, y = scores[order], labels[order]
  last = np.r_[np.nonzero(np.diff(s))[0], len(s) - 1]  # end of each tie group
  tp, fp = np.cumsum(y)[last], np.cumsum(~y)[last]
  tpr = np.r_[0.0, tp / max(y.sum(), 1)]
  fpr = np.r_[0.0, fp / max((~y).sum(), 1)]
  return fpr, tpr


def tpr_at_fpr(scores, labels, *, fpr: float = 0.05) -> float:
  """Largest true-positive rate among thresholds whose false-positive rate <= ``fpr``."""
  f, t = roc_curve(scores, labels)
  return float(t[f <= fpr + 1e-12].max())


def bootstrap_interval(values, *, key_seed: int = 0, num: int = 1000,
                       level: float = 0.95) -> tuple[float, float, float]:
  """Mean and percentile-bootstrap interval of the mean over images (NaNs dropped)."""
  values = np.asarray(values, np.float64)
  values = values[np.isfinite(values)]
  if values.size == 0:
    return float("nan"), float("nan"), float("nan")
  rng = np.random.default_rng(key_seed)
  means = values[rng.integers(0, values.size, (num, values.size))].mean(1)
  lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
  return float(values.mean()), float(lo), float(hi)


def _check_maps(maps, boxes):
  maps = jnp.asarray(maps, jnp.float32)
  boxes = jnp.asarray(boxes).astype(bool)
  if maps.ndim != 3 or boxes.shape != maps.shape:
    raise ValueError(f"maps and box masks must both be (n, h, w); got {maps.shape} and "
                     f"{boxes.shape}.")
  return maps, boxes


def pointing_game(maps, boxes, *, ties: str = "majority", rtol: float = 1e-6):
  """Whether each map's peak falls in the box (Zhang et al., 2016), ``(n,)`` bool.

  Ties: the *peak* is every pixel within ``rtol`` of the maximum (relative to the
  map's range). A flat map (max == min) is never a hit. Otherwise the hit needs more
  than half of the peak inside the box (``ties="majority"``, which lets coarse,
  blocky maps such as grid CE maps score when their peak block is mostly inside) or
  all of it (``ties="strict"``). Either way, a tie split evenly is a miss, and no
  arbitrary argmax order decides a hit.
  """
  maps, boxes = _check_maps(maps, boxes)
  if ties not in ("majority", "strict"):
    raise ValueError(f"ties must be 'majority' or 'strict', got {ties!r}.")
  hi = maps.max((1, 2), keepdims=True)
  lo = maps.min((1, 2), keepdims=True)
  peak = maps >= hi - rtol * (hi - lo)
  inside = (peak & boxes).sum((1, 2))
  total = peak.sum((1, 2))
  hit = inside * 2 > total if ties == "majority" else inside == total
  return hit & (hi[:, 0, 0] > lo[:, 0, 0]) & boxes.any((1, 2))


def mass_in_box(maps, boxes):
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


def iou(maps, boxes, *, level: float = 0.5):
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


def _ranks(x):
  """Ranks 0..n-1 of a flat array (ties broken by position)."""
  return jnp.argsort(jnp.argsort(x)).astype(jnp.float32)


def spearman(a, b):
  """Spearman rank correlation between paired maps, ``(n,)`` (flattened per map)."""
  a = jnp.asarray(a, jnp.float32).reshape(len(a), -1)
  b = jnp.asarray(b, jnp.float32).reshape(len(b), -1)
  ra, rb = jax.vmap(_ranks)(a), jax.vmap(_ranks)(b)
  ra = ra - ra.mean(1, keepdims=True)
  rb = rb - rb.mean(1, keepdims=True)
  return (ra * rb).sum(1) / jnp.sqrt((ra**2).sum(1) * (rb**2).sum(1))


def deletion_insertion(logits_fn: Callable, images, maps, targets, *, steps: int = 16,
                       fill=0.0, activation: str = "softmax", batch_size: int = 16):
  """Deletion and insertion AUC (Petsiuk et al., 2018), ``((n,), (n,))``.

  Pixels are taken in decreasing map order (ties by position), ``steps`` equal
  fractions at a time. Deletion replaces the top pixels by ``fill`` in the original
  image (a faithful map makes the target probability fall fast: low AUC is good);
  insertion starts from an all-``fill`` image and restores them (high AUC is good).
  The AUC is the trapezoid mean over the ``steps + 1`` fractions 0, 1/steps, ..., 1.
  """
  images = jnp.asarray(images, jnp.float32)
  maps = jnp.asarray(maps, jnp.float32)
  targets = jnp.asarray(targets, jnp.int32)
  n, h, w, _ = images.shape
  if maps.shape != (n, h, w):
    raise ValueError(f"maps must be {(n, h, w)} to match images, got {maps.shape}.")
  act = jax.nn.softmax if activation == "softmax" else jax.nn.sigmoid
  counts = jnp.round(jnp.linspace(0, h * w, steps + 1)).astype(jnp.int32)

  def one(image, saliency, target):
    order = jnp.argsort(-saliency.reshape(-1))
    rank = jnp.zeros(h * w, jnp.int32).at[order].set(jnp.arange(h * w)).reshape(h, w)
    top = (rank[None] < counts[:, None, None]).astype(jnp.float32)[..., None]
    deleted = image * (1 - top) + fill * top
    inserted = image * top + fill * (1 - top)
    x = jnp.concatenate([deleted, inserted])
    logits = jax.lax.map(lambda xi: logits_fn(xi[None])[0], x, batch_size=batch_size)
    curve = act(logits.astype(jnp.float32))[:, target]
    d, i = curve[: steps + 1], curve[steps + 1:]
    auc = lambda c: (c[1:] + c[:-1]).mean() / 2
    return auc(d), auc(i)

  return jax.lax.map(lambda a: one(*a), (images, maps, targets))
