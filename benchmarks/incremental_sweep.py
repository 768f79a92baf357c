"""Incremental recompute (``cejax.forwards.incremental``) against the full-forward sweep
(``effects.causal_effect``): DenseNet-121, the paper's 10 x 10 grid, zero fill, one
image, side by side in one process, the masks sharded over one XLA CPU device per core.

    python benchmarks/incremental_sweep.py --sizes 224,448 --devices 2 \
        --out results/incremental_DATE.json

Random weights (torchvision's initialisation), 3 channels, 14 classes: the PyTorch
anchor's network. Rates are masks/s over ``--repeats`` timed
runs after a warm-up (the median); the max abs difference of the effects between the
two paths is printed for the expected, per-class probability and logit estimands.
"""

import argparse
import functools
import json
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--sizes", default="224,448")
  p.add_argument("--devices", type=int, default=2)
  p.add_argument("--full-batch-sizes", default="1,4")
  p.add_argument("--batch-sizes", default="1,4")
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--full-fractions", default="", help="also time these full_fraction values")
  p.add_argument("--out", default="")
  args = p.parse_args()
  import jax
  jax.config.update("jax_num_cpu_devices", args.devices)
  import jax.numpy as jnp
  from flax import nnx

  from cejax import effects, masks, sharding
  from cejax.forwards import incremental
  from cejax.models import densenet

  model = densenet.DenseNet121(num_classes=14, in_channels=3, rngs=nnx.Rngs(0))
  model.eval()
  graphdef, state = nnx.split(model)
  logits_fn = lambda x: nnx.merge(graphdef, state)(x)  # noqa: E731
  mesh = sharding.mask_mesh(jax.devices()[:args.devices]) if args.devices > 1 else None
  records = []
  for size in (int(s) for s in args.sizes.split(",")):
    image = jax.random.uniform(jax.random.key(1), (size, size, 3))
    grid = masks.grid(shape=(size, size), n=10)
    decision = incremental.plan(model, image.shape, grid)
    def full(b, est="expected", image=image, grid=grid):
      return effects.causal_effect(logits_fn, image, grid, batch_size=b, mesh=mesh,
                                   estimand=est)

    def fast(b, est="expected", fraction=incremental.FULL_FRACTION, image=image, grid=grid):
      return effects.causal_effect(incremental.forward(model, full_fraction=fraction), image,
                                   grid, batch_size=b, mesh=mesh, estimand=est)

    runs = {f"full B{b}": functools.partial(full, b)
            for b in map(int, args.full_batch_sizes.split(","))}
    runs |= {f"incremental B{b}": functools.partial(fast, b)
             for b in map(int, args.batch_sizes.split(","))}
    for f in (float(v) for v in args.full_fractions.split(",") if v):
      runs[f"incremental B1 full_fraction={f}"] = functools.partial(fast, 1, fraction=f)
    rates = {}
    for name, fn in runs.items():
      fn().effects.block_until_ready()
      times = []
      for _ in range(args.repeats):
        t = time.perf_counter()
        fn().effects.block_until_ready()
        times.append(time.perf_counter() - t)
      rates[name] = grid.num / statistics.median(times)
      print(size, name, f"{rates[name]:.1f} masks/s", flush=True)
    diffs = {}
    for est in ("expected", "per_class", "logit"):
      full = next(f for n, f in runs.items() if n.startswith("full"))(est=est).effects
      inc = next(f for n, f in runs.items() if n.startswith("incr"))(est=est).effects
      diffs[est] = {"max_abs_difference": float(jnp.abs(full - inc).max()),
                    "max_abs_effect": float(jnp.abs(full).max())}
    best_full = max(v for n, v in rates.items() if n.startswith("full"))
    best_inc = max(v for n, v in rates.items() if n.startswith("incr"))
    rec = {"image_size": size, "masks": grid.num, "box": decision.box,
           "macs_full": decision.macs_full, "macs_incremental": decision.macs_incremental,
           "masks_per_s": rates, "speedup": best_inc / best_full, "exactness": diffs}
    print(json.dumps(rec), flush=True)
    records.append(rec)
  if args.out:
    Path(args.out).write_text(json.dumps(
        {"cpu": platform.processor(), "devices": args.devices, "records": records,
         "command": "python benchmarks/incremental_sweep.py " + " ".join(sys.argv[1:])},
        indent=2))


if __name__ == "__main__":
  main()
