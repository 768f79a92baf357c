"""analyze.py end to end on the smoke settings: report sections, files, resume."""

import json
import subprocess
import sys
import time

import numpy as np
from conftest import ROOT


def _analyze(config, workdir, *extra):
  cmd = [sys.executable, str(ROOT / "analyze.py"), "--config=configs/smoke.py",
         f"--workdir={workdir}", f"--config.data.data_dir={config.data.data_dir}",
         f"--config.data.num_train={config.data.num_train}", *extra]
  t0 = time.perf_counter()
  proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc, time.perf_counter() - t0


def test_analyze_writes_a_complete_report_and_resumes(trained_tiny):
  config, workdir = trained_tiny
  proc, seconds = _analyze(config, workdir)
  out = workdir / "analysis"
  assert f"Report: {out / 'report.html'}" in proc.stdout
  print(f"analyze.py on the smoke settings: {seconds:.1f} s")
  page = (out / "report.html").read_text()
  for section in ("<h2>Maps</h2>", "<h2>Localization and faithfulness</h2>",
                  "<h2>Causal effects under attack</h2>",
                  "<h2>Detecting adversarial images</h2>",
                  "<h2>Input-transform defenses</h2>", "<h2>Settings</h2>",
                  "pointing game", "T(IoU)", "Grad-CAM++", "SmoothGrad",
                  "Integrated Grad.", "RISE", "bpda_pgd", "AUROC", "TPR at 5% FPR"):
    assert section in page, section
  # Figures are embedded (no external files).
  assert page.count("data:image/png;base64,") == 4  # grid, histograms, ROC, defenses
  summary = json.loads((out / "metrics.json").read_text())
  assert summary["num_images"] == 8
  methods = summary["methods"]
  assert summary["pointing_tolerance_px"] == 15 * 32 / 224
  for m in ("ce_sliding", "ce_grid", "ce_rise", "ce_latent", "grad_cam",
            "grad_cam_pp", "smoothgrad", "integrated_gradients", "rise", "occlusion"):
    mean, lo, hi = methods[m]["pointing"]
    assert 0 <= lo <= mean <= hi <= 1, (m, methods[m]["pointing"])
    assert len(methods[m]["t_iou"]) == 7
    for curve in ("deletion_zero", "deletion_blur", "insertion_blur"):
      assert 0 <= methods[m][curve][0] <= 1, (m, curve)
  assert set(summary["detection"]) == {"fgsm@8", "pgd@8"}
  assert "error_diffusion/bpda_pgd" in summary["defenses"]
  for name in ("localization.csv", "detection.csv", "per_image.csv"):
    assert len((out / name).read_text().splitlines()) > 2
  # A killed run resumes: the finished chunk is kept, the missing one recomputed the same,
  # here by the second of two workers sharing the directory.
  chunks = sorted((out / "chunks").glob("*.npz"))
  assert len(chunks) == 2
  before = dict(np.load(chunks[1]))
  kept_mtime = chunks[0].stat().st_mtime_ns
  chunks[1].unlink()
  (out / "report.html").unlink()
  proc, _ = _analyze(config, workdir, "--num_workers=2", "--worker=0")
  assert "1 chunks are other workers'" in proc.stdout and not chunks[1].exists()
  assert not (out / "report.html").exists()
  proc, _ = _analyze(config, workdir, "--num_workers=2", "--worker=1")
  assert "Report:" in proc.stdout and (out / "report.html").exists()
  assert chunks[0].stat().st_mtime_ns == kept_mtime
  after = dict(np.load(chunks[1]))
  assert set(after) == set(before)
  for k in before:
    np.testing.assert_array_equal(after[k], before[k], err_msg=k)
  # Changed settings are refused rather than mixed with old results.
  cmd = [sys.executable, str(ROOT / "analyze.py"), "--config=configs/smoke.py",
         f"--workdir={workdir}", f"--config.data.data_dir={config.data.data_dir}",
         f"--config.data.num_train={config.data.num_train}",
         "--config.analysis.rise_masks=32"]
  proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert proc.returncode != 0 and "different settings" in proc.stderr
