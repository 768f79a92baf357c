"""Compile once: eager calls of a public function reuse one compiled program.

A function users call eagerly must not retrace on every call. ``compile_once`` wraps
it in a module-level ``jax.jit`` whose static arguments are the callables (the model)
and the hyperparameters, so XLA's cache is keyed on them and on the shapes of the
array arguments. Checks that need concrete values (ranges, NaNs) run in ``validate``
before the call, outside the compiled program; under an outer ``jit`` they see
tracers and stay silent, and the function's own NaN contract applies.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Sequence

import jax


def compile_once(*, static_argnames: Sequence[str],
                 validate: Callable[[dict], None] | None = None):
  """Decorator: ``jax.jit`` with ``static_argnames``, plus eager validation.

  Args:
    static_argnames: arguments that define the program (callables, sizes, flags);
      they must be hashable. Everything else is traced.
    validate: called with the bound arguments (defaults applied) before each call.
  """

  def wrap(fn):
    jitted = jax.jit(fn, static_argnames=tuple(static_argnames))
    signature = inspect.signature(fn)

    @functools.wraps(fn)
    def call(*args, **kwargs):
      if validate is not None:
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        validate(bound.arguments)
      return jitted(*args, **kwargs)

    return call

  return wrap


@functools.lru_cache(maxsize=256)
def output_shape(fn: Callable, shape: tuple, dtype) -> tuple:
  """``fn``'s output shape for one input of ``shape``, traced once per shape."""
  return tuple(jax.eval_shape(fn, jax.ShapeDtypeStruct(shape, dtype)).shape)
