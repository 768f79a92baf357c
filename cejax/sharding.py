"""Mesh helpers for sweeps over masks.

A sweep shards its mask axis over every device of a 1-D mesh; model parameters
are closed over and so replicated. The same code runs on one host or many: on a
cluster call ``jax.distributed.initialize()`` first in every process (it detects
TPU pods, SLURM and Open MPI; otherwise pass ``coordinator_address``,
``num_processes`` and ``process_id``), then build the mesh over ``jax.devices()``,
which then lists the devices of every process.
"""

from __future__ import annotations

import jax


def mask_mesh(devices=None, *, axis: str = "masks") -> jax.sharding.Mesh:
  """A 1-D mesh named ``axis`` over ``devices`` (default: every device of every process)."""
  devices = jax.devices() if devices is None else list(devices)
  return jax.make_mesh((len(devices),), (axis,), devices=devices)
