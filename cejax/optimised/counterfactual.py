"""The minimal counterfactual region: per image, the smallest region whose intervention
``do(X_M = v)`` changes the decision, found by CE-optimal deletion masks
(``cejax.optimised.extremal``) over a grid of areas refined by bisection.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from cejax import estimands, interventions, precision
from cejax._compile import jit
from cejax._validation import check_channels_last
from cejax.optimised import extremal
from cejax.optimised.ce_optimal import DEFAULT_START, default_objective
from cejax.optimised.extremal import DELETE, Schedule, objective_of, optimise_in_chunks
from cejax.optimised.smooth_masks import area_reference, geometry, hard_region
from cejax.types import Images, LogitsFn


class Counterfactual(NamedTuple):
  """The smallest region found whose intervention changes the decision.

  Attributes:
    area: ``(n,)`` its area (fraction of the image); NaN where no tried area flips.
    mask: ``(n, h, w)`` the hard region (1 = intervened on), zeros where none flips.
    flipped_to: ``(n,)`` the class predicted under the intervention (-1 where none).
    found: ``(n,)`` whether a flipping region was found.
    reward_grad, area_grad: ``(n, K, 2)`` the objective's and the area term's gradient
      norms at the first and last iteration of the grid's optimisation (``K`` areas),
      as ``extremal.ExtremalResult``'s (``extremal.dead_objective`` reads them).
  """

  area: np.ndarray
  mask: np.ndarray
  flipped_to: np.ndarray
  found: np.ndarray
  reward_grad: np.ndarray
  area_grad: np.ndarray


@precision.applied
def minimal_counterfactual(logits_fn: LogitsFn, images: Images, *,
                           areas: Sequence[float] = (0.02, 0.05, 0.1, 0.2, 0.4),
                           bisection_steps: int = 3, intervention: Any = "zero",
                           estimand: Any = "probability", objective: Any = None,
                           start: float | None = None, threshold: float | None = None,
                           activation: str = "softmax", iterations: int = 300,
                           batch_size: int = 1, mesh: jax.sharding.Mesh | None = None,
                           step: int = 7, sigma: float = 21.0, jitter: bool = False,
                           progress: bool = True) -> Counterfactual:
  """Per image, the smallest area whose CE-optimal deletion changes the decision.

  The decision is the clean image's predicted class ``t``. For each area of the grid a
  CE-optimal ``delete`` mask is optimised (all areas as one batch); its ``round(a h w)``
  strongest pixels are set to the intervention's value, and the decision *flips* when
  the prediction is no longer ``t`` (or, with ``threshold``, when ``t``'s probability falls
  below it). Between the largest grid area that does not flip and the smallest that does,
  ``bisection_steps`` rounds of bisection (one optimisation each) refine the area.
  Areas here are fractions of the image: each is optimised as the same number of
  pixels of the margined mask (``a h w / (out_h out_w)`` in ``ce_optimal_mask``'s terms).

  What the masks optimise is ``objective`` (default ``ce_optimal.default_objective(
  estimand)``: the target's log-odds for ``probability``, which does not saturate where
  a confident model's probability does); ``start`` is the mask parameters' initial
  value (default ``ce_optimal.DEFAULT_START['delete']``, 0). Both, and the area term's
  symmetric gradient at ties, as ``ce_optimal.ce_optimal_mask``.

  Returns:
    ``Counterfactual`` (numpy arrays). A ``UserWarning`` says where the objective's
    gradient was negligible against the area term's (``extremal.dead_objective``).
  """
  images = jnp.asarray(images)
  if images.ndim != 4:
    raise ValueError(f"images must be (n, h, w, c), got shape {images.shape}.")
  check_channels_last(images.shape, "images")
  grid = np.sort(np.asarray(areas, np.float64))
  if grid.size == 0:
    raise ValueError("areas must hold at least one area.")
  if int(bisection_steps) < 0:
    raise ValueError(f"bisection_steps must be >= 0, got {bisection_steps}.")
  if threshold is not None and not 0 < threshold < 1:
    raise ValueError(f"threshold must lie in (0, 1) (a probability), got {threshold}.")
  objective = default_objective(estimand) if objective is None else objective
  start = DEFAULT_START[DELETE] if start is None else float(start)
  if not 0 <= start <= 1:
    raise ValueError(f"start must lie in [0, 1] (a mask parameter), got {start}.")
  fill = interventions.resolve(intervention)
  n, h, w, _ = images.shape
  # The decisions between optimisations: one compiled forward pass under the precision
  # policy (called as it is, an un-jitted network would run, and first compile,
  # operation by operation, at JAX's default precision: TF32 on NVIDIA GPUs).
  predict = functools.partial(_logits, logits_fn)
  clean = np.asarray(predict(images))
  targets = clean.argmax(-1).astype(np.int32)
  values = jax.vmap(lambda x: fill.fill(x, None))(images)  # the same for every decision

  def decide(regions):
    """Predicted class and flip flag of each image with ``regions (n, h, w)`` replaced."""
    x = images * (1 - regions[..., None]) + values * regions[..., None]
    logits = np.asarray(predict(x))
    pred = logits.argmax(-1)
    if threshold is None:
      return pred, pred != targets
    probs = np.asarray(estimands.activate(jnp.asarray(logits), activation))
    return pred, probs[np.arange(n), targets] < threshold

  g = geometry((h, w), step=step, sigma=sigma)
  full = g.shape_out[0] * g.shape_out[1]

  settings = objective_of(dict(perturbation=fill, reward=objective, activation=activation,
                                num_levels=8, max_blur=20.0, ties="symmetric"))
  schedule = Schedule(int(iterations), 0.01, 0.9, 0.9, 300.0, 1.0035, bool(jitter))

  def optimise(area_per_image):  # (n, K) image fractions -> soft masks (n, K, h, w), ...
    zeros = np.stack([area_reference(full, np.asarray(row) * h * w / full)
                      for row in area_per_image])
    init = jnp.full((n, zeros.shape[1], *g.shape_in), start, jnp.float32)
    masks, _, _, reward_grad, area_grad = optimise_in_chunks(
        logits_fn, images, jnp.asarray(targets), jnp.asarray(zeros), g=g, objective=settings,
        schedule=schedule, variant=DELETE, batch_size=int(batch_size), mesh=mesh, init=init,
        bar=bar)
    return masks, reward_grad, area_grad

  with extremal.progress_bar(dict(images=images, batch_size=batch_size, mesh=mesh,
                                  iterations=iterations, progress=progress),
                             desc="minimal counterfactual",
                             rounds=1 + int(bisection_steps)) as bar:
    soft, reward_grad, area_grad = map(np.asarray, optimise(np.broadcast_to(grid,
                                                                            (n, grid.size))))
    flips, preds = np.zeros((n, grid.size), bool), np.zeros((n, grid.size), np.int64)
    regions = np.zeros((n, grid.size, h, w), np.float32)
    for j, a in enumerate(grid):
      regions[:, j] = np.asarray(hard_region(jnp.asarray(soft[:, j]), jnp.full((n,), a)))
      preds[:, j], flips[:, j] = decide(jnp.asarray(regions[:, j]))
    found = flips.any(1)
    first = np.where(found, flips.argmax(1), 0)
    hi = np.where(found, grid[first], np.nan)
    lo = np.where(first > 0, grid[np.maximum(first - 1, 0)], 0.0)
    best = regions[np.arange(n), first] * found[:, None, None]
    best_pred = np.where(found, preds[np.arange(n), first], -1)
    for _ in range(int(bisection_steps)):
      if not found.any():
        break
      mid = np.where(found, (lo + hi) / 2, grid[0])
      soft_mid = np.asarray(optimise(mid[:, None])[0])[:, 0]
      region = np.asarray(hard_region(jnp.asarray(soft_mid), jnp.asarray(mid)))
      pred, flip = decide(jnp.asarray(region))
      take = found & flip
      hi, best = np.where(take, mid, hi), np.where(take[:, None, None], region, best)
      best_pred = np.where(take, pred, best_pred)
      lo = np.where(found & ~flip, mid, lo)
  result = Counterfactual(hi, best, best_pred.astype(np.int32), found, reward_grad,
                          area_grad)
  extremal.warn_if_dead(result, "minimal_counterfactual")
  return result


@jit
def _logits(logits_fn, images):
  """``logits_fn(images)`` compiled once per network, under the precision policy."""
  return logits_fn(images)


__all__ = ["Counterfactual", "minimal_counterfactual"]
