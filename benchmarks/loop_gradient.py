"""DenseNet-121's input gradient inside a loop, with and without ``models/_conv.py``.

XLA:CPU canonicalises convolutions only in a program's entry computation, so JAX's
input-gradient convolutions (HWOI kernels) ran as generic loops inside ``lax.scan`` and
``fori_loop`` bodies. This times, on one device, one input gradient (batch 4, 224 px,
random weights) in an entry computation and ``--steps`` gradient-descent steps in a
``fori_loop``, through ``densenet.spatial_conv`` (the library) and through ``nnx.Conv``'s
own call (JAX's transposes), and counts the HWOI convolutions left in each program.

    python benchmarks/loop_gradient.py --json results/loop_gradient_DATE.json
"""

import argparse
import datetime
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--steps", type=int, default=3)
  p.add_argument("--batch", type=int, default=4)
  p.add_argument("--size", type=int, default=224)
  p.add_argument("--json", default="")
  args = p.parse_args()
  import jax
  import numpy as np
  from flax import nnx
  from random_networks import random_densenet

  from cejax.models import densenet

  model = random_densenet(lambda: densenet.create_densenet("densenet121", num_classes=14,
                                                           rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(model)
  x = jax.numpy.asarray(np.random.default_rng(0).normal(
      size=(args.batch, args.size, args.size, 3)), jax.numpy.float32)
  library_conv = densenet.spatial_conv
  record = {"benchmark": "loop_gradient", "date": str(datetime.date.today()),
            "command": "python " + " ".join(sys.argv), "batch": args.batch,
            "size": args.size, "steps": args.steps, "jax": jax.__version__}
  for name, conv in (("spatial_conv", library_conv),
                     ("nnx_conv", lambda layer, x: layer(x))):
    densenet.spatial_conv = conv  # read when the programs below are traced
    grad = jax.grad(lambda z: nnx.merge(graphdef, state)(z)[:, 0].sum())

    def descent(z, grad=grad):
      return jax.lax.fori_loop(0, args.steps, lambda i, z: z - 1e-3 * grad(z), z)

    for program, fn in (("gradient", grad), ("loop", descent)):
      compiled = jax.jit(fn).lower(x).compile()
      jax.block_until_ready(compiled(x))
      t = time.perf_counter()
      jax.block_until_ready(compiled(x))
      record[f"{name}_{program}_s"] = round(time.perf_counter() - t, 3)
      record[f"{name}_{program}_hwoi_convolutions"] = compiled.as_text().count("01oi")
    print(name, {k: v for k, v in record.items() if k.startswith(name)}, flush=True)
  densenet.spatial_conv = library_conv
  print(json.dumps(record, indent=1))
  if args.json:
    Path(args.json).write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
  main()
