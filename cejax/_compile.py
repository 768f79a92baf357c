"""One way to compile: ``jit`` traces arrays and keeps everything else static.

In the manner of Equinox's ``filter_jit``: every argument is flattened into its pytree
leaves; array leaves (numpy or JAX arrays, tracers) are traced, every other leaf
(functions, names, sizes, a frozen dataclass that is not a pytree) is part of the
compiled program's identity and must be hashable. Arguments declared as *data* also
have their Python numbers traced, so a new target class, budget or fill value reuses
the program instead of compiling a new one.

Every program is traced under cejax's precision policy (``cejax.precision``): the
function's own ``precision`` argument when it has one and it is set, else the policy
in force at the call (``exact`` by default), which is part of the program's identity.

Eager work stays outside the compiled program: ``prepare`` checks concrete values (a
NaN image, a mask outside [0, 1]) and normalises arguments (a mask array wrapped as a
mask source, an estimand name resolved to its function) before each call; ``check``
runs after it, for checks that need the result's shapes. Under an outer ``jit`` they
see tracers, skip the value checks, and the function's own NaN contract applies.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np

from cejax import precision as precision_lib


class _Traced:
  """Marks where a traced leaf goes back among the static ones."""

  def __repr__(self):
    return "<traced>"


_TRACED = _Traced()
_NUMBERS = (int, float, complex)


def _traced(leaf, data: bool) -> bool:
  """Arrays (numpy scalars too) always; Python numbers of data arguments."""
  if isinstance(leaf, (jax.Array, np.ndarray, np.generic)):
    return True
  return data and isinstance(leaf, _NUMBERS) and not isinstance(leaf, bool)


def _split(arguments: Mapping[str, Any], data: frozenset[str]):
  """``(static, traced)``: the hashable description of the call and its traced leaves."""
  static, traced = [], []
  for name, value in arguments.items():
    leaves, treedef = jax.tree.flatten(value)
    kept = []
    for leaf in leaves:
      if _traced(leaf, name in data):
        traced.append(leaf)
        kept.append(_TRACED)
        continue
      try:
        hash(leaf)
      except TypeError:
        raise ValueError(
            f"Argument {name!r} holds {leaf!r}, which is neither an array nor hashable: "
            "register its type as a pytree (jax.tree_util.register_dataclass, arrays as "
            "data fields) or make it hashable (a frozen dataclass).") from None
      kept.append(leaf)
    static.append((name, treedef, tuple(kept)))
  return tuple(static), traced


def _merge(static, traced) -> dict[str, Any]:
  leaves = iter(traced)
  arguments = {}
  for name, treedef, kept in static:
    arguments[name] = jax.tree.unflatten(
        treedef, [next(leaves) if leaf is _TRACED else leaf for leaf in kept])
  return arguments


def jit(fn: Callable | None = None, *, data: Sequence[str] = (),
        prepare: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
        check: Callable[[dict[str, Any], Any], None] | None = None):
  """Decorator: compile ``fn`` once per static configuration and shapes.

  Args:
    fn: the function; its body is traced with the arguments ``prepare`` returns.
    data: names of the arguments that are data: their Python numbers are traced too.
    prepare: ``prepare(arguments) -> arguments``, run eagerly before each call with
      every argument bound by name (defaults applied); raises ``ValueError`` for bad
      input and returns the arguments the compiled program receives.
    check: ``check(arguments, result)``, run eagerly after each call.

  Returns:
    The wrapped function, with the same signature.

  Raises:
    ValueError: an argument holds a leaf that is neither an array nor hashable.
  """
  if fn is None:
    return functools.partial(jit, data=data, prepare=prepare, check=check)
  signature = inspect.signature(fn)
  data = frozenset(data)

  takes_precision = "precision" in signature.parameters

  def body(policy, static, traced):
    with precision_lib.matmul_context(policy):
      return fn(**_merge(static, traced))

  compiled = jax.jit(body, static_argnums=(0, 1))

  @functools.wraps(fn)
  def call(*args, **kwargs):
    bound = signature.bind(*args, **kwargs)
    bound.apply_defaults()
    arguments = dict(bound.arguments)
    policy = precision_lib.current()
    if takes_precision:
      policy = arguments["precision"] = precision_lib.check(
          arguments["precision"] or policy)
    if prepare is not None:
      arguments = prepare(arguments)
    result = compiled(policy, *_split(arguments, data))
    if check is not None:
      check(arguments, result)
    return result

  return call


def tracing(*values) -> bool:
  """Whether this call is being traced by a transformation: some value is a tracer
  (``vmap``, ``grad``, a ``jit`` argument), or operations are being staged (a ``jit``
  around code that closes over concrete arrays)."""
  leaves = jax.tree.leaves(values)
  return (any(isinstance(x, jax.core.Tracer) for x in leaves)
          or isinstance(jax.numpy.zeros(()) + 0, jax.core.Tracer))


@functools.lru_cache(maxsize=256)
def output_shape(fn: Callable, shape: tuple, dtype) -> tuple:
  """``fn``'s output shape for one input of ``shape``, traced once per shape."""
  return tuple(jax.eval_shape(fn, jax.ShapeDtypeStruct(shape, dtype)).shape)
