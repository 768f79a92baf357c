"""Peak memory of a CE sweep over every stride-1 sliding window at 224 x 224.

    python benchmarks/lazy_windows.py --size 224 --window 31 --stride 1 --batch-size 64 \
        --json results/lazy_windows_2026-11-25.json

A 31-px window at stride 1 on 224 x 224 is 194^2 = 37,636 masks: 7.6 GB as dense float32
masks. ``masks.sliding_windows`` is a recipe: each chunk of ``batch_size`` windows is made
on the device inside the sweep, so memory is bounded by the chunk. The model is the tiny
DenseNet (random weights), which keeps the run to minutes on a CPU; memory for the masks
does not depend on the model.
"""

import argparse
import json
import resource
import time

import jax
from flax import nnx

from cejax import effects, masks
from cejax.jobs import checkpoint
from cejax.models import densenet


def peak_rss_gb() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--size", type=int, default=224)
  parser.add_argument("--window", type=int, default=31)
  parser.add_argument("--stride", type=int, default=1)
  parser.add_argument("--batch-size", type=int, default=64)
  parser.add_argument("--json", default="")
  args = parser.parse_args()
  model = densenet.create_densenet("tiny", num_classes=5, in_channels=1, rngs=nnx.Rngs(0))
  model.eval()
  graphdef, params, stats = nnx.split(model, nnx.Param, nnx.BatchStat)
  logits_fn = checkpoint.make_logits_fn(graphdef, nnx.to_pure_dict(params),
                                        nnx.to_pure_dict(stats))
  recipe = masks.sliding_windows(shape=(args.size, args.size), window=args.window,
                                 stride=args.stride)
  image = jax.random.normal(jax.random.key(0), (args.size, args.size, 1))
  before = peak_rss_gb()
  t0 = time.perf_counter()
  result = effects.causal_effect(logits_fn, image, recipe, batch_size=args.batch_size)
  ce = jax.block_until_ready(effects.ce_map(result.effects, recipe,
                                            batch_size=args.batch_size))
  seconds = time.perf_counter() - t0
  record = {"masks": recipe.num, "size": args.size, "window": args.window,
            "stride": args.stride, "batch_size": args.batch_size, "seconds": seconds,
            "masks_per_s": recipe.num / seconds,
            "dense_masks_gb": recipe.num * args.size**2 * 4 / 2**30,
            "peak_rss_gb_before_sweep": before, "peak_rss_gb": peak_rss_gb(),
            "map_finite": bool(jax.numpy.isfinite(ce).all()), "jax": jax.__version__}
  print(json.dumps(record, indent=1))
  if args.json:
    with open(args.json, "w") as f:
      json.dump(record, f, indent=1)


if __name__ == "__main__":
  main()
