"""Latent interventions ``do(h_k = v)`` on hidden features at one stage of a model.

``forward(prefix_fn, suffix_fn)`` is a forward for ``effects.causal_effect``: the
prefix (image -> features) runs once per image, the suffix (features -> logits) over
chunks of ``LatentInterventions`` as pixel masks are, with the same estimands, sharding
and ``CEResult``::

    inter = latent.latent_interventions(channels=range(64), values=[0.0])
    result = effects.causal_effect(latent.forward(prefix_fn, suffix_fn), image, inter)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from cejax._compile import output_shape


class LatentInterventions(NamedTuple):
  """``do(h_k = v)`` on feature channels, optionally restricted to spatial regions.

  Attributes:
    channels: int ``(m,)``, the channel ``k`` of each intervention.
    values: float ``(m,)``, the value ``v`` written.
    regions: float ``(m, h', w')`` in [0, 1] (soft regions blend), or None for
      the whole feature map.
  """

  channels: Any
  values: Any
  regions: Any = None


def latent_interventions(*, channels, values=(0.0,), regions=None) -> LatentInterventions:
  """Every combination of ``channels`` x ``regions`` x ``values``.

  Args:
    channels: channel indices.
    values: values to write.
    regions: ``(r, h', w')`` masks, or None for whole maps.
  """
  channels = np.asarray(channels, np.int32).reshape(-1)
  values = np.asarray(values, np.float32).reshape(-1)
  if regions is None:
    c, v = np.meshgrid(channels, values, indexing="ij")
    return LatentInterventions(jnp.asarray(c.ravel()), jnp.asarray(v.ravel()))
  regions = np.asarray(regions, np.float32)
  c, r, v = np.meshgrid(channels, np.arange(len(regions)), values, indexing="ij")
  return LatentInterventions(jnp.asarray(c.ravel()), jnp.asarray(v.ravel()),
                             jnp.asarray(regions[r.ravel()]))


def intervene_latent(h, channel, value, region=None):
  """``h`` with ``h[..., channel] = value`` (inside ``region`` if given); h ``(h', w', C)``."""
  onehot = jax.nn.one_hot(channel, h.shape[-1], dtype=h.dtype)
  m = onehot if region is None else region[..., None].astype(h.dtype) * onehot
  return h * (1 - m) + jnp.asarray(value, h.dtype) * m


def _checked(interventions, feature_shape) -> LatentInterventions:
  """``interventions`` as arrays, checked against the features ``(h', w', C)``."""
  raw_channels = interventions.channels
  channels = jnp.asarray(raw_channels, jnp.int32)
  values = jnp.asarray(interventions.values, jnp.float32)
  num = int(channels.shape[0])
  if num == 0:
    raise ValueError("interventions is empty.")
  if values.shape != (num,):
    raise ValueError(f"values must have shape ({num},), got {values.shape}.")
  if not isinstance(raw_channels, jax.core.Tracer) and (
      np.asarray(raw_channels).min() < 0
      or np.asarray(raw_channels).max() >= feature_shape[-1]):
    raise ValueError(f"channels must be in [0, {feature_shape[-1]}).")
  regions = interventions.regions
  if regions is not None:
    regions = jnp.asarray(regions, jnp.float32)
    if regions.shape != (num,) + tuple(feature_shape[:2]):
      raise ValueError(f"regions must have shape {(num,) + tuple(feature_shape[:2])}, got "
                       f"{regions.shape}.")
  return LatentInterventions(channels, values, regions)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LatentForward:
  """The forward of latent interventions (see the module doc); ``forward`` builds it.

  Attributes:
    prefix_fn: ``images (n, h, w, c) -> features (n, h', w', C)``.
    suffix_fn: ``features -> logits (n, k)``; ``suffix(prefix(x))`` is the model.
    interventions: the ``LatentInterventions`` (set by ``prepare``).
  """

  prefix_fn: Callable = dataclasses.field(metadata=dict(static=True))
  suffix_fn: Callable = dataclasses.field(metadata=dict(static=True))
  interventions: Any = None

  @property
  def num(self) -> int:
    return int(self.interventions.channels.shape[0])

  def prepare(self, what, *, image, intervention) -> LatentForward:
    if intervention is not None:
      raise ValueError("Latent interventions carry their own values "
                       "(LatentInterventions.values); intervention= is for pixel masks.")
    if not isinstance(what, LatentInterventions):
      raise ValueError(f"The latent forward intervenes on LatentInterventions "
                       f"(latent.latent_interventions), got {type(what).__name__}.")
    features = output_shape(self.prefix_fn, (1,) + image.shape, image.dtype)[1:]
    return dataclasses.replace(self, interventions=_checked(what, features))

  def setup(self, image):
    h = self.prefix_fn(image[None])[0]
    return self.suffix_fn(h[None])[0], h

  def logits(self, h, indices, keys):
    del keys  # nothing random
    chunk = jax.tree.map(lambda a: a[indices], self.interventions)
    if chunk.regions is None:
      hs = jax.vmap(lambda c, v: intervene_latent(h, c, v))(chunk.channels, chunk.values)
    else:
      hs = jax.vmap(lambda *a: intervene_latent(h, *a))(*chunk)
    # A channel outside [0, C) would be a silent no-op: NaN instead (the NaN contract).
    ok = jnp.isfinite(h).all() & (chunk.channels >= 0) & (chunk.channels < h.shape[-1])
    return self.suffix_fn(hs), ok


def forward(prefix_fn: Callable, suffix_fn: Callable) -> LatentForward:
  """The latent forward of a model split at a stage (``checkpoint.make_stage_fns``)."""
  return LatentForward(prefix_fn, suffix_fn)


__all__ = ["LatentForward", "LatentInterventions", "forward", "intervene_latent",
           "latent_interventions"]
