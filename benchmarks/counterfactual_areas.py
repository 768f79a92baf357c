"""Minimal counterfactual regions against the true boxes (issue "CE-optimal masks").

    python -m cejax.jobs.sweep --config=configs/synthetic_counterfactual.py \\
        --workdir=runs/synthetic --out=runs/synthetic/counterfactual
    python benchmarks/counterfactual_areas.py --sweep runs/synthetic/counterfactual \\
        --json results/counterfactual_DATE.json

Reads a sweep's ``counterfactual`` results (``cejax.jobs.sweep.load``: every chunk
checked against the run) and the same images' boxes, from the data settings the sweep
recorded (``--data_dir`` where the data are not in the default place); the data found
must have the split sizes the sweep recorded. Per image with a box:
whether a region was found, its area and the box's (fractions of the image), their
ratio, the fraction of the region inside the box and their IoU; without a box, how
often deleting a region changes the decision at all. Prints a markdown table and
writes the record (``--json``) with how it was made.

The synthetic data's class lives only in the box (``cejax.data.synthetic_gen``), so a
counterfactual region that is the box's size and inside it is the right answer; one
much smaller than the box says the model decides on part of the finding, one outside it
that the decision can be flipped by deleting something else.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.9)
RATIO_BINS = (0.0, 0.5, 0.8, 1.25, 2.0, np.inf)


def per_image(region, found, box) -> dict[str, np.ndarray]:
  """Per image: region and box areas (fractions of the image), the region's fraction
  inside the box, and IoU (NaN where no region was found)."""
  pixels = region.shape[1] * region.shape[2]
  r, b = region.astype(bool), box.astype(bool)
  inter = (r & b).sum((1, 2))
  union = (r | b).sum((1, 2))
  size = r.sum((1, 2))
  nan = np.full(len(r), np.nan)
  return {"region_area": np.where(found, size / pixels, nan),
          "box_area": b.sum((1, 2)) / pixels,
          "inside_box": np.where(found & (size > 0), inter / np.maximum(size, 1), nan),
          "iou": np.where(found, inter / np.maximum(union, 1), nan)}


def summary(stats, found, flipped_to, predicted) -> dict:
  """The distribution of region areas against box areas over the boxed images: region
  areas, ratios, overlap and correlation over those with a region found; box areas over
  all of them and over those with a region found."""
  from scipy import stats as scipy_stats

  area, box = stats["region_area"][found], stats["box_area"][found]
  ratio = area / box
  counts, _ = np.histogram(ratio, bins=RATIO_BINS)
  rho = scipy_stats.spearmanr(area, box)
  quantiles = lambda x: dict(zip(map(str, QUANTILES), np.quantile(x, QUANTILES).tolist(),  # noqa: E731
                                 strict=True))
  return {
      "images": int(len(found)), "found": int(found.sum()),
      "region_area_quantiles": quantiles(area),
      "box_area_quantiles": quantiles(stats["box_area"]),
      "box_area_quantiles_found": quantiles(box),
      "ratio_quantiles": quantiles(ratio),
      "ratio_bins": {f"[{lo}, {hi})": int(c) for lo, hi, c in
                     zip(RATIO_BINS[:-1], RATIO_BINS[1:], counts, strict=True)},
      "spearman_region_vs_box_area": [float(rho.statistic), float(rho.pvalue)],
      "inside_box_mean": float(np.mean(stats["inside_box"][found])),
      "inside_box_median": float(np.median(stats["inside_box"][found])),
      "iou_mean": float(np.mean(stats["iou"][found])),
      "flipped_to_counts": {str(k): int(v) for k, v in
                            zip(*np.unique(flipped_to[found], return_counts=True),
                                strict=True)},
      "predicted_class_counts": {str(k): int(v) for k, v in
                                 zip(*np.unique(predicted, return_counts=True), strict=True)},
  }


def table(record) -> str:
  """The README's rows, as markdown."""
  boxed, q = record["boxed"], lambda d: " / ".join(f"{100 * v:.1f}" for v in d.values())
  rows = [f"{boxed['images']} images with a box, a region found for {boxed['found']}; "
          f"{record['unboxed']['images']} without a box, a region found for "
          f"{record['unboxed']['found']}.", "",
          "| quantile (10 / 25 / 50 / 75 / 90 %) | value |", "|---|---|",
          "| minimal counterfactual area, % of the image (region found) | "
          f"{q(boxed['region_area_quantiles'])} |",
          "| true box area, % of the image (region found) | "
          f"{q(boxed['box_area_quantiles_found'])} |",
          "| true box area, % of the image (every boxed image) | "
          f"{q(boxed['box_area_quantiles'])} |",
          "| ratio region / box (region found) | " + " / ".join(
              f"{v:.2f}" for v in boxed["ratio_quantiles"].values()) + " |", "",
          "| ratio region / box | images |", "|---|---|"]
  rows += [f"| {k} | {v} |" for k, v in boxed["ratio_bins"].items()]
  rho, p = boxed["spearman_region_vs_box_area"]
  rows += ["", f"Spearman correlation of region and box areas {rho:.2f} (p = {p:.2g}); "
           f"fraction of the region inside the box: mean {boxed['inside_box_mean']:.2f}, "
           f"median {boxed['inside_box_median']:.2f}; IoU with the box: mean "
           f"{boxed['iou_mean']:.2f}."]
  return "\n".join(rows) + "\n"


def main():
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--sweep", default="runs/synthetic/counterfactual")
  p.add_argument("--intervention", default="zero")
  p.add_argument("--data_dir", default="", help="where the sweep's data are, if not in "
                 "the default place")
  p.add_argument("--json", default="")
  args = p.parse_args()

  from cejax.data import pipeline
  from cejax.jobs import config as config_lib
  from cejax.jobs import sweep
  from cejax.jobs.evaluators import common as ev_common

  results = sweep.load(Path(args.sweep))
  record = results.settings
  if not results.optimised or "counterfactual" not in results.optimised:
    raise SystemExit(f"{args.sweep} holds no counterfactual regions "
                     "(config.sweep.optimised must name 'counterfactual').")
  cf = results.optimised["counterfactual"].get(args.intervention)
  if cf is None:
    raise SystemExit(f"{args.sweep} has counterfactuals for "
                     f"{sorted(results.optimised['counterfactual'])}, not "
                     f"{args.intervention!r}.")
  data = config_lib.base_config().data
  recorded = {k: v for k, v in record["data"].items() if k != "split_sizes"}
  with data.unlocked():
    for key, value in recorded.items():
      data[key] = type(data[key])(value) if isinstance(data[key], tuple) else value
    if args.data_dir:
      data.data_dir = args.data_dir
  dataset = pipeline.load_dataset(data)
  sizes = {name: dataset.num_examples(name) for name in sorted(dataset.sources)}
  if sizes != record["data"]["split_sizes"]:
    raise SystemExit(f"The data found ({data.name} in {data.data_dir or 'the default place'})"
                     f" has splits {sizes}; {args.sweep} was made on "
                     f"{record['data']['split_sizes']} (pass --data_dir).")
  split = record["job"]["split"]
  positions = [int(i.split("/")[1]) for i in results.ids]
  batch = dataset.batch(split, positions)
  region = np.asarray(cf["mask"])
  found = np.asarray(cf["found"], bool)
  box = ev_common.box_union(batch, region.shape[1:])
  has_box = np.asarray(batch["box_mask"]).any(1)  # as the evaluators count them
  stats = per_image(region, found, box)
  predicted = np.asarray(results.optimised["targets"])
  out = {
      "benchmark": "counterfactual_areas", "date": datetime.date.today().isoformat(),
      "command": "python " + " ".join(sys.argv), "sweep": str(args.sweep),
      "sweep_job": record["job"], "sweep_commit": record["code"].get("commit", "unknown"),
      "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                               text=True, cwd=ROOT).stdout.strip(),
      "machine": platform.processor() or platform.machine(),
      "intervention": args.intervention,
      "areas_tried": list(record["job"]["optimised_settings"]["areas"]),
      "iterations": record["job"]["optimised_settings"]["iterations"],
      "bisection_steps": record["job"]["optimised_settings"]["counterfactual_bisection"],
      "boxed": summary({k: v[has_box] for k, v in stats.items()}, found[has_box],
                       np.asarray(cf["flipped_to"])[has_box], predicted[has_box]),
      "unboxed": {"images": int((~has_box).sum()), "found": int(found[~has_box].sum())},
  }
  print(table(out), end="")
  if args.json:
    Path(args.json).write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
  main()
