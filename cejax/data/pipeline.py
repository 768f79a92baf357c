"""Loading data sets by name and turning them into normalized numpy batches.

Every data set goes through tensorflow-datasets: it is built (or found prepared)
as ArrayRecord files and read with ``tfds.data_source``, which needs no TensorFlow.

Batches are dicts of numpy arrays:

* ``image``: float32 ``(n, h, w, c)``, normalized as ``(pixel / 255 - mean) / std``;
* ``label``: int32 ``(n,)`` (multi-class) or float32 ``(n, k)`` multi-hot (multi-label);
* ``boxes``: float32 ``(n, max_boxes, 4)`` ``[x_min, y_min, x_max, y_max]`` pixels,
  zero-padded; ``box_mask``: bool ``(n, max_boxes)``; ``box_labels``: int32.

Training order is a pure function of ``(seed, step)``, so a resumed run reads
exactly the batches an uninterrupted one would have.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

_log = logging.getLogger(__name__)

SPLITS = ("train", "validation", "test")
BUILTIN = ("synthetic", "chestxray14")
# Data sets small enough to hold decoded in memory (bytes).
_CACHE_LIMIT = 1 << 30


class Normalization(NamedTuple):
  """Per-channel ``mean`` and ``std`` of the [0, 1] pixel scale."""

  mean: np.ndarray
  std: np.ndarray

  def __call__(self, pixels01):
    return (pixels01 - self.mean) / self.std

  def invert(self, normalized):
    return normalized * self.std + self.mean


@dataclasses.dataclass
class Dataset:
  """A prepared data set: splits, class names, and how images are preprocessed."""

  name: str
  sources: dict[str, Any]
  class_names: tuple[str, ...]
  multi_label: bool
  normalization: Normalization
  channels: int
  crop_size: int
  max_boxes: int
  image_key: str = "image"
  label_key: str = "label"
  _cache: dict = dataclasses.field(default_factory=dict)

  @property
  def activation(self) -> str:
    """``"sigmoid"`` for multi-label data (one binary finding per output), else
    ``"softmax"``."""
    return "sigmoid" if self.multi_label else "softmax"

  @property
  def num_classes(self) -> int:
    return len(self.class_names)

  def num_examples(self, split: str) -> int:
    return len(self._source(split))

  def _source(self, split: str):
    if split not in self.sources:
      raise ValueError(f"Unknown split {split!r}; {self.name} has {sorted(self.sources)}.")
    return self.sources[split]

  def _records(self, split: str, indices: Sequence[int]) -> list[dict]:
    if split in self._cache:
      return [self._cache[split][i] for i in indices]
    source = self._source(split)
    size = len(source)
    first = source[0] if size else None
    if first is not None and size * first[self.image_key].nbytes < _CACHE_LIMIT:
      self._cache[split] = source.__getitems__(list(range(size)))
      return [self._cache[split][i] for i in indices]
    return source.__getitems__([int(i) for i in indices])

  def batch(self, split: str, indices: Sequence[int]) -> dict[str, np.ndarray]:
    """The preprocessed examples at ``indices`` of ``split``, stacked."""
    records = self._records(split, indices)
    images = np.stack([r[self.image_key] for r in records])
    if images.ndim == 3:
      images = images[..., None]
    offset = 0
    if self.crop_size:
      h = images.shape[1]
      if self.crop_size > h:
        raise ValueError(f"crop_size {self.crop_size} exceeds the stored size {h}.")
      offset = (h - self.crop_size) // 2
      images = images[:, offset:offset + self.crop_size, offset:offset + self.crop_size]
    pixels = images.astype(np.float32) / 255.0
    if pixels.shape[-1] == 1 and self.channels == 3:
      pixels = np.repeat(pixels, 3, axis=-1)
    elif pixels.shape[-1] != self.channels:
      raise ValueError(
          f"{self.name} images have {pixels.shape[-1]} channels but the model expects "
          f"{self.channels} (set config.data.channels).")
    out = {"image": self.normalization(pixels).astype(np.float32)}
    if self.multi_label:
      out["label"] = np.stack([r["labels"] for r in records]).astype(np.float32)
    else:
      out["label"] = np.array([r[self.label_key] for r in records], np.int32)
    boxes = np.zeros((len(records), self.max_boxes, 4), np.float32)
    box_labels = np.zeros((len(records), self.max_boxes), np.int32)
    box_mask = np.zeros((len(records), self.max_boxes), bool)
    for i, r in enumerate(records):
      b = np.asarray(r.get("boxes", np.zeros((0, 4))), np.float32)[: self.max_boxes]
      if len(b):
        b = b - offset
        if self.crop_size:
          b = np.clip(b, 0, self.crop_size)
        boxes[i, : len(b)] = b
        box_labels[i, : len(b)] = np.asarray(r["box_labels"])[: len(b)]
        box_mask[i, : len(b)] = True
    out.update(boxes=boxes, box_labels=box_labels, box_mask=box_mask)
    return out


def _normalization(config, channels: int) -> Normalization:
  mean = np.broadcast_to(np.asarray(config.mean, np.float32), (channels,)).copy()
  std = np.broadcast_to(np.asarray(config.std, np.float32), (channels,)).copy()
  if np.any(std <= 0):
    raise ValueError(f"config.data.std must be positive, got {config.std}.")
  return Normalization(mean, std)


def _config_arg(builder_cls, config):
  """TFDS refuses a config object named like a predefined one: pass the name then."""
  names = {c.name for c in builder_cls.BUILDER_CONFIGS}
  return config.name if config.name in names else config


def _prepare(builder, **kwargs):
  from tensorflow_datasets.core import download

  builder.download_and_prepare(
      file_format="array_record",
      download_config=download.DownloadConfig(**kwargs),
  )
  return builder.as_data_source()


def load_dataset(config) -> Dataset:
  """Builds or opens the data set described by ``config.data``.

  Args:
    config: the data section of a run config (``config.data``), with at least
      ``name``, ``data_dir``, ``channels``, ``mean``, ``std``.

  Raises:
    ValueError: unknown data set name (the message lists the valid ones).
    FileNotFoundError: ChestX-ray14 manual files missing (the message says which).
  """
  import tensorflow_datasets as tfds

  data_dir = config.get("data_dir") or None
  common = dict(
      normalization=_normalization(config, config.channels),
      channels=config.channels,
      crop_size=config.get("crop_size", 0),
      max_boxes=config.get("max_boxes", 4),
  )
  if config.name == "synthetic":
    from cejax.data import synthetic, synthetic_gen

    params = dict(image_size=config.image_size, num_train=config.num_train,
                  num_validation=config.num_validation, num_test=config.num_test,
                  seed=config.seed)
    builder = synthetic.CejaxSynthetic(
        data_dir=data_dir, file_format="array_record",
        config=_config_arg(synthetic.CejaxSynthetic, synthetic.SyntheticConfig(
            name=synthetic.config_name(**params), **params)))
    return Dataset("synthetic", _prepare(builder), synthetic_gen.CLASS_NAMES, False,
                   **common)
  if config.name == "chestxray14":
    from cejax.data import chestxray14

    manual_dir = config.get("manual_dir")
    if not manual_dir:
      raise FileNotFoundError(
          "config.data.manual_dir is empty.\n" + chestxray14.MANUAL_DOWNLOAD_INSTRUCTIONS)
    chestxray14.check_manual_dir(Path(manual_dir))
    builder = chestxray14.ChestXray14(
        data_dir=data_dir, file_format="array_record",
        config=_config_arg(chestxray14.ChestXray14, chestxray14.ChestXray14Config(
            name=f"{config.image_size}px", image_size=config.image_size)))
    sources = _prepare(builder, manual_dir=manual_dir)
    return Dataset("chestxray14", sources, chestxray14.FINDINGS, True, **common)
  # Any other name: a TFDS data set already prepared on this machine.
  try:
    builder = tfds.builder(config.name, data_dir=data_dir, file_format="array_record")
  except Exception as e:  # tfds raises DatasetNotFoundError and friends
    raise ValueError(
        f"Unknown data set {config.name!r}: it is neither built in ({', '.join(BUILTIN)}) "
        f"nor a TFDS data set registered here ({type(e).__name__}: {e}).") from e
  if not builder.is_prepared():
    raise ValueError(
        f"TFDS data set {config.name!r} is not prepared in {builder.data_dir}; nothing "
        "is downloaded at run time. Prepare it first (array_record format) or use one "
        f"of {', '.join(BUILTIN)}.")
  info = builder.info
  label_key = config.get("label_key", "label")
  image_key = config.get("image_key", "image")
  names = tuple(info.features[label_key].names)
  sources = builder.as_data_source()
  if "validation" not in sources and "test" in sources:
    _log.warning("%s has no validation split; validating on test.", config.name)
    sources = dict(sources, validation=sources["test"])
  return Dataset(config.name, sources, names, False, image_key=image_key,
                 label_key=label_key, **common)


def epoch_permutation(num_examples: int, *, seed: int, epoch: int) -> np.ndarray:
  return np.random.default_rng([seed, epoch]).permutation(num_examples)


def train_indices(num_examples: int, *, batch_size: int, seed: int, step: int) -> np.ndarray:
  """Global example indices of training step ``step`` (remainder batches dropped)."""
  steps_per_epoch = num_examples // batch_size
  if steps_per_epoch == 0:
    raise ValueError(
        f"batch_size {batch_size} exceeds the {num_examples} training examples.")
  epoch, position = divmod(step, steps_per_epoch)
  perm = epoch_permutation(num_examples, seed=seed, epoch=epoch)
  return perm[position * batch_size:(position + 1) * batch_size]


def train_batches(dataset: Dataset, *, batch_size: int, seed: int, start_step: int,
                  num_steps: int) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
  """Yields ``(step, batch)`` for ``start_step <= step < num_steps``.

  In a multi-process run each process reads only its slice of the global batch.
  """
  import jax

  n = dataset.num_examples("train")
  count, index = jax.process_count(), jax.process_index()
  if batch_size % count:
    raise ValueError(f"batch_size {batch_size} must divide over {count} processes.")
  local = batch_size // count
  for step in range(start_step, num_steps):
    idx = train_indices(n, batch_size=batch_size, seed=seed, step=step)
    yield step, dataset.batch("train", idx[index * local:(index + 1) * local])


def eval_batches(dataset: Dataset, split: str, *, batch_size: int,
                 limit: int | None = None) -> Iterator[dict[str, np.ndarray]]:
  """In-order batches of ``split``, the last padded; ``batch['valid']`` marks real rows."""
  n = dataset.num_examples(split)
  if limit:
    n = min(n, limit)
  for start in range(0, n, batch_size):
    idx = np.arange(start, min(start + batch_size, n))
    valid = np.ones(batch_size, bool)
    valid[len(idx):] = False
    idx = np.concatenate([idx, np.full(batch_size - len(idx), idx[-1])])
    yield dict(dataset.batch(split, idx), valid=valid)
