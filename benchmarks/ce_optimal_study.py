"""What makes the CE-optimal objective work: every combination of the optimised objective,
the start, the game and the area weight, measured on the demo model and on toy models
whose cause is known.

    python benchmarks/ce_optimal_study.py --workdir runs/synthetic \
        --json results/ce_optimal_study_DATE.json

``ce_optimal.ce_optimal_mask`` optimises a smooth mask against TorchRay's area constraint.
Which *objective* it follows is separate from the *estimand* it reports, and this study
chooses the defaults. Per variant:

- objective: the paper's ``expected`` CE, the target's ``probability``,
  ``log_probability``, ``logit``, ``log_odds`` (``extremal.OBJECTIVES``);
- start: the mask parameters' initial value, 1 (TorchRay's: everything intervened on in
  the delete game), 0.5 or 0;
- game: ``delete`` (the mask marks the region intervened on), ``preserve`` (the region
  kept while the rest is intervened on), ``dual`` (both rewards);
- area weight: TorchRay's (300, growing 1.0035x per step), or scaled to the objective:
  each image's weight times the objective's range on that image over the logit's
  (range: the objective with nothing and with everything intervened on), so the area
  term has the weight against it that TorchRay's logit reward has.

Reported per variant: the objective's gradient norm over the area term's at the first
and the last step (median, and the share below ``extremal.DEAD_RATIO``: a dead
objective), the pointing game and mass in box of the soft mask, the share of the hard
region (the mask's strongest pixels, as many as the area asks) inside the box, and the
paper's expected CE that intervening on the hard region causes, with how often it
changes the decision. The same on two toy models (softmax and sigmoid) whose logit
depends only on a 12 x 12 box: clean logits 15 (against 5), -10 with the box zero-filled.

The demo: the first ``--num_images`` boxed test images of the evaluation
(``configs/synthetic_eval.py``), zero fill, one area (5 % of the margined mask, 6.9 % of
the 64 px image; the boxes cover 2-6 %), TorchRay's 800 iterations, mask step 2 and
sigma 6 as in the science runs.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

OBJECTIVES = ("expected", "probability", "log_probability", "logit", "log_odds")
STARTS = (1.0, 0.5, 0.0)
GAMES = ("delete", "preserve", "dual")
AREA = 0.05
STEP, SIGMA = 2, 6.0


def variants(*, scaled_games=("delete",)):
  """``(objective, start, game, weight)`` of the study: every objective, start and game
  at TorchRay's weight, and the scaled weight for ``scaled_games`` (the logit's scaled
  weight is TorchRay's, so it is not repeated)."""
  out = [(o, s, g, "torchray") for o, s, g in itertools.product(OBJECTIVES, STARTS, GAMES)]
  out += [(o, s, g, "scaled") for o, s, g in itertools.product(OBJECTIVES, STARTS,
                                                                 scaled_games)
          if o != "logit"]
  return out


def objective_range(logits_fn, images, targets, objective, *, activation):
  """Per image ``|r(nothing intervened on) - r(everything)|`` of an objective (zero fill)."""
  import jax
  import jax.numpy as jnp

  from cejax import estimands
  from cejax.optimised import extremal

  fn = extremal.resolve_objective(objective)
  clean = logits_fn(images)
  filled = logits_fn(jnp.zeros_like(images))

  def value(logits):
    return jax.vmap(lambda c, z, t: fn(c, z[None], estimands.activate(z[None], activation),
                                       t, activation)[0])(clean, logits, targets)

  return np.abs(np.asarray(value(clean)) - np.asarray(value(filled)))


def score(masks, regions, boxes, effect, changed) -> dict:
  """One variant's scores over images: ``masks``/``regions`` ``(n, h, w)`` (soft, hard),
  ``boxes`` ``(n, h, w)`` bool, ``effect``/``changed`` ``(n,)``."""
  import jax.numpy as jnp

  from cejax import metrics

  boxes = np.asarray(boxes, bool)
  regions = np.asarray(regions) > 0.5
  inside = (regions & boxes).sum((1, 2)) / np.maximum(regions.sum((1, 2)), 1)
  return {
      "pointing": metrics.bootstrap_interval(np.asarray(
          metrics.pointing_game(jnp.asarray(masks), jnp.asarray(boxes)), np.float64)),
      "mass_in_box": metrics.bootstrap_interval(np.asarray(
          metrics.mass_in_box(jnp.asarray(masks), jnp.asarray(boxes)))),
      "hard_region_in_box": metrics.bootstrap_interval(inside),
      "expected_ce": metrics.bootstrap_interval(np.asarray(effect)),
      "decision_changed": float(np.mean(changed)),
  }


def gradient_summary(result) -> dict:
  from cejax.optimised import extremal

  ratio = extremal.gradient_ratio(result)[:, 0]  # (n, 2): one area
  return {"ratio_median": [float(np.median(ratio[:, 0])), float(np.median(ratio[:, 1]))],
          "dead_share": [float((ratio[:, 0] < extremal.DEAD_RATIO).mean()),
                         float((ratio[:, 1] < extremal.DEAD_RATIO).mean())]}


def run_variant(logits_fn, images, targets, boxes, variant, *, iterations, activation,
                mesh, batch_size, logit_range):
  """The scores of one ``(objective, start, game, weight)`` on ``images``."""
  import warnings

  import jax.numpy as jnp

  from cejax.optimised import ce_optimal

  objective, start, game, weight = variant
  scale = None
  if weight == "scaled":
    scale = objective_range(logits_fn, images, targets, objective,
                            activation=activation) / np.maximum(logit_range, 1e-6)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # the study records the dead objectives itself
    result = ce_optimal.ce_optimal_mask(
        logits_fn, images, targets, areas=(AREA,), estimand="expected", objective=objective,
        variant=game, start=start, activation=activation, iterations=iterations, step=STEP,
        sigma=SIGMA, batch_size=batch_size, mesh=mesh, regul_scale=scale)
  regions = result.regions[:, 0]
  # The study's common yardstick: the cause, whatever the game. Deleting the hard region.
  effect = ce_optimal.region_effects(logits_fn, images, result.regions, targets,
                                   intervention="zero", estimand="expected",
                                   activation=activation)[:, 0]
  after = logits_fn(images * (1 - regions[..., None]))
  changed = np.asarray(jnp.argmax(after, -1) != jnp.argmax(logits_fn(images), -1))
  out = score(result.masks[:, 0], regions, boxes, effect, changed)
  out.update(gradient_summary(result))
  return out


def toy_models(size=64):
  """``{name: (logits_fn, activation)}``, the image (ones) and the box of the toys."""
  import jax.numpy as jnp

  box = np.zeros((size, size), np.float32)
  box[20:32, 36:48] = 1
  weights = jnp.asarray(box / box.sum())

  def evidence(x):
    return 25 * jnp.sum(x[..., 0] * weights, (1, 2)) - 10  # 15 clean, -10 box zero-filled

  def softmax_toy(x):
    return jnp.stack([evidence(x), jnp.full(x.shape[0], 5.0)], -1)

  def sigmoid_toy(x):
    return jnp.stack([evidence(x), jnp.full(x.shape[0], -5.0)], -1)

  models = {"softmax": (softmax_toy, "softmax"), "sigmoid": (sigmoid_toy, "sigmoid")}
  return models, jnp.ones((1, size, size, 1)), box[None].astype(bool)


def main():
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--workdir", default="runs/synthetic")
  p.add_argument("--num_images", type=int, default=40)
  p.add_argument("--iterations", type=int, default=800)
  p.add_argument("--devices", type=int, default=os.cpu_count() or 1)
  p.add_argument("--only", default="", help="comma-separated objectives (a quick look)")
  p.add_argument("--skip_model", action="store_true", help="the toys only")
  p.add_argument("--json", default="")
  args = p.parse_args()
  import jax

  jax.config.update("jax_num_cpu_devices", args.devices)
  import jax.numpy as jnp

  from cejax import sharding
  from cejax.data import pipeline
  from cejax.jobs import checkpoint
  from cejax.jobs.evaluators.common import box_union
  from configs import synthetic_eval

  chosen = [v for v in variants() if not args.only or v[0] in args.only.split(",")]
  mesh = sharding.mask_mesh()
  record = {"benchmark": "ce_optimal_study", "date": datetime.date.today().isoformat(),
            "command": "python " + " ".join(sys.argv),
            "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                                     capture_output=True, text=True).stdout.strip(),
            "machine": platform.processor() or platform.machine(),
            "devices": jax.device_count(), "area": AREA, "iterations": args.iterations,
            "step": STEP, "sigma": SIGMA, "toys": {}, "model": {}}
  started = time.time()
  toys, toy_image, toy_box = toy_models()
  for name, (fn, activation) in toys.items():
    targets = jnp.zeros(1, jnp.int32)
    logit_range = objective_range(fn, toy_image, targets, "logit", activation=activation)
    for v in chosen:
      r = run_variant(fn, toy_image, targets, toy_box, v, iterations=args.iterations,
                      activation=activation, mesh=None, batch_size=1,
                      logit_range=logit_range)
      record["toys"].setdefault(name, {})["/".join(map(str, v))] = r
      print(f"toy {name} {v}: in box {r['hard_region_in_box'][0]:.2f} mass "
            f"{r['mass_in_box'][0]:.2f} ratio {r['ratio_median']}", flush=True)
  if not args.skip_model:
    config = synthetic_eval.get_config()
    logits_fn, _ = checkpoint.load_logits_fn(Path(args.workdir))
    logits_fn = jax.jit(logits_fn)
    dataset = pipeline.load_dataset(config.data)
    batch = dataset.batch("test", list(range(config.analysis.num_images)))
    boxes = box_union(batch, batch["image"].shape[1:3])
    picked = np.flatnonzero(boxes.any((1, 2)))[:args.num_images]
    images = jnp.asarray(batch["image"][picked], jnp.float32)
    boxes = boxes[picked]
    targets = jnp.argmax(logits_fn(images), -1).astype(jnp.int32)
    box_ce = np.asarray(jax.vmap(lambda x, b, t: __import__("cejax").causal_effect(
        logits_fn, x, b[None].astype(jnp.float32), target=t).effects[0])(
            images, jnp.asarray(boxes), targets))
    record.update(images=[int(i) for i in picked], box_expected_ce=float(box_ce.mean()),
                  box_area_mean=float(boxes.mean()))
    logit_range = objective_range(logits_fn, images, targets, "logit", activation="softmax")
    per_device = -(-len(picked) // jax.device_count())
    for v in chosen:
      t0 = time.time()
      r = run_variant(logits_fn, images, targets, boxes, v, iterations=args.iterations,
                      activation="softmax", mesh=mesh, batch_size=per_device,
                      logit_range=logit_range)
      r["seconds"] = time.time() - t0
      record["model"]["/".join(map(str, v))] = r
      print(f"model {v}: pointing {r['pointing'][0]:.2f} in box "
            f"{r['hard_region_in_box'][0]:.2f} ECE {r['expected_ce'][0]:.3f} ratio "
            f"{r['ratio_median']} ({r['seconds']:.0f} s)", flush=True)
      if args.json:  # a long run: every variant is kept as it finishes
        Path(args.json).write_text(json.dumps(record, indent=1) + "\n")
  record["seconds"] = time.time() - started
  print(tables(record))
  if args.json:
    Path(args.json).write_text(json.dumps(record, indent=1) + "\n")


def tables(record) -> str:
  """The study's tables (markdown) from its record."""
  out = []
  sections = [(f"toy ({name})", rows) for name, rows in record["toys"].items()]
  if record.get("model"):
    sections.append((f"demo model, {len(record['images'])} boxed images (deleting the box: "
                     f"expected CE {record['box_expected_ce']:.3f})", record["model"]))
  for title, rows in sections:
    out += ["", f"{title}:", "",
            "| objective / start / game / area weight | gradient ratio first, last "
            "(dead share) | pointing | mass in box | hard region in box | expected CE of "
            "the hard region | decision changed |", "|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
      ratio, dead = r["ratio_median"], r["dead_share"]
      out.append(f"| {name} | {ratio[0]:.2g}, {ratio[1]:.2g} ({dead[0]:.2f}, {dead[1]:.2f}) "
                 f"| {_ci(r['pointing'])} | {_ci(r['mass_in_box'])} | "
                 f"{_ci(r['hard_region_in_box'])} | {_ci(r['expected_ce'], 3)} | "
                 f"{r['decision_changed']:.2f} |")
  return "\n".join(out) + "\n"


def _ci(v, digits=2):
  mean, lo, hi = v
  if lo == hi:
    return f"{mean:.{digits}f}"
  return f"{mean:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"


if __name__ == "__main__":
  main()
