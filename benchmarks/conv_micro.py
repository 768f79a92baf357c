"""Micro-benchmarks behind the XLA:CPU findings in RESULTS.md.

* a 1x1 convolution as ``lax.conv`` vs the same product as ``jnp.dot``;
* the 3x3 convolution of a DenseNet-121 block-1 layer, to compare with one core::

    python benchmarks/conv_micro.py
    taskset -c 0 python benchmarks/conv_micro.py    # pinned to one core
"""

import time

import jax


def bench_ms(f, *args, n=10):
  f = jax.jit(f)
  jax.block_until_ready(f(*args))
  t = time.perf_counter()
  for _ in range(n):
    jax.block_until_ready(f(*args))
  return (time.perf_counter() - t) / n * 1e3


def conv(x, k, pad):
  return jax.lax.conv_general_dilated(x, k, (1, 1), pad,
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"))


def main():
  x = jax.random.normal(jax.random.key(0), (8, 56, 56, 256))
  k = jax.random.normal(jax.random.key(1), (1, 1, 256, 128))
  gflop = 2 * 8 * 56 * 56 * 256 * 128 / 1e9
  for name, f in (("1x1 lax.conv", lambda x, k: conv(x, k, "VALID")),
                  ("1x1 jnp.dot", lambda x, k: x @ k[0, 0])):
    ms = bench_ms(f, x, k)
    print(f"{name:14s} (8,56,56,256)->128: {ms:6.2f} ms  {gflop / ms * 1e3:5.0f} GFLOP/s")
  x = jax.random.normal(jax.random.key(0), (8, 56, 56, 128))
  k = jax.random.normal(jax.random.key(1), (3, 3, 128, 32))
  gflop = 2 * 8 * 56 * 56 * 128 * 32 * 9 / 1e9
  ms = bench_ms(lambda x, k: conv(x, k, ((1, 1), (1, 1))), x, k)
  print(f"3x3 lax.conv   (8,56,56,128)->32:  {ms:6.2f} ms  {gflop / ms * 1e3:5.0f} GFLOP/s")


if __name__ == "__main__":
  main()
