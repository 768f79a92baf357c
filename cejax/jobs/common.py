"""What every job shares: chunk plans, run settings records, atomic stores, masks.

- ``chunks``: which images each chunk (the unit of resume) holds, and which chunks a
  worker of several computes.
- ``record_settings``: an output directory holds results of one set of settings.
- ``write_json_atomic``, ``save_tree``/``load_tree``: files written to a temporary
  name and renamed, so a killed job never leaves half a file. A tree file holds the
  leaves as ``leaf_0 .. leaf_k`` and the nesting as JSON (``structure``, whose leaves
  are the array names), so any numpy user can read it with ``np.load``.
- ``mask_sources``: the mask families of ``config.masks``, the one mask specification
  of the analysis and the sweep.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import tempfile
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np

from cejax import masks

MASK_FAMILIES = ("grid", "sliding", "rise")


def chunks(num_images: int, chunk_size: int, *, worker: int = 0,
           num_workers: int = 1) -> dict[int, range]:
  """``{c: image positions of chunk c}`` for the chunks of ``worker``: those with
  ``c % num_workers == worker`` (all of them by default)."""
  starts = range(0, num_images, chunk_size)
  return {c: range(start, min(start + chunk_size, num_images))
          for c, start in enumerate(starts) if c % num_workers == worker}


def write_json_atomic(path: Path, obj) -> None:
  """``obj`` as indented JSON at ``path``, written to a temporary file and renamed."""
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
  with os.fdopen(fd, "w") as f:
    json.dump(obj, f, indent=2, sort_keys=True)
  os.replace(tmp, path)


def record_settings(out_dir: Path, settings: Mapping[str, Any], *, fresh: bool = False,
                    num_workers: int = 1) -> None:
  """Makes ``out_dir`` hold results of ``settings`` only, and records them.

  With ``fresh`` the chunks of an earlier run are deleted first.

  Raises:
    ValueError: ``out_dir`` holds chunks computed with other settings (naming the
      settings that differ), or ``fresh`` with several workers (one would delete
      another's results).
  """
  out_dir = Path(out_dir)
  settings = json.loads(json.dumps(dict(settings)))  # as it reads back from JSON
  if fresh and num_workers > 1:
    raise ValueError("--fresh with several workers would let one delete another's "
                     "results: clear the output directory once, then start the workers.")
  if fresh:
    shutil.rmtree(out_dir / "chunks", ignore_errors=True)
  settings_file = out_dir / "settings.json"
  if settings_file.exists() and (out_dir / "chunks").exists():
    old = json.loads(settings_file.read_text())
    if old != settings:
      old, new = _flat(old), _flat(settings)
      diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
      raise ValueError(f"{out_dir} holds results of different settings ({diff}); pass "
                       "--fresh to discard them or --out for a new directory.")
  out_dir.mkdir(parents=True, exist_ok=True)
  write_json_atomic(settings_file, settings)


def _flat(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  """Nested settings as ``{"section.key": value}``."""
  out = {}
  for key, value in tree.items():
    if isinstance(value, Mapping):
      out.update(_flat(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = value
  return out


def sliding_geometry(spec, shape) -> tuple[int, int]:
  """The sliding window and stride in pixels: ``spec.window``/``spec.stride``, or
  image height / 4 and / 16 where they are 0."""
  h = shape[0]
  return spec.window or max(1, h // 4), spec.stride or max(1, h // 16)


def mask_sources(spec, shape, *, key, families=MASK_FAMILIES) -> dict[str, Any]:
  """The mask sources of ``families`` for images of ``shape`` (``h, w``), from
  ``spec`` (``config.masks``: ``grid_cells``, ``window``, ``stride``, ``rise_masks``,
  ``rise_cells``, ``rise_p``); ``key`` draws the RISE masks."""
  window, stride = sliding_geometry(spec, shape)
  made = {
      "grid": lambda: masks.grid(shape=shape, n=spec.grid_cells),
      "sliding": lambda: masks.sliding_windows(shape=shape, window=window, stride=stride),
      "rise": lambda: masks.rise(key, num=spec.rise_masks, shape=shape,
                                 cells=spec.rise_cells, p=spec.rise_p),
  }
  return {f: made[f]() for f in families}


def check_mask_spec(spec, shape=None) -> None:
  """Raises ``ValueError`` naming the bad ``config.masks`` key (with the image shape,
  also checks that every family can be built)."""
  for key in ("grid_cells", "rise_masks", "rise_cells"):
    if not isinstance(spec[key], int) or spec[key] < 1:
      raise ValueError(f"config.masks.{key} must be a positive integer, got {spec[key]!r}.")
  if not 0.0 < spec.rise_p < 1.0:
    raise ValueError(f"config.masks.rise_p must be in (0, 1), got {spec.rise_p!r}.")
  for key in ("window", "stride"):
    if not isinstance(spec[key], int) or spec[key] < 0:
      raise ValueError(f"config.masks.{key} must be an integer >= 0 (0: the default "
                       f"fraction of the image), got {spec[key]!r}.")
  if shape is not None:
    try:
      mask_sources(spec, shape, key=jax.random.key(0))
    except ValueError as e:
      raise ValueError(f"config.masks does not fit {tuple(shape)} images: {e}") from e


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
