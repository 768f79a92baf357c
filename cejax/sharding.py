"""Mesh helpers: the mask axis of a causal effect over every device, a batch of images
over every device.

``map_chunks`` shards an item axis (masks, latent interventions) over every device of a
1-D mesh; model parameters are closed over and so replicated. The same code runs on one
host or many: on a cluster call ``jax.distributed.initialize()`` first in every process
(it detects TPU pods, SLURM and Open MPI; otherwise pass ``coordinator_address``,
``num_processes`` and ``process_id``), then build the mesh over ``jax.devices()``,
which then lists the devices of every process.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P


def mask_mesh(devices=None, *, axis: str = "masks") -> jax.sharding.Mesh:
  """A 1-D mesh named ``axis`` over ``devices`` (default: every device of every process)."""
  devices = jax.devices() if devices is None else list(devices)
  return jax.make_mesh((len(devices),), (axis,), devices=devices)


def padded_size(m, batch_size, devices):
  """``m`` rounded up to a multiple of ``batch_size * devices``."""
  per = batch_size * devices
  return -(-m // per) * per


def map_chunks(chunk_fn: Callable, num: int, *, batch_size: int,
               mesh: jax.sharding.Mesh | None = None, axis: str | None = None, args=()):
  """Maps ``chunk_fn(indices (b,), *args)`` over items ``0 .. num - 1`` in chunks of
  ``batch_size`` (a ``lax.map``, so memory is bounded by one chunk).

  Indices are padded to a multiple of ``batch_size`` (times the mesh size) and the
  padding is cut from the result; ``args`` are passed whole (replicated). With
  ``mesh``, the index axis is sharded over mesh axis ``axis`` (default: all of the
  mesh's axes) with ``jax.shard_map``.

  Returns:
    ``chunk_fn``'s outputs concatenated over items, leading axis ``num``.
  """
  devices = 1 if mesh is None else mesh.size
  total = padded_size(num, batch_size, devices)
  indices = jnp.arange(total, dtype=jnp.int32)

  def local(indices, *args):
    chunks = indices.reshape(-1, batch_size)
    out = jax.lax.map(lambda c: chunk_fn(c, *args), chunks)
    return jax.tree.map(lambda o: o.reshape(-1, *o.shape[2:]), out)

  if mesh is None:
    out = local(indices, *args)
  else:
    spec = P(axis if axis is not None else mesh.axis_names)
    specs = (spec,) + (P(),) * len(args)

    def run(*inputs):
      # Lay inputs out on the mesh (a no-op when they already are), then split.
      inputs = tuple(
          jax.tree.map(lambda x, sp=sp: jax.reshard(x, jax.sharding.NamedSharding(mesh, sp)),
                       tree) for tree, sp in zip(inputs, specs, strict=True))
      out = jax.shard_map(local, mesh=mesh, in_specs=specs, out_specs=spec,
                          check_vma=False)(*inputs)
      # Effects are small (m numbers per image): gather them to cut the padding.
      return jax.tree.map(
          lambda o: jax.reshard(o, jax.sharding.NamedSharding(mesh, P())), out)

    out = jax.jit(run)(indices, *args)
  return jax.tree.map(lambda o: o[:num], out)


def shard_batch(fn: Callable, mesh: jax.sharding.Mesh, *, axis: str | None = None):
  """Wraps ``fn(images, labels) -> pytree`` to split the batch over ``mesh``.

  ``fn`` is jitted with the batch axis sharded (``NamedSharding``) and the outputs
  gathered; XLA partitions the per-example work, and random draws (PGD's random
  start) are the same as on one device, as JAX's threefry is partitionable. The
  batch size must be divisible by the number of devices on ``axis``.
  """
  axis = axis or mesh.axis_names[0]
  batch = jax.sharding.NamedSharding(mesh, P(axis))
  jitted = jax.jit(fn, out_shardings=jax.sharding.NamedSharding(mesh, P()))

  def wrapped(images, labels):
    if images.shape[0] % mesh.shape[axis]:
      raise ValueError(f"batch of {images.shape[0]} does not split over "
                       f"{mesh.shape[axis]} devices.")
    return jitted(jax.device_put(images, batch), jax.device_put(labels, batch))

  return wrapped


__all__ = ["map_chunks", "mask_mesh", "padded_size", "shard_batch"]
