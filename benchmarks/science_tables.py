"""Prints the README's science tables (markdown) from one analysis run's metrics.json.

    python benchmarks/science_tables.py runs/synthetic/eval/metrics.json

Every number comes from the file, so the README's tables match the run they name.
"""

import json
import sys

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
)
ATTACKS = {"fgsm": "FGSM", "bim": "I-FGSM", "mifgsm": "MI-FGSM", "pgd": "PGD"}


def ci(v, digits=2):
  mean, lo, hi = v
  return f"{mean:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"


def main(path):
  s = json.load(open(path))
  print(f"{s['num_images']} images, {s['num_with_box']} with a box; clean accuracy "
        f"{s['clean_accuracy']:.3f}; pointing tolerance {s['pointing_tolerance_px']:.2f} px\n")
  print("| method | pointing game | IoU@0.5 | mass in box | deletion AUC, zero fill "
        "(lower better) | deletion AUC, blur fill (lower better) | insertion AUC, from blur "
        "| rank corr. with random model |")
  print("|---|---|---|---|---|---|---|---|")
  for key, name in ROWS:
    row = s["methods"].get(key)
    if row is None:
      continue
    sanity = ci(row["sanity_spearman"]) if "sanity_spearman" in row else "—"
    print(f"| {name} | {ci(row['pointing'])} | {ci(row['iou'])} | {row['mass'][0]:.2f} | "
          f"{ci(row['deletion_zero'], 3)} | {ci(row['deletion_blur'], 3)} | "
          f"{ci(row['insertion_blur'], 3)} | {sanity} |")
  print("\n| attack (eps in /255) | success | attacked images (train / test) | CE features "
        "| max confidence | feature squeezing |")
  print("|---|---|---|---|---|---|")
  for attack, dets in s["detection"].items():
    base, eps = attack.split("@")
    cells = [f"{d['auroc']:.2f} [{d['auroc_ci'][0]:.2f}, {d['auroc_ci'][1]:.2f}]; "
             f"{d['tpr_at_5fpr']:.2f}" for d in
             (dets["CE features"], dets["max confidence"], dets["squeezing"])]
    ce = dets["CE features"]
    print(f"| {ATTACKS.get(base, base)} {eps} | {s['attack_success'][attack]:.2f} | "
          f"{ce['n_train']} / {ce['n_test']} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
  main(sys.argv[1])
