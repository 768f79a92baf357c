"""Old names and import paths, kept for one release with a ``DeprecationWarning``.

Two mechanisms, both listed in one place each:

- ``deprecated_names(module, table)`` builds a module's ``__getattr__`` (PEP 562):
  ``table[old] = (what to use instead, the object)``.
- ``MOVED`` maps old module paths to new ones; ``install()`` puts a finder on
  ``sys.meta_path`` that answers ``import cejax.old`` with the new module itself (so
  ``cejax.old is cejax.new``), and ``python -m cejax.old`` with the new module's
  ``main()``.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import warnings
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

REMOVED_IN = "cejax 0.3"

# Old module path -> new module path. A prefix entry covers its submodules.
MOVED = {
    "cejax.analysis": "cejax.jobs.analysis",
    "cejax.checkpoint": "cejax.jobs.checkpoint",
    "cejax.compile": "cejax._compile",
    "cejax.config": "cejax.jobs.config",
    "cejax.convert": "cejax.jobs.convert",
    "cejax.evaluators": "cejax.jobs.evaluators",
    "cejax.evaluators.store": "cejax.jobs.common",
    "cejax.report": "cejax.jobs.report",
    "cejax.sweep": "cejax.jobs.sweep",
    "cejax.throughput": "cejax.jobs.throughput",
    "cejax.training": "cejax.jobs.training",
    "cejax.validation": "cejax._validation",
    "cejax.attack_core": "cejax._attack_core",
    "cejax.minimal_attacks": "cejax._minimal_attacks",
    "cejax.regions": "cejax._regions",
    "cejax.incremental_plan": "cejax._incremental_plan",
}


def _warn(old: str, new: str, category=DeprecationWarning) -> None:
  warnings.warn(f"{old} is deprecated and goes in {REMOVED_IN}; use {new}.", category,
                stacklevel=3)


class Lazy(NamedTuple):
  """An old name's object that lives in a module importing this one: ``module.name``
  (the module itself if ``name`` is None), looked up when the old name is first used
  (no import cycle, no import of a job's dependencies before it is needed)."""

  module: str
  name: str | None = None


def deprecated_names(module: str, table: Mapping[str, tuple[str, Any]]) -> Callable:
  """A module ``__getattr__`` serving ``table``'s old names with a warning:
  ``table[old] = (what to use instead, the object or a Lazy reference to it)``."""

  def __getattr__(name):
    if name in table:
      instead, value = table[name]
      _warn(f"{module}.{name}", instead)
      if isinstance(value, Lazy):
        value = importlib.import_module(value.module)
        value = value if table[name][1].name is None else getattr(value, table[name][1].name)
      return value
    raise AttributeError(f"module {module!r} has no attribute {name!r}")

  return __getattr__


def new_path(name: str) -> str | None:
  """Where the module ``name`` lives now, or None if it did not move."""
  if name in MOVED:
    return MOVED[name]
  parent, _, child = name.rpartition(".")
  while parent:
    if parent in MOVED:
      return f"{MOVED[parent]}.{child}"
    parent, _, last = parent.rpartition(".")
    child = f"{last}.{child}"
  return None


class _MovedFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
  """Imports an old module path as the new module (one object, one set of classes)."""

  def find_spec(self, name, path=None, target=None):
    new = new_path(name)
    if new is None:
      return None
    found = importlib.util.find_spec(new)
    # The new file as origin: ``python -m old`` sets sys.argv[0] to it.
    return importlib.machinery.ModuleSpec(
        name, self, origin=found.origin,
        is_package=found.submodule_search_locations is not None)

  def __init__(self):
    self._specs = {}

  def create_module(self, spec):
    new = new_path(spec.name)
    _warn(spec.name, new)
    module = importlib.import_module(new)
    self._specs[spec.name] = module.__spec__
    return module

  def exec_module(self, module):
    # The import machinery gave the module the old path's spec: give its own back.
    module.__spec__ = self._specs.pop(module.__spec__.name)

  def get_code(self, name):
    """For ``python -m cejax.old``: run the new module as ``python -m cejax.new`` does."""
    new = new_path(name)
    # A command's user is no developer: FutureWarning is shown by default.
    _warn(f"python -m {name}", f"python -m {new}", FutureWarning)
    return compile(f"import runpy\nrunpy.run_module({new!r}, run_name='__main__', "
                   "alter_sys=True)\n", f"<{name} -> {new}>", "exec")


def install() -> None:
  """Puts the finder first on ``sys.meta_path`` (once)."""
  if not any(isinstance(f, _MovedFinder) for f in sys.meta_path):
    sys.meta_path.insert(0, _MovedFinder())
