"""Latent interventions ``do(h_k = v)`` on hidden features at one stage of a model.

The prefix (image -> features) runs once; the suffix (features -> logits) is swept over
the interventions like pixel masks, with the same estimands and ``CEResult``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from cejax import validation
from cejax.compile import output_shape
from cejax.estimands import CEResult, activate, check_activation, check_estimand, estimand_value
from cejax.sharding import sweep


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


def latent_causal_effect(prefix_fn: Callable, suffix_fn: Callable, image,
                         interventions: LatentInterventions, *, estimand="expected",
                         target=None, batch_size=None, activation="softmax",
                         mesh=None) -> CEResult:
  """Causal effects of interventions on hidden features at one stage.

  The prefix runs once; the suffix is vmapped over the interventions in chunks of
  ``batch_size``, sharded over ``mesh`` like pixel masks. Same estimands and result
  as ``causal_effect``; ``clean_logits`` is ``suffix(prefix(x))``.

  Args:
    prefix_fn: ``images (n, h, w, c) -> features (n, h', w', C)``.
    suffix_fn: ``features -> logits (n, k)``.
    image: ``(h, w, c)``.
    interventions: a ``LatentInterventions``.
  """
  validation.check_image(image)
  image = jnp.asarray(image)
  check_estimand(estimand)
  check_activation(activation)
  feature_shape = output_shape(prefix_fn, (1,) + image.shape, image.dtype)[1:]
  raw_channels = interventions.channels
  channels = jnp.asarray(interventions.channels, jnp.int32)
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
    if regions.shape != (num,) + feature_shape[:2]:
      raise ValueError(f"regions must have shape {(num,) + feature_shape[:2]}, got "
                       f"{regions.shape}.")
  batch_size = validation.check_batch_size(batch_size, num)
  data = (channels, values) if regions is None else (channels, values, regions)
  result = _latent_causal_effect(prefix_fn, suffix_fn, image, data, target,
                                 estimand=estimand, batch_size=batch_size,
                                 activation=activation, mesh=mesh)
  validation.check_target(target, result.clean_logits.shape[-1])
  return result


@functools.partial(jax.jit, static_argnames=("prefix_fn", "suffix_fn", "estimand",
                                             "batch_size", "activation", "mesh"))
def _latent_causal_effect(prefix_fn, suffix_fn, image, data, target, *, estimand,
                          batch_size, activation, mesh):
  h = prefix_fn(image[None])[0]
  num = data[0].shape[0]
  clean_logits = suffix_fn(h[None])[0].astype(jnp.float32)
  t = (jnp.argmax(clean_logits) if target is None else jnp.asarray(target)).astype(jnp.int32)

  def chunk_fn(indices, chunk, h):
    del indices
    hs = jax.vmap(lambda *a: intervene_latent(h, *a))(*chunk)
    logits = suffix_fn(hs).astype(jnp.float32)
    value = estimand_value(estimand, clean_logits, logits, activate(logits, activation), t,
                           activation)
    # Traced values cannot raise (see the module doc): a non-finite image or a channel
    # outside [0, C) gives NaN, never a silent no-op.
    ok = jnp.isfinite(h).all() & (chunk[0] >= 0) & (chunk[0] < h.shape[-1])
    return jnp.where(ok.reshape(ok.shape + (1,) * (value.ndim - 1)), value, jnp.nan)

  effects = sweep(chunk_fn, num, data, batch_size=batch_size, mesh=mesh, args=(h,))
  return CEResult(effects, clean_logits, t)
