"""Statistics over images: ROC curves and AUROC (on the host, numpy), bootstrap
intervals, and rank correlation (Spearman, as scipy's ``spearmanr``)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from cejax.types import Maps


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


def average_ranks(x):
  """1-based ranks of a flat array, ties given their average rank (as scipy's
  ``rankdata``)."""
  order = jnp.sort(x)
  below = jnp.searchsorted(order, x, side="left")
  up_to = jnp.searchsorted(order, x, side="right")
  return (below + up_to + 1).astype(jnp.float32) / 2


@jax.jit  # one program, not a compilation per eager op
def spearman(a: Maps, b: Maps) -> Float[Array, " n"]:
  """Spearman rank correlation between paired maps, ``(n,)`` (flattened per map).

  Equal to ``scipy.stats.spearmanr``: ties get average ranks, and a constant map
  (whose ranks have no variance) gives NaN.
  """
  a = jnp.asarray(a, jnp.float32).reshape(len(a), -1)
  b = jnp.asarray(b, jnp.float32).reshape(len(b), -1)
  ra, rb = jax.vmap(average_ranks)(a), jax.vmap(average_ranks)(b)
  ra = ra - ra.mean(1, keepdims=True)
  rb = rb - rb.mean(1, keepdims=True)
  den = jnp.sqrt((ra**2).sum(1) * (rb**2).sum(1))
  return jnp.where(den > 0, (ra * rb).sum(1) / jnp.where(den > 0, den, 1.0), jnp.nan)
