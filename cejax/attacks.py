"""Gradient-based adversarial attacks, written with ``jax.grad``.

Every attack is a pure function ``attack(logits_fn, images, labels, *, key, ...)``
with keyword-only hyperparameters, returning an ``AttackResult``. Images and the
budget live in **pixel space** (``space.low``..``space.high``); the model sees
``space.normalize(x)``. ``space`` is required: a model trained on normalised inputs
attacked without its normalisation would be attacked on the wrong input distribution
without any error, so even a model that takes [0, 1] pixels says so with
``space=PixelSpace()``. Iterates are clipped to valid pixels.

Labels: int ``(n,)`` classes (``activation="softmax"``) or multi-hot ``(n, k)`` findings
(``activation="sigmoid"``, multi-label models; targeted attacks then ask for a whole target
vector, e.g. the true labels with one finding switched on or off).

Steps run in ``lax.fori_loop``; examples are independent, so ``jax.vmap`` over an
epsilon array gives an epsilon sweep in one call (``epsilon_sweep``) and the batch
axis shards over devices with ``shard_batch``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from cejax.compile import compile_once
from cejax.estimands import check_activation
from cejax.sharding import shard_batch  # noqa: F401  (re-exported: batch sharding of attacks)
from cejax.types import LogitsFn, Pixels


class PixelSpace(NamedTuple):
  """Valid pixel range and the normalisation the model applies to pixels.

  ``normalize(x) = (x - mean) / std``; ``PixelSpace()`` is the identity on [0, 1] (a
  model that takes raw [0, 1] pixels).
  """

  low: float = 0.0
  high: float = 1.0
  mean: Any = 0.0
  std: Any = 1.0

  def normalize(self, x):
    return (x - jnp.asarray(self.mean, x.dtype)) / jnp.asarray(self.std, x.dtype)

  def to_pixels(self, normalized):
    return normalized * jnp.asarray(self.std) + jnp.asarray(self.mean)


class AttackResult(NamedTuple):
  """Attack outputs.

  Attributes:
    images: adversarial images in pixel space, ``(n, h, w, c)``.
    success: ``(n,)`` bool, the attack's goal is met on the final images.
    logits: ``(n, k)`` logits of the adversarial images.
    linf: ``(n,)`` L-infinity norm of the perturbation (pixel units).
    l2: ``(n,)`` L2 norm of the perturbation.
  """

  images: jax.Array
  success: jax.Array
  logits: jax.Array
  linf: jax.Array
  l2: jax.Array


def attack_loss(logits_fn, space, labels, *, targeted=False, activation="softmax"):
  """``loss(pixels) -> (n,)``, the per-example loss the gradient attacks *ascend*:
  cross-entropy of ``logits_fn(space.normalize(pixels))`` with the labels (summed
  per-finding binary cross-entropy for ``activation="sigmoid"``), negated when
  ``targeted``."""

  def loss(x):
    logits = logits_fn(space.normalize(x)).astype(jnp.float32)
    if check_activation(activation) == "sigmoid":
      per = optax.sigmoid_binary_cross_entropy(logits, labels.astype(jnp.float32)).sum(-1)
    else:
      per = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    return -per if targeted else per

  return loss


def _grad(logits_fn, space, labels, *, targeted, activation):
  loss = attack_loss(logits_fn, space, labels, targeted=targeted, activation=activation)
  return jax.grad(lambda x: loss(x).sum())


def success(logits, labels, *, targeted=False, activation="softmax"):
  """Whether the attack's goal holds for ``logits``, ``(n,)`` bool."""
  if check_activation(activation) == "sigmoid":
    match = ((logits > 0) == (labels > 0.5)).all(-1)
    return match if targeted else ~match
  hit = jnp.argmax(logits, -1) == labels
  return hit if targeted else ~hit


def _result(logits_fn, space, clean, adv, labels, targeted, activation):
  logits = logits_fn(space.normalize(adv)).astype(jnp.float32)
  delta = (adv - clean).reshape(len(adv), -1)
  return AttackResult(adv, success(logits, labels, targeted=targeted, activation=activation),
                      logits, jnp.abs(delta).max(-1), jnp.sqrt((delta**2).sum(-1)))


def _check(images, labels, space, activation):
  multi_label = check_activation(activation) == "sigmoid"
  images = jnp.asarray(images, jnp.float32)
  if images.ndim != 4:
    raise ValueError(f"images must be (n, h, w, c) in pixel space, got {images.shape}.")
  labels = jnp.asarray(labels)
  want = images.shape[:1] + ((labels.shape[-1],) if multi_label else ())
  labels = jnp.asarray(labels, jnp.float32 if multi_label else jnp.int32)
  if labels.shape != want:
    kind = "multi-hot" if multi_label else "class indices"
    raise ValueError(f"labels must have shape {want} ({kind}), got {labels.shape}.")
  if not isinstance(images, jax.core.Tracer):
    lo, hi = float(images.min()), float(images.max())
    if lo < space.low - 1e-5 or hi > space.high + 1e-5:
      raise ValueError(f"images must be pixels in [{space.low}, {space.high}] (attacks work "
                       f"in pixel space; pass space= for the model's normalisation); got "
                       f"values in [{lo:.3g}, {hi:.3g}].")
  return images, labels


def _validate(args):
  """Eager checks before the compiled attack (pixel range, label shape)."""
  _check(args["images"], args["labels"], args["space"], args.get("activation", "softmax"))


def _attack(*static):
  """Compiled once per model, defense and hyperparameters (``cejax.compile``); images,
  labels, ``eps``, ``key`` and the pixel space are traced arguments."""
  return compile_once(static_argnames=("logits_fn",) + static, validate=_validate)


def _project(x, clean, eps, norm, space):
  if norm == "linf":
    x = jnp.clip(x, clean - eps, clean + eps)
  else:
    d = (x - clean).reshape(len(x), -1)
    n = jnp.sqrt((d**2).sum(-1, keepdims=True))
    d = d * jnp.minimum(1.0, eps / jnp.maximum(n, 1e-12))
    x = clean + d.reshape(x.shape)
  return jnp.clip(x, space.low, space.high)


def _step(g, norm):
  if norm == "linf":
    return jnp.sign(g)
  n = jnp.sqrt((g.reshape(len(g), -1) ** 2).sum(-1))
  return g / jnp.maximum(n, 1e-12).reshape(-1, *([1] * (g.ndim - 1)))


@_attack("targeted", "activation")
def fgsm(logits_fn: LogitsFn, images: Pixels, labels: jax.Array, *,
         key=None, eps, targeted=False, activation="softmax",
         space: PixelSpace) -> AttackResult:
  """Goodfellow et al. (2015): ``x + eps * sign(grad loss)`` (minus for targeted)."""
  del key  # deterministic; accepted for a uniform signature
  images, labels = _check(images, labels, space, activation)
  g = _grad(logits_fn, space, labels, targeted=targeted, activation=activation)(images)
  adv = jnp.clip(images + eps * jnp.sign(g), space.low, space.high)
  return _result(logits_fn, space, images, adv, labels, targeted, activation)


def _iterate(logits_fn, images, labels, start, *, eps, steps, step_size, norm, decay,
             targeted, activation, space):
  grad = _grad(logits_fn, space, labels, targeted=targeted, activation=activation)

  def body(_, carry):
    x, momentum = carry
    g = grad(x)
    if decay is not None:  # MI-FGSM: accumulate L1-normalised gradients
      l1 = jnp.abs(g).reshape(len(g), -1).sum(-1).reshape(-1, 1, 1, 1)
      momentum = decay * momentum + g / jnp.maximum(l1, 1e-12)
      g = momentum
    x = _project(x + step_size * _step(g, norm), images, eps, norm, space)
    return x, momentum

  x, _ = jax.lax.fori_loop(0, steps, body, (start, jnp.zeros_like(images)))
  return x


@_attack("steps", "step_size", "targeted", "activation")
def bim(logits_fn: LogitsFn, images: Pixels, labels: jax.Array, *,
        key=None, eps, steps=10, step_size=None,
        targeted=False, activation="softmax", space: PixelSpace) -> AttackResult:
  """I-FGSM / BIM (Kurakin et al., 2017): iterated FGSM steps projected to the eps-ball."""
  del key
  images, labels = _check(images, labels, space, activation)
  step_size = eps / steps * 1.25 if step_size is None else step_size
  adv = _iterate(logits_fn, images, labels, images, eps=eps, steps=steps,
                 step_size=step_size, norm="linf", decay=None, targeted=targeted,
                 activation=activation, space=space)
  return _result(logits_fn, space, images, adv, labels, targeted, activation)


@_attack("steps", "step_size", "decay", "targeted", "activation")
def mifgsm(logits_fn: LogitsFn, images: Pixels, labels: jax.Array, *,
           key=None, eps, steps=10, step_size=None,
           decay=1.0, targeted=False, activation="softmax",
           space: PixelSpace) -> AttackResult:
  """MI-FGSM (Dong et al., 2018): I-FGSM with a momentum of L1-normalised gradients."""
  del key
  images, labels = _check(images, labels, space, activation)
  step_size = eps / steps if step_size is None else step_size
  adv = _iterate(logits_fn, images, labels, images, eps=eps, steps=steps,
                 step_size=step_size, norm="linf", decay=decay, targeted=targeted,
                 activation=activation, space=space)
  return _result(logits_fn, space, images, adv, labels, targeted, activation)


@_attack("steps", "step_size", "norm", "restarts", "random_start", "targeted",
         "activation")
def pgd(logits_fn: LogitsFn, images: Pixels, labels: jax.Array, *,
        key, eps, steps=20, step_size=None, norm="linf",
        restarts=1, random_start=True, targeted=False, activation="softmax",
        space: PixelSpace) -> AttackResult:
  """PGD (Madry et al., 2018) under L-infinity or L2, with random restarts.

  Each restart starts uniformly in the eps-ball (L-inf) or at a random direction of
  random radius (L2); per example the restart with the highest loss among the
  successful ones (else the highest loss) is kept.
  """
  if norm not in ("linf", "l2"):
    raise ValueError(f"norm must be 'linf' or 'l2', got {norm!r}.")
  if restarts < 1 or steps < 1:
    raise ValueError(f"steps and restarts must be >= 1, got {steps}, {restarts}.")
  images, labels = _check(images, labels, space, activation)
  step_size = 2.5 * eps / steps if step_size is None else step_size
  loss = attack_loss(logits_fn, space, labels, targeted=targeted, activation=activation)

  def one_restart(k):
    if not random_start:
      start = images
    elif norm == "linf":
      start = images + jax.random.uniform(k, images.shape, minval=-eps, maxval=eps)
    else:
      kd, kr = jax.random.split(k)
      d = jax.random.normal(kd, images.shape)
      d = d / jnp.sqrt((d.reshape(len(d), -1) ** 2).sum(-1)).reshape(-1, 1, 1, 1)
      d = d * eps * jax.random.uniform(kr, (len(d), 1, 1, 1))
      start = images + d
    start = _project(start, images, eps, norm, space)
    adv = _iterate(logits_fn, images, labels, start, eps=eps, steps=steps,
                   step_size=step_size, norm=norm, decay=None, targeted=targeted,
                   activation=activation, space=space)
    logits = logits_fn(space.normalize(adv)).astype(jnp.float32)
    ok = success(logits, labels, targeted=targeted, activation=activation)
    return adv, loss(adv) + jnp.where(ok, 1e6, 0.0)  # success first, then loss

  advs, scores = jax.lax.map(one_restart, jax.random.split(key, restarts))
  best = jnp.argmax(scores, 0)
  adv = jnp.take_along_axis(advs, best[None, :, None, None, None], 0)[0]
  return _result(logits_fn, space, images, adv, labels, targeted, activation)


@_attack("defense", "steps", "step_size", "norm", "restarts", "random_start", "targeted",
         "activation")
def bpda_pgd(logits_fn: LogitsFn, images: Pixels, labels: jax.Array, *,
             key, defense: Callable, eps, steps=20,
             step_size=None, norm="linf", restarts=1, random_start=True, targeted=False,
             activation="softmax", space: PixelSpace) -> AttackResult:
  """PGD through a non-differentiable input defense with BPDA (Athalye et al., 2018).

  The forward pass applies ``defense`` (pixels -> pixels); the backward pass treats
  it as the identity. The returned logits and success are for the *defended* model.
  """
  def defended(x_normalized):
    x = space.to_pixels(x_normalized)
    x = x + jax.lax.stop_gradient(defense(x) - x)
    return logits_fn(space.normalize(x))

  return pgd(defended, images, labels, key=key, eps=eps, steps=steps, step_size=step_size,
             norm=norm, restarts=restarts, random_start=random_start, targeted=targeted,
             activation=activation, space=space)


@_attack("steps", "learning_rate", "c", "confidence", "search_steps", "targeted")
def carlini_wagner_l2(logits_fn: LogitsFn, images: Pixels, labels: jax.Array, *,
                      key=None, steps=100,
                      learning_rate=0.01, c=1e-3, confidence=0.0, search_steps=9,
                      targeted=False, space: PixelSpace) -> AttackResult:
  """Carlini & Wagner (2017) L2 attack for softmax models, with a binary search on ``c``.

  Optimises ``w`` with Adam from the clean image, ``x = low + (high - low) (tanh(w) +
  1) / 2``, minimising ``||x - x0||^2 + c * f(x)`` with the margin loss ``f = max(Z_y -
  max_{j != y} Z_j, -confidence)`` (targeted: ``max(max_{j != y} Z_j - Z_y,
  -confidence)``). An iterate succeeds when it is misclassified by at least
  ``confidence`` logits (targeted: classified as ``y`` by that margin). After each of
  ``search_steps`` runs, per example: success at ``c`` sets the upper bound to ``c``,
  failure sets the lower bound; ``c`` becomes the bounds' midpoint, or ten times
  itself while no success has been seen (Carlini's search; Foolbox's
  ``L2CarliniWagnerAttack``). Returns, per example, the smallest-L2 successful iterate
  over all runs (the clean image if none).
  """
  del key
  images, labels = _check(images, labels, space, "softmax")
  n = len(images)
  span = space.high - space.low
  to_x = lambda w: space.low + span * (jnp.tanh(w) + 1) / 2
  x01 = jnp.clip((images - space.low) / span, 1e-6, 1 - 1e-6)
  w0 = jnp.arctanh(2 * x01 - 1)
  opt = optax.adam(learning_rate)

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
    return (dist + cs * jnp.maximum(m, -confidence)).sum(), (dist, m, x)

  def run(cs, best):
    def body(_, carry):
      w, state, best_x, best_d, found = carry
      (_, (dist, m, x)), g = jax.value_and_grad(objective, has_aux=True)(w, cs)
      ok = m <= -confidence
      better = ok & (dist < best_d)
      best_x = jnp.where(better[:, None, None, None], x, best_x)
      best_d = jnp.where(better, dist, best_d)
      updates, state = opt.update(g, state)
      return optax.apply_updates(w, updates), state, best_x, best_d, found | ok

    init = (w0, opt.init(w0)) + best + (jnp.zeros(n, bool),)
    _, _, best_x, best_d, found = jax.lax.fori_loop(0, steps, body, init)
    return (best_x, best_d), found

  def search(carry, _):
    lo, hi, cs, best = carry
    best, found = run(cs, best)
    hi = jnp.where(found, cs, hi)
    lo = jnp.where(found, lo, cs)
    cs = jnp.where(jnp.isinf(hi), cs * 10, (lo + hi) / 2)
    return (lo, hi, cs, best), None

  init_best = (images, jnp.full((n,), jnp.inf))
  (_, _, _, (adv, _)), _ = jax.lax.scan(
      search, (jnp.zeros(n), jnp.full((n,), jnp.inf), jnp.full((n,), c), init_best), None,
      length=search_steps)
  return _result(logits_fn, space, images, adv, labels, targeted, "softmax")


@_attack("steps", "overshoot", "candidates")
def deepfool(logits_fn: LogitsFn, images: Pixels, labels: jax.Array, *,
             key=None, steps=50, overshoot=0.02,
             candidates: int | None = 10, space: PixelSpace) -> AttackResult:
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
  images, labels = _check(images, labels, space, "softmax")
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
  return _result(logits_fn, space, images, adv, labels, False, "softmax")


def epsilon_sweep(attack: Callable, logits_fn, images, labels, *, eps, **kwargs):
  """``attack`` at every budget in ``eps`` in one vmapped call; leading axis = eps."""
  eps = jnp.asarray(eps, jnp.float32)
  return jax.vmap(lambda e: attack(logits_fn, images, labels, eps=e, **kwargs))(eps)
