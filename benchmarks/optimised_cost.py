"""What the optimised masks' science run costs: seconds per iteration of extremal
perturbations on the demo model, and the projection to the evaluation's images.

    python benchmarks/optimised_cost.py --workdir runs/synthetic --devices 2 \
        --json results/optimised_cost_DATE.json

Runs ``extremal_perturbation`` (TorchRay's 4 areas, mask step 2 and sigma 6 at 64 px,
as ``configs/synthetic_eval_optimised.py``) on the first ``--images`` test images of
the demo's data, the images spread over one XLA CPU device per core, at two iteration
counts; the difference of the two wall times over the difference of the iterations is
the time per iteration without compilation. The projection multiplies it by 800
iterations and the evaluation's 680 images.
"""

import argparse
import datetime
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main():
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--workdir", default="runs/synthetic")
  p.add_argument("--devices", type=int, default=2)
  p.add_argument("--images", type=int, default=20)
  p.add_argument("--iterations", type=int, nargs=2, default=(10, 210))
  p.add_argument("--json", default="")
  args = p.parse_args()
  import jax

  jax.config.update("jax_num_cpu_devices", args.devices)
  import jax.numpy as jnp

  from cejax import sharding
  from cejax.data import pipeline
  from cejax.jobs import checkpoint
  from cejax.optimised import extremal
  from configs import synthetic_eval_optimised

  config = synthetic_eval_optimised.get_config()
  a = config.analysis
  logits_fn, _ = checkpoint.load_logits_fn(Path(args.workdir))
  images = jnp.asarray(pipeline.load_dataset(config.data).batch(
      "test", list(range(args.images)))["image"])
  targets = jnp.argmax(logits_fn(images), -1)
  mesh = sharding.mask_mesh(jax.devices()[:args.devices])
  wall = {}
  for iterations in args.iterations:
    start = time.perf_counter()
    jax.block_until_ready(extremal.extremal_perturbation(
        logits_fn, images, targets, areas=tuple(a.extremal_areas), iterations=iterations,
        step=a.extremal_step, sigma=a.extremal_sigma,
        batch_size=-(-args.images // args.devices), mesh=mesh).masks)
    wall[iterations] = time.perf_counter() - start
  (i0, t0), (i1, t1) = sorted(wall.items())
  per_iteration = (t1 - t0) / (i1 - i0)
  hours = per_iteration * a.extremal_iterations * a.num_images / args.images / 3600
  record = {
      "benchmark": "optimised_cost", "date": datetime.date.today().isoformat(),
      "command": "python " + " ".join(sys.argv), "devices": args.devices,
      "images": args.images, "areas": list(a.extremal_areas), "step": a.extremal_step,
      "sigma": a.extremal_sigma, "wall_s": {str(k): round(v, 2) for k, v in wall.items()},
      "seconds_per_iteration": round(per_iteration, 3),
      "projected_hours_per_method": round(hours, 1),
      "projection": f"{a.extremal_iterations} iterations x {a.num_images} images",
      "versions": {"jax": jax.__version__}}
  print(json.dumps(record, indent=1))
  if args.json:
    Path(args.json).write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
  main()
