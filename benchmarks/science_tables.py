"""Prints the science tables (markdown) from one committed evaluation record.

    python benchmarks/science_tables.py results/science_2026-12-07.json

The science page (``docs/science.md``) prints two records: the evaluation's
(``configs/synthetic_eval.py``) and the optimised masks'
(``configs/synthetic_eval_optimised.py``, no attack table).

The record is the evaluation's ``metrics.json`` with how it was made (``record``:
command, config, commit, date, machine); ``--make OUT --from METRICS`` writes one from a
run's ``metrics.json``. Every number printed comes from the record, and
``tests/test_science_tables.py`` checks that the page's tables, between its
``science-tables`` markers, are exactly this script's output.
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
import subprocess
import time

ROWS = (
    ("ce_sliding", "CE, sliding windows (expected CE)"),
    ("ce_grid", "CE, 10 x 10 grid (the paper's form)"),
    ("ce_rise", "CE, RISE masks (coverage weighting)"),
    ("ce_latent", "latent CE (block2 channels)"),
    ("occlusion", "occlusion = CE of the target probability"),
    ("rise", "RISE"),
    ("cam", "CAM"),
    ("grad_cam", "Grad-CAM"),
    ("grad_cam_pp", "Grad-CAM++"),
    ("smooth_grad_cam_pp", "Smooth Grad-CAM++"),
    ("gradient", "gradient"),
    ("gradient_x_input", "gradient x input"),
    ("smoothgrad", "SmoothGrad"),
    ("integrated_gradients", "Integrated Gradients"),
    # Optimised masks (configs/synthetic_eval_optimised.py), printed when present.
    ("extremal_perturbation", "extremal perturbations (TorchRay)"),
    ("ce_optimal", "CE-optimal masks (expected CE, zero fill)"),
    ("meaningful_perturbation", "meaningful perturbations"),
    # Chance levels (metrics.chance_maps), scored by the same code.
    ("chance_noise", "chance: uniform noise"),
    ("chance_center", "chance: centred Gaussian"),
    ("chance_box", "chance: random box of the mean box size"),
)
MARK = "†"
ATTACKS = {"fgsm": "FGSM", "bim": "I-FGSM", "mifgsm": "MI-FGSM", "pgd": "PGD"}


def ci(v, digits=2) -> str:
  if not isinstance(v, (list, tuple)):  # records made before every metric had one
    return f"{v:.{digits}f}"
  mean, lo, hi = v
  return f"{mean:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"


def _title(s: dict, metric: str, title: str) -> str:
  """A column title, marked where uniform noise reaches the best method's interval
  (``cejax.metrics.uninformative`` of the record's rows: the library's rule, applied to
  the recorded means and intervals)."""
  return f"{title} {MARK}" if s.get("uninformative", {}).get(metric) is True else title


def _iobb_title(s: dict) -> str:
  flags = s.get("uninformative", {}).get("t_iobb") or [False] * len(s["iobb_levels"])
  return "T(IoBB) at " + " / ".join(f"{t}{' ' + MARK if f else ''}"
                                     for t, f in zip(s["iobb_levels"], flags, strict=True))


def _note(s: dict, metrics: tuple[str, ...]) -> list[str]:
  flags = s.get("uninformative", {})
  if not any(any(flags[m]) if isinstance(flags.get(m), list) else flags.get(m)
             for m in metrics):
    return []
  return ["", f"{MARK} Uninformative for these maps: uniform noise's 95 % interval reaches "
          "the best method's (or noise scores better), so the column does not separate the "
          "methods from chance."]


def tables(record: dict) -> str:
  """The science tables, as markdown."""
  from cejax import metrics

  s = dict(record["metrics"])
  s["uninformative"] = metrics.uninformative(s["methods"])
  out = [f"{s['num_images']} images, {s['num_with_box']} with a box; clean accuracy "
         f"{s['clean_accuracy']:.3f}; pointing tolerance {s['pointing_tolerance_px']:.2f} px; "
         f"`{record['record']['command']}` at commit {record['record']['commit']}, "
         f"{record['record']['date']}.", ""]
  t = functools.partial(_title, s)
  out += ["Localization (the boxed images):", "",
          f"| method | {t('pointing', 'pointing game')} | {t('hit', 'hit rate')} | "
          f"{t('mass', 'mass in box')} | {t('iou', 'IoU at half range')} | "
          f"{t('otsu_iou', 'Otsu mIoU')} | {_iobb_title(s)} |", "|---|---|---|---|---|---|---|"]
  for key, name in ROWS:
    row = s["methods"].get(key)
    if row is not None:
      iobb = " / ".join(ci(v) for v in row["t_iobb"])
      out.append(f"| {name} | {ci(row['pointing'])} | {ci(row['hit'])} | "
                 f"{ci(row['mass'])} | {ci(row['iou'])} | {ci(row['otsu_iou'])} | {iobb} |")
  out += _note(s, ("pointing", "hit", "mass", "iou", "otsu_iou", "t_iobb"))
  out += ["", "Faithfulness (every image) and the randomisation check:", "",
          f"| method | {t('deletion_zero', 'deletion AUC, zero fill (lower better)')} | "
          f"{t('deletion_blur', 'deletion AUC, blur fill (lower better)')} | "
          f"{t('insertion_blur', 'insertion AUC, from blur')} | rank corr. with random "
          "model |", "|---|---|---|---|---|"]
  for key, name in ROWS:
    row = s["methods"].get(key)
    if row is not None:
      sanity = ci(row["sanity_spearman"]) if "sanity_spearman" in row else "—"
      out.append(f"| {name} | {ci(row['deletion_zero'], 3)} | {ci(row['deletion_blur'], 3)} "
                 f"| {ci(row['insertion_blur'], 3)} | {sanity} |")
  out += _note(s, ("deletion_zero", "deletion_blur", "insertion_blur"))
  gap = s["methods"].get("integrated_gradients", {}).get("completeness_gap")
  if gap:
    out += ["", f"Integrated Gradients' completeness gap (|sum of attributions - logit "
            f"difference| / |logit difference|): mean {ci(gap, 4)}, median "
            f"{s['methods']['integrated_gradients']['completeness_gap_median']:.4f}."]
  if not s.get("detection"):  # a run without the attack evaluators (the optimised masks')
    return "\n".join(out) + "\n"
  out += ["", "| attack (eps in /255) | success | attacked images (train / test) | CE "
          "features | max confidence | feature squeezing |", "|---|---|---|---|---|---|"]
  for attack, dets in s["detection"].items():
    base, eps = attack.split("@")
    cells = [f"{d['auroc']:.2f} [{d['auroc_ci'][0]:.2f}, {d['auroc_ci'][1]:.2f}]; "
             f"{d['tpr_at_5fpr']:.2f}" for d in
             (dets["CE features"], dets["max confidence"], dets["squeezing"])]
    ce = dets["CE features"]
    out.append(f"| {ATTACKS.get(base, base)} {eps} | {s['attack_success'][attack]:.2f} | "
               f"{ce['n_train']} / {ce['n_test']} | " + " | ".join(cells) + " |")
  return "\n".join(out) + "\n"


def make_record(metrics_path: str, *, command: str, config: str, commit: str = "") -> dict:
  """A record: the run's metrics.json and how it was made (``commit``: the code the run
  used; default this checkout's HEAD)."""
  commit = commit or subprocess.run(["git", "rev-parse", "--short", "HEAD"],
                                    capture_output=True, text=True).stdout.strip()
  with open(metrics_path) as f:
    metrics = json.load(f)
  return {"record": {"command": command, "config": config, "commit": commit,
                     "date": time.strftime("%Y-%m-%d"),
                     "machine": platform.processor() or platform.machine()},
          "metrics": metrics}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("record", nargs="?")
  parser.add_argument("--make", help="write a record to this path ...")
  parser.add_argument("--from", dest="source", help="... from this metrics.json")
  parser.add_argument("--command", default="", help="the command that made the run")
  parser.add_argument("--config", default="configs/synthetic_eval.py")
  parser.add_argument("--commit", default="", help="the commit the run used (default HEAD)")
  args = parser.parse_args()
  if args.make:
    record = make_record(args.source, command=args.command, config=args.config,
                         commit=args.commit)
    with open(args.make, "w") as f:
      json.dump(record, f, sort_keys=True)
    return
  with open(args.record) as f:
    print(tables(json.load(f)), end="")


if __name__ == "__main__":
  main()
