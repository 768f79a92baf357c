"""Minimal-perturbation attacks for softmax models: Carlini-Wagner L2 and DeepFool.

Same contract as ``cejax.attacks`` (pixel space, ``space=`` required, an
``AttackResult``); re-exported there.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

import cejax.attacks._core as core
from cejax.types import LogitsFn, Pixels


@core.attack_program
def carlini_wagner_l2(logits_fn: LogitsFn, images: Pixels, labels: jax.Array, *,
                      key=None, steps=100, learning_rate=0.01, c=1e-3, confidence=0.0,
                      search_steps=9, abort_early=False, targeted=False,
                      space: core.PixelSpace) -> core.AttackResult:
  """Carlini & Wagner (2017) L2 attack for softmax models, with a binary search on ``c``.

  Carlini's algorithm as Foolbox 3's ``L2CarliniWagnerAttack`` runs it (a test compares
  the two): Adam on ``w`` from the clean image, ``x = low + (high - low) (tanh(w) + 1) /
  2``, minimising ``||x - x0||^2 + c * max(Z_y - max_{j != y} Z_j + confidence, 0)``
  (targeted: the other way round). An iterate succeeds when it is misclassified by at
  least ``confidence`` logits (targeted: classified as ``y`` by that margin). After each
  of ``search_steps`` runs, per example: success at ``c`` sets the upper bound to ``c``,
  failure sets the lower bound; ``c`` becomes the bounds' midpoint, or ten times itself
  while no success has been seen; with 10 or more search steps the last run uses the
  upper bound (Carlini's ``repeat``). Returns, per example, the smallest-L2 successful
  iterate over all runs (the clean image if none).

  Deliberate difference: ``steps=100`` and no early abort by default, where Carlini and
  Foolbox default to 10,000 steps with ``abort_early``. ``abort_early=True`` stops a
  run, as theirs do, when the loss summed over the batch has not fallen below 0.9999 of
  its value at the previous check (every ``ceil(steps / 10)`` steps); the iterate of
  that step is not recorded.
  """
  del key
  images, labels = core.check_inputs(images, labels, space, "softmax")
  n = len(images)
  span = space.high - space.low
  to_x = lambda w: space.low + span * (jnp.tanh(w) + 1) / 2
  x01 = jnp.clip((images - space.low) / span, 1e-6, 1 - 1e-6)
  w0 = jnp.arctanh(2 * x01 - 1)
  opt = optax.adam(learning_rate)
  check_every = -(-steps // 10)

  def margin(logits):
    onehot = jax.nn.one_hot(labels, logits.shape[-1])
    own = (logits * onehot).sum(-1)
    other = jnp.max(logits - 1e9 * onehot, -1)
    return (own - other) if not targeted else (other - own)

  def objective(w, cs):
    x = to_x(w)
    logits = logits_fn(space.normalize(x)).astype(jnp.float32)
    dist = ((x - images) ** 2).reshape(n, -1).sum(-1)
    m = margin(logits)
    return (dist + cs * jnp.maximum(m + confidence, 0.0)).sum(), (dist, m, x)

  def run(cs, best):
    def body(carry):
      i, w, state, best_x, best_d, found, previous, _ = carry
      (loss, (dist, m, x)), g = jax.value_and_grad(objective, has_aux=True)(w, cs)
      updates, state = opt.update(g, state)
      w = optax.apply_updates(w, updates)
      check = abort_early & (i % check_every == 0)
      abort = check & ~(loss <= 0.9999 * previous)
      previous = jnp.where(check & ~abort, loss, previous)
      ok = (m <= -confidence) & ~abort  # an aborted step's iterate is not recorded
      better = ok & (dist < best_d)
      best_x = jnp.where(better[:, None, None, None], x, best_x)
      best_d = jnp.where(better, dist, best_d)
      return i + 1, w, state, best_x, best_d, found | ok, previous, abort

    def going(carry):
      i, *_, abort = carry
      return (i < steps) & ~abort

    init = (0, w0, opt.init(w0)) + best + (jnp.zeros(n, bool), jnp.float32(jnp.inf),
                                           jnp.bool_(False))
    _, _, _, best_x, best_d, found, _, _ = jax.lax.while_loop(going, body, init)
    return (best_x, best_d), found

  def search(carry, step):
    lo, hi, cs, best = carry
    if search_steps >= 10:  # Carlini's repeat: the last run at the upper bound
      cs = jnp.where(step == search_steps - 1, jnp.minimum(hi, 1e10), cs)
    best, found = run(cs, best)
    hi = jnp.where(found, cs, hi)
    lo = jnp.where(found, lo, cs)
    cs = jnp.where(jnp.isinf(hi), cs * 10, (lo + hi) / 2)
    return (lo, hi, cs, best), None

  init_best = (images, jnp.full((n,), jnp.inf))
  (_, _, _, (adv, _)), _ = jax.lax.scan(
      search, (jnp.zeros(n), jnp.full((n,), jnp.inf), jnp.full((n,), c), init_best),
      jnp.arange(search_steps))
  return core.attack_result(logits_fn, space, images, adv, labels, targeted, "softmax")


@core.attack_program
def deepfool(logits_fn: LogitsFn, images: Pixels, labels: jax.Array, *,
             key=None, steps=50, overshoot=0.02,
             candidates: int | None = 10, space: core.PixelSpace) -> core.AttackResult:
  """DeepFool L2 (Moosavi-Dezfooli et al., 2016), untargeted, softmax models.

  Foolbox 3's ``L2DeepFoolAttack`` (logit loss): the reference class is the clean
  image's top class and only the next ``candidates - 1`` classes by clean logit are
  considered (``None``: all), so the Jacobian held per step is ``(candidates - 1)``
  images per example and 1000-class models fit. Each step linearises every
  candidate's margin ``Z_k - Z_ref`` and moves to the nearest linearised boundary
  (plus 1e-4 for stability); ``x = clip(x0 + (1 + overshoot) * sum of steps)``.
  Examples stop moving once misclassified (with respect to ``labels``).
  """
  del key
  images, labels = core.check_inputs(images, labels, space, "softmax")
  n = len(images)
  clean_logits = logits_fn(space.normalize(images)).astype(jnp.float32)
  k = clean_logits.shape[-1]
  num = k if candidates is None else min(int(candidates), k)
  if num < 2:
    raise ValueError(f"candidates must be >= 2 (the model has {k} classes), got "
                     f"{candidates}.")
  # Stable descending order, as Foolbox's argsort().flip() for distinct logits.
  classes = jnp.argsort(-clean_logits, axis=-1, stable=True)[:, :num]  # (n, num)

  def losses(x):
    logits = logits_fn(space.normalize(x)).astype(jnp.float32)
    picked = jnp.take_along_axis(logits, classes, 1)
    return picked[:, 1:] - picked[:, :1], logits  # (n, num - 1)

  def norm(v):
    return jnp.sqrt((v.reshape(v.shape[0], -1) ** 2).sum(-1))

  def body(_, carry):
    x, p_total = carry
    f, logits = losses(x)
    done = jnp.argmax(logits, -1) != labels
    _, vjp_fn = jax.vjp(lambda y: losses(y)[0], x)
    basis = jnp.broadcast_to(jnp.eye(num - 1)[:, None, :], (num - 1, n, num - 1))
    grads = jax.vmap(lambda e: vjp_fn(e)[0])(basis)  # (num - 1, n, h, w, c)
    grad_norms = jax.vmap(norm)(grads).T  # (n, num - 1)
    dist = jnp.abs(f) / (grad_norms + 1e-8)
    best = jnp.argmin(dist, -1)
    g = jnp.take_along_axis(grads, best[None, :, None, None, None], 0)[0]
    d = jnp.take_along_axis(dist, best[:, None], 1)[:, 0] + 1e-4
    p_total = p_total + (d / (norm(g) + 1e-8))[:, None, None, None] * g
    moved = jnp.clip(images + (1 + overshoot) * p_total, space.low, space.high)
    return jnp.where(done[:, None, None, None], x, moved), p_total

  adv, _ = jax.lax.fori_loop(0, steps, body, (images, jnp.zeros_like(images)))
  return core.attack_result(logits_fn, space, images, adv, labels, False, "softmax")
