"""Estimands: how the prediction under an intervention is compared with the clean one.

See ``cejax.effects`` for the table of definitions. Any callable with ``Estimand``'s
signature can stand in for a built-in name.
"""

from __future__ import annotations

from typing import NamedTuple, Protocol

import jax
import jax.numpy as jnp

ESTIMANDS = ("expected", "probability", "logit", "kl", "per_class")
ACTIVATIONS = ("softmax", "sigmoid")


class CEResult(NamedTuple):
  """Per-mask effects and the clean prediction.

  Attributes:
    effects: ``(m,)``, or ``(m, k)`` for ``per_class``.
    clean_logits: ``(k,)`` logits of the unmodified input.
    target: ``()`` int32, the class the target estimands refer to.
  """

  effects: jax.Array
  clean_logits: jax.Array
  target: jax.Array


def check_activation(activation: str) -> str:
  """``activation`` if it is one of ``ACTIVATIONS``, else a ``ValueError``."""
  if activation not in ACTIVATIONS:
    raise ValueError(f"Unknown activation {activation!r}; valid are {list(ACTIVATIONS)}.")
  return activation


def activate(logits, activation: str):
  """Probabilities: softmax over the last axis, or an elementwise sigmoid."""
  check_activation(activation)
  return jax.nn.softmax(logits, -1) if activation == "softmax" else jax.nn.sigmoid(logits)



def take_class(values, target):
  """``values[..., target]``, NaN when ``target`` is outside ``[0, k)`` (never clamped,
  never wrapped like a negative numpy index)."""
  k = values.shape[-1]
  picked = jnp.take(values, jnp.clip(target, 0, k - 1), axis=-1)
  return jnp.where((target >= 0) & (target < k), picked, jnp.nan)


class Estimand(Protocol):
  """A user-defined estimand: any hashable callable with this signature (a plain
  function will do). ``clean_logits (k,)``, ``do_logits``/``do_probs`` ``(b, k)`` (the
  mean over draws for random interventions), ``target ()`` int32; returns ``(b, ...)``.
  """

  def __call__(self, clean_logits: jax.Array, do_logits: jax.Array, do_probs: jax.Array,
               target: jax.Array, activation: str) -> jax.Array: ...


def check_estimand(estimand):
  """``estimand`` if it is a name in ``ESTIMANDS`` or a callable; ``ValueError`` otherwise."""
  if isinstance(estimand, str):
    if estimand not in ESTIMANDS:
      raise ValueError(f"Unknown estimand {estimand!r}; valid estimands are "
                       f"{list(ESTIMANDS)} or a callable (see Estimand).")
  elif not callable(estimand):
    raise ValueError(f"Unknown estimand {estimand!r}; valid estimands are "
                     f"{list(ESTIMANDS)} or a callable (see Estimand).")
  return estimand


def estimand_value(estimand, clean_logits, do_logits, do_probs, target, activation):
  """The estimand for one or more interventions (leading axes broadcast)."""
  if callable(estimand):
    return estimand(clean_logits, do_logits, do_probs, target, activation)
  p = activate(clean_logits, activation)
  q = do_probs
  if estimand == "expected":
    weight = p if activation == "softmax" else 2 * p - 1
    return jnp.sum(weight * (q - p), -1)
  if estimand == "probability":
    return take_class(q, target) - take_class(p, target)
  if estimand == "logit":
    return take_class(do_logits, target) - take_class(clean_logits, target)
  if estimand == "per_class":
    return q - p
  if estimand == "kl":
    eps = 1e-12
    if activation == "softmax":
      logp = jax.nn.log_softmax(clean_logits)
      return jnp.sum(p * (logp - jnp.log(q + eps)), -1)
    qc = jnp.clip(q, eps, 1 - eps)
    return jnp.sum(p * (jnp.log(p + eps) - jnp.log(qc))
                   + (1 - p) * (jnp.log(1 - p + eps) - jnp.log(1 - qc)), -1)
  raise ValueError(f"Unknown estimand {estimand!r}; valid estimands are {list(ESTIMANDS)}.")
