"""Gradient-based adversarial attacks, written with ``jax.grad``.

Every attack is a pure function ``attack(logits_fn, images, labels, *, key, ...)``
with keyword-only hyperparameters, returning an ``AttackResult``. Images and the
budget live in **pixel space** (``space.low``..``space.high``, [0, 1] by default); the
model sees ``space.normalize(x)``, so attacks on models trained with normalised
inputs need no conversion by the caller. Iterates are clipped to valid pixels.

Labels: int ``(n,)`` classes (softmax models) or multi-hot ``(n, k)`` findings
(``multi_label=True``, sigmoid models; targeted attacks then ask for a whole target
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
from jax.sharding import PartitionSpec as P


class PixelSpace(NamedTuple):
  """Valid pixel range and the normalisation the model applies to pixels.

  ``normalize(x) = (x - mean) / std``; the default is the identity on [0, 1].
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


def _loss_fn(logits_fn, space, labels, *, targeted, multi_label):
  """Per-example loss the attacker *ascends*."""

  def loss(x):
    logits = logits_fn(space.normalize(x)).astype(jnp.float32)
    if multi_label:
      per = optax.sigmoid_binary_cross_entropy(logits, labels.astype(jnp.float32)).sum(-1)
    else:
      per = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    return -per if targeted else per

  return loss


def _grad(logits_fn, space, labels, *, targeted, multi_label):
  loss = _loss_fn(logits_fn, space, labels, targeted=targeted, multi_label=multi_label)
  return jax.grad(lambda x: loss(x).sum())


def success(logits, labels, *, targeted=False, multi_label=False):
  """Whether the attack's goal holds for ``logits``, ``(n,)`` bool."""
  if multi_label:
    match = ((logits > 0) == (labels > 0.5)).all(-1)
    return match if targeted else ~match
  hit = jnp.argmax(logits, -1) == labels
  return hit if targeted else ~hit


def _result(logits_fn, space, clean, adv, labels, targeted, multi_label):
  logits = logits_fn(space.normalize(adv)).astype(jnp.float32)
  delta = (adv - clean).reshape(len(adv), -1)
  return AttackResult(adv, success(logits, labels, targeted=targeted, multi_label=multi_label),
                      logits, jnp.abs(delta).max(-1), jnp.sqrt((delta**2).sum(-1)))


def _check(images, labels, space, multi_label):
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


def fgsm(logits_fn, images, labels, *, key=None, eps, targeted=False, multi_label=False,
         space: PixelSpace = PixelSpace()) -> AttackResult:
  """Goodfellow et al. (2015): ``x + eps * sign(grad loss)`` (minus for targeted)."""
  del key  # deterministic; accepted for a uniform signature
  images, labels = _check(images, labels, space, multi_label)
  g = _grad(logits_fn, space, labels, targeted=targeted, multi_label=multi_label)(images)
  adv = jnp.clip(images + eps * jnp.sign(g), space.low, space.high)
  return _result(logits_fn, space, images, adv, labels, targeted, multi_label)


def _iterate(logits_fn, images, labels, start, *, eps, steps, step_size, norm, decay,
             targeted, multi_label, space):
  grad = _grad(logits_fn, space, labels, targeted=targeted, multi_label=multi_label)

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


def bim(logits_fn, images, labels, *, key=None, eps, steps=10, step_size=None,
        targeted=False, multi_label=False, space: PixelSpace = PixelSpace()) -> AttackResult:
  """I-FGSM / BIM (Kurakin et al., 2017): iterated FGSM steps projected to the eps-ball."""
  del key
  images, labels = _check(images, labels, space, multi_label)
  step_size = eps / steps * 1.25 if step_size is None else step_size
  adv = _iterate(logits_fn, images, labels, images, eps=eps, steps=steps,
                 step_size=step_size, norm="linf", decay=None, targeted=targeted,
                 multi_label=multi_label, space=space)
  return _result(logits_fn, space, images, adv, labels, targeted, multi_label)


def mifgsm(logits_fn, images, labels, *, key=None, eps, steps=10, step_size=None,
           decay=1.0, targeted=False, multi_label=False,
           space: PixelSpace = PixelSpace()) -> AttackResult:
  """MI-FGSM (Dong et al., 2018): I-FGSM with a momentum of L1-normalised gradients."""
  del key
  images, labels = _check(images, labels, space, multi_label)
  step_size = eps / steps if step_size is None else step_size
  adv = _iterate(logits_fn, images, labels, images, eps=eps, steps=steps,
                 step_size=step_size, norm="linf", decay=decay, targeted=targeted,
                 multi_label=multi_label, space=space)
  return _result(logits_fn, space, images, adv, labels, targeted, multi_label)


def pgd(logits_fn, images, labels, *, key, eps, steps=20, step_size=None, norm="linf",
        restarts=1, random_start=True, targeted=False, multi_label=False,
        space: PixelSpace = PixelSpace()) -> AttackResult:
  """PGD (Madry et al., 2018) under L-infinity or L2, with random restarts.

  Each restart starts uniformly in the eps-ball (L-inf) or at a random direction of
  random radius (L2); per example the restart with the highest loss among the
  successful ones (else the highest loss) is kept.
  """
  if norm not in ("linf", "l2"):
    raise ValueError(f"norm must be 'linf' or 'l2', got {norm!r}.")
  if restarts < 1 or steps < 1:
    raise ValueError(f"steps and restarts must be >= 1, got {steps}, {restarts}.")
  images, labels = _check(images, labels, space, multi_label)
  step_size = 2.5 * eps / steps if step_size is None else step_size
  loss = _loss_fn(logits_fn, space, labels, targeted=targeted, multi_label=multi_label)

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
                   multi_label=multi_label, space=space)
    logits = logits_fn(space.normalize(adv)).astype(jnp.float32)
    ok = success(logits, labels, targeted=targeted, multi_label=multi_label)
    return adv, loss(adv) + jnp.where(ok, 1e6, 0.0)  # success first, then loss

  advs, scores = jax.lax.map(one_restart, jax.random.split(key, restarts))
  best = jnp.argmax(scores, 0)
  adv = jnp.take_along_axis(advs, best[None, :, None, None, None], 0)[0]
  return _result(logits_fn, space, images, adv, labels, targeted, multi_label)


def bpda_pgd(logits_fn, images, labels, *, key, defense: Callable, eps, steps=20,
             step_size=None, norm="linf", restarts=1, targeted=False, multi_label=False,
             space: PixelSpace = PixelSpace()) -> AttackResult:
  """PGD through a non-differentiable input defense with BPDA (Athalye et al., 2018).

  The forward pass applies ``defense`` (pixels -> pixels); the backward pass treats
  it as the identity. The returned logits and success are for the *defended* model.
  """
  def defended(x_normalized):
    x = space.to_pixels(x_normalized)
    x = x + jax.lax.stop_gradient(defense(x) - x)
    return logits_fn(space.normalize(x))

  return pgd(defended, images, labels, key=key, eps=eps, steps=steps, step_size=step_size,
             norm=norm, restarts=restarts, targeted=targeted, multi_label=multi_label,
             space=space)


def carlini_wagner_l2(logits_fn, images, labels, *, key=None, steps=100,
                      learning_rate=0.01, c=1.0, confidence=0.0, search_steps=5,
                      targeted=False, space: PixelSpace = PixelSpace()) -> AttackResult:
  """Carlini & Wagner (2017) L2 attack for softmax models, with a binary search on ``c``.

  Optimises ``w`` with Adam, ``x = low + (high - low) (tanh(w) + 1) / 2``, minimising
  ``||x - x0||^2 + c * f(x)`` with the margin loss ``f``; keeps, per example, the
  smallest-L2 successful iterate over all search steps (the clean image if none).
  """
  del key
  images, labels = _check(images, labels, space, False)
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
    return jnp.maximum((own - other) if not targeted else (other - own), -confidence)

  def objective(w, cs):
    x = to_x(w)
    logits = logits_fn(space.normalize(x)).astype(jnp.float32)
    dist = ((x - images) ** 2).reshape(n, -1).sum(-1)
    return (dist + cs * margin(logits)).sum(), (dist, logits)

  def run(cs, best):
    def body(_, carry):
      w, state, best_x, best_d = carry
      (_, (dist, logits)), g = jax.value_and_grad(objective, has_aux=True)(w, cs)
      ok = success(logits, labels, targeted=targeted)
      better = ok & (dist < best_d)
      best_x = jnp.where(better[:, None, None, None], to_x(w), best_x)
      best_d = jnp.where(better, dist, best_d)
      updates, state = opt.update(g, state)
      return optax.apply_updates(w, updates), state, best_x, best_d

    _, _, best_x, best_d = jax.lax.fori_loop(0, steps, body, (w0, opt.init(w0)) + best)
    return best_x, best_d

  def search(carry, _):
    lo, hi, cs, best = carry
    before = best[1]
    best = run(cs, best)
    found = best[1] < before
    hi = jnp.where(found, jnp.minimum(hi, cs), hi)
    lo = jnp.where(found, lo, jnp.maximum(lo, cs))
    cs = jnp.where(hi < 1e9, (lo + hi) / 2, cs * 10)
    return (lo, hi, cs, best), None

  init_best = (images, jnp.full((n,), jnp.inf))
  (_, _, _, (adv, _)), _ = jax.lax.scan(
      search, (jnp.zeros(n), jnp.full((n,), 1e10), jnp.full((n,), c), init_best), None,
      length=search_steps)
  return _result(logits_fn, space, images, adv, labels, targeted, False)


def deepfool(logits_fn, images, labels, *, key=None, steps=50, overshoot=0.02,
             space: PixelSpace = PixelSpace()) -> AttackResult:
  """DeepFool (Moosavi-Dezfooli et al., 2016), untargeted, softmax models.

  Each step linearises every class's margin to the label and moves to the nearest
  linearised boundary; the total perturbation is scaled by ``1 + overshoot``.
  Examples stop moving once misclassified.
  """
  del key
  images, labels = _check(images, labels, space, False)
  n = len(images)

  def margins(x):
    logits = logits_fn(space.normalize(x)).astype(jnp.float32)
    own = jnp.take_along_axis(logits, labels[:, None], 1)
    return logits - own, logits  # (n, k): f_k - f_label, 0 at the label

  def body(_, r):
    x = jnp.clip(images + (1 + overshoot) * r, space.low, space.high)
    f, logits = margins(x)
    k = f.shape[-1]
    # Row j: the gradient of every example's margin f_j (examples are independent).
    _, vjp_fn = jax.vjp(lambda y: margins(y)[0], x)
    jac = jax.vmap(lambda e: vjp_fn(e)[0])(
        jnp.broadcast_to(jnp.eye(k)[:, None, :], (k, n, k)))  # (k, n, h, w, c)
    norms = jnp.sqrt((jac.reshape(k, n, -1) ** 2).sum(-1)).T  # (n, k)
    dist = jnp.abs(f) / jnp.maximum(norms, 1e-12)
    dist = jnp.where(jax.nn.one_hot(labels, k) > 0, jnp.inf, dist)
    best = jnp.argmin(dist, -1)
    w = jnp.take_along_axis(jac, best[None, :, None, None, None], 0)[0]
    d = jnp.take_along_axis(dist, best[:, None], 1)[:, 0]
    wn = jnp.sqrt((w.reshape(n, -1) ** 2).sum(-1))
    step = (d + 1e-4) / jnp.maximum(wn, 1e-12)
    done = jnp.argmax(logits, -1) != labels
    return r + jnp.where(done[:, None, None, None], 0.0, step[:, None, None, None] * w)

  r = jax.lax.fori_loop(0, steps, body, jnp.zeros_like(images))
  adv = jnp.clip(images + (1 + overshoot) * r, space.low, space.high)
  return _result(logits_fn, space, images, adv, labels, False, False)


def epsilon_sweep(attack: Callable, logits_fn, images, labels, *, eps, **kwargs):
  """``attack`` at every budget in ``eps`` in one vmapped call; leading axis = eps."""
  eps = jnp.asarray(eps, jnp.float32)
  return jax.vmap(lambda e: attack(logits_fn, images, labels, eps=e, **kwargs))(eps)


def shard_batch(fn: Callable, mesh: jax.sharding.Mesh, *, axis: str | None = None):
  """Wraps ``fn(images, labels) -> pytree`` to split the batch over ``mesh``.

  ``fn`` is jitted with the batch axis sharded (``NamedSharding``) and the outputs
  gathered; XLA partitions the per-example work, and random draws (PGD's random
  start) are the same as on one device, as JAX's threefry is partitionable. The
  batch size must be divisible by the number of devices on ``axis``.
  """
  axis = axis or mesh.axis_names[0]
  batch = jax.sharding.NamedSharding(mesh, P(axis))
  jitted = jax.jit(fn, out_shardings=jax.sharding.NamedSharding(mesh, P()))

  def wrapped(images, labels):
    if images.shape[0] % mesh.shape[axis]:
      raise ValueError(f"batch of {images.shape[0]} does not split over "
                       f"{mesh.shape[axis]} devices.")
    return jitted(jax.device_put(images, batch), jax.device_put(labels, batch))

  return wrapped
