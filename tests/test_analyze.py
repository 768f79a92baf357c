"""analyze.py end to end on the smoke settings: every evaluator, report sections and
files. (Resume, the worker split and the settings check are tested in the library, in
test_evaluators, on smaller settings.)"""

import json
import subprocess
import sys
import time

import pytest
from conftest import ROOT

pytestmark = pytest.mark.xdist_group("trained_tiny")


def test_analyze_writes_a_complete_report(trained_tiny):
  config, workdir = trained_tiny
  cmd = [sys.executable, str(ROOT / "analyze.py"), "--config=configs/smoke.py",
         f"--workdir={workdir}", f"--config.data.data_dir={config.data.data_dir}",
         f"--config.data.num_train={config.data.num_train}"]
  t0 = time.perf_counter()
  proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  print(f"analyze.py on the smoke settings: {time.perf_counter() - t0:.1f} s")
  out = workdir / "analysis"
  assert f"Report: {out / 'report.html'}" in proc.stdout
  page = (out / "report.html").read_text()
  for section in ("<h2>Maps</h2>", "<h2>Localization and faithfulness</h2>",
                  "<h2>Causal effects under attack</h2>",
                  "<h2>Detecting adversarial images</h2>",
                  "<h2>Input-transform defenses</h2>", "<h2>Settings</h2>",
                  "pointing game", "T(IoU)", "T(IoBB)", "Otsu mIoU", "Grad-CAM++",
                  "SmoothGrad",
                  "Integrated Grad.", "RISE", "bpda_pgd", "AUROC", "TPR at 5% FPR"):
    assert section in page, section
  # Figures are embedded (no external files).
  assert page.count("data:image/png;base64,") == 4  # grid, histograms, ROC, defenses
  summary = json.loads((out / "metrics.json").read_text())
  assert summary["num_images"] == 8
  assert 0 < summary["clean_accuracy"] <= 1
  methods = summary["methods"]
  assert summary["pointing_tolerance_px"] == 15 * 32 / 224
  for m in ("ce_sliding", "ce_grid", "ce_rise", "ce_latent", "grad_cam",
            "grad_cam_pp", "smoothgrad", "integrated_gradients", "rise", "occlusion"):
    mean, lo, hi = methods[m]["pointing"]
    assert 0 <= lo <= mean <= hi <= 1, (m, methods[m]["pointing"])
    assert len(methods[m]["t_iou"]) == 7 and len(methods[m]["t_iobb"]) == 3
    for metric in ("hit", "otsu_iou"):
      assert 0 <= methods[m][metric][0] <= 1, (m, metric)
    for curve in ("deletion_zero", "deletion_blur", "insertion_blur"):
      assert 0 <= methods[m][curve][0] <= 1, (m, curve)
  for m in ("ce_grid", "gradient", "gradient_x_input", "grad_cam"):
    assert -1 <= methods[m]["sanity_spearman"][0] <= 1, m
  assert methods["integrated_gradients"]["completeness_gap"][0] >= 0
  assert set(summary["detection"]) == {"fgsm@8", "pgd@8"}
  for dets in summary["detection"].values():
    assert set(dets) == {"CE features", "max confidence", "squeezing"}
  # The smoke config attacks with FGSM and PGD only; the defenses add BPDA-PGD.
  assert set(summary["defenses"]) == {"none", "error_diffusion", "bit_depth"}
  assert set(summary["defenses"]["bit_depth"]) == {"clean", "fgsm", "pgd", "bpda_pgd"}
  for name in ("localization.csv", "detection.csv", "per_image.csv"):
    assert len((out / name).read_text().splitlines()) > 2
  header = (out / "per_image.csv").read_text().splitlines()[0]
  assert "localization/pointing/ce_grid" in header and "attacks/success/fgsm@8" in header
  assert len(list((out / "chunks").glob("*.npz"))) == 2
  # One image, one method, recomputed independently: the stored ce_grid map of test
  # image 0 is minus the expected CE of zeroing each of the 4 x 4 cells, from plain
  # forward passes of the masked images and the estimand in numpy.
  import jax
  import numpy as np

  from cejax.data import pipeline
  from cejax.jobs import checkpoint, store

  stored = store.load_tree(out / "chunks" / "0000.npz")["maps"]["maps"]["ce_grid"][0]
  logits_fn, _ = checkpoint.load_logits_fn(workdir)
  data = config.copy_and_resolve_references().data
  x = np.asarray(pipeline.load_dataset(data).batch("test", [0])["image"][0], np.float64)
  cells = [(r, c) for r in range(4) for c in range(4)]
  batch = [x]
  for r, c in cells:
    masked = x.copy()
    masked[r * 8:(r + 1) * 8, c * 8:(c + 1) * 8] = 0.0  # zero fill, 8-px cells at 32 px
    batch.append(masked)
  z = np.asarray(jax.jit(logits_fn)(np.asarray(batch, np.float32)), np.float64)
  p = np.exp(z - z.max(1, keepdims=True))
  p /= p.sum(1, keepdims=True)
  ce = (p[0] * (p[1:] - p[0])).sum(1)
  want = np.zeros((32, 32))
  for (r, c), e in zip(cells, ce, strict=True):
    want[r * 8:(r + 1) * 8, c * 8:(c + 1) * 8] = -e
  np.testing.assert_allclose(stored.astype(np.float64), want, rtol=2e-3, atol=1e-6)
