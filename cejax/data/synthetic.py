"""TFDS builder for the embedded synthetic X-ray data set (the default).

Built locally and deterministically from a seed; nothing is downloaded. Records
are ArrayRecord files read back with ``tfds.data_source`` (no TensorFlow needed).
See ``synthetic_gen`` for how images are drawn.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import tensorflow_datasets as tfds

from cejax.data import synthetic_gen

# Each split draws from its own seed stream, so splits never share an image.
_SPLIT_OFFSETS = {"train": 0, "validation": 1_000_003, "test": 2_000_003}


@dataclasses.dataclass
class SyntheticConfig(tfds.core.BuilderConfig):
  image_size: int = 64
  num_train: int = 10_000
  num_validation: int = 1_000
  num_test: int = 1_000
  seed: int = 0


def config_name(*, image_size, num_train, num_validation, num_test, seed) -> str:
  return f"s{image_size}_n{num_train}_{num_validation}_{num_test}_seed{seed}"


class CejaxSynthetic(tfds.core.GeneratorBasedBuilder):
  """X-ray-like images whose class is decided only inside a ground-truth box."""

  VERSION = tfds.core.Version("1.0.0")
  BUILDER_CONFIGS = [SyntheticConfig(name=config_name(
      image_size=64, num_train=10_000, num_validation=1_000, num_test=1_000, seed=0))]

  def _info(self) -> tfds.core.DatasetInfo:
    s = self.builder_config.image_size
    return self.dataset_info_from_configs(
        description=synthetic_gen.__doc__,
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Tensor(shape=(s, s, 1), dtype=np.uint8),
            "label": tfds.features.ClassLabel(names=synthetic_gen.CLASS_NAMES),
            # [x_min, y_min, x_max, y_max] in pixels; zero rows for no_finding.
            "boxes": tfds.features.Tensor(shape=(None, 4), dtype=np.float32),
            "box_labels": tfds.features.Tensor(shape=(None,), dtype=np.int64),
            "index": tfds.features.Scalar(dtype=np.int64),
        }),
        supervised_keys=("image", "label"),
    )

  def _split_generators(self, dl_manager):
    c = self.builder_config
    sizes = {"train": c.num_train, "validation": c.num_validation, "test": c.num_test}
    return {split: self._generate_examples(split, n) for split, n in sizes.items()}

  def _generate_examples(self, split, num):
    c = self.builder_config
    for i in range(num):
      index = _SPLIT_OFFSETS[split] + i
      image, label, boxes = synthetic_gen.generate_example(
          c.seed, index, image_size=c.image_size)
      yield i, {
          "image": image,
          "label": label,
          "boxes": boxes,
          "box_labels": np.full((len(boxes),), label, np.int64),
          "index": index,
      }
