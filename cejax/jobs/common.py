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
- Chunks that prove themselves (``save_chunk``/``check_chunk``: index, image ids, run
  and a checksum in the file); what a run is: ``cejax.jobs.run_identity``.
- ``user_errors_exit``: the command lines' clear errors.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import logging
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

_log = logging.getLogger(__name__)

MASK_FAMILIES = ("grid", "sliding", "rise")


def user_errors_exit(main):
  """Wraps a command-line ``main``: a ``ValueError``, ``OSError`` (``FileNotFoundError``
  too) or ``FloatingPointError`` (the jobs' errors about settings, files, disks and a
  diverged loss, each naming what is wrong) ends the program with its message and
  status 2, not a traceback. ``CEJAX_TRACEBACK=1`` shows the traceback too."""
  import sys

  @functools.wraps(main)
  def wrapped(*args, **kwargs):
    try:
      return main(*args, **kwargs)
    except (ValueError, OSError, FloatingPointError) as e:  # FileNotFoundError: OSError
      if os.environ.get("CEJAX_TRACEBACK"):
        raise
      print(f"error: {e}", file=sys.stderr)
      sys.exit(2)

  return wrapped


_HELP_FLAGS = ("--help", "-help", "-h", "-?", "--helpshort", "--helpfull", "--helpxml")


def run_app(main, argv=None) -> None:
  """``absl.app.run(main)`` for the command lines: a mistyped ``--config.x.y`` is named
  before any flag is parsed (``config.check_argv``), and asking for help exits with
  status 0 (absl's help flags exit with 1, which scripts read as a failure)."""
  import sys

  from absl import app

  from cejax.jobs import config as config_lib

  argv = list(sys.argv if argv is None else argv)
  config_lib.check_argv(argv)
  try:
    app.run(main, argv=argv)
  except SystemExit as e:
    if e.code == 1 and any(a.split("=")[0] in _HELP_FLAGS for a in argv[1:]):
      raise SystemExit(0) from None
    raise


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


def check_extremal_settings(settings, section: str) -> None:
  """Raises ``ValueError`` naming a bad ``config.<section>.extremal_*`` key (the
  optimised masks' areas, iterations, mask step and smoothing; analysis and sweep)."""
  def number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool)

  areas = tuple(settings.extremal_areas)
  if not areas or not all(number(a) and 0 < a <= 1 for a in areas):
    raise ValueError(f"config.{section}.extremal_areas must be fractions in (0, 1], got "
                     f"{areas!r}.")
  for key in ("extremal_iterations", "extremal_step"):
    value = settings[key]
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
      raise ValueError(f"config.{section}.{key} must be an integer >= 1, got {value!r}.")
  if not (number(settings.extremal_sigma) and settings.extremal_sigma > 0):
    raise ValueError(f"config.{section}.extremal_sigma must be > 0 (pixels), got "
                     f"{settings.extremal_sigma!r}.")


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
