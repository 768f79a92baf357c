"""Optimised masks in the sweep: per chunk of images, beside the mask families, the
masks that ``cejax.extremal`` and ``cejax.counterfactual`` optimise by ``jax.grad``.

``config.sweep.optimised`` names any of:

- ``"extremal"``: extremal perturbations (TorchRay's preserve game, simple reward, blur
  pyramid, flip jitter), one mask per area of ``extremal_areas``;
- ``"ce_optimal"``: per intervention of ``config.sweep.interventions`` and scalar
  estimand of ``config.sweep.estimands`` (expected, probability, logit, kl), the region
  of each area whose intervention has the largest effect (``extremal.ce_optimal_mask``
  with its default objective for that estimand, ``extremal.DEFAULT_OBJECTIVES``);
- ``"counterfactual"``: per intervention, the smallest region (areas ``extremal_areas``,
  refined by ``counterfactual_bisection`` bisection steps) whose intervention changes
  the predicted class (``counterfactual.minimal_counterfactual``).

All are for the predicted class (``targets="predicted"``, each image's on its own), the
chunk's images spread over the devices (``mesh``), ``optimised_batch_size`` images per
device at a time (default 1) with their areas as one batch: the results do not depend on
the device count (a sharded run equals one device bit for bit at the same per-device
batch, ``tests/test_extremal.py``, ``tests/test_sweep.py``).
They are stored in the chunk under ``optimised`` (``masks`` ``(n, K, h, w)`` per area;
``final_reward``: the objective of the last iteration, ``(n, K)``; the CE-optimal masks'
``effect``, the estimand of intervening on each hard region ``(n, K)``; the
counterfactual's ``area``, ``mask``, ``flipped_to``, ``found``; for each, the
diagnostics ``reward_grad`` and ``area_grad``, ``(n, K, 2)``: the objective's and the
area term's gradient norms at the first and last iteration, whose ratio below
``extremal.DEAD_RATIO`` marks a dead objective, warned about as the chunk is
computed), so they get the sweep's record, checksums and resume.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from cejax import counterfactual, extremal
from cejax.jobs import common

OPTIMISED = ("extremal", "ce_optimal", "counterfactual")
# The estimands ce_optimal can maximise: one number per image and mask.
SCALAR_ESTIMANDS = ("expected", "probability", "logit", "kl")


def check_settings(s) -> None:
  """Raises ``ValueError`` naming the bad ``config.sweep`` key and what is valid."""
  bad = [m for m in s.optimised if m not in OPTIMISED]
  if bad:
    raise ValueError(f"config.sweep.optimised has {bad}; valid are {OPTIMISED}.")
  if not s.optimised:
    return
  if s.targets != "predicted":
    raise ValueError("config.sweep.optimised masks are for the predicted class; "
                     f"config.sweep.targets must be 'predicted', got {s.targets!r}.")
  common.check_extremal_settings(s, "sweep")
  bisection = s.counterfactual_bisection
  if not isinstance(bisection, int) or isinstance(bisection, bool) or bisection < 0:
    raise ValueError("config.sweep.counterfactual_bisection must be an integer >= 0, got "
                     f"{bisection!r}.")
  batch = s.optimised_batch_size
  if not isinstance(batch, int) or isinstance(batch, bool) or batch < 1:
    raise ValueError("config.sweep.optimised_batch_size must be an integer >= 1 (images "
                     f"per device at a time), got {batch!r}.")
  if "ce_optimal" in s.optimised and not scalar_estimands(s):
    raise ValueError(f"config.sweep.optimised has 'ce_optimal', which maximises one of "
                     f"{SCALAR_ESTIMANDS}; config.sweep.estimands has none "
                     f"({tuple(s.estimands)}).")


def scalar_estimands(s) -> tuple[str, ...]:
  """The estimands of ``config.sweep.estimands`` that ``ce_optimal`` optimises."""
  return tuple(e for e in s.estimands if e in SCALAR_ESTIMANDS)


@functools.partial(jax.jit, static_argnums=0)
def _predicted_class(logits_fn, image):
  """The predicted class of one image on its own (a batch of one), as the families take
  it; compiled once per network (op by op, every chunk ran each operation eagerly)."""
  return jnp.argmax(logits_fn(image[None])[0])


def chunk_results(logits_fn, images, *, settings, fills, activation,
                  mesh=None) -> dict[str, Any]:
  """The optimised masks of a chunk of ``images`` ``(n, h, w, c)``: a tree of numpy
  arrays (module docstring); ``fills`` maps intervention names to interventions."""
  s = settings
  images = jnp.asarray(images)
  targets = jnp.stack([_predicted_class(logits_fn, x) for x in images])
  # optimised_batch_size images per device at a time (their areas as one batch), not a
  # batch that follows the device count: the network's rounding may depend on its batch,
  # so the masks would depend on the mesh too. At a fixed per-device batch every device
  # count groups the same images together (sharding.map_chunks): the same bits.
  common = dict(areas=tuple(float(a) for a in s.extremal_areas),
                iterations=s.extremal_iterations, step=s.extremal_step,
                sigma=float(s.extremal_sigma), batch_size=s.optimised_batch_size,
                mesh=mesh, progress=False)
  out: dict[str, Any] = {"targets": np.asarray(targets)}
  if "extremal" in s.optimised:
    res = extremal.extremal_perturbation(logits_fn, images, targets, **common)
    out["extremal"] = {"masks": np.asarray(res.masks),
                       "final_reward": np.asarray(res.reward[..., -1]), **_grads(res)}
  if "ce_optimal" in s.optimised:
    out["ce_optimal"] = {}
    for name in s.interventions:
      out["ce_optimal"][name] = {}
      for estimand in scalar_estimands(s):
        res = extremal.ce_optimal_mask(logits_fn, images, targets, intervention=fills[name],
                                       estimand=estimand, activation=activation, **common)
        out["ce_optimal"][name][estimand] = {
            "masks": np.asarray(res.masks), "final_reward": np.asarray(res.reward[..., -1]),
            "effect": np.asarray(res.effect), **_grads(res)}
  if "counterfactual" in s.optimised:
    out["counterfactual"] = {}
    for name in s.interventions:
      cf = counterfactual.minimal_counterfactual(
          logits_fn, images, bisection_steps=s.counterfactual_bisection,
          intervention=fills[name], activation=activation, **common)
      out["counterfactual"][name] = {"area": np.asarray(cf.area),
                                     "mask": np.asarray(cf.mask),
                                     "flipped_to": np.asarray(cf.flipped_to),
                                     "found": np.asarray(cf.found), **_grads(cf)}
  return out


def _grads(result) -> dict[str, np.ndarray]:
  """The optimisation's diagnostics as stored: gradient norms ``(n, K, 2)`` of the
  objective and the area term at the first and last iteration."""
  return {"reward_grad": np.asarray(result.reward_grad),
          "area_grad": np.asarray(result.area_grad)}


__all__ = ["OPTIMISED", "SCALAR_ESTIMANDS", "check_settings", "chunk_results",
           "scalar_estimands"]
