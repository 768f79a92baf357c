"""Missingness bias (Jain et al., "Missingness Bias in Model Debugging", ICLR 2022): how
far a model's prediction moves when patches that hold no evidence are removed, by zero
fill and, for a ViT, by dropping their tokens.

    python benchmarks/missingness.py --run densenet=runs/synthetic \
        --run vit=runs/vit_synthetic --json results/missingness_DATE.json

For each of the first ``--images`` test images: the patch grid of ``--patch`` pixels;
the patches that touch the image's evidence box (none for a normal image) are never
removed; ``--draws`` random sets of the other patches, ``round(f x patches)`` of them
for each fraction ``f`` of ``--fractions``, are removed (one key per image, the same
sets for every model and intervention). Per model, intervention and fraction: the share
of removals that change the predicted class (Jain et al.'s measure), the mean drop of
the clean class's probability and the mean KL(p_clean || p_removed), each with a
percentile bootstrap interval over images. A model that only reads the evidence moves
by nothing; a CNN that reads the masking pattern moves under zero fill.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import _provenance  # noqa: E402  (benchmarks/, the script's own folder)


def removal_masks(key, box, *, shape, patch: int, fraction: float, draws: int):
  """``(draws, h, w)`` masks of ``round(fraction x patches)`` patches each, none of them
  touching ``box`` (``(x0, y0, x1, y1)`` pixels, or None), or None when too few patches
  are free."""
  rows, cols = shape[0] // patch, shape[1] // patch
  free = np.ones((rows, cols), bool)
  if box is not None:
    x0, y0, x1, y1 = box
    r0, r1 = int(y0 // patch), int(np.ceil(y1 / patch))
    c0, c1 = int(x0 // patch), int(np.ceil(x1 / patch))
    free[max(r0, 0):r1, max(c0, 0):c1] = False
  count = int(round(fraction * rows * cols))
  candidates = np.flatnonzero(free)
  if count < 1 or count > len(candidates):
    return None
  rng = np.random.default_rng(key)
  masks = np.zeros((draws, rows * cols), np.float32)
  for mask in masks:
    mask[rng.choice(candidates, count, replace=False)] = 1
  return np.kron(masks.reshape(draws, rows, cols), np.ones((patch, patch), np.float32))


def movement(clean_probs, per_class_effects):
  """Per removal: (prediction changed, drop of the clean class's probability, KL(p_clean
  || p_removed)) from the clean probabilities ``(k,)`` and the per-class effects
  ``(draws, k)`` (``p_removed - p_clean``)."""
  p = np.asarray(clean_probs, np.float64)
  q = np.clip(p + np.asarray(per_class_effects, np.float64), 1e-12, 1)
  t = int(p.argmax())
  changed = q.argmax(-1) != t
  drop = p[t] - q[:, t]
  kl = (p * (np.log(np.clip(p, 1e-12, 1)) - np.log(q))).sum(-1)
  return changed, drop, kl


def _interval(values, seed=0):
  values = np.asarray(values, np.float64)
  rng = np.random.default_rng(seed)
  means = [values[rng.integers(0, len(values), len(values))].mean() for _ in range(1000)]
  return [float(values.mean()), float(np.percentile(means, 2.5)),
          float(np.percentile(means, 97.5))]


def table(record) -> str:
  """The record's measures as a Markdown table: a row per model, intervention and
  fraction; each cell the mean [95 % interval]."""
  lines = ["| model | removal | patches removed | prediction changed | clean-class "
           "probability drop | KL |", "|---|---|---|---|---|---|"]
  cell = lambda v: f"{v[0]:.3f} [{v[1]:.3f}, {v[2]:.3f}]"  # noqa: E731
  for name, model in record["models"].items():
    for key, row in model.items():
      if not isinstance(row, dict):
        continue
      label, fraction = key.rsplit(" ", 1)
      lines.append(f"| {name} | {label} | {float(fraction):.0%} | "
                   f"{cell(row['prediction_changed'])} | "
                   f"{cell(row['clean_probability_drop'])} | {cell(row['kl'])} |")
  return "\n".join(lines)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--run", action="append", default=[], help="NAME=WORKDIR (repeat)")
  p.add_argument("--images", type=int, default=200)
  p.add_argument("--patch", type=int, default=8)
  p.add_argument("--fractions", type=float, nargs="+", default=(0.1, 0.25, 0.5))
  p.add_argument("--draws", type=int, default=8)
  p.add_argument("--json", default="")
  p.add_argument("--table", default="", help="print the table of a record and stop")
  if "--table" in (argv or sys.argv[1:]):
    args = p.parse_known_args(argv)[0]
    print(table(json.loads(Path(args.table).read_text())))
    return None
  args = p.parse_args(argv)
  if not args.run:
    p.error("give at least one --run NAME=WORKDIR")
  import jax
  import jax.numpy as jnp
  from flax import nnx

  import cejax
  from cejax.data import pipeline
  from cejax.forwards import tokens
  from cejax.jobs import checkpoint
  from cejax.jobs import config as config_lib
  from cejax.models import vit

  runs = dict(item.split("=", 1) for item in args.run)
  out = {"question": "missingness bias: prediction movement when evidence-free patches "
                     "are removed (Jain et al. 2022)",
         "command": "python benchmarks/missingness.py " + " ".join(argv or sys.argv[1:]),
         "date": datetime.date.today().isoformat(), "commit": _provenance.commit(),
         "cpu": _provenance.cpu(), "settings": vars(args) | {"run": runs}, "models": {}}
  for name, workdir in runs.items():
    graphdef, params, stats, run = checkpoint.load_model(Path(workdir))
    model = nnx.merge(graphdef, params, stats)
    logits_fn = checkpoint.make_logits_fn(graphdef, params, stats)
    data = config_lib.base_config().data
    for key, value in run["data"].items():
      data[key] = tuple(value) if isinstance(data[key], tuple) else value
    batch = pipeline.load_dataset(data).batch("test", list(range(args.images)))
    forwards = {"zero fill": (logits_fn, "zero")}
    if isinstance(model, vit.VisionTransformer):
      forwards["token drop"] = (tokens.from_vit(model, mode="drop"), None)
    clean = np.asarray(jax.nn.softmax(jax.jit(logits_fn)(jnp.asarray(batch["image"]))))
    result = {}
    for label, (forward, fill) in forwards.items():
      for fraction in args.fractions:
        changed, drops, kls = [], [], []
        for i, image in enumerate(batch["image"]):
          box = batch["boxes"][i][0] if batch["box_mask"][i].any() else None
          masks = removal_masks(i, box, shape=image.shape[:2], patch=args.patch,
                                fraction=fraction, draws=args.draws)
          if masks is None:
            continue
          effects = cejax.causal_effect(forward, jnp.asarray(image), masks,
                                        intervention=fill, estimand="per_class").effects
          c, d, k = movement(clean[i], effects)
          changed.append(c.mean())
          drops.append(d.mean())
          kls.append(k.mean())
        result[f"{label} {fraction}"] = {
            "images": len(changed), "prediction_changed": _interval(changed),
            "clean_probability_drop": _interval(drops), "kl": _interval(kls)}
        print(name, label, fraction, result[f"{label} {fraction}"], flush=True)
    out["models"][name] = {"preset": run["preset"], "step": run["step"], **result}
  if args.json:
    Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
  return out


if __name__ == "__main__":
  main()
