"""Throughput helpers of the sweep job: the largest batch that fits a memory budget (from
the compiled program's memory analysis), FLOP counts of the forward a sweep runs, and a
measured matmul peak to compare with."""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp

from cejax import sharding


def compiled_bytes(compiled) -> int:
  """Device memory of a compiled program: temporaries, arguments and outputs."""
  m = compiled.memory_analysis()
  return m.temp_size_in_bytes + m.argument_size_in_bytes + m.output_size_in_bytes


def auto_batch_size(usage: Callable[[int], int], *, budget_bytes: float, limit: int,
                    probe: int = 8) -> int:
  """The largest batch, at most ``limit``, whose program fits ``budget_bytes``.

  Read off compiled programs' memory analysis, not found by trial: ``usage(batch)``
  compiles (does not run) the program at a batch and returns its bytes
  (``compiled_bytes``). Memory is linear in the batch, so two points, ``probe`` and
  ``2 * probe`` (smaller when ``limit`` is), give the bytes per item and the fixed part.

  Raises:
    ValueError: not even one item fits.
  """
  if limit < 1:
    raise ValueError(f"limit must be >= 1, got {limit}.")
  probe = max(1, min(probe, limit // 2))
  small = usage(probe)
  large = usage(2 * probe) if 2 * probe <= limit else small
  per_item = (large - small) / probe
  fixed = small - per_item * probe
  if per_item <= 0:  # nothing grows with the batch (or only one point)
    if small > budget_bytes:
      raise ValueError(f"A batch of {probe} needs {small:.3g} bytes but the budget "
                       f"(config.sweep.memory_budget_gb) is {budget_bytes:.3g} bytes.")
    return limit
  fits = math.floor((budget_bytes - fixed) / per_item)
  if fits < 1:
    raise ValueError(f"One item needs {fixed + per_item:.3g} bytes but the budget "
                     f"(config.sweep.memory_budget_gb) is {budget_bytes:.3g} bytes.")
  return min(fits, limit)


def forward_flops(logits_fn, image) -> float:
  """XLA's cost analysis of one full forward pass of one image (FLOPs)."""
  cost = jax.jit(logits_fn).lower(image[None]).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  return float(cost.get("flops", float("nan")))


def matmul_peak(devices, *, size: int = 512, repeats: int = 5) -> float:
  """Measured float32 matmul FLOP/s of ``devices`` together (the best of ``repeats``)."""
  mesh = sharding.mask_mesh(devices)
  spec = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(mesh.axis_names))
  x = jax.device_put(jnp.ones((len(devices), size, size), jnp.float32), spec)
  f = jax.jit(lambda a: jnp.einsum("bij,bjk->bik", a, a))
  f(x).block_until_ready()
  best = min(_timed(lambda: f(x).block_until_ready()) for _ in range(repeats))
  return 2 * size**3 * len(devices) / best


def _timed(fn) -> float:
  t0 = time.perf_counter()
  fn()
  return time.perf_counter() - t0


__all__ = ["auto_batch_size", "compiled_bytes", "forward_flops", "matmul_peak"]
