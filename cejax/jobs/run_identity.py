"""A run's identity: what decides a job's results, recorded in its ``settings.json`` at
the start and checked on resume (``store.record_settings``), and carried by every chunk
(``store.save_chunk``).

- ``data_identity``: every data setting that decides the images; ``resolve_data`` takes
  them from the trained run's ``run.json`` unless the user set them.
- ``weights_fingerprint``, ``code_version``: the model's weights and the code.
- ``run_record``: all of it, with the job's settings and resolved compute; ``identity_of``
  its short hash.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import subprocess
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np

_log = logging.getLogger(__name__)

# The data settings that change the images (or which images): a resume, an analysis or
# a sweep must see the same ones. Where the data live (data_dir, manual_dir) does not.
DATA_IDENTITY = ("name", "image_size", "crop_size", "channels", "mean", "std", "seed",
                 "num_train", "num_validation", "num_test", "max_boxes", "image_key",
                 "label_key")


def data_identity(data) -> dict[str, Any]:
  """The settings of ``config.data`` that decide the images (``DATA_IDENTITY``)."""
  return json.loads(json.dumps({k: data[k] for k in DATA_IDENTITY if k in data}))


def weights_fingerprint(*trees) -> str:
  """A short hash of the weights (every leaf's bytes, in order)."""
  digest = hashlib.sha256()
  for leaf in jax.tree.leaves(trees):
    digest.update(np.ascontiguousarray(np.asarray(leaf)).tobytes())
  return digest.hexdigest()[:16]


def code_version() -> dict[str, str]:
  """cejax's version, and the checkout's commit when it is one."""
  return dict(_code_version())


@functools.cache
def _code_version() -> dict[str, str]:
  # git is asked once per process.
  from importlib import metadata

  import cejax

  try:
    version = {"cejax": metadata.version("cejax")}
  except metadata.PackageNotFoundError:  # run from a checkout that was not installed
    version = {"cejax": "not installed"}
  root = Path(cejax.__file__).resolve().parents[1]
  if (root / ".git").exists():
    try:
      commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"],
                              capture_output=True, text=True, timeout=10).stdout.strip()
      version["commit"] = commit or "unknown"
    except (OSError, subprocess.SubprocessError):
      version["commit"] = "unknown"
  return version


def run_record(*, job: Mapping[str, Any], masks, data, dataset, weights: str, step: int,
               compute: Mapping[str, Any]) -> dict[str, Any]:
  """What a job's results depend on, as recorded in ``settings.json`` and checked on
  resume: the job's own section (``job``), the mask specification, every data setting
  that decides the images (``data_identity``) with each split's size (what the data
  directory holds), the weights' fingerprint and step, the resolved compute settings
  (``compute``: precision, dtype, batch, paths) and the code version."""
  splits = {name: dataset.num_examples(name) for name in sorted(dataset.sources)}
  return json.loads(json.dumps({
      "job": dict(job), "masks": dict(masks), "data": dict(data_identity(data),
                                                          split_sizes=splits),
      "model": {"weights": weights, "step": int(step)}, "compute": dict(compute),
      "code": code_version()}))


def identity_of(record: Mapping[str, Any]) -> str:
  """A short hash of a run record: each chunk carries it, so a chunk of another run
  (another directory's, or an older run's in this one) is recognised."""
  return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:16]


def resolve_data(data, trained: Mapping[str, Any] | str | None, *, base,
                 allow_other: bool, explicit: Collection[str] | None = None):
  """``data`` for a job on a trained run: the run's data settings (``trained``, run.json's
  ``data``), except those the user set explicitly (``explicit``); an explicit setting
  other than the run's is refused unless ``allow_other``
  (``config.data.other_than_trained``).

  Args:
    data: the job's ``config.data``.
    trained: the run's record of its data settings (``data_identity``); a name (older
      run.json files) or None (a converted checkpoint) takes ``data`` as it is.
    base: the default data section (``config.base_config().data``).
    allow_other: let explicit settings differ from the run's.
    explicit: the keys the user set (the command line's ``--config.data.KEY``); None:
      every key whose value differs from ``base`` (a config built in Python).

  Returns:
    A copy of ``data`` with the run's settings filled in.

  Raises:
    ValueError: naming each refused setting, the run's value and the config's.
  """
  data = data.copy_and_resolve_references()
  if isinstance(trained, str):  # run.json of older versions: the data set's name only
    trained = {"name": trained}
  if not trained:  # a converted checkpoint: no data settings recorded
    return data

  def plain(value):
    return json.loads(json.dumps(value))

  clash, taken = {}, []
  for key in DATA_IDENTITY:
    if key not in trained or key not in data:
      continue
    ours, theirs = plain(data[key]), trained[key]
    if ours == theirs:
      continue
    chosen = (key in explicit) if explicit is not None else ours != plain(base[key])
    if not chosen:
      taken.append(f"data.{key}={theirs!r} (the config says {ours!r})")
      with data.unlocked():
        data[key] = type(data[key])(theirs) if isinstance(data[key], tuple) else theirs
    elif not allow_other:
      clash[key] = (theirs, ours)
  if clash:
    lines = "; ".join(f"data.{k}: trained with {a!r}, the config says {b!r}"
                      for k, (a, b) in clash.items())
    raise ValueError(f"The model was trained on other data ({lines}). Leave these "
                     "settings out to take the run's, or pass "
                     "--config.data.other_than_trained=True to evaluate on other data.")
  if taken:
    _log.warning("Data settings taken from the trained run: %s.", ", ".join(taken))
  return data


__all__ = ["DATA_IDENTITY", "code_version", "data_identity", "identity_of", "resolve_data",
           "run_record", "weights_fingerprint"]
