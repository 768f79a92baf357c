"""Estimands: how the prediction under an intervention is compared with the clean one.

With ``p = act(logits(x))``, ``q = act(logits(do))`` (``act`` softmax for multi-class,
sigmoid for multi-label) and target class ``t``:

=========== ================================================================
expected    softmax: ``sum_c p_c (q_c - p_c)``, the paper's expected causal effect
            (ECE). Sigmoid: each finding ``c`` is its own binary variable, and the
            paper's definition applied to it gives ``p_c (q_c - p_c) + (1 - p_c)
            ((1 - q_c) - (1 - p_c)) = (2 p_c - 1)(q_c - p_c)``; ``expected`` is
            the sum of these over findings. It does not depend on ``target``.
probability ``q_t - p_t``
logit       ``z'_t - z_t``
kl          ``KL(p || q)`` (softmax), or the sum of per-finding Bernoulli KLs (sigmoid)
per_class   ``q - p`` for every class, shape ``(m, k)`` (per-finding effects)
=========== ================================================================

``ESTIMANDS`` maps each name to its function; any function with ``Estimand``'s
signature stands in for a name. A target outside ``[0, k)`` gives NaN, never a
clamped or wrapped class.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import jax
import jax.numpy as jnp

ACTIVATIONS = ("softmax", "sigmoid")


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
  """An estimand: any hashable function with this signature (a plain function will do).

  ``clean_logits (k,)``, ``do_logits``/``do_probs`` ``(b, k)`` (the mean over draws for
  random interventions), ``target ()`` int32; returns ``(b, ...)``.
  """

  def __call__(self, clean_logits: jax.Array, do_logits: jax.Array, do_probs: jax.Array,
               target: jax.Array, activation: str) -> jax.Array: ...


def expected(clean_logits, do_logits, do_probs, target, activation):
  """The paper's expected causal effect (see the module table)."""
  del do_logits, target
  p = activate(clean_logits, activation)
  weight = p if activation == "softmax" else 2 * p - 1
  return jnp.sum(weight * (do_probs - p), -1)


def probability(clean_logits, do_logits, do_probs, target, activation):
  """``q_t - p_t``."""
  del do_logits
  return take_class(do_probs, target) - take_class(activate(clean_logits, activation), target)


def logit(clean_logits, do_logits, do_probs, target, activation):
  """``z'_t - z_t``."""
  del do_probs, activation
  return take_class(do_logits, target) - take_class(clean_logits, target)


def kl(clean_logits, do_logits, do_probs, target, activation):
  """``KL(p || q)``, or the sum of per-finding Bernoulli KLs for ``sigmoid``."""
  del do_logits, target
  eps = 1e-12
  p, q = activate(clean_logits, activation), do_probs
  if activation == "softmax":
    return jnp.sum(p * (jax.nn.log_softmax(clean_logits) - jnp.log(q + eps)), -1)
  qc = jnp.clip(q, eps, 1 - eps)
  return jnp.sum(p * (jnp.log(p + eps) - jnp.log(qc))
                 + (1 - p) * (jnp.log(1 - p + eps) - jnp.log(1 - qc)), -1)


def per_class(clean_logits, do_logits, do_probs, target, activation):
  """``q - p`` for every class, ``(b, k)``."""
  del do_logits, target
  return do_probs - activate(clean_logits, activation)


ESTIMANDS: dict[str, Callable] = {"expected": expected, "probability": probability,
                                  "logit": logit, "kl": kl, "per_class": per_class}


def resolve(estimand) -> Callable:
  """The function of a name in ``ESTIMANDS``, or ``estimand`` itself if callable.

  Raises:
    ValueError: neither (the message lists the valid names).
  """
  if isinstance(estimand, str) and estimand in ESTIMANDS:
    return ESTIMANDS[estimand]
  if callable(estimand) and not isinstance(estimand, str):
    return estimand
  raise ValueError(f"Unknown estimand {estimand!r}; valid estimands are {list(ESTIMANDS)} "
                   "or a callable (see Estimand).")

__all__ = ["ACTIVATIONS", "ESTIMANDS", "Estimand", "activate", "check_activation", "expected",
           "kl", "logit", "per_class", "probability", "resolve", "take_class"]
