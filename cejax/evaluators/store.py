"""Nested dicts of arrays as ``.npz`` files, written atomically.

A file holds the leaves as ``leaf_0 .. leaf_k`` and the nesting as JSON (``structure``,
whose leaves are the array names), so nothing is parsed back out of key strings and
any numpy user can read a file with ``np.load``.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np


def _index(tree, leaves: dict[str, np.ndarray]):
  if isinstance(tree, Mapping):
    return {str(k): _index(v, leaves) for k, v in tree.items()}
  name = f"leaf_{len(leaves)}"
  leaves[name] = np.asarray(tree)
  return name


def save_tree(path: Path, tree: Mapping[str, Any]) -> None:
  """Writes ``tree`` (nested dicts with array leaves) to ``path`` atomically."""
  path = Path(path)
  leaves: dict[str, np.ndarray] = {}
  structure = _index(tree, leaves)
  buf = io.BytesIO()
  np.savez_compressed(buf, structure=np.asarray(json.dumps(structure)), **leaves)
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
  with os.fdopen(fd, "wb") as f:
    f.write(buf.getvalue())
  os.replace(tmp, path)


def load_tree(path: Path) -> dict[str, Any]:
  """The nested dict written by ``save_tree``.

  Raises:
    ValueError: the file is not one ``save_tree`` wrote (or is corrupt).
  """
  try:
    with np.load(path) as data:
      structure = json.loads(str(data["structure"]))
      arrays = {k: data[k] for k in data.files if k != "structure"}
  except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile) as e:
    raise ValueError(f"{path} is not a readable cejax results file ({e}); delete it to "
                     "recompute it.") from e

  def build(node):
    return {k: build(v) for k, v in node.items()} if isinstance(node, dict) else arrays[node]

  return build(structure)
