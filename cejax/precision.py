"""The precision policy: what cejax's compiled programs compute float32 products with.

A measurement tool must not change its numbers with the hardware. On NVIDIA GPUs JAX's
default float32 matrix product and convolution use TF32 (operands rounded to a 10-bit
mantissa), on TPUs bf16 passes; either moves CE values by about 1e-3 relative. So:

======= ==================================================================================
exact   the default: every dot and convolution at ``Precision.HIGHEST`` (float32
        products on every backend).
tf32    ``"tensorfloat32"``: TF32 tensor cores on NVIDIA GPUs (10-bit mantissa operands,
        float32 accumulation), three bf16 passes on TPUs. CPUs compute float32.
bf16    ``"bfloat16"``: one bf16 pass on TPUs. On GPUs float32 operands still run as
        TF32: bf16 speed needs bf16 operands, so the jobs build the network in bfloat16
        (weights stay float32, ``compute_dtype``); your own ``logits_fn`` keeps the dtype
        it computes in.
======= ==================================================================================

Every function compiled by cejax (``causal_effect``, ``ce_map``, saliency, attacks)
runs under the policy in force when it is traced: ``causal_effect(..., precision=)``,
else JAX's own ``jax_default_matmul_precision`` setting (``with precision.policy("tf32")``
sets it, as ``jax.default_matmul_precision("tensorfloat32")`` does), else ``exact``.
Because the policy is JAX's setting, JAX's caches key on it: a ``jax.jit`` of your own
around a cejax call is traced again when the policy changes. A product whose precision
your model sets itself keeps it. Errors of each mode against a float64 reference:
``docs/benchmarks.md``.
"""

from __future__ import annotations

import functools

import jax

# Policy name -> the value of jax.default_matmul_precision that implements it.
PRECISIONS = {"exact": "float32", "tf32": "tensorfloat32", "bf16": "bfloat16"}
COMPUTE_DTYPES = {"exact": "float32", "tf32": "float32", "bf16": "bfloat16"}
# JAX's names for the same settings (jax.lax.Precision and its aliases).
_FROM_JAX = {None: "exact", "float32": "exact", "highest": "exact",
             "tensorfloat32": "tf32", "high": "tf32",
             "bfloat16": "bf16", "default": "bf16", "fastest": "bf16"}


def check(precision: str) -> str:
  """``precision`` if it is a policy name, else a ``ValueError`` naming the valid ones."""
  if precision not in PRECISIONS:
    raise ValueError(f"Unknown precision {precision!r}; valid are {list(PRECISIONS)}.")
  return precision


def current() -> str:
  """The policy in force: JAX's ``jax_default_matmul_precision`` as a policy name,
  ``"exact"`` when it is not set.

  Raises:
    ValueError: the setting is one cejax has no policy for (a dot algorithm preset).
  """
  value = jax.config.jax_default_matmul_precision
  if value not in _FROM_JAX:
    raise ValueError(f"jax_default_matmul_precision is {value!r}; cejax's policies are "
                     f"{list(PRECISIONS)} (precision.policy).")
  return _FROM_JAX[value]


def policy(precision: str):
  """A context in which cejax's compiled functions (and every float32 product JAX traces)
  run under ``precision``: ``jax.default_matmul_precision`` of its JAX name."""
  return jax.default_matmul_precision(PRECISIONS[check(precision)])


def matmul_context(precision: str):
  """The context that implements ``precision`` while a program is traced."""
  return policy(precision)


def applied(fn):
  """Decorator: ``fn`` runs (and traces whatever it compiles) under the policy in force
  at the call, ``exact`` when none is set: for public functions that call a model
  outside cejax's compiled programs (eager decisions, training steps)."""

  @functools.wraps(fn)
  def wrapped(*args, **kwargs):
    with matmul_context(current()):
      return fn(*args, **kwargs)

  return wrapped


def compute_dtype(precision: str) -> str:
  """The dtype the jobs build their network in under ``precision``."""
  return COMPUTE_DTYPES[check(precision)]


__all__ = ["COMPUTE_DTYPES", "PRECISIONS", "applied", "check", "compute_dtype", "current",
           "matmul_context", "policy"]
