"""The gradient attacks (FGSM, I-FGSM, MI-FGSM, PGD, BPDA-PGD): ``cejax.attacks``."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

import cejax.attacks._core as core
from cejax.attacks._core import AttackResult, PixelSpace, attack_loss, success
from cejax.types import LogitsFn, Pixels


@core.attack_program
def fgsm(logits_fn: LogitsFn, images: Pixels, labels: jax.Array, *,
         key=None, eps, targeted=False, activation="softmax",
         space: PixelSpace) -> AttackResult:
  """Goodfellow et al. (2015): ``x + eps * sign(grad loss)`` (minus for targeted)."""
  del key  # deterministic; accepted for a uniform signature
  images, labels = core.check_inputs(images, labels, space, activation)
  grad = core.input_gradient(logits_fn, space, labels, targeted=targeted,
                             activation=activation)
  g = grad(images)
  adv = jnp.clip(images + eps * jnp.sign(g), space.low, space.high)
  return core.attack_result(logits_fn, space, images, adv, labels, targeted, activation)


def _iterate(logits_fn, images, labels, start, *, eps, steps, step_size, norm, decay,
             targeted, activation, space):
  grad = core.input_gradient(logits_fn, space, labels, targeted=targeted,
                             activation=activation)

  def body(_, carry):
    x, momentum = carry
    g = grad(x)
    if decay is not None:  # MI-FGSM: accumulate L1-normalised gradients
      l1 = jnp.abs(g).reshape(len(g), -1).sum(-1).reshape(-1, 1, 1, 1)
      momentum = decay * momentum + g / jnp.maximum(l1, 1e-12)
      g = momentum
    x = core.project(x + step_size * core.ascent_direction(g, norm), images, eps, norm, space)
    return x, momentum

  x, _ = jax.lax.fori_loop(0, steps, body, (start, jnp.zeros_like(images)))
  return x


@core.attack_program
def bim(logits_fn: LogitsFn, images: Pixels, labels: jax.Array, *,
        key=None, eps, steps=10, step_size=None,
        targeted=False, activation="softmax", space: PixelSpace) -> AttackResult:
  """I-FGSM / BIM (Kurakin et al., 2017): iterated FGSM steps projected to the eps-ball."""
  del key
  images, labels = core.check_inputs(images, labels, space, activation)
  step_size = eps / steps * 1.25 if step_size is None else step_size
  adv = _iterate(logits_fn, images, labels, images, eps=eps, steps=steps,
                 step_size=step_size, norm="linf", decay=None, targeted=targeted,
                 activation=activation, space=space)
  return core.attack_result(logits_fn, space, images, adv, labels, targeted, activation)


@core.attack_program
def mifgsm(logits_fn: LogitsFn, images: Pixels, labels: jax.Array, *,
           key=None, eps, steps=10, step_size=None,
           decay=1.0, targeted=False, activation="softmax",
           space: PixelSpace) -> AttackResult:
  """MI-FGSM (Dong et al., 2018): I-FGSM with a momentum of L1-normalised gradients."""
  del key
  images, labels = core.check_inputs(images, labels, space, activation)
  step_size = eps / steps if step_size is None else step_size
  adv = _iterate(logits_fn, images, labels, images, eps=eps, steps=steps,
                 step_size=step_size, norm="linf", decay=decay, targeted=targeted,
                 activation=activation, space=space)
  return core.attack_result(logits_fn, space, images, adv, labels, targeted, activation)


@core.attack_program
def pgd(logits_fn: LogitsFn, images: Pixels, labels: jax.Array, *,
        key, eps, steps=20, step_size=None, norm="linf",
        restarts=1, random_start=True, targeted=False, activation="softmax",
        space: PixelSpace) -> AttackResult:
  """PGD (Madry et al., 2018) under L-infinity or L2, with random restarts.

  Each restart starts uniformly in the eps-ball (``uniform_in_ball``); per example the
  restart with the highest loss among the successful ones (else the highest loss) is
  kept.
  """
  if norm not in ("linf", "l2"):
    raise ValueError(f"norm must be 'linf' or 'l2', got {norm!r}.")
  if restarts < 1 or steps < 1:
    raise ValueError(f"steps and restarts must be >= 1, got {steps}, {restarts}.")
  images, labels = core.check_inputs(images, labels, space, activation)
  step_size = 2.5 * eps / steps if step_size is None else step_size
  loss = attack_loss(logits_fn, space, labels, targeted=targeted, activation=activation)

  def one_restart(k):
    start = uniform_in_ball(k, images, eps=eps, norm=norm) if random_start else images
    start = core.project(start, images, eps, norm, space)
    adv = _iterate(logits_fn, images, labels, start, eps=eps, steps=steps,
                   step_size=step_size, norm=norm, decay=None, targeted=targeted,
                   activation=activation, space=space)
    logits = logits_fn(space.normalize(adv)).astype(jnp.float32)
    ok = success(logits, labels, targeted=targeted, activation=activation)
    return adv, loss(adv) + jnp.where(ok, 1e6, 0.0)  # success first, then loss

  advs, scores = jax.lax.map(one_restart, jax.random.split(key, restarts))
  best = jnp.argmax(scores, 0)
  adv = jnp.take_along_axis(advs, best[None, :, None, None, None], 0)[0]
  return core.attack_result(logits_fn, space, images, adv, labels, targeted, activation)


def uniform_in_ball(key, images, *, eps, norm: str = "linf"):
  """PGD's random start: uniform in the eps-ball around each image. L-inf: uniform per
  pixel. L2: uniform in the ball, as Foolbox samples it (a uniform point on the unit
  sphere of ``d + 2`` dimensions, its last two coordinates dropped; Voelker et al.,
  2017), so the radius ``r`` has ``P(r <= t eps) = t^d`` in ``d`` dimensions."""
  if norm == "linf":
    return images + jax.random.uniform(key, images.shape, minval=-eps, maxval=eps)
  n, d = len(images), images[0].size
  sphere = jax.random.normal(key, (n, d + 2))
  sphere = sphere / jnp.linalg.norm(sphere, axis=-1, keepdims=True)
  return images + eps * sphere[:, :d].reshape(images.shape)


@core.attack_program
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


def epsilon_sweep(attack: Callable, logits_fn, images, labels, *, eps, **kwargs):
  """``attack`` at every budget in ``eps`` in one vmapped call; leading axis = eps."""
  eps = jnp.asarray(eps, jnp.float32)
  return jax.vmap(lambda e: attack(logits_fn, images, labels, eps=e, **kwargs))(eps)
