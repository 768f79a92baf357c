"""benchmarks/counterfactual_areas.py: region and box statistics against hand counts."""

import sys

import numpy as np
from conftest import ROOT


def _script():
  sys.path.insert(0, str(ROOT / "benchmarks"))
  import counterfactual_areas

  return counterfactual_areas


def test_per_image_areas_overlap_and_iou_are_the_hand_counts():
  script = _script()
  region = np.zeros((3, 8, 8), np.float32)
  box = np.zeros((3, 8, 8), bool)
  region[0, 0:2, 0:2] = 1  # 4 pixels, 2 of them in a 6-pixel box
  box[0, 1:3, 0:2] = True
  box[0, 1:3, 2] = True
  region[1, 4:8, 4:8] = 1  # 16 pixels around a 4-pixel box
  box[1, 5:7, 5:7] = True
  box[2, 0:4, 0:4] = True  # none found
  got = script.per_image(region, np.array([True, True, False]), box)
  np.testing.assert_allclose(got["region_area"][:2], [4 / 64, 16 / 64])
  np.testing.assert_allclose(got["box_area"], [6 / 64, 4 / 64, 16 / 64])
  np.testing.assert_allclose(got["inside_box"][:2], [2 / 4, 4 / 16])
  np.testing.assert_allclose(got["iou"][:2], [2 / 8, 4 / 16])
  assert np.isnan(got["region_area"][2]) and np.isnan(got["iou"][2])


def test_summary_counts_ratios_into_their_bins():
  script = _script()
  area = np.array([0.01, 0.03, 0.05, 0.2, 0.02])
  box = np.array([0.04, 0.04, 0.04, 0.041, 0.04])
  stats = {"region_area": area, "box_area": box, "inside_box": np.full(5, 0.5),
           "iou": np.full(5, 0.25)}
  found = np.array([True, True, True, True, False])
  out = script.summary(stats, found, np.array([1, 1, 0, 2, -1]), np.array([3, 3, 3, 3, 3]))
  # ratios 0.25, 0.75, 1.25, 4.9: one in [0, 0.5), one in [0.5, 0.8), one in [1.25, 2)
  # (1.25 is the bin's closed left edge), one in [2, inf).
  assert list(out["ratio_bins"].values()) == [1, 1, 0, 1, 1]
  assert out["found"] == 4 and out["images"] == 5
  assert out["flipped_to_counts"] == {"0": 1, "1": 2, "2": 1}
  assert abs(out["region_area_quantiles"]["0.5"] - 0.04) < 1e-12  # median of the 4 found
