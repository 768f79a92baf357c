"""benchmarks/ce_optimal_study.py: its per-variant scores against hand counts, and the
variants it measures (the issue's grid: every objective, start and game, and the scaled
area weight where it differs from TorchRay's)."""

import sys

import numpy as np
from conftest import ROOT


def _study():
  sys.path.insert(0, str(ROOT / "benchmarks"))
  import ce_optimal_study

  return ce_optimal_study


def test_scores_are_the_hand_counts():
  study = _study()
  boxes = np.zeros((2, 6, 6), bool)
  boxes[:, 1:3, 1:3] = True                 # 4 pixels
  masks = np.zeros((2, 6, 6), np.float32)
  masks[0, 1, 1], masks[0, 5, 5] = 1.0, 1.0  # half its mass in the box, maximum inside
  masks[1, 4, 4] = 1.0                       # all outside
  regions = np.zeros((2, 6, 6), np.float32)
  regions[0, 1:3, 1] = 1                     # 2 of 2 inside
  regions[1, 1, 1], regions[1, 4, 4], regions[1, 5, 5] = 1, 1, 1  # 1 of 3 inside
  got = study.score(masks, regions, boxes, np.array([-0.5, -0.1]), np.array([True, False]))
  assert got["mass_in_box"][0] == 0.25      # (0.5 + 0) / 2
  np.testing.assert_allclose(got["hard_region_in_box"][0], (1 + 1 / 3) / 2)
  assert got["pointing"][0] == 0.5          # image 0's first maximum is (1, 1)
  np.testing.assert_allclose(got["expected_ce"][0], -0.3)
  assert got["decision_changed"] == 0.5


def test_the_variants_are_the_issues_grid():
  study = _study()
  variants = study.variants()
  assert len(variants) == 5 * 3 * 3 + 4 * 3
  assert {v[0] for v in variants} == {"expected", "probability", "log_probability", "logit",
                                      "log_odds"}
  assert {(v[1], v[2]) for v in variants if v[3] == "torchray"} == {
      (s, g) for s in (1.0, 0.5, 0.0) for g in ("delete", "preserve", "dual")}
  assert not [v for v in variants if v[3] == "scaled" and v[0] == "logit"]
