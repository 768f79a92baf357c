"""How many RISE masks a stopping tolerance needs, against a 10,000-mask reference.

    python benchmarks/adaptive_rise.py --workdir=runs/synthetic --images=8 --rule=norm
    python benchmarks/adaptive_rise.py --workdir=runs/synthetic --images=8 --rule=rank

On the trained demo model (``train.py --config=configs/synthetic.py``), for the first
``--images`` test images: the fixed-count RISE map with ``--reference`` masks, then
``saliency.adaptive_rise`` at each tolerance with the stopping rule ``--rule`` (checks
at ``first``, ``2 first``, ...; same key, so its masks are the reference's first
ones). Prints, per tolerance, the masks used and the Spearman rank correlation
(average ranks) with the reference map, per image and in summary, and writes them to
``--json``.
"""

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", default="runs/synthetic")
  parser.add_argument("--images", type=int, default=8)
  parser.add_argument("--reference", type=int, default=10_000)
  parser.add_argument("--tolerances", default="0.05,0.02,0.01,0.005,0.002,0.001")
  parser.add_argument("--rule", choices=("norm", "rank"), default="norm")
  parser.add_argument("--first", type=int, default=250)
  parser.add_argument("--p", type=float, default=0.1, help="kept fraction (RISE's code: 0.1)")
  parser.add_argument("--batch-size", type=int, default=100)
  parser.add_argument("--json", type=Path, default=None)
  args = parser.parse_args()
  sys.path.insert(0, str(ROOT))
  import jax
  import numpy as np

  from cejax import metrics, saliency
  from cejax.data import pipeline
  from cejax.jobs import checkpoint
  from configs import synthetic

  logits_fn, run = checkpoint.load_logits_fn(args.workdir)
  data = pipeline.load_dataset(synthetic.get_config().data)
  batch = data.batch("test", np.arange(args.images))
  x = batch["image"]
  t = np.asarray(jax.numpy.argmax(logits_fn(x), -1))
  key = jax.random.key(0)
  kw = dict(key=key, cells=8, p=args.p, batch_size=args.batch_size)
  reference = saliency.rise(logits_fn, x, t, num_masks=args.reference, **kw)
  rows = []
  for tol in (float(v) for v in args.tolerances.split(",")):
    maps, used = saliency.adaptive_rise(logits_fn, x, t, tolerance=tol, rule=args.rule,
                                        first=args.first, max_masks=args.reference, **kw)
    rho = np.asarray(metrics.spearman(maps, reference))
    rows.append({"tolerance": tol, "masks_used": np.asarray(used).tolist(),
                 "spearman": rho.tolist(), "min_spearman": float(rho.min()),
                 "mean_masks": float(np.mean(used))})
    print(f"tolerance {tol:g}: masks used mean {np.mean(used):.0f} "
          f"(min {np.min(used)}, max {np.max(used)}); Spearman with the "
          f"{args.reference}-mask map: min {rho.min():.4f}, mean {rho.mean():.4f}",
          flush=True)
  if args.json:
    args.json.write_text(json.dumps({"workdir": args.workdir, "images": args.images,
                                     "reference_masks": args.reference, "rule": args.rule,
                                     "first": args.first, "p": args.p, "rows": rows},
                                    indent=2))


if __name__ == "__main__":
  main()
