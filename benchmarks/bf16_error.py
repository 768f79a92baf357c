"""How far bf16 CE maps are from float32 ones: the same sweep run twice on a trained
model, with ``config.precision`` exact (float32) and bf16 (bfloat16), compared map by map.

    python benchmarks/bf16_error.py --workdir runs/synthetic --num-images 100 \
        --out results/bf16_error_DATE.json

Per map (image x family x intervention x estimand): the max abs error, the float32
map's max abs value, and the Spearman rank correlation over its pixels (scipy);
summarised as the median and worst over images, plus each dtype's masks/s.
"""

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
from scipy import stats

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--workdir", default="runs/synthetic")
  p.add_argument("--config", default="configs/sweep.py")
  p.add_argument("--num-images", type=int, default=100)
  p.add_argument("--out", default="")
  args = p.parse_args()

  import jax
  jax.config.update("jax_num_cpu_devices", 2)

  from cejax.jobs import sweep
  from configs import sweep as sweep_config

  results, speed = {}, {}
  with tempfile.TemporaryDirectory() as tmp:
    for dtype in ("float32", "bfloat16"):
      config = sweep_config.get_config()
      config.sweep.num_images = args.num_images
      config.precision = {"float32": "exact", "bfloat16": "bf16"}[dtype]
      out = Path(tmp) / dtype
      speed[dtype] = sweep.run(config, Path(args.workdir), out=out, progress=False)
      results[dtype] = sweep.load(out)
  ref, low = results["float32"].maps, results["bfloat16"].maps
  table = {}
  for family in ref:
    for fill in ref[family]:
      for est in ref[family][fill]:
        a, b = ref[family][fill][est], low[family][fill][est]
        err = np.abs(a - b).reshape(len(a), -1).max(1)
        scale = np.abs(a).reshape(len(a), -1).max(1)
        rho = np.array([stats.spearmanr(x.ravel(), y.ravel()).statistic
                        for x, y in zip(a, b, strict=True)])
        table[f"{family}/{fill}/{est}"] = {
            "max_abs_error": float(err.max()), "median_max_abs_error": float(np.median(err)),
            "max_abs_value": float(scale.max()),
            "median_relative_error": float(np.median(err / np.maximum(scale, 1e-12))),
            "spearman_min": float(rho.min()), "spearman_median": float(np.median(rho)),
            "images_spearman_below_0.99": int((rho < 0.99).sum())}
        print(f"{family}/{fill}/{est}", json.dumps(table[f"{family}/{fill}/{est}"]))
  record = {"workdir": args.workdir, "config": args.config, "images": args.num_images,
            "maps": table,
            "masks_per_s": {d: s["masks_per_s"] for d, s in speed.items()},
            "command": "python benchmarks/bf16_error.py " + " ".join(sys.argv[1:])}
  print(json.dumps(record["masks_per_s"]))
  if args.out:
    Path(args.out).write_text(json.dumps(record, indent=2))


if __name__ == "__main__":
  main()
