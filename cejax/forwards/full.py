"""Full forward passes: the forward path of a plain ``logits_fn(images) -> logits``.

``causal_effect`` wraps a function in ``FullForward``: every mask's intervened image
``x * (1 - M) + v * M`` goes through the whole network. Other forward paths beside it:
``cejax.forwards.incremental`` (a DenseNet recomputed only where a mask reaches),
``cejax.forwards.latent`` (interventions on hidden features).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from cejax import interventions
from cejax import masks as masks_lib


def masks_ok(masks, image):
  """``(b,)``: each mask lies in [0, 1] and the image is finite (the NaN contract)."""
  return ((masks >= 0) & (masks <= 1)).all((1, 2)) & jnp.isfinite(image).all()


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class FullForward:
  """Full forward passes of the masked images through ``logits_fn``.

  Attributes:
    logits_fn: pure ``images (n, h, w, c) -> logits (n, k)``; hashable (a function).
    masks: the mask source (set by ``prepare``).
    intervention: what fills the masks (set by ``prepare``).
  """

  logits_fn: Callable = dataclasses.field(metadata=dict(static=True))
  masks: Any = None
  intervention: Any = None

  @property
  def num(self) -> int:
    return self.masks.num

  def prepare(self, what, *, image, intervention) -> FullForward:
    intervention = interventions.resolve("zero" if intervention is None else intervention)
    interventions.check_fill(intervention, image)
    return FullForward(self.logits_fn, masks_lib.as_source(what, image.shape[:2]),
                       intervention)

  def setup(self, image):
    return self.logits_fn(image[None])[0], image

  def logits(self, image, indices, keys):
    fill = self.intervention.fill
    chunk = self.masks(indices)
    # Materialise the masks and the image: XLA then fuses the blend x (1 - m) + v m the
    # same way in every program (one device or a mesh, one chunk or many), so soft
    # masks with a non-zero fill round identically whatever the device count.
    chunk, image = jax.lax.optimization_barrier((chunk, image))
    if keys is None:
      value = fill(image, None)
      logits = self.logits_fn(jax.vmap(lambda m: interventions.intervene(image, m, value))(
          chunk))
    else:
      x = jax.vmap(lambda m, ks: jax.vmap(lambda k: interventions.intervene(
          image, m, fill(image, k)))(ks))(chunk, keys)
      b, d = keys.shape
      logits = self.logits_fn(x.reshape(b * d, *x.shape[2:])).reshape(b, d, -1)
    return logits, masks_ok(chunk, image)



__all__ = ["FullForward", "masks_ok"]
