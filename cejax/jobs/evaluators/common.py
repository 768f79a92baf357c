"""What every evaluator shares: the model as pure functions, a chunk's inputs, and the
way typed results are stored.

Every evaluator receives a ``Model`` of pure functions (``logits_fn`` and the stage and
CAM splits), never the network object (big_vision's ``predict_fn`` contract). Results
are frozen dataclasses of arrays (or of ``{name: array}`` mappings), registered as
pytrees so that chunks concatenate with ``jax.tree.map``. A field whose metadata says
``store=False`` lives only in memory (for a later evaluator of the same chunk); a
``dtype`` in the metadata is the dtype it is stored with.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cejax import masks
from cejax.attacks import PixelSpace
from cejax.estimands import activate
from cejax.jobs import checkpoint


@dataclasses.dataclass(frozen=True)
class Model:
  """A trained model as the pure functions the analysis needs. A DenseNet's has the
  CAM and latent-stage splits and no ``vit``; a Vision Transformer's has ``vit`` (the
  eval-mode module, for the token forwards and the attention baselines) and no splits."""

  logits_fn: Callable
  features_fn: Callable | None
  classify_fn: Callable | None
  prefix_fn: Callable | None
  suffix_fn: Callable | None
  activation: str
  num_classes: int
  vit: Any = None


def make_model(graphdef, params, stats, run, *, latent_stage: str) -> Model:
  """The ``Model`` of a checkpoint (``checkpoint.load_model``'s outputs). Its functions
  are jitted: the evaluators also call them eagerly (the clean logits of a chunk), and
  op by op the network would compile each of its operations in turn."""
  logits_fn = jax.jit(checkpoint.make_logits_fn(graphdef, params, stats))
  activation = checkpoint.activation_of(run)
  if checkpoint.is_vit(run):
    module = nnx.merge(graphdef, params, stats)
    return Model(logits_fn, None, None, None, None, activation, run["num_classes"],
                 vit=module)
  features_fn, classify_fn = checkpoint.make_cam_fns(graphdef, params, stats)
  prefix_fn, suffix_fn = checkpoint.make_stage_fns(graphdef, params, stats, latent_stage)
  fns = (features_fn, classify_fn, prefix_fn, suffix_fn)
  return Model(logits_fn, *map(jax.jit, fns), activation, run["num_classes"])


def random_model(run, *, latent_stage: str, seed: int = 1) -> Model:
  """The same architecture re-initialised (the model-randomisation sanity check)."""
  model = checkpoint.build_model(run, seed=seed)
  model.eval()
  g, p, s = nnx.split(model, nnx.Param, nnx.BatchStat)
  return make_model(g, nnx.to_pure_dict(p), nnx.to_pure_dict(s), run,
                    latent_stage=latent_stage)


def pixel_space(normalization) -> PixelSpace:
  """The attacks' ``PixelSpace`` of a data set's normalisation."""
  return PixelSpace(mean=jnp.asarray(normalization.mean, jnp.float32),
                    std=jnp.asarray(normalization.std, jnp.float32))


@dataclasses.dataclass(frozen=True)
class Context:
  """What an evaluator is built from: the model, the ``analysis`` settings, the pixel
  space, the mask specification (``config.masks``), (for the sanity check only) the
  re-initialised model, the mean ground-truth box ``(height, width)`` in pixels of the
  analysed images (the chance rows' random box; ``mean_box_shape``), and the optimised
  masks' settings (``config.optimised``)."""

  model: Model
  settings: Any
  space: PixelSpace
  masks: Any
  random_model: Model | None = None
  box_shape: tuple[float, float] | None = None
  optimised: Any = None


def mean_box_shape(batches, shape) -> tuple[float, float]:
  """The mean ``(height, width)`` in pixels of every ground-truth box in ``batches``
  (``Dataset.batch`` dicts), or a fifth of each side of ``shape`` when there is none."""
  sizes = [np.stack([b["boxes"][..., 3] - b["boxes"][..., 1],
                     b["boxes"][..., 2] - b["boxes"][..., 0]], -1)[b["box_mask"]]
           for b in batches]
  sizes = np.concatenate(sizes) if sizes else np.zeros((0, 2))
  if not len(sizes):
    return (shape[0] / 5, shape[1] / 5)
  return tuple(float(v) for v in sizes.mean(0))


def confidence(model: Model, logits):
  """Maximum softmax probability (or the largest sigmoid's distance from 0.5, x2)."""
  p = activate(logits, model.activation)
  return p.max(-1) if model.activation == "softmax" else (2 * jnp.abs(p - 0.5)).mean(-1)


def correct(model: Model, logits, labels):
  """Per image: argmax == label, or the fraction of findings right (multi-label)."""
  if model.activation == "sigmoid":
    return ((logits > 0) == (labels > 0.5)).mean(-1)
  return (jnp.argmax(logits, -1) == labels).astype(jnp.float32)


def field(*, store: bool = True, dtype=None):
  """A result field; ``store=False`` keeps it in memory only, ``dtype`` is its stored
  dtype (e.g. float16 for maps)."""
  return dataclasses.field(metadata={"store": store, "dtype": dtype},
                           default=None if not store else dataclasses.MISSING)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Inputs:
  """One chunk's images and what is known about them; every field is ``(n, ...)``.

  Attributes:
    index: position of each image in the analysis' image list.
    label: class index, or multi-hot findings.
    target: the class the maps explain: the boxed finding, else the prediction.
    has_box: whether the image has a ground-truth box.
    box: ``(n, h, w)`` bool, the union of the image's boxes.
    correct: 1 if classified correctly (multi-label: fraction of findings right).
    pixels: ``(n, h, w, c)`` pixels in [0, 1] (stored as float16).
    images: the normalised images the model sees (memory only).
    logits: the clean logits (memory only).
  """

  index: np.ndarray
  label: Any
  target: Any
  has_box: Any
  box: Any
  correct: Any
  pixels: Any = field(dtype=np.float16)
  images: Any = field(store=False)
  logits: Any = field(store=False)


def box_union(batch: Mapping[str, np.ndarray], shape) -> np.ndarray:
  """``(n, h, w)`` bool: the union of each image's boxes of a ``Dataset.batch``, pixels
  more than half covered (``masks.boxes``)."""
  soft = jax.vmap(lambda b: masks.to_array(masks.boxes(b, shape=shape)))(
      jnp.asarray(batch["boxes"]))
  return np.asarray(((soft > 0.5) & jnp.asarray(batch["box_mask"])[:, :, None, None]).any(1))


def prepare_inputs(model: Model, batch: Mapping[str, np.ndarray], *, space: PixelSpace,
                   index) -> Inputs:
  """``Inputs`` of a batch from ``Dataset.batch`` (image, label, boxes, box_mask,
  box_labels)."""
  images = jnp.asarray(batch["image"], jnp.float32)
  _, h, w, _ = images.shape
  labels = jnp.asarray(batch["label"])
  logits = model.logits_fn(images)
  has_box = np.asarray(batch["box_mask"]).any(1)
  predicted = np.asarray(jnp.argmax(logits, -1))
  targets = np.where(has_box, np.asarray(batch["box_labels"])[:, 0], predicted)
  boxes = box_union(batch, (h, w))
  return Inputs(index=np.asarray(index), label=np.asarray(labels),
                target=targets.astype(np.int32), has_box=has_box, box=boxes,
                correct=np.asarray(correct(model, logits, labels)),
                pixels=jnp.clip(space.to_pixels(images), 0.0, 1.0), images=images,
                logits=logits)


def to_stored(result) -> dict[str, Any]:
  """The stored fields of a result dataclass as a nested dict of numpy arrays."""
  out = {}
  for f in dataclasses.fields(result):
    if not f.metadata.get("store", True):
      continue
    dtype = f.metadata.get("dtype")
    out[f.name] = jax.tree.map(lambda a, d=dtype: np.asarray(a, d), getattr(result, f.name))
  return out


def from_stored(result_type, tree: Mapping[str, Any]):
  """The result dataclass of ``to_stored``'s dict (memory-only fields are ``None``)."""
  return result_type(**{f.name: tree[f.name] for f in dataclasses.fields(result_type)
                        if f.metadata.get("store", True)})


def take(result, n: int):
  """The first ``n`` images of every field (drops a padded chunk's repeats)."""
  return jax.tree.map(lambda a: a[:n], result)
