"""Seconds per eager call of ``effects.causal_effect``: first call, later calls, and the
same sweep under the caller's own ``jax.jit``. Later eager calls should cost what the
jitted call costs (cejax compiles once per model, settings and shapes).

    python benchmarks/eager_calls.py --model tiny --size 64 --masks 64
    python benchmarks/eager_calls.py --model densenet121 --size 224 --masks 16

Each call uses a new image of the same shape; the time includes waiting for the result.
"""

import argparse
import json
import time

import jax
from flax import nnx

from cejax import effects, masks
from cejax.jobs import checkpoint
from cejax.models import densenet


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--model", default="tiny")
  parser.add_argument("--size", type=int, default=64)
  parser.add_argument("--masks", type=int, default=64)
  parser.add_argument("--calls", type=int, default=4)
  parser.add_argument("--json", default="")
  args = parser.parse_args()
  channels = 1 if args.model == "tiny" else 3
  model = densenet.create_densenet(args.model, num_classes=5, in_channels=channels,
                                   rngs=nnx.Rngs(0))
  model.eval()
  graphdef, params, stats = nnx.split(model, nnx.Param, nnx.BatchStat)
  logits_fn = checkpoint.make_logits_fn(graphdef, nnx.to_pure_dict(params),
                                        nnx.to_pure_dict(stats))
  n = int(round(args.masks ** 0.5))
  grid = masks.to_array(masks.grid(shape=(args.size, args.size), n=n))
  images = jax.random.normal(jax.random.key(0), (args.calls + 2, args.size, args.size,
                                                 channels))
  sweep = lambda image: effects.causal_effect(logits_fn, image, grid, batch_size=16).effects

  def timed(fn, image):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(image))
    return time.perf_counter() - t0

  first = timed(sweep, images[0])
  eager = [timed(sweep, images[i]) for i in range(1, args.calls + 1)]
  jitted_fn = jax.jit(sweep)
  jit_first = timed(jitted_fn, images[0])
  jitted = [timed(jitted_fn, images[i]) for i in range(1, args.calls + 1)]
  record = {"model": args.model, "size": args.size, "masks": n * n,
            "first_eager_s": first, "later_eager_s": eager, "jit_first_s": jit_first,
            "later_jitted_s": jitted, "jax": jax.__version__}
  print(json.dumps(record, indent=1))
  if args.json:
    with open(args.json, "w") as f:
      json.dump(record, f, indent=1)


if __name__ == "__main__":
  main()
