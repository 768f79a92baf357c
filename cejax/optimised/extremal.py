"""Optimised masks, by ``jax.grad``: extremal perturbations, CE-optimal masks, minimal
counterfactual regions and meaningful perturbations.

Every other CE map enumerates fixed masks and asks what each does; these methods ask the
inverse question: *which region of a given area has the largest effect* (extremal
perturbations, CE-optimal masks), *what is the smallest region whose intervention changes
the decision* (``minimal_counterfactual``), or *which smooth, sparse deletion lowers the
target's probability most* (``meaningful_perturbation``).

``extremal_perturbation`` is the method of Fong, Patrick and Vedaldi (ICCV 2019) as
TorchRay's ``torchray.attribution.extremal_perturbation`` defines it:

- the mask is parameterised on a grid of ``ceil(size / step)`` cells (``step = 7``) and
  turned into a smooth mask by smooth-max pooling of Gaussian-like bumps
  (``smooth_masks``: kernel ``exp(-2 max(d / sigma - 1/2, 0)^2)``, ``sigma = 21``,
  softmax pooling with coldness 20, clamped to [0, 1], computed on a margin of
  ``sigma`` pixels and cropped);
- mask 1 keeps a pixel and 0 perturbs it fully: by default with the blur pyramid
  (``blur_pyramid``: 8 levels, Gaussian blur from ``sigma = 20`` down to none, zero
  padding; a mask value picks two neighbouring levels and interpolates linearly);
- the area constraint is ``-w mean((sort(mask) - r_a)^2)`` over the full mask, ``r_a``
  the step vector with the last ``a`` fraction of entries 1; ``w`` starts at 300 and
  grows by 1.0035 per iteration;
- SGD with learning rate 0.01, momentum 0.9 and dampening 0.9 (``torch.optim.SGD``,
  whose first step takes the whole gradient), parameters clamped to [0, 1] after each
  step, starting from all ones, for 800 iterations; the perturbed images are flipped
  horizontally on even iterations (jitter);
- ``preserve`` maximises the target's logit on the image kept by the mask, ``delete``
  minimises it on the image with the mask perturbed, ``dual`` rewards the difference;
  ``contrastive`` rewards the target's logit minus the largest other one.

The masks returned are the ones generated at the last iteration (as TorchRay returns
them). Several areas are optimised as one batch, images as a larger one.

The *CE-optimal mask* (``ce_optimal_mask``) is the same optimisation with a cejax
intervention ``do(X_M = v)`` (zero, mean, blur, reference: the mask blends the image
with the fill) and a cejax estimand (expected, probability, logit, KL; softmax or
sigmoid) as the objective: the region of area ``a`` whose intervention has the largest
effect. Estimands that an intervention lowers (expected, probability, logit) are
maximised as they are by ``preserve`` and negated by ``delete``; ``kl``, which grows,
the other way round. A callable estimand is treated like ``probability``.

Batches of images are processed ``batch_size`` at a time (``sharding.map_chunks``), and
with ``mesh=`` spread over its devices; results do not depend on either.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from cejax import estimands, interventions, sharding
from cejax._compile import jit, tracing
from cejax._progress import bar as _bar
from cejax._validation import check_channels_last, check_floating
from cejax.optimised.smooth_masks import (
  PYRAMIDS,
  TIES,
  Geometry,
  apply_pyramid,
  area_gap,
  area_reference,
  blur_pyramid,
  correlation_matrix,
  geometry,
  smooth_masks,
  torchray_gaussian,
)
from cejax.types import Images, LogitsFn, Maps, Targets

PRESERVE, DELETE, DUAL = "preserve", "delete", "dual"
VARIANTS = (PRESERVE, DELETE, DUAL)
LOGIT_REWARDS = ("simple", "contrastive")
_GROWING_ESTIMANDS = ("kl",)  # the effect of an intervention makes these larger


def _log_probs(logits, activation):
  """``(log q, log(1 - q))`` of every class, computed without forming ``1 - q``."""
  if activation == "sigmoid":
    return jax.nn.log_sigmoid(logits), jax.nn.log_sigmoid(-logits)
  k = logits.shape[-1]
  total = jax.nn.logsumexp(logits, -1, keepdims=True)
  others = jnp.where(jnp.eye(k, dtype=bool), -jnp.inf, logits[..., None, :])  # (..., k, k)
  return logits - total, jax.nn.logsumexp(others, -1) - total


def log_probability(clean_logits, do_logits, do_probs, target, activation):
  """``log q_t``: the target's log-probability under the intervention."""
  del clean_logits, do_probs
  return estimands.take_class(_log_probs(do_logits, activation)[0], target)


def log_odds(clean_logits, do_logits, do_probs, target, activation):
  """``log q_t - log(1 - q_t)``: the target's log-odds (sigmoid: its logit ``z_t``;
  softmax: ``z_t - logsumexp_{c != t} z_c``). Monotone in ``probability``, and on a
  logit's scale: its gradient does not vanish where ``q_t`` saturates at 0 or 1."""
  del clean_logits, do_probs
  log_q, log_not_q = _log_probs(do_logits, activation)
  return estimands.take_class(log_q - log_not_q, target)


def expected_log_odds(clean_logits, do_logits, do_probs, target, activation):
  """``log s - log(1 - s)``, ``s`` the agreement of the intervened prediction with the
  clean one: softmax ``s = sum_c p_c q_c``; sigmoid ``s = mean_c (p_c q_c + (1 - p_c)(1 -
  q_c))``. The paper's expected CE is an increasing affine function of ``s`` (softmax:
  ``s - sum_c p_c^2``; sigmoid: ``k s - sum_c (p_c^2 + (1 - p_c)^2)``), so this orders
  regions exactly as the expected CE does, on a logit's scale that does not saturate.
  Does not depend on ``target``."""
  del do_probs, target
  log_p, log_not_p = _log_probs(clean_logits, activation)
  log_q, log_not_q = _log_probs(do_logits, activation)
  if activation == "softmax":
    agree = jax.nn.logsumexp(log_p + log_q, -1)
    disagree = jax.nn.logsumexp(log_p + log_not_q, -1)
  else:
    agree = jax.nn.logsumexp(jnp.logaddexp(log_p + log_q, log_not_p + log_not_q), -1)
    disagree = jax.nn.logsumexp(jnp.logaddexp(log_p + log_not_q, log_not_p + log_q), -1)
  return agree - disagree


# Optimisation objectives beside the estimands (``estimands.ESTIMANDS``): smooth
# surrogates that an intervention lowers as it lowers the estimand it stands for.
OBJECTIVES = {"log_probability": log_probability, "log_odds": log_odds,
              "expected_log_odds": expected_log_odds}


def resolve_objective(objective):
  """The function of an objective name (``OBJECTIVES`` or ``estimands.ESTIMANDS``) or a
  callable with ``estimands.Estimand``'s signature.

  Raises:
    ValueError: none of these (the message lists the valid names).
  """
  if isinstance(objective, str) and objective in OBJECTIVES:
    return OBJECTIVES[objective]
  try:
    return estimands.resolve(objective)
  except ValueError:
    raise ValueError(f"Unknown objective {objective!r}; valid are {list(OBJECTIVES)}, "
                     f"the estimands {list(estimands.ESTIMANDS)} or a callable (see "
                     "estimands.Estimand).") from None


class Objective(NamedTuple):
  """What is perturbed and what is rewarded (static)."""

  perturbation: Any  # "blur", "fade" or an intervention
  reward: Any  # "simple", "contrastive", an estimand name or function
  activation: str
  num_levels: int
  max_blur: float
  ties: str = "stable"  # the area term's gradient at tied mask values (area_gap)


def _perturber(objective: Objective, image):
  """``perturb(keep (..., h, w)) -> images (..., h, w, c)`` for one image."""
  if objective.perturbation in PYRAMIDS:
    pyramid = blur_pyramid(image, num_levels=objective.num_levels,
                           max_blur=objective.max_blur, kind=objective.perturbation)
    return lambda keep: apply_pyramid(pyramid, keep)
  fill = objective.perturbation.fill(image, None)
  return lambda keep: image * keep[..., None] + fill * (1 - keep[..., None])


def _reward(objective: Objective, logits, clean_logits, target, variant):
  """Reward ``(K,)`` of logits ``(V, K, k)`` (``V = 2`` for dual: kept, deleted)."""
  if objective.reward in LOGIT_REWARDS:
    score = estimands.take_class(logits, target)
    if objective.reward == "contrastive":
      others = jnp.where(jnp.arange(logits.shape[-1]) == target, -100.0, logits)
      score = score - others.max(-1)
    sign = 1.0
  else:
    fn = resolve_objective(objective.reward)
    probs = estimands.activate(logits, objective.activation)
    score = jax.vmap(lambda z, q: fn(clean_logits, z, q, target, objective.activation))(
        logits, probs)
    sign = -1.0 if objective.reward in _GROWING_ESTIMANDS else 1.0
  if variant == PRESERVE:
    return sign * score[0]
  if variant == DELETE:
    return -sign * score[0]
  return sign * (score[0] - score[1])


class Schedule(NamedTuple):
  """The optimiser and area-constraint settings (static)."""

  iterations: int
  learning_rate: float
  momentum: float
  dampening: float
  regul_weight: float
  regul_growth: float
  jitter: bool


class _Energy(NamedTuple):
  """The objective of a batch (static settings, traced arrays): images ``(n, h, w, c)``,
  targets ``(n,)``, the leading zeros of each area's reference ``(n, K)``, a per-image
  factor on the area weight ``(n,)`` (or None)."""

  logits_fn: Any
  images: Any
  targets: Any
  zeros: Any
  regul_scale: Any
  g: Geometry
  objective: Objective
  variant: str

  def reward(self, cropped, flip, clean):
    """``(n, K)``: the game's reward of the masks ``cropped (n, K, h, w)``."""
    n, num_areas = self.zeros.shape
    num_variants = 2 if self.variant == DUAL else 1
    keeps = [cropped, 1 - cropped] if self.variant == DUAL else [
        1 - cropped if self.variant == DELETE else cropped]
    keeps = jnp.stack(keeps, axis=1)  # (n, V, K, h, w)
    x = jax.vmap(lambda image, keep: _perturber(self.objective, image)(keep))(self.images,
                                                                               keeps)
    x = jnp.where(flip, x[..., ::-1, :], x)
    logits = self.logits_fn(x.reshape(-1, *x.shape[-3:])).reshape(n, num_variants,
                                                                   num_areas, -1)
    return jax.vmap(lambda z, c, t: _reward(self.objective, z, c, t, self.variant))(
        logits, clean, self.targets)

  def area(self, full, weight):
    """``(n, K)``: the area term (``<= 0``) of the margined masks ``full``."""
    n, num_areas = self.zeros.shape
    scale = 1.0 if self.regul_scale is None else self.regul_scale[:, None]
    gap = area_gap(full.reshape(n, num_areas, -1), self.zeros, ties=self.objective.ties)
    return -gap * (weight * scale)


def _iterate(e: _Energy, schedule: Schedule, carry, xs):
  """TorchRay's SGD over the iterations of ``xs`` (weights, flips, first-step flags),
  from ``carry`` (parameters, momentum buffer, the parameters of the last iteration):
  the new carry and the reward and area term of each iteration, ``(n, K, L)`` each."""
  clean = e.logits_fn(e.images)

  def energy(params, weight, flip):
    cropped, full = smooth_masks(params, e.g)  # (n, K, h, w), (n, K, oh, ow)
    reward, regul = e.reward(cropped, flip, clean), e.area(full, weight)
    return jnp.sum(reward + regul), (reward, regul)

  def step(carry, xs):
    params, buf, _ = carry
    weight, flip, first = xs
    grads, (reward, regul) = jax.grad(lambda p: energy(p, weight, flip), has_aux=True)(params)
    grads = -grads  # SGD descends -energy
    buf = jnp.where(first, grads, schedule.momentum * buf + (1 - schedule.dampening) * grads)
    new = jnp.clip(params - schedule.learning_rate * buf, 0, 1)
    return (new, buf, params), (reward, regul)

  carry, (rewards, reguls) = jax.lax.scan(step, carry, xs)
  return carry, (jnp.moveaxis(rewards, 0, -1), jnp.moveaxis(reguls, 0, -1))


def _finish(e: _Energy, first, last, ends):
  """The masks of the last iteration's parameters ``(n, K, h, w)``, and the norms of
  the reward's and the area term's gradients at the first and the last iteration
  (``ends``: their weights and flips), ``(n, K, 2)`` each."""
  clean = e.logits_fn(e.images)
  masks, _ = smooth_masks(last, e.g)
  # Behind a barrier: merged with the masks' own computation, the diagnostics changed the
  # masks' rounding differently on one device and on several.
  first, last = jax.lax.optimization_barrier((first, last))

  # Both ends at once: the smooth masks of the two are one batch, the network's gradient
  # one vmapped program; traced, lowered and compiled once, not once per end and term.
  (w0, wt), (f0, ft) = ends

  def reward_grad(cropped, flip):
    return jax.grad(lambda m: jnp.sum(e.reward(m, flip, clean)))(cropped)

  def area_grad(full, weight):
    return jax.grad(lambda m: jnp.sum(e.area(m, weight)))(full)

  (cropped, full), pullback = jax.vjp(lambda p: smooth_masks(p, e.g),
                                      jnp.stack([first, last]))
  to_cropped = jax.vmap(reward_grad)(cropped, jnp.asarray([f0, ft]))
  to_full = jax.vmap(area_grad)(full, jnp.asarray([w0, wt], jnp.float32))
  reward, = pullback((to_cropped, jnp.zeros_like(full)))
  area, = pullback((jnp.zeros_like(cropped), to_full))
  norm = lambda x: jnp.moveaxis(jnp.sqrt(jnp.sum(x * x, axis=(-2, -1))), 0, -1)  # noqa: E731
  return masks, norm(reward), norm(area)


def _schedule_arrays(schedule: Schedule):
  """Per iteration: the area weight, the flip, whether it is the first step."""
  t = np.arange(schedule.iterations)
  weights = (schedule.regul_weight * schedule.regul_growth ** t).astype(np.float32)
  flips = (t % 2 == 0) & schedule.jitter
  return weights, flips, t == 0


# Below this ratio of the reward's gradient norm to the area term's, the objective is
# dead: the mask is shaped by the area constraint alone. Measured (benchmarks/
# ce_optimal_study.py, the demo model's delete game): probability and expected CE end
# at medians of 3e-5 to 5e-3 and point at 0.00-0.15; the log-odds end at 0.2-1.0 and
# point at 0.57-0.68.
DEAD_RATIO = 1e-3


class ExtremalResult(NamedTuple):
  """Optimised masks, their optimisation history and its diagnostics.

  Attributes:
    masks: ``(n, K, h, w)`` in [0, 1], one per image and area; 1 marks the region the
      variant is about (kept for ``preserve``, perturbed for ``delete``).
    reward: ``(n, K, T)`` the reward at each iteration.
    area_term: ``(n, K, T)`` the area constraint at each iteration (``<= 0``).
    reward_grad: ``(n, K, 2)`` the norm of the reward's gradient with respect to the
      mask parameters at the first and the last iteration.
    area_grad: ``(n, K, 2)`` the same for the area term (with that iteration's weight).
  """

  masks: jax.Array
  reward: jax.Array
  area_term: jax.Array
  reward_grad: jax.Array
  area_grad: jax.Array


def gradient_ratio(result) -> np.ndarray:
  """``(n, K, 2)``: the reward's gradient norm over the area term's, at the first and
  the last iteration (inf where the area term's gradient is 0)."""
  reward, area = np.asarray(result.reward_grad), np.asarray(result.area_grad)
  with np.errstate(divide="ignore", invalid="ignore"):
    return np.where(area > 0, reward / np.where(area > 0, area, 1), np.inf)


def dead_objective(result, *, threshold: float = DEAD_RATIO) -> np.ndarray:
  """``(n, K)`` bool: where the reward's gradient is negligible against the area
  term's (ratio below ``threshold``) at the first or the last iteration, so the mask was
  shaped by the area constraint, not by the model."""
  return (gradient_ratio(result) < threshold).any(-1)


def warn_if_dead(result, what: str, *, threshold: float = DEAD_RATIO) -> None:
  """A ``UserWarning`` naming how many of ``result``'s masks had a dead objective
  (silent on traced results)."""
  if isinstance(result.reward_grad, jax.core.Tracer):
    return
  dead = dead_objective(result, threshold=threshold)
  if dead.any():
    warnings.warn(
        f"{what}: the reward's gradient is below {threshold:g} of the area term's for "
        f"{int(dead.sum())} of {dead.size} masks (image, area): those masks are shaped "
        "by the area constraint, not by the model. Use a non-saturating objective "
        "('log_odds', 'expected_log_odds', 'logit') or see gradient_ratio(result).",
        stacklevel=3)


def check_inputs(a):
  images = jnp.asarray(a["images"])
  if images.ndim != 4:
    raise ValueError(f"images must be (n, h, w, c), got shape {images.shape}.")
  check_channels_last(images.shape, "images")
  check_floating(images)
  if not isinstance(images, jax.core.Tracer) and not np.isfinite(np.asarray(images)).all():
    raise ValueError("images hold NaN or infinite values.")
  targets = jnp.asarray(a["targets"])
  if targets.shape != images.shape[:1] or not jnp.issubdtype(targets.dtype, jnp.integer):
    raise ValueError(f"targets must be {images.shape[0]} integer classes (one per image), "
                     f"got {targets.dtype} of shape {targets.shape}.")
  if a["variant"] not in VARIANTS:
    raise ValueError(f"Unknown variant {a['variant']!r}; valid are {list(VARIANTS)}.")
  if int(a["iterations"]) < 1:
    raise ValueError(f"iterations must be at least 1, got {a['iterations']}.")
  if int(a["batch_size"]) < 1:
    raise ValueError(f"batch_size must be at least 1, got {a['batch_size']}.")
  return images, targets


def objective_of(a) -> Objective:
  perturbation = a["perturbation"]
  if not (isinstance(perturbation, str) and perturbation in PYRAMIDS):
    perturbation = interventions.resolve(perturbation)
    if interventions.is_random(perturbation):
      raise ValueError("optimised masks need a deterministic intervention (zero, mean, "
                       "blur, reference); random fills would make the objective noisy.")
  reward = a["reward"]
  if not (isinstance(reward, str) and reward in LOGIT_REWARDS):
    if reward == "per_class":
      raise ValueError("the per_class estimand gives a vector per mask; optimise one "
                       "class with 'probability' (sigmoid for one finding) instead.")
    resolve_objective(reward)
  ties = a.get("ties", "stable")
  if ties not in TIES:
    raise ValueError(f"ties must be one of {TIES}, got {ties!r}.")
  return Objective(perturbation, reward, estimands.check_activation(a["activation"]),
                   int(a["num_levels"]), float(a["max_blur"]), ties)


def _prepare(a):
  images, targets = check_inputs(a)
  g = geometry(images.shape[1:3], step=a["step"], sigma=a["sigma"])
  areas = tuple(float(x) for x in np.atleast_1d(np.asarray(a["areas"], np.float64)))
  zeros = area_reference(g.shape_out[0] * g.shape_out[1], areas)
  return dict(a, images=images, targets=targets.astype(jnp.int32), areas=areas,
              mask_geometry=g, zeros=jnp.asarray(zeros), objective=objective_of(a))


# Iterations per compiled call of an eager optimisation: the progress bar moves between
# calls. (A host callback inside the loop changed how XLA compiled the step, and with it
# the rounding of one device against several.)
SEGMENT = 50


def _per_image(fn, n, per_image, shared, *, batch_size, mesh):
  """``fn(*rows of per_image, *shared)`` over chunks of ``batch_size`` images. Both are
  passed as arguments, not closed over: a carry that a sharded call returned lives on
  the mesh, and ``shard_map`` cannot close over such an array."""
  def chunk(indices, per_image, shared):
    pick = lambda x: None if x is None else jnp.take(x, indices, axis=0, mode="clip")  # noqa: E731
    return fn(*jax.tree.map(pick, per_image, is_leaf=lambda x: x is None), *shared)

  return sharding.map_chunks(chunk, n, batch_size=batch_size, mesh=mesh,
                             args=(per_image, shared))


def _energy_rows(logits_fn, g, objective, variant):
  return lambda images, targets, zeros, scale: _Energy(logits_fn, images, targets, zeros,
                                                       scale, g, objective, variant)


@jit
def _segment(logits_fn, images, targets, zeros, regul_scale, carry, xs, *, g, objective,
             schedule, variant, batch_size, mesh):
  """Iterations ``xs`` of every image from ``carry``: one compiled call per segment."""
  energy = _energy_rows(logits_fn, g, objective, variant)
  return _per_image(lambda x, t, z, r, c, xs: _iterate(energy(x, t, z, r), schedule, c, xs),
                    images.shape[0], (images, targets, zeros, regul_scale, carry), (xs,),
                    batch_size=batch_size, mesh=mesh)


@jit
def _finish_all(logits_fn, images, targets, zeros, regul_scale, first, last, ends, *, g,
                objective, variant, batch_size, mesh):
  energy = _energy_rows(logits_fn, g, objective, variant)
  return _per_image(lambda x, t, z, r, f, last, e: _finish(energy(x, t, z, r), f, last, e),
                    images.shape[0], (images, targets, zeros, regul_scale, first, last),
                    (ends,), batch_size=batch_size, mesh=mesh)


@jit
def _whole(logits_fn, images, targets, zeros, regul_scale, init, *, g, objective, schedule,
           variant, batch_size, mesh):
  """Every iteration of every image in one program (under a transformation)."""
  weights, flips, firsts = _schedule_arrays(schedule)
  ends = ((weights[0], weights[-1]), (bool(flips[0]), bool(flips[-1])))
  energy = _energy_rows(logits_fn, g, objective, variant)

  def one(x, t, z, r, start):
    e = energy(x, t, z, r)
    carry, (rewards, reguls) = _iterate(e, schedule, (start, jnp.zeros_like(start), start),
                                        (weights, flips, firsts))
    masks, reward_grad, area_grad = _finish(e, start, carry[2], ends)
    return masks, rewards, reguls, reward_grad, area_grad

  return _per_image(one, images.shape[0], (images, targets, zeros, regul_scale, init), (),
                    batch_size=batch_size, mesh=mesh)


def optimise_in_chunks(logits_fn, images, targets, zeros, *, g, objective, schedule,
                       variant, batch_size, mesh, init=None, regul_scale=None,
                       bar=None):
  """The optimisation of every image, ``batch_size`` at a time (sharded with ``mesh``):
  masks ``(n, K, h, w)``, rewards and area terms ``(n, K, T)``, gradient norms ``(n, K,
  2)``.

  Called eagerly, it runs ``SEGMENT`` iterations per compiled call and advances ``bar``
  (a tqdm bar, or None) between calls by each segment's iterations times the number of
  image chunks. Under a transformation (a ``jit`` of the user's, ``vmap``) the
  iterations are one program (``_whole``): the two agree to float32 rounding, and each
  is the same bits on any number of devices at one ``batch_size``.
  """
  n = images.shape[0]
  if init is None:
    init = jnp.ones((n, zeros.shape[1], *g.shape_in), jnp.float32)
  init = jnp.asarray(init, jnp.float32)
  static = dict(g=g, objective=objective, variant=variant, batch_size=batch_size, mesh=mesh)
  data = (logits_fn, images, targets, zeros, regul_scale)
  if tracing(images, targets, zeros, regul_scale, init):
    return _whole(*data, init, schedule=schedule, **static)
  weights, flips, firsts = _schedule_arrays(schedule)
  carry, history = (init, jnp.zeros_like(init), init), []
  devices = 1 if mesh is None else mesh.size
  chunks = sharding.padded_size(n, batch_size, devices) // batch_size
  for start in range(0, schedule.iterations, SEGMENT):
    part = slice(start, start + SEGMENT)
    xs = (jnp.asarray(weights[part]), jnp.asarray(flips[part]), jnp.asarray(firsts[part]))
    carry, segment_history = _segment(*data, carry, xs, schedule=schedule, **static)
    history.append(segment_history)
    if bar is not None:
      jax.block_until_ready(carry)
      bar.update(chunks * len(weights[part]))
  ends = ((weights[0], weights[-1]), (bool(flips[0]), bool(flips[-1])))
  masks, reward_grad, area_grad = _finish_all(*data, init, carry[2], ends, **static)
  rewards = jnp.concatenate([h[0] for h in history], -1)
  reguls = jnp.concatenate([h[1] for h in history], -1)
  return masks, rewards, reguls, reward_grad, area_grad


def progress_bar(a, *, desc: str, rounds: int = 1):
  """The progress bar of an eager optimisation: ``rounds`` optimisations of every chunk
  of ``batch_size`` images (times the mesh's devices), ``iterations`` each."""
  devices = 1 if a.get("mesh") is None else a["mesh"].size
  n = int(np.shape(a["images"])[0])
  chunks = sharding.padded_size(n, int(a["batch_size"]), devices) // int(a["batch_size"])
  return _bar(rounds * chunks * int(a["iterations"]), desc,
                       enabled=bool(a.get("progress")))


def extremal_perturbation(logits_fn: LogitsFn, images: Images, targets: Targets, *,
                          areas: Sequence[float] = (0.1,), variant: str = PRESERVE,
                          iterations: int = 800, perturbation: Any = "blur",
                          reward: Any = "simple", activation: str = "softmax",
                          step: int = 7, sigma: float = 21.0, num_levels: int = 8,
                          max_blur: float = 20.0, jitter: bool = True,
                          learning_rate: float = 0.01, momentum: float = 0.9,
                          regul_weight: float = 300.0, regul_growth: float = 1.0035,
                          batch_size: int = 1, mesh: jax.sharding.Mesh | None = None,
                          progress: bool = True, init=None,
                          regul_scale=None, ties: str = "stable") -> ExtremalResult:
  """Extremal perturbations (Fong et al., 2019; TorchRay's definition, module docstring).

  Args:
    logits_fn: ``images (b, h, w, c) -> logits (b, k)``.
    images: ``(n, h, w, c)`` floating point.
    targets: ``(n,)`` int classes.
    areas: target areas, fractions in (0, 1]; all are optimised as one batch.
    variant: ``"preserve"``, ``"delete"`` or ``"dual"``.
    iterations: SGD steps (TorchRay: 800).
    perturbation: ``"blur"`` or ``"fade"`` (TorchRay's pyramid), or a cejax
      intervention (``"zero"``, ``"mean"``, ``Blur(...)``, ``Reference(...)``).
    reward: ``"simple"`` or ``"contrastive"`` (target logit), or a cejax estimand or
      objective (``OBJECTIVES``).
    activation: ``"softmax"`` or ``"sigmoid"`` (for estimand rewards).
    step, sigma: the mask's parameter step and smoothing (pixels).
    num_levels, max_blur: the pyramid's levels and strongest blur.
    jitter: flip the perturbed images horizontally on even iterations.
    learning_rate, momentum, regul_weight, regul_growth: TorchRay's constants.
    batch_size: images optimised at a time (each is ``len(areas)`` forward and
      backward passes per iteration; ``2 len(areas)`` for dual).
    mesh: spread the images over this mesh's devices.
    progress: show a progress bar (stderr) while an eager call runs (it never changes
      the result: eager calls always run in segments, ``optimise_in_chunks``).
    init: initial mask parameters, ``(n, K, h_in, w_in)`` or broadcastable (``h_in, w_in``
      = ``geometry(...).shape_in``); TorchRay starts from ones (the default).
    regul_scale: ``(n,)`` a factor on each image's area weight (default 1), e.g. to
      scale the area term to a reward's range.
    ties: the area term's gradient where mask values tie (``smooth_masks.area_gap``):
      ``"stable"`` (TorchRay's) or ``"symmetric"``.

  Returns:
    ``ExtremalResult`` with masks ``(n, K, h, w)`` and the gradient diagnostics. Called
    eagerly, a ``UserWarning`` says where the reward's gradient was negligible against
    the area term's (``dead_objective``).

  Raises:
    ValueError: bad shapes, dtypes, areas, variant, iterations, batch size, objective or
      intervention (eagerly; named).
  """
  a = _prepare(dict(logits_fn=logits_fn, images=images, targets=targets, areas=areas,
                    variant=variant, iterations=iterations, perturbation=perturbation,
                    reward=reward, activation=activation, step=step, sigma=sigma,
                    num_levels=num_levels, max_blur=max_blur, batch_size=batch_size,
                    progress=progress, mesh=mesh, ties=ties))
  images, g = a["images"], a["mask_geometry"]
  schedule = Schedule(int(iterations), float(learning_rate), float(momentum),
                      float(momentum), float(regul_weight), float(regul_growth), bool(jitter))
  n, num_areas = images.shape[0], a["zeros"].shape[0]
  zeros = jnp.broadcast_to(a["zeros"], (n, num_areas))
  if init is not None:
    init = jnp.broadcast_to(jnp.asarray(init, jnp.float32), (n, num_areas, *g.shape_in))
  if regul_scale is not None:
    regul_scale = jnp.broadcast_to(jnp.asarray(regul_scale, jnp.float32), (n,))
  run = functools.partial(
      optimise_in_chunks, logits_fn, images, a["targets"], zeros, g=g,
      objective=a["objective"], schedule=schedule, variant=variant, batch_size=int(batch_size),
      mesh=mesh, init=init, regul_scale=regul_scale)
  if tracing(images, a["targets"], init, regul_scale):
    return ExtremalResult(*run())
  with progress_bar(a, desc="optimised masks") as bar:
    result = ExtremalResult(*run(bar=bar))
  warn_if_dead(result, "extremal_perturbation")
  return result


def saliency(result: ExtremalResult, *, smooth: float = 0.0) -> Maps:
  """One map per image: the sum of its masks over areas (TorchRay's benchmark sums the
  preserve masks of areas 0.025-0.2), optionally blurred with ``smooth`` times the
  shorter side as sigma (TorchRay's ``smooth``, zero padding)."""
  maps = jnp.sum(result.masks, axis=1)
  if smooth > 0:
    kernel = torchray_gaussian(smooth * min(maps.shape[-2:]))
    rows = jnp.asarray(correlation_matrix(maps.shape[-2], kernel))
    cols = jnp.asarray(correlation_matrix(maps.shape[-1], kernel))
    maps = jnp.einsum("ij,njw,kw->nik", rows, maps, cols, precision=jax.lax.Precision.HIGHEST)
  return maps


__all__ = ["DEAD_RATIO", "DELETE", "DUAL", "OBJECTIVES", "PRESERVE", "SEGMENT", "VARIANTS",
           "ExtremalResult", "Objective", "Schedule", "dead_objective", "expected_log_odds",
           "extremal_perturbation", "gradient_ratio", "log_odds", "log_probability",
           "objective_of", "optimise_in_chunks", "progress_bar", "resolve_objective",
           "saliency", "warn_if_dead"]
