"""CE-sweep throughput: masks per second, GFLOP/s, compile time and peak memory.

Not a test: a script whose JSON output is the record. Examples::

    python benchmarks/ce_sweep.py --models tiny,densenet121 --batch-sizes 16,32
    python benchmarks/ce_sweep.py --models densenet121 --devices 1,2 --baseline
    python benchmarks/ce_sweep.py --models densenet121 --rise 10000 --batch-sizes 32

``--devices`` makes that many (fake, on CPU) devices and shards the mask axis over
them; ``--baseline`` also times the original notebooks' way, a Python loop of one
masked image per forward call.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import time


def parse():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--models", default="tiny,densenet121")
  p.add_argument("--num-classes", type=int, default=14)
  p.add_argument("--image-size", type=int, default=0, help="default: 64 tiny, 224 others")
  p.add_argument("--num-masks", type=int, default=64)
  p.add_argument("--batch-sizes", default="16,32")
  p.add_argument("--devices", default="1")
  p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  p.add_argument("--repeats", type=int, default=3,
                 help="timed runs after a warm-up; 0 times the warm-up run itself")
  p.add_argument("--baseline", action="store_true")
  p.add_argument("--loop-masks", type=int, default=16)
  p.add_argument("--rise", type=int, default=0, help="sweep this many RISE masks instead")
  p.add_argument("--latent", default="", help="also sweep channel interventions here")
  p.add_argument("--json", default="")
  return p.parse_args()


def main():
  args = parse()
  device_counts = [int(d) for d in args.devices.split(",")]
  import jax

  if max(device_counts) > 1:  # only affects the CPU backend; must precede its start
    jax.config.update("jax_num_cpu_devices", max(device_counts))
  import jax.numpy as jnp
  import numpy as np
  from flax import nnx

  sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
  from cejax import effects, interventions, masks, sharding
  from cejax.forwards import latent
  from cejax.jobs import checkpoint
  from cejax.models import densenet

  records = []
  for name in args.models.split(","):
    size = args.image_size or (64 if name == "tiny" else 224)
    channels = 1 if name == "tiny" else 3
    model = densenet.create_densenet(name, num_classes=args.num_classes,
                                     in_channels=channels, dtype=jnp.dtype(args.dtype),
                                     rngs=nnx.Rngs(0))
    model.eval()
    g, params, stats = nnx.split(model, nnx.Param, nnx.BatchStat)
    logits_fn = checkpoint.make_logits_fn(g, nnx.to_pure_dict(params),
                                          nnx.to_pure_dict(stats))
    image = jax.random.normal(jax.random.key(0), (size, size, channels))
    # XLA's cost analysis counts a loop body once, so count one forward and scale.
    cost = jax.jit(logits_fn).lower(image[None]).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    forward_flops = float(cost.get("flops", float("nan")))
    if args.rise:
      mask_set = masks.rise(jax.random.key(1), num=args.rise, shape=(size, size))
      num = args.rise
    else:
      mask_set = masks.to_array(masks.sliding_windows(shape=(size, size), window=size // 8,
                                                      stride=size // 8))
      mask_set = jnp.concatenate([mask_set] * (-(-args.num_masks // len(mask_set))))
      mask_set = mask_set[: args.num_masks]
      num = args.num_masks
    for devices in device_counts:
      mesh = sharding.mask_mesh(jax.devices()[:devices]) if devices > 1 else None
      for batch_size in [int(b) for b in args.batch_sizes.split(",")]:
        fn = jax.jit(lambda im, ms: effects.causal_effect(
            logits_fn, im, ms, batch_size=batch_size, mesh=mesh).effects)
        t0 = time.perf_counter()
        compiled = fn.lower(image, mask_set).compile()
        compile_s = time.perf_counter() - t0
        flops = forward_flops * (num + 1)  # every mask, plus the clean image
        times = []
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(image, mask_set))  # warm-up
        if not args.repeats:  # one long sweep (e.g. 10k RISE masks): time the only run
          times.append(time.perf_counter() - t0)
        for _ in range(args.repeats):
          t0 = time.perf_counter()
          jax.block_until_ready(compiled(image, mask_set))
          times.append(time.perf_counter() - t0)
        t = statistics.median(times)
        rec = {"model": name, "image_size": size, "dtype": args.dtype, "masks": num,
               "batch_size": batch_size, "devices": devices, "mode": "sweep",
               "seconds": t, "masks_per_s": num / t, "compile_s": compile_s,
               "gflop_per_forward": forward_flops / 1e9,
               "gflop_per_s": flops / t / 1e9,
               "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
        records.append(rec)
        print(json.dumps(rec), flush=True)
    if args.latent:
      prefix, suffix = checkpoint.make_stage_fns(g, nnx.to_pure_dict(params),
                                                 nnx.to_pure_dict(stats), args.latent)
      width = prefix(image[None]).shape[-1]
      inter = latent.latent_interventions(
          channels=np.arange(num) % width, values=[0.0])
      for batch_size in [int(b) for b in args.batch_sizes.split(",")]:
        forward = latent.forward(prefix, suffix)
        fn = jax.jit(lambda im: effects.causal_effect(  # noqa: B023 (called in the loop)
            forward, im, inter, batch_size=batch_size).effects)
        t0 = time.perf_counter()
        compiled = fn.lower(image).compile()
        compile_s = time.perf_counter() - t0
        jax.block_until_ready(compiled(image))
        times = []
        for _ in range(args.repeats):
          t0 = time.perf_counter()
          jax.block_until_ready(compiled(image))
          times.append(time.perf_counter() - t0)
        t = statistics.median(times)
        rec = {"model": name, "image_size": size, "dtype": args.dtype, "masks": num,
               "batch_size": batch_size, "devices": 1, "mode": f"latent@{args.latent}",
               "seconds": t, "masks_per_s": num / t, "compile_s": compile_s,
               "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
        records.append(rec)
        print(json.dumps(rec), flush=True)
    if args.baseline:
      forward = jax.jit(logits_fn)
      ms = np.asarray(mask_set(jnp.arange(args.loop_masks)) if args.rise
                      else mask_set[: args.loop_masks])
      jax.block_until_ready(forward(interventions.intervene(image, ms[0], 0.0)[None]))
      t0 = time.perf_counter()
      for m in ms:  # the notebooks' way: one masked image per forward call
        jax.block_until_ready(forward(interventions.intervene(image, m, 0.0)[None]))
      t = time.perf_counter() - t0
      rec = {"model": name, "image_size": size, "dtype": args.dtype,
             "masks": len(ms), "batch_size": 1, "devices": 1, "mode": "loop",
             "seconds": t, "masks_per_s": len(ms) / t}
      records.append(rec)
      print(json.dumps(rec), flush=True)
  meta = {"machine": platform.processor() or platform.machine(),
          "cpus": os.cpu_count(), "backend": jax.default_backend(),
          "jax": jax.__version__, "argv": sys.argv}
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"meta": meta, "records": records}, f, indent=2)
  print("\n| model | mode | batch | devices | masks/s | GFLOP/s | compile s | peak RSS GB |")
  print("|---|---|---|---|---|---|---|---|")
  for r in records:
    print(f"| {r['model']} {r['image_size']} | {r['mode']} | {r['batch_size']} | "
          f"{r['devices']} | {r['masks_per_s']:.1f} | {r.get('gflop_per_s', float('nan')):.1f}"
          f" | {r.get('compile_s', float('nan')):.1f} | {r.get('peak_rss_gb', float('nan')):.2f} |")


if __name__ == "__main__":
  main()
