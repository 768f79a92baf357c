"""What every attack shares: the pixel space, the result type, the loss, compilation.

Attacks work in **pixel space** (``space.low``..``space.high``) and the model sees
``space.normalize(x)``; see ``cejax.attacks`` for the attacks themselves.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from cejax._compile import jit, output_shape
from cejax._validation import check_channels_last
from cejax.estimands import check_activation


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


def input_gradient(logits_fn, space, labels, *, targeted, activation):
  """``grad(pixels) -> pixels``: the gradient of the summed ``attack_loss``."""
  loss = attack_loss(logits_fn, space, labels, targeted=targeted, activation=activation)
  return jax.grad(lambda x: loss(x).sum())


def success(logits, labels, *, targeted=False, activation="softmax"):
  """Whether the attack's goal holds for ``logits``, ``(n,)`` bool."""
  if check_activation(activation) == "sigmoid":
    match = ((logits > 0) == (labels > 0.5)).all(-1)
    return match if targeted else ~match
  hit = jnp.argmax(logits, -1) == labels
  return hit if targeted else ~hit


def attack_result(logits_fn, space, clean, adv, labels, targeted, activation):
  """The ``AttackResult`` of adversarial pixels ``adv`` made from ``clean``."""
  logits = logits_fn(space.normalize(adv)).astype(jnp.float32)
  delta = (adv - clean).reshape(len(adv), -1)
  return AttackResult(adv, success(logits, labels, targeted=targeted, activation=activation),
                      logits, jnp.abs(delta).max(-1), jnp.sqrt((delta**2).sum(-1)))


def check_inputs(images, labels, space, activation):
  """``(images, labels)`` as float32 / int32 (multi-hot float32); raises ``ValueError``
  for a wrong rank, a label shape that does not match, or pixels outside the space."""
  multi_label = check_activation(activation) == "sigmoid"
  concrete = None if isinstance(images, jax.core.Tracer) else np.asarray(images, np.float32)
  images = jnp.asarray(images, jnp.float32)
  if images.ndim != 4:
    raise ValueError(f"images must be (n, h, w, c) in pixel space, got {images.shape}.")
  check_channels_last(images.shape, "images")
  labels = jnp.asarray(labels)
  if not multi_label and not jnp.issubdtype(labels.dtype, jnp.integer):
    raise ValueError(f"labels must be integer class indices, got dtype {labels.dtype} (a "
                     "float would be truncated).")
  want = images.shape[:1] + ((labels.shape[-1],) if multi_label else ())
  labels = jnp.asarray(labels, jnp.float32 if multi_label else jnp.int32)
  if labels.shape != want:
    kind = "multi-hot" if multi_label else "class indices"
    raise ValueError(f"labels must have shape {want} ({kind}), got {labels.shape}.")
  # numpy on the concrete values: under a user's jit, jnp operations on a closed-over
  # array are staged, and float() of their result fails.
  if concrete is not None and concrete.size:
    lo, hi = float(concrete.min()), float(concrete.max())
    if lo < space.low - 1e-5 or hi > space.high + 1e-5:
      raise ValueError(f"images must be pixels in [{space.low}, {space.high}] (attacks work "
                       f"in pixel space; pass space= for the model's normalisation); got "
                       f"values in [{lo:.3g}, {hi:.3g}].")
  return images, labels


def _validate(args):
  """Eager checks before the compiled attack: pixel range, label shape, and labels that
  are classes of the model (a class past the end would be clamped by the loss's gather
  and the attack reported as a success)."""
  activation = args.get("activation", "softmax")
  images, labels = check_inputs(args["images"], args["labels"], args["space"], activation)
  if isinstance(args["labels"], jax.core.Tracer) or isinstance(images, jax.core.Tracer):
    return args
  k = output_shape(args["logits_fn"], (1, *images.shape[1:]), jnp.float32)[-1]
  given = np.asarray(args["labels"])
  if activation == "sigmoid":
    if given.shape[-1] != k or given.size and (given.min() < 0 or given.max() > 1):
      raise ValueError(f"labels must be multi-hot (n, {k}) in [0, 1] for the model's {k} "
                       f"findings, got shape {given.shape}"
                       + (f" and values in [{given.min()}, {given.max()}]." if given.size
                          else "."))
  elif given.size and (given.min() < 0 or given.max() >= k):
    raise ValueError(f"labels must be classes in [0, {k}) of the model's {k} logits, got "
                     f"values in [{given.min()}, {given.max()}].")
  return args


# Compiled once per model, defense and hyperparameters (``cejax._compile.jit``); images,
# labels, ``eps``, ``key`` and the pixel space are traced arguments.
attack_program = jit(data=("images", "labels", "eps", "key", "space"), prepare=_validate)


def project(x, clean, eps, norm, space):
  """``x`` projected onto the ``norm`` ball of radius ``eps`` around ``clean``, then
  clipped to valid pixels."""
  if norm == "linf":
    x = jnp.clip(x, clean - eps, clean + eps)
  else:
    d = (x - clean).reshape(len(x), -1)
    n = jnp.sqrt((d**2).sum(-1, keepdims=True))
    d = d * jnp.minimum(1.0, eps / jnp.maximum(n, 1e-12))
    x = clean + d.reshape(x.shape)
  return jnp.clip(x, space.low, space.high)


def ascent_direction(g, norm):
  """The steepest-ascent step for a gradient: its sign (L-inf) or unit L2 direction."""
  if norm == "linf":
    return jnp.sign(g)
  n = jnp.sqrt((g.reshape(len(g), -1) ** 2).sum(-1))
  return g / jnp.maximum(n, 1e-12).reshape(-1, *([1] * (g.ndim - 1)))
