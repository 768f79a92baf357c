"""Keeps tracing a Flax NNX model linear in its size under JAX 0.10.

Flax NNX's ``Variable.set_value`` probes ``getattr(value, "sharding", None)`` whenever
an array is assigned into a Variable: the RNG stream's counter at every initialiser, a
BatchNorm's statistics at every training step. On a tracer that attribute raises
``AttributeError``, and JAX 0.10 builds the error's message by walking every equation
traced so far (jax-ml/jax#40041; upstream drops that part of the message). Tracing a
DenseNet's construction or its training step is then quadratic in its depth: in a
fresh process, DenseNet-201 under ``nnx.eval_shape`` took 9.7 s instead of 1.5 s, and
tracing DenseNet-121's training step 12.4 s instead of 5.5 s
(``benchmarks/model_build_time.py``, docs/benchmarks.md).

``short_sharding_errors`` gives that ``AttributeError`` a short message while cejax's
models are built or called. Nothing else changes: ``getattr(tracer, "sharding", d)``
still returns ``d``, and the original property is back when the last caller leaves.
"""

from __future__ import annotations

import contextlib
import threading

from jax._src import core

_ORIGINAL = core.Tracer.__dict__.get("sharding")
_lock = threading.Lock()
_depth = 0


def _no_sharding(self):
  raise AttributeError(f"The 'sharding' attribute is not available on a tracer "
                       f"({type(self).__name__}).")


@contextlib.contextmanager
def short_sharding_errors():
  """Within: a tracer's missing ``sharding`` raises without walking the trace.
  Re-entrant and thread-safe (the property is one class attribute of JAX's)."""
  global _depth
  if _ORIGINAL is None:  # a JAX without the property: nothing to do
    yield
    return
  with _lock:
    if _depth == 0:
      core.Tracer.sharding = property(_no_sharding)
    _depth += 1
  try:
    yield
  finally:
    with _lock:
      _depth -= 1
      if _depth == 0:
        core.Tracer.sharding = _ORIGINAL
