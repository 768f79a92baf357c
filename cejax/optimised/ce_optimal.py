"""CE-optimal masks: the region of each area whose intervention ``do(X_M = v)`` has the
largest causal effect, found by ``cejax.optimised.extremal``'s optimisation with a cejax
intervention, an optimised objective and a reported estimand named apart.

The objective is what the optimiser follows; the estimand is what is reported
(``CEOptimalResult.effect``: the estimand of intervening on each final hard region, by
the causal-effect engine). The defaults come from ``benchmarks/ce_optimal_study.py``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from cejax import estimands
from cejax._compile import jit
from cejax.optimised.extremal import DELETE, DUAL, PRESERVE, extremal_perturbation
from cejax.optimised.smooth_masks import area_reference, geometry, hard_region
from cejax.types import Images, LogitsFn, Targets


@jit
def region_effects(logits_fn: LogitsFn, images: Images, regions, targets: Targets, *,
                   intervention: Any = "zero", estimand: Any = "expected",
                   activation: str = "softmax"):
  """``(n, K)``: the estimand of ``do(X_R = v)`` for each image's regions ``R`` ``(n, K,
  h, w)`` (1 = intervened on), by the causal-effect engine (``effects.causal_effect``)."""
  from cejax import effects  # effects is the engine; this module is one of its users

  return jax.vmap(lambda x, r, t: effects.causal_effect(
      logits_fn, x, r, intervention=intervention, estimand=estimand, target=t,
      activation=activation).effects)(images, regions, targets)


class CEOptimalResult(NamedTuple):
  """CE-optimal masks: what was optimised, and the effect that was found.

  Attributes:
    masks, reward, area_term, reward_grad, area_grad: as ``ExtremalResult``; ``reward``
      is the optimised objective (with the game's sign).
    regions: ``(n, K, h, w)`` the hard region of each mask: its ``a`` strongest pixels,
      as many as the area constraint asks for (at most the image).
    effect: ``(n, K)`` the reported estimand (``estimand``, by default the paper's
      expected CE) of the game's intervention on the hard region: ``do(X_R = v)`` for
      ``delete`` and ``dual``, ``do(X_{not R} = v)`` for ``preserve``.
  """

  masks: jax.Array
  reward: jax.Array
  area_term: jax.Array
  reward_grad: jax.Array
  area_grad: jax.Array
  regions: jax.Array
  effect: jax.Array


# The objective optimised for each reported estimand by default (benchmarks/
# ce_optimal_study.py): a surrogate that orders regions as the estimand does where the
# estimand saturates. A callable estimand is optimised as it is.
DEFAULT_OBJECTIVES = {"expected": "log_odds", "probability": "log_odds",
                      "logit": "logit", "kl": "kl"}
# The initial mask parameter of each game by default (the study's best pointing per
# game). TorchRay starts every game from 1; in the delete game that intervenes on the
# whole image, where a confident model's objective is flat, and the smooth mask is
# above 1 inside the image, so clamped: only the area term moves the mask at first.
DEFAULT_START = {DELETE: 0.0, PRESERVE: 1.0, DUAL: 1.0}


def default_objective(estimand):
  """The objective ``ce_optimal_mask`` optimises for ``estimand`` by default."""
  if isinstance(estimand, str):
    estimands.resolve(estimand)
    if estimand == "per_class":
      raise ValueError("the per_class estimand gives a vector per mask; report one class "
                       "with 'probability' (sigmoid for one finding) instead.")
    return DEFAULT_OBJECTIVES[estimand]
  return estimands.resolve(estimand)


def ce_optimal_mask(logits_fn: LogitsFn, images: Images, targets: Targets, *,
                    areas: Sequence[float] = (0.05, 0.1, 0.2), intervention: Any = "zero",
                    estimand: Any = "expected", objective: Any = None,
                    variant: str = DELETE, start: float | None = None,
                    activation: str = "softmax", iterations: int = 800,
                    jitter: bool = False, ties: str = "symmetric",
                    **settings) -> CEOptimalResult:
  """The region of each area whose intervention ``do(X_M = v)`` has the largest causal
  effect: ``extremal_perturbation`` with a cejax intervention, an optimised objective
  and a reported estimand.

  Two quantities are named apart. ``objective`` is what the optimiser follows;
  ``estimand`` is what is reported (``effect``: the estimand of intervening on the
  final hard region). By default the objective is the target's log-odds
  (``log_odds``) for the ``expected`` and ``probability`` estimands: both are
  probabilities, whose gradient vanishes where a confident model saturates, and the
  optimisation is then decided by the area term alone (``dead_objective``); the
  log-odds order regions as the probability does and do not saturate
  (``benchmarks/ce_optimal_study.py`` measured every combination of objective, start,
  game and area weight). ``logit`` and ``kl`` are optimised as they are.

  With the default ``delete`` variant, ``masks`` mark the region intervened on (1 = set
  to the intervention's value). ``preserve`` finds the region that, kept while
  everything else is intervened on, keeps the prediction best. The optimisation starts
  from ``start`` (mask parameters; default ``DEFAULT_START[variant]``: 0 for ``delete``,
  nothing intervened on; 1 for ``preserve`` and ``dual``, TorchRay's start).

  The area term's gradient at tied mask values is split evenly among them
  (``ties="symmetric"``, ``smooth_masks.area_gap``): every start is a flat mask, and
  TorchRay's stable-sort rule grows it from its last rows first.

  Unlike TorchRay there is no flip jitter by default: it assumes a mirror-invariant
  model, and a chest X-ray model is not one (the heart is on one side); the answer is
  for the image as it is. Areas are TorchRay's: fractions of the mask with its margin
  (``geometry(...).shape_out``), which is larger than the image.

  Args:
    objective: what is optimised: a name in ``OBJECTIVES`` or ``estimands.ESTIMANDS``,
      or a callable (``estimands.Estimand``); default ``default_objective(estimand)``.
    estimand: what ``effect`` reports (a scalar estimand or callable).
    start: initial mask parameter in [0, 1] (or ``init=`` an array).
    ties: ``"symmetric"`` or ``"stable"`` (TorchRay's), as ``smooth_masks.area_gap``.
    Others: as ``extremal_perturbation``.

  Returns:
    ``CEOptimalResult``. Called eagerly, a ``UserWarning`` says where the objective's
    gradient was negligible against the area term's.
  """
  objective = default_objective(estimand) if objective is None else objective
  if estimand == "per_class":
    raise ValueError("the per_class estimand gives a vector per mask; report one class "
                     "with 'probability' (sigmoid for one finding) instead.")
  if "init" not in settings:
    start = DEFAULT_START.get(variant, 1.0) if start is None else float(start)
    if not 0 <= start <= 1:
      raise ValueError(f"start must lie in [0, 1] (a mask parameter), got {start}.")
    settings["init"] = jnp.float32(start)
  elif start is not None:
    raise ValueError("give start (a number) or init (an array), not both.")
  result = extremal_perturbation(logits_fn, images, targets, areas=areas, variant=variant,
                                 perturbation=intervention, reward=objective,
                                 activation=activation, iterations=iterations,
                                 jitter=jitter, ties=ties, **settings)
  images = jnp.asarray(images)
  h, w = images.shape[1:3]
  g = geometry((h, w), step=settings.get("step", 7), sigma=settings.get("sigma", 21.0))
  full = g.shape_out[0] * g.shape_out[1]
  zeros = area_reference(full, np.atleast_1d(np.asarray(areas, np.float64)))
  fractions = np.minimum((full - zeros) / (h * w), 1.0).astype(np.float32)
  regions = hard_region(result.masks, jnp.broadcast_to(jnp.asarray(fractions),
                                                       result.masks.shape[:2]))
  intervened = 1 - regions if variant == PRESERVE else regions
  effect = region_effects(logits_fn, images, intervened, jnp.asarray(targets, jnp.int32),
                          intervention=intervention, estimand=estimand,
                          activation=activation)
  return CEOptimalResult(*result, regions, effect)




__all__ = ["DEFAULT_OBJECTIVES", "DEFAULT_START", "CEOptimalResult", "ce_optimal_mask",
           "default_objective", "region_effects"]
