"""Evaluation metrics.

``auroc`` and the ROC helpers run on the host with numpy (once per evaluation).
The localization and faithfulness metrics for attribution maps are jax functions,
batched over images (maps ``(n, h, w)``, boolean box masks ``(n, h, w)``), for use
under ``jit`` with no per-image host loops. Maps are "larger = more important".
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from cejax import filters
from cejax._compile import jit, output_shape
from cejax._validation import check_channels_last
from cejax.estimands import activate, check_activation
from cejax.types import BoxMasks, Images, LogitsFn, Maps, Targets

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


SUBSTRATES = ("zero", "blur")
CURVES = ("deletion_zero", "deletion_blur", "insertion_blur")


def substrate(images, kind: str):
  """What deleted pixels become, in the model's input space: ``"zero"`` (0, the data
  mean for normalised inputs; Petsiuk et al.'s deletion) or ``"blur"`` (their
  insertion start: ``filters.petsiuk_blur``, 11 x 11 kernel, sigma 5, zero padding)."""
  if kind == "zero":
    return jnp.zeros_like(images)
  if kind == "blur":
    return filters.petsiuk_blur(images)
  raise ValueError(f"Unknown substrate {kind!r}; valid are {list(SUBSTRATES)}.")


def _check_curve_inputs(a):
  """Concrete targets must be classes of the model (an index past the end would be
  clamped to the last class by the gather, silently)."""
  targets = a["targets"]
  if np.ndim(a["images"]) == 4:
    check_channels_last(np.shape(a["images"]), "images")
  if not isinstance(targets, jax.core.Tracer):
    t = np.asarray(targets)
    if t.size and not np.issubdtype(t.dtype, np.integer):
      raise ValueError(f"targets must be integer classes, got dtype {t.dtype}.")
    k = output_shape(a["logits_fn"], tuple(np.shape(a["images"])), jnp.float32)[-1]
    if t.size and (t.min() < 0 or t.max() >= k):
      raise ValueError(f"targets must be classes in [0, {k}) of the model's {k} logits, "
                       f"got values in [{t.min()}, {t.max()}].")
  return a


@jit(data=("images", "maps", "targets"), prepare=_check_curve_inputs)
def deletion_insertion(logits_fn: LogitsFn, images: Images, maps: Maps, targets: Targets, *,
                       step: int | None = None,
                       curves=CURVES, activation: str = "softmax",
                       batch_size: int = 16) -> dict[str, jax.Array]:
  """Deletion and insertion AUCs (Petsiuk et al., 2018), ``{curve: (n,)}``, as their
  ``CausalMetric`` computes them.

  Pixels are taken in decreasing map order, ``step`` at a time (default: one image row,
  their rule): after ``i`` steps the first ``min(i * step, h * w)`` pixels of the order
  are changed, for ``i = 0 .. ceil(h * w / step)``. ``"deletion_<s>"`` replaces them in
  the image by substrate ``s`` (a faithful map makes the target probability fall
  fast: low AUC is good); ``"insertion_<s>"`` starts from substrate ``s`` and restores
  them (high AUC is good). Petsiuk et al. delete to ``zero`` and insert into ``blur``;
  deleting to ``blur`` as well scores maps with a perturbation they were not built from
  (CE and occlusion maps are built from zero fills). The AUC is the trapezoid mean over
  the steps (their ``auc``). ``targets`` should be the predicted classes, as theirs are.

  Ties: their code orders pixels by ``np.flip(np.argsort(map))``, numpy's default,
  unstable sort, whose order among equal values depends on numpy's version and the
  CPU's vector instructions. cejax fixes that order to their expression with a stable
  sort (``np.flip(np.argsort(map, kind="stable"))``: among equal values, later pixels
  first); maps without ties are ordered identically.

  Args:
    logits_fn: pure ``images -> logits``.
    images: ``(n, h, w, c)`` in the model's input space.
    maps: ``(n, h, w)``.
    targets: int ``(n,)``, the class whose probability is tracked.
    step: pixels changed per step; None: ``w`` (one row).
    curves: names ``"deletion_<substrate>"`` / ``"insertion_<substrate>"``.
    activation: ``"softmax"`` or ``"sigmoid"``.
  """
  images = jnp.asarray(images, jnp.float32)
  maps = jnp.asarray(maps, jnp.float32)
  targets = jnp.asarray(targets, jnp.int32)
  n, h, w, _ = images.shape
  if maps.shape != (n, h, w):
    raise ValueError(f"maps must be {(n, h, w)} to match images, got {maps.shape}.")
  step = w if step is None else int(step)
  if step < 1:
    raise ValueError(f"step must be a positive number of pixels, got {step}.")
  act = functools.partial(activate, activation=check_activation(activation))
  parsed = []
  for name in curves:
    mode, _, kind = name.partition("_")
    if mode not in ("deletion", "insertion") or kind not in SUBSTRATES:
      raise ValueError(f"Unknown curve {name!r}; use 'deletion_<s>' or 'insertion_<s>' "
                       f"with s in {list(SUBSTRATES)}.")
    parsed.append((mode, kind))
  num_steps = -(-h * w // step)
  counts = jnp.minimum(jnp.arange(num_steps + 1) * step, h * w)

  def one(image, saliency, target):
    order = jnp.flip(jnp.argsort(saliency.reshape(-1), stable=True))
    rank = jnp.zeros(h * w, jnp.int32).at[order].set(jnp.arange(h * w)).reshape(h, w)
    fills = [substrate(image, kind) for _, kind in parsed]

    def curve_at(count):  # every curve's probability after ``count`` pixels
      top = (rank < count).astype(jnp.float32)[..., None]
      x = jnp.stack([image * (1 - top) + fill * top if mode == "deletion"
                     else image * top + fill * (1 - top)
                     for (mode, _), fill in zip(parsed, fills, strict=True)])
      return act(logits_fn(x).astype(jnp.float32))[:, target]

    curve = jax.lax.map(curve_at, counts, batch_size=max(1, batch_size // len(parsed))).T
    return (curve[:, 1:] + curve[:, :-1]).mean(1) / 2

  aucs = jax.lax.map(lambda a: one(*a), (images, maps, targets))
  return {name: aucs[:, i] for i, name in enumerate(curves)}


# --- Chance levels ---------------------------------------------------------------------

CHANCE_MAPS = ("chance_noise", "chance_center", "chance_box")


def chance_maps(key, *, num: int, shape, box_shape) -> dict[str, Float[Array, "n h w"]]:
  """Maps that know nothing about the model, scored like any method to give each
  metric its chance level:

  - ``chance_noise``: i.i.d. uniform noise on [0, 1) per pixel;
  - ``chance_center``: a Gaussian centred on the image, ``sigma`` a quarter of each
    side (a prior that findings lie near the middle), the same for every image;
  - ``chance_box``: 1 inside a box of ``box_shape`` ``(bh, bw)`` pixels (the mean
    ground-truth box) placed uniformly at random inside the image, 0 outside.

  Args:
    key: PRNG key (the noise and the box positions).
    num: how many maps of each kind.
    shape: ``(h, w)``.
    box_shape: ``(bh, bw)`` in pixels, rounded and clipped to ``[1, side]``.

  Returns:
    ``{name: (num, h, w)}`` float32.
  """
  h, w = (int(s) for s in shape)
  bh, bw = (min(max(int(round(float(b))), 1), side) for b, side in zip(box_shape, (h, w),
                                                                        strict=True))
  k_noise, k_row, k_col = jax.random.split(key, 3)
  noise = jax.random.uniform(k_noise, (num, h, w))
  yy, xx = np.mgrid[:h, :w].astype(np.float32)
  centre = np.exp(-(((yy - (h - 1) / 2) / (h / 4)) ** 2
                    + ((xx - (w - 1) / 2) / (w / 4)) ** 2) / 2)
  top = jax.random.randint(k_row, (num, 1, 1), 0, h - bh + 1)
  left = jax.random.randint(k_col, (num, 1, 1), 0, w - bw + 1)
  rows, cols = jnp.arange(h)[None, :, None], jnp.arange(w)[None, None, :]
  box = ((rows >= top) & (rows < top + bh) & (cols >= left) & (cols < left + bw))
  return {"chance_noise": noise,
          "chance_center": jnp.broadcast_to(jnp.asarray(centre), (num, h, w)),
          "chance_box": box.astype(jnp.float32)}


# Metrics where lower is better; every other score is higher-is-better.
LOWER_IS_BETTER = ("deletion_zero", "deletion_blur")


def uninformative(rows: dict, *, chance: str = "chance_noise") -> dict:
  """Which metric columns do not separate methods from chance: those where the
  ``chance`` row's mean lies within the 95 % interval of the best other method (the
  largest mean, or the smallest for ``LOWER_IS_BETTER``), or beyond it (noise scoring
  better than every method).

  Args:
    rows: ``{method: {metric: (mean, lo, hi) or [(mean, lo, hi), ...] per level}}``.
    chance: the row of uniform noise.

  Returns:
    ``{metric: bool}``, or a list of bools per level for list-valued metrics; metrics
    the chance row lacks are left out.
  """
  if chance not in rows:
    return {}
  others = {m: r for m, r in rows.items() if m not in CHANCE_MAPS}
  out = {}
  for metric, noise in rows[chance].items():
    levels = noise if _is_list_of_intervals(noise) else [noise]
    flags = []
    for i, level in enumerate(levels):
      candidates = []
      for r in others.values():
        value = r.get(metric)
        if value is None:
          continue
        value = value[i] if _is_list_of_intervals(noise) else value
        if np.isfinite(value[0]):
          candidates.append(value)
      if not candidates or not np.isfinite(level[0]):
        flags = None
        break
      if metric in LOWER_IS_BETTER:
        best = min(candidates, key=lambda v: v[0])
        flags.append(bool(level[0] <= best[2]))
      else:
        best = max(candidates, key=lambda v: v[0])
        flags.append(bool(level[0] >= best[1]))
    if flags is not None:
      out[metric] = flags if _is_list_of_intervals(noise) else flags[0]
  return out


def _is_list_of_intervals(value) -> bool:
  return (isinstance(value, (list, tuple)) and len(value) > 0
          and isinstance(value[0], (list, tuple)))
