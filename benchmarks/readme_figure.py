"""The README's picture: test images of the embedded synthetic X-ray set beside their CE
maps from the demo model (README command 1), with the ground-truth box.

    python benchmarks/readme_figure.py --workdir runs/synthetic --out docs/_static/ce_map.png

Each CE map is the analysis' ``ce_sliding`` map: minus the paper's expected causal effect
of zero-filling 16 px windows every 4 px (``config.masks`` defaults at 64 px), averaged
over the windows covering each pixel. The images are the first ``--num`` boxed test
images the model classifies correctly.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main():
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--workdir", default="runs/synthetic")
  p.add_argument("--out", default="docs/_static/ce_map.png")
  p.add_argument("--num", type=int, default=3)
  args = p.parse_args()
  import jax.numpy as jnp
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  import cejax
  from cejax.data import pipeline
  from cejax.jobs.evaluators.common import box_union
  from configs import synthetic

  config = synthetic.get_config()
  logits_fn, run = cejax.load_logits_fn(Path(args.workdir))
  dataset = pipeline.load_dataset(config.data)
  batch = dataset.batch("test", list(range(64)))
  boxes = box_union(batch, batch["image"].shape[1:3])
  predicted = np.asarray(jnp.argmax(logits_fn(jnp.asarray(batch["image"])), -1))
  picked = [i for i in range(64) if boxes[i].any() and predicted[i] == batch["label"][i]]
  picked = picked[:args.num]
  windows = cejax.sliding_windows(shape=(64, 64), window=16, stride=4)
  fig, axes = plt.subplots(2, len(picked), figsize=(2.2 * len(picked), 4.6), squeeze=False)
  for col, i in enumerate(picked):
    image = jnp.asarray(batch["image"][i])
    effects = cejax.causal_effect(logits_fn, image, windows, estimand="expected",
                                  batch_size=64).effects
    ce = -np.asarray(cejax.ce_map(effects, windows))
    y0, x0 = np.argwhere(boxes[i]).min(0)
    y1, x1 = np.argwhere(boxes[i]).max(0)
    for row, (shown, cmap) in enumerate(((batch["image"][i][..., 0], "gray"), (ce, "magma"))):
      ax = axes[row, col]
      ax.imshow(shown, cmap=cmap)
      ax.add_patch(plt.Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0 + 1, y1 - y0 + 1, fill=False,
                                 edgecolor="lime", linewidth=1.2))
      ax.set_xticks([])
      ax.set_yticks([])
    axes[0, col].set_title(run["class_names"][int(batch["label"][i])], fontsize=10)
  axes[0, 0].set_ylabel("image", fontsize=10)
  axes[1, 0].set_ylabel("CE map", fontsize=10)
  fig.tight_layout()
  Path(args.out).parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(args.out, dpi=90)
  print(f"wrote {args.out}: test images {picked}")


if __name__ == "__main__":
  main()
