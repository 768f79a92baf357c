"""What XLA:CPU makes of bfloat16 on this CPU: float32 vs bfloat16 throughput of the
DenseNet-121 building blocks and of the whole forward pass, under XLA flag variants.

Each variant runs in a fresh process (XLA reads ``XLA_FLAGS`` once, at start-up)::

    python benchmarks/xla_cpu_bf16.py --out results/xla_cpu_bf16_DATE.json

Ops (batch 8, DenseNet-121 block-1 shapes): a 1x1 convolution as ``jnp.dot``
(8*56*56 x 256 -> 128), a 3x3 convolution (8,56,56,128 -> 32), and DenseNet-121's
forward at 224 px (random weights, batch 8). GFLOP/s are the ops' multiply-adds x 2
over the best of 5 timed runs.
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import time

VARIANTS = {
    "default": "",
    "ynn off": "--xla_cpu_experimental_ynn_fusion_type=",
    "ynn dot+conv": "--xla_cpu_experimental_ynn_fusion_type=individual_dot,"
                    "individual_convolution",
    "xnn dot": "--xla_cpu_experimental_xnn_fusion_type=dot",
    "onednn dot": "--xla_cpu_use_onednn=true --xla_cpu_experimental_onednn_fusion_type=dot",
    "onednn custom call": "--xla_cpu_use_onednn=true "
                          "--xla_cpu_experimental_onednn_custom_call=true",
    "max isa AMX": "--xla_cpu_max_isa=AMX",
}


def measure() -> dict:
  import jax
  import jax.numpy as jnp
  from flax import nnx

  from cejax.models import densenet

  def best_ms(f, *args, n=5):
    f = jax.jit(f)
    jax.block_until_ready(f(*args))
    times = []
    for _ in range(n):
      t = time.perf_counter()
      jax.block_until_ready(f(*args))
      times.append(time.perf_counter() - t)
    return min(times) * 1e3

  def conv(x, k):
    return jax.lax.conv_general_dilated(x, k, (1, 1), ((1, 1), (1, 1)),
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))

  key = jax.random.key(0)
  out = {}
  for dtype in ("float32", "bfloat16"):
    dt = jnp.dtype(dtype)
    a = jax.random.normal(key, (8 * 56 * 56, 256), dt)
    w = jax.random.normal(key, (256, 128), dt)
    ms = best_ms(lambda a, w: a @ w, a, w)
    out[f"dot1x1 {dtype}"] = 2 * a.shape[0] * 256 * 128 / ms / 1e6
    x = jax.random.normal(key, (8, 56, 56, 128), dt)
    k = jax.random.normal(key, (3, 3, 128, 32), dt)
    ms = best_ms(conv, x, k)
    out[f"conv3x3 {dtype}"] = 2 * 8 * 56 * 56 * 128 * 32 * 9 / ms / 1e6
    model = densenet.DenseNet121(num_classes=14, dtype=dt, rngs=nnx.Rngs(0))
    model.eval()
    graphdef, state = nnx.split(model)
    images = jax.random.uniform(key, (8, 224, 224, 3))
    ms = best_ms(lambda s, x, g=graphdef: nnx.merge(g, s)(x), state, images, n=3)
    out[f"densenet121 {dtype}"] = 8 * 5.67 / ms * 1e3  # 5.67 GFLOP per image
  return out


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--out", default="")
  p.add_argument("--variant", default="", help=argparse.SUPPRESS)  # child process
  args = p.parse_args()
  if args.variant:
    print(json.dumps(measure()))
    return
  results = {}
  for name, flags in VARIANTS.items():
    env = dict(os.environ, XLA_FLAGS=flags)
    proc = subprocess.run([sys.executable, __file__, "--variant", name], env=env,
                          capture_output=True, text=True)
    if proc.returncode:
      results[name] = {"error": proc.stderr.strip().splitlines()[-1:]}
    else:
      results[name] = json.loads(proc.stdout.strip().splitlines()[-1])
    print(name, json.dumps(results[name]), flush=True)
  record = {"cpu": platform.processor() or platform.machine(), "unit": "GFLOP/s",
            "variants": VARIANTS, "results": results,
            "command": "python benchmarks/xla_cpu_bf16.py"}
  if args.out:
    with open(args.out, "w") as f:
      json.dump(record, f, indent=2)


if __name__ == "__main__":
  main()
