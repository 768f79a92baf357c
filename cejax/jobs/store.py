"""How jobs keep their work: atomic files, tree files that any numpy user can read,
chunks that prove themselves, and the record of a run's settings.

- ``chunks``: which images each chunk (the unit of resume) holds, and which chunks a
  worker of several computes.
- ``write_json_atomic``, ``write_text_atomic``, ``save_tree``/``load_tree``: files
  written to a temporary name and renamed, so a killed job never leaves half a file. A
  tree file holds the leaves as ``leaf_0 .. leaf_k`` and the nesting as JSON
  (``structure``, whose leaves are the array names), so any numpy user can read it
  with ``np.load``.
- ``save_chunk``/``check_chunk``: chunks that carry their index, image ids, run and a
  checksum (what a run is: ``cejax.jobs.run_identity``).
- ``record_settings``: an output directory holds results of one set of settings.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tempfile
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np


def chunks(num_images: int, chunk_size: int, *, worker: int = 0,
           num_workers: int = 1) -> dict[int, range]:
  """``{c: image positions of chunk c}`` for the chunks of ``worker``: those with
  ``c % num_workers == worker`` (all of them by default)."""
  starts = range(0, num_images, chunk_size)
  return {c: range(start, min(start + chunk_size, num_images))
          for c, start in enumerate(starts) if c % num_workers == worker}


def _umask() -> int:
  mask = os.umask(0)
  os.umask(mask)
  return mask


def _write_atomic(path: Path, data: bytes) -> None:
  """``data`` at ``path``: written to a temporary file beside it, given the mode a plain
  ``open`` would (0666 less the umask; ``mkstemp`` makes 0600), then renamed. A failed
  write (a full disk) removes the temporary file and names ``path``."""
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.chmod(tmp, 0o666 & ~_umask())
    os.replace(tmp, path)
  except OSError as e:
    Path(tmp).unlink(missing_ok=True)
    raise OSError(e.errno, f"Could not write {path}: {e.strerror or e} (nothing was "
                  "replaced; free space or choose another --out)") from e


def write_json_atomic(path: Path, obj) -> None:
  """``obj`` as indented JSON at ``path``, atomically (``_write_atomic``)."""
  _write_atomic(path, json.dumps(obj, indent=2, sort_keys=True).encode())


def write_text_atomic(path: Path, text: str) -> None:
  """``text`` at ``path``, atomically (``_write_atomic``)."""
  _write_atomic(path, text.encode())


def append_json_line(path: Path, obj) -> None:
  """Appends ``obj`` as one JSON line to ``path`` (a log of runs: nothing is rewritten)."""
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  with open(path, "a") as f:
    f.write(json.dumps(obj, sort_keys=True) + "\n")


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
  chunk_dir = out_dir / "chunks"
  # A start that failed before computing anything leaves no chunk and blocks nothing.
  if settings_file.exists() and chunk_dir.is_dir() and any(chunk_dir.iterdir()):
    old = json.loads(settings_file.read_text())
    if old != settings:
      old, new = _flat(old), _flat(settings)
      diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
      values = "; ".join(f"{k}: {old.get(k)!r} there, {new.get(k)!r} now" for k in diff)
      raise ValueError(f"{out_dir} holds results of different settings ({diff}): "
                       f"{values}. Pass --fresh to discard them or --out for a new "
                       "directory.")
  out_dir.mkdir(parents=True, exist_ok=True)
  if not settings_file.exists() or json.loads(settings_file.read_text()) != settings:
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


def _index(tree, leaves: dict[str, np.ndarray]):
  if isinstance(tree, Mapping):
    return {str(k): _index(v, leaves) for k, v in tree.items()}
  name = f"leaf_{len(leaves)}"
  leaves[name] = np.asarray(tree)
  return name


def save_tree(path: Path, tree: Mapping[str, Any], *, meta: Mapping[str, Any] | None = None
              ) -> None:
  """Writes ``tree`` (nested dicts with array leaves) to ``path`` atomically, with a
  checksum of its content (and ``meta``, JSON) that ``load_tree`` verifies."""
  leaves: dict[str, np.ndarray] = {}
  structure = json.dumps(_index(tree, leaves))
  meta = dict(meta or {}, checksum=_checksum(structure, leaves))
  buf = io.BytesIO()
  np.savez_compressed(buf, structure=np.asarray(structure), meta=np.asarray(json.dumps(meta)),
                      **leaves)
  _write_atomic(path, buf.getvalue())


def load_tree(path: Path, *, with_meta: bool = False):
  """The nested dict written by ``save_tree`` (and its ``meta`` with ``with_meta``).

  Raises:
    ValueError: the file is unreadable, not one ``save_tree`` wrote, or its content
      does not match its checksum (damaged).
  """
  try:
    with np.load(path) as data:
      structure = str(data["structure"])
      arrays = {k: data[k] for k in data.files if k not in ("structure", "meta")}
      meta = json.loads(str(data["meta"])) if "meta" in data.files else None
  except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile) as e:
    raise ValueError(f"{path} is not a readable cejax results file ({e}); delete it to "
                     "recompute it.") from e
  if meta is not None and meta.get("checksum") != _checksum(structure, arrays):
    raise ValueError(f"{path} does not match its checksum (damaged); delete it to "
                     "recompute it.")

  def build(node):
    return {k: build(v) for k, v in node.items()} if isinstance(node, dict) else arrays[node]

  tree = build(json.loads(structure))
  return (tree, meta) if with_meta else tree


# --- chunks that prove themselves -------------------------------------------------------

def _checksum(structure: str, leaves: Mapping[str, np.ndarray]) -> str:
  digest = hashlib.sha256(structure.encode())
  for name in sorted(leaves):
    digest.update(name.encode())
    digest.update(np.ascontiguousarray(leaves[name]).tobytes())
  return digest.hexdigest()


def save_chunk(path: Path, tree: Mapping[str, Any], *, chunk: int, ids: list[str],
               identity: str) -> None:
  """``tree`` as chunk ``chunk`` of the run ``identity``, holding images ``ids``: a tree
  file (``save_tree``) whose ``meta`` records the three and a checksum of the content."""
  save_tree(path, tree, meta={"chunk": int(chunk), "ids": [str(i) for i in ids],
                              "identity": identity})


def check_chunk(path: Path, *, chunk: int, ids: list[str], identity: str) -> str | None:
  """Why the chunk file at ``path`` is not chunk ``chunk`` of run ``identity`` holding
  ``ids``, or None when it is (readable, checksum, chunk, ids, run all as expected)."""
  try:
    meta = load_tree(path, with_meta=True)[1]
  except ValueError as e:
    return str(e)
  if meta is None:
    return f"{path} records no chunk metadata (an older or foreign file)"
  expected = {"chunk": int(chunk), "ids": [str(i) for i in ids], "identity": identity}
  def shown(key, value):
    return f"{value[:2]}... ({len(value)} ids)" if key == "ids" and value else value

  for key, want in expected.items():
    if meta.get(key) != want:
      return (f"{path} holds {key} {shown(key, meta.get(key))} where this run expects "
              f"{shown(key, want)}")
  return None


__all__ = ["append_json_line", "check_chunk", "chunks", "load_tree", "record_settings",
           "save_chunk", "save_tree", "write_json_atomic", "write_text_atomic"]
