"""Throughput helpers of the sweep job: the largest batch that fits a memory budget (from
the compiled executable's memory analysis), XLA's FLOP count of a forward pass, and a
measured matmul peak to compare with."""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp

from cejax import sharding


def auto_batch_size(logits_fn, image_shape, *, budget_bytes: float, probe: int = 8,
                    limit: int = 4096) -> int:
  """The largest batch of masks whose forward pass fits ``budget_bytes``.

  Read off the compiled executable's memory analysis, not found by trial: the
  forward pass is compiled (not run) at ``probe`` and ``2 * probe`` images; its
  memory (temporaries, arguments, outputs) is linear in the batch, so two points give
  the bytes per mask and the fixed part.

  Raises:
    ValueError: not even one mask fits.
  """
  def usage(batch):
    shape = jax.ShapeDtypeStruct((batch, *image_shape), jnp.float32)
    m = jax.jit(logits_fn).lower(shape).compile().memory_analysis()
    return m.temp_size_in_bytes + m.argument_size_in_bytes + m.output_size_in_bytes

  small, large = usage(probe), usage(2 * probe)
  per_mask = (large - small) / probe
  fixed = small - per_mask * probe
  if per_mask <= 0:
    return limit
  fits = int((budget_bytes - fixed) // per_mask)
  if fits < 1:
    raise ValueError(f"One mask needs {fixed + per_mask:.3g} bytes but the budget "
                     f"(config.sweep.memory_budget_gb) is {budget_bytes:.3g} bytes.")
  return min(fits, limit)


def forward_flops(logits_fn, image) -> float:
  """XLA's cost analysis of one forward pass of one image (FLOPs)."""
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


__all__ = ["auto_batch_size", "forward_flops", "matmul_peak"]
