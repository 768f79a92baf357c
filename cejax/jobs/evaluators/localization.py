"""Localization and faithfulness of each map, and the model-randomisation sanity check.

Every table carries the chance rows of ``metrics.chance_maps`` (uniform noise, a centred
Gaussian, a random box of the mean box size), scored by the same code, and each metric
a 95 % bootstrap interval over images; ``summarize`` names the columns where noise's
interval reaches the best method's (``metrics.uninformative``).

Localization (images with a box): the standard pointing game (Zhang et al.'s
tolerance scaled to the image, first maximum), mass in box, IoU at half the map's
range, and the chest X-ray field's metrics (``cejax.metrics.chestxray``): Wang et al.'s
T(IoBB), CheXlocalize's Otsu IoU and hit rate; faithfulness (every image): Petsiuk et
al.'s deletion/insertion AUCs for the substrates of ``metrics.CURVES``, of the
predicted class as theirs are (of the map's target, the boxed finding, for multi-label
models), ``analysis.deletion_step`` pixels a step (0: one image row, theirs). Sanity
(Adebayo et al.): Spearman rank correlation between the maps of the trained and a
re-initialised model.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from cejax import metrics
from cejax.jobs.evaluators.common import Context, Inputs, field
from cejax.jobs.evaluators.maps import compute_maps
from cejax.metrics import chestxray

SANITY_METHODS = ("ce_grid", "gradient", "gradient_x_input", "grad_cam", "ce_grid_token_drop",
                  "token_grad_cam")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Localization:
  """Per-image scores, ``{method: (n,)}`` each; ``curves[curve][method]`` for the
  deletion/insertion AUCs of ``metrics.CURVES``."""

  pointing: dict[str, Any] = field()
  mass: dict[str, Any] = field()
  iou: dict[str, Any] = field()
  iobb: dict[str, Any] = field()
  otsu_iou: dict[str, Any] = field()
  hit: dict[str, Any] = field()
  curves: dict[str, dict[str, Any]] = field()


def localization(logits_fn, images, maps, boxes, targets, *, activation, step,
                 batch_size) -> Localization:
  """The scores of every map in ``maps`` (``{method: (n, h, w)}``); ``targets`` are the
  classes deletion and insertion track."""
  # Every method's scores from one call per metric on the maps stacked along the image
  # axis: each image is scored on its own (vmap, lax.map), so the scores are the
  # per-method calls', and the compiled program holds each metric (and the network of
  # the deletion curves) once, not once per method (14 methods: 4.2 s -> 2.4 s to compile).
  names, n = list(maps), len(images)
  if not names:
    return Localization({}, {}, {}, {}, {}, {}, {c: {} for c in metrics.CURVES})
  stacked = jnp.concatenate([maps[name] for name in names])
  tiled = jnp.tile(jnp.asarray(boxes), (len(names), 1, 1))

  def per_method(values):
    return {name: values[i * n:(i + 1) * n] for i, name in enumerate(names)}

  curves = metrics.deletion_insertion(
      logits_fn, jnp.tile(images, (len(names), 1, 1, 1)), stacked,
      jnp.tile(targets, len(names)), step=step, activation=activation,
      batch_size=batch_size)
  return Localization(
      pointing=per_method(metrics.pointing_game(stacked, tiled).astype(jnp.float32)),
      mass=per_method(metrics.mass_in_box(stacked, tiled)),
      iou=per_method(metrics.iou(stacked, tiled)),
      iobb=per_method(chestxray.best_iobb(stacked, tiled)),
      otsu_iou=per_method(chestxray.otsu_iou(stacked, tiled)),
      hit=per_method(chestxray.hit(stacked, tiled)),
      curves={c: per_method(v) for c, v in curves.items()})


class LocalizationEvaluator:
  """Scores the maps of the ``maps`` evaluator against the boxes and by deletion."""

  name: ClassVar[str] = "localization"
  requires: ClassVar[tuple[str, ...]] = ("maps",)
  result_type: ClassVar[type] = Localization

  def __init__(self, context: Context):
    model, s = context.model, context.settings
    self._activation = model.activation
    self._score = jax.jit(lambda x, m, b, t: localization(
        model.logits_fn, x, m, b, t, activation=model.activation,
        step=s.deletion_step or None, batch_size=s.batch_size))

  def evaluate(self, inputs: Inputs, earlier, *, key) -> Localization:
    del key
    # Petsiuk et al. track the predicted class (a multi-label model: the map's finding).
    tracked = (jnp.argmax(inputs.logits, -1) if self._activation == "softmax"
               else inputs.target)
    return self._score(inputs.images, earlier["maps"].maps, inputs.box, tracked)

  def summarize(self, results, inputs: Inputs) -> dict[str, Any]:
    """Means with 95% bootstrap intervals: localization over boxed images, deletion
    and insertion over all; T(IoU) at ``metrics.IOU_THRESHOLDS``."""
    loc: Localization = results[self.name]
    boxed = inputs.has_box.astype(bool)
    table = {}
    for m in loc.pointing:
      row = {metric: metrics.bootstrap_interval(getattr(loc, metric)[m][boxed])
             for metric in ("pointing", "mass", "iou", "otsu_iou", "hit")}
      row.update({c: metrics.bootstrap_interval(loc.curves[c][m]) for c in metrics.CURVES})
      ious = np.asarray(loc.iou[m][boxed], np.float64)
      row["t_iou"] = [metrics.bootstrap_interval(ious > t) for t in metrics.IOU_THRESHOLDS]
      # A flat map (best IoBB 0, or NaN in chunks stored before flat maps were misses)
      # detects nothing: a miss, in the denominator as Wang et al. count it.
      iobb = np.nan_to_num(np.asarray(loc.iobb[m][boxed], np.float64), nan=0.0)
      row["t_iobb"] = [metrics.bootstrap_interval(iobb > t) for t in chestxray.WANG_LEVELS]
      table[m] = row
    return {"methods": table, "uninformative": metrics.uninformative(table),
            "iou_thresholds": list(metrics.IOU_THRESHOLDS),
            "iobb_levels": list(chestxray.WANG_LEVELS),
            "pointing_tolerance_px": metrics.pointing_tolerance(inputs.box.shape[1:3])}


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Sanity:
  """``spearman[method]``: ``(n,)`` rank correlation of trained vs random-model maps."""

  spearman: dict[str, Any] = field()


class SanityEvaluator:
  """Maps of ``SANITY_METHODS`` (those the maps evaluator computed) on a re-initialised
  network, compared with the trained network's by Spearman rank correlation."""

  name: ClassVar[str] = "sanity"
  requires: ClassVar[tuple[str, ...]] = ("maps",)
  result_type: ClassVar[type] = Sanity

  def __init__(self, context: Context):
    if context.random_model is None:
      raise ValueError("The sanity evaluator needs Context.random_model (a re-initialised "
                       "network, evaluators.random_model).")
    self._methods = tuple(m for m in SANITY_METHODS if m in context.settings.methods)
    rand, s = context.random_model, context.settings
    self._maps = jax.jit(lambda x, t, k: compute_maps(rand, x, t, key=k, settings=s,
                                                      mask_spec=context.masks,
                                                      methods=self._methods))

  def evaluate(self, inputs: Inputs, earlier, *, key) -> Sanity:
    trained = earlier["maps"].maps
    random = self._maps(inputs.images, inputs.target, key)
    return Sanity(spearman={m: metrics.spearman(trained[m], random[m])
                            for m in self._methods})

  def summarize(self, results, inputs: Inputs) -> dict[str, Any]:
    del inputs
    return {"methods": {m: {"sanity_spearman": metrics.bootstrap_interval(v)}
                        for m, v in results[self.name].spearman.items()}}
