"""The analysis as evaluators, one per job, chosen by ``config.analysis.evaluators``.

In the style of big_vision's evaluators: each receives the model as pure functions
(``Context``), computes a typed per-image result for a chunk of images
(``evaluate``), and turns all images' results into its section of ``metrics.json``
(``summarize``). An evaluator may use the results of those it ``requires`` for the
same chunk (localization scores the maps of the maps evaluator).

Any class with this shape is an evaluator:

  name: ClassVar[str]; requires: ClassVar[tuple[str, ...]]
  result_type: ClassVar[type | None]   # a pytree dataclass, None if nothing per image
  __init__(self, context: Context)
  evaluate(self, inputs: Inputs, earlier: {name: result}, *, key) -> result | None
  summarize(self, results: {name: result}, inputs: Inputs) -> dict
"""

from __future__ import annotations

import difflib
from typing import Any, ClassVar, Protocol

from cejax.jobs.evaluators.adversarial import (
    ATTACKS,
    CE_FEATURES,
    AttacksEvaluator,
    UnderAttack,
    ce_features,
)
from cejax.jobs.evaluators.common import (
    Context,
    Inputs,
    Model,
    make_model,
    pixel_space,
    prepare_inputs,
    random_model,
)
from cejax.jobs.evaluators.defended import Defended, DefensesEvaluator
from cejax.jobs.evaluators.detection import (
    DetectionEvaluator,
    detection,
    fit_logistic,
    paired_auroc_interval,
)
from cejax.jobs.evaluators.localization import (
    SANITY_METHODS,
    Localization,
    LocalizationEvaluator,
    Sanity,
    SanityEvaluator,
)
from cejax.jobs.evaluators.maps import (
    MAP_METHODS,
    OPTIMISED_METHODS,
    Maps,
    MapsEvaluator,
    check_methods_for_model,
    compute_maps,
    families_of,
)


class Evaluator(Protocol):
  """The evaluator protocol (see the module docstring)."""

  name: ClassVar[str]
  requires: ClassVar[tuple[str, ...]]
  result_type: ClassVar[type | None]

  def evaluate(self, inputs: Inputs, earlier: dict[str, Any], *, key) -> Any: ...

  def summarize(self, results: dict[str, Any], inputs: Inputs) -> dict[str, Any]: ...


# Every evaluator, in the order they run (each after those it requires).
EVALUATORS: dict[str, type] = {e.name: e for e in (
    MapsEvaluator, LocalizationEvaluator, SanityEvaluator, AttacksEvaluator,
    DetectionEvaluator, DefensesEvaluator)}


def select(names, registry=None) -> list[type]:
  """The evaluator classes named in ``names``, in run order.

  Raises:
    ValueError: an unknown name (naming the closest valid one), or an evaluator
      without one it requires.
  """
  registry = EVALUATORS if registry is None else registry
  for name in names:
    if name not in registry:
      close = difflib.get_close_matches(name, list(registry), n=1)
      hint = f" Did you mean {close[0]!r}?" if close else ""
      raise ValueError(f"Unknown evaluator {name!r} in analysis.evaluators.{hint} Valid "
                       f"are {list(registry)}.")
  chosen = [cls for name, cls in registry.items() if name in names]
  for cls in chosen:
    missing = [r for r in cls.requires if r not in names]
    if missing:
      raise ValueError(f"Evaluator {cls.name!r} requires {missing}; add them to "
                       "analysis.evaluators.")
  return chosen


def check_for_model(chosen, model: Model, *, methods, mask_spec, shape) -> None:
  """Raises ``ValueError`` where the ``chosen`` evaluator classes or the map ``methods``
  need another kind of model than ``model``: the attacks' CE features (and so the
  detector) include the latent CE at a DenseNet stage; the maps' methods as
  ``maps.check_methods_for_model`` (also whether the token CE maps' masks of
  ``mask_spec`` cover whole patches of ``shape`` images)."""
  if model.vit is not None:
    latent = [c.name for c in chosen if c in (AttacksEvaluator, DetectionEvaluator)]
    if latent:
      raise ValueError(
          f"analysis.evaluators has {latent}: the attacks' CE features include the latent "
          f"CE at a DenseNet stage, and this run's model is a Vision Transformer. Its "
          f"evaluators: ['maps', 'localization', 'sanity', 'defenses'].")
  if MapsEvaluator in chosen:
    check_methods_for_model(methods, model, mask_spec, shape)


__all__ = [
    "ATTACKS", "CE_FEATURES", "EVALUATORS", "MAP_METHODS", "SANITY_METHODS",
    "AttacksEvaluator", "Context", "Defended", "DefensesEvaluator", "DetectionEvaluator",
    "Evaluator", "Inputs", "Localization", "LocalizationEvaluator", "Maps",
    "MapsEvaluator", "Model", "OPTIMISED_METHODS", "Sanity", "SanityEvaluator",
    "UnderAttack", "ce_features",
    "check_for_model", "check_methods_for_model", "compute_maps", "detection",
    "families_of", "fit_logistic", "make_model",
    "paired_auroc_interval",
    "pixel_space", "prepare_inputs", "random_model", "select",
]
