"""Optimised masks in the sweep: per chunk of images, beside the mask families, the
masks that ``cejax.optimised`` finds by ``jax.grad``.

``config.sweep.optimised`` names any of:

- ``"extremal"``: extremal perturbations (TorchRay's preserve game, simple reward, blur
  pyramid, flip jitter), one mask per area of ``config.optimised.areas``;
- ``"ce_optimal"``: per pixel intervention of ``config.sweep.interventions`` (the token
  interventions have no optimised form) and scalar
  estimand of ``config.sweep.estimands`` (expected, probability, logit, kl), the region
  of each area whose intervention has the largest effect (``ce_optimal.ce_optimal_mask``
  with its default objective for that estimand, ``ce_optimal.DEFAULT_OBJECTIVES``);
- ``"counterfactual"``: per pixel intervention, the smallest region (areas
  ``config.optimised.areas``, refined by ``config.optimised.counterfactual_bisection``
  bisection steps) whose intervention changes the predicted class
  (``counterfactual.minimal_counterfactual``).

All are for the predicted class (``targets="predicted"``, each image's on its own), the
chunk's images spread over the devices (``mesh``), ``config.optimised.batch_size`` images per
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

from cejax.jobs.sweep import plan as sweep_plan
from cejax.optimised import ce_optimal, counterfactual, extremal

OPTIMISED = ("extremal", "ce_optimal", "counterfactual")
# The estimands ce_optimal can maximise: one number per image and mask.
SCALAR_ESTIMANDS = ("expected", "probability", "logit", "kl")


def scalar_estimands(s) -> tuple[str, ...]:
  """The estimands of ``config.sweep.estimands`` that ``ce_optimal`` optimises."""
  return tuple(e for e in s.estimands if e in SCALAR_ESTIMANDS)


@functools.partial(jax.jit, static_argnums=0)
def _predicted_class(logits_fn, image):
  """The predicted class of one image on its own (a batch of one), as the families take
  it; compiled once per network (op by op, every chunk ran each operation eagerly)."""
  return jnp.argmax(logits_fn(image[None])[0])


def pixel_interventions(s) -> list[str]:
  """The pixel interventions of ``config.sweep.interventions`` (not a ViT's token
  interventions), those the CE-optimal masks and counterfactuals are computed for."""
  return [n for n in s.interventions if n in sweep_plan.PIXEL_INTERVENTIONS]


def chunk_results(logits_fn, images, *, settings, optimised, fills, activation,
                  mesh=None) -> dict[str, Any]:
  """The optimised masks of a chunk of ``images`` ``(n, h, w, c)``: a tree of numpy
  arrays (module docstring); ``settings`` is ``config.sweep``, ``optimised``
  ``config.optimised``; ``fills`` maps intervention names to interventions."""
  s, o = settings, optimised
  images = jnp.asarray(images)
  targets = jnp.stack([_predicted_class(logits_fn, x) for x in images])
  # config.optimised.batch_size images per device at a time (their areas as one batch), not a
  # batch that follows the device count: the network's rounding may depend on its batch,
  # so the masks would depend on the mesh too. At a fixed per-device batch every device
  # count groups the same images together (sharding.map_chunks): the same bits.
  common = dict(areas=tuple(float(a) for a in o.areas), iterations=o.iterations,
                step=o.step, sigma=float(o.sigma), batch_size=o.batch_size, mesh=mesh,
                progress=False)
  out: dict[str, Any] = {"targets": np.asarray(targets)}
  if "extremal" in s.optimised:
    res = extremal.extremal_perturbation(logits_fn, images, targets, **common)
    out["extremal"] = {"masks": np.asarray(res.masks),
                       "final_reward": np.asarray(res.reward[..., -1]), **_grads(res)}
  if "ce_optimal" in s.optimised:
    out["ce_optimal"] = {}
    for name in pixel_interventions(s):
      out["ce_optimal"][name] = {}
      for estimand in scalar_estimands(s):
        res = ce_optimal.ce_optimal_mask(logits_fn, images, targets, intervention=fills[name],
                                       estimand=estimand, activation=activation, **common)
        out["ce_optimal"][name][estimand] = {
            "masks": np.asarray(res.masks), "final_reward": np.asarray(res.reward[..., -1]),
            "effect": np.asarray(res.effect), **_grads(res)}
  if "counterfactual" in s.optimised:
    out["counterfactual"] = {}
    for name in pixel_interventions(s):
      cf = counterfactual.minimal_counterfactual(
          logits_fn, images, bisection_steps=o.counterfactual_bisection,
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


__all__ = ["OPTIMISED", "SCALAR_ESTIMANDS", "chunk_results",
           "scalar_estimands"]
