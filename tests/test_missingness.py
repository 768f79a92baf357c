"""benchmarks/missingness.py: the removal masks and the movement measures against their
definitions (scipy's KL divergence, a hand count)."""

import sys

import numpy as np
import scipy.stats

from conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
import missingness  # noqa: E402


def test_removal_masks_take_whole_free_patches_and_never_touch_the_box():
  box = (20.0, 16.0, 30.0, 26.0)  # x0, y0, x1, y1: rows 2-3, columns 2-3 of 8 px patches
  masks = missingness.removal_masks(3, box, shape=(64, 64), patch=8, fraction=0.25,
                                    draws=5)
  assert masks.shape == (5, 64, 64) and set(np.unique(masks)) == {0.0, 1.0}
  patches = masks.reshape(5, 8, 8, 8, 8)
  assert (patches.min((2, 4)) == patches.max((2, 4))).all()  # whole patches
  assert (patches[:, :, 0, :, 0].sum((1, 2)) == 16).all()  # round(0.25 x 64)
  assert not masks[:, 16:32, 16:32].any()  # the four patches the box touches
  np.testing.assert_array_equal(
      masks, missingness.removal_masks(3, box, shape=(64, 64), patch=8, fraction=0.25,
                                       draws=5))  # one key per image
  assert missingness.removal_masks(0, None, shape=(64, 64), patch=8, fraction=1.0,
                                   draws=1).all()
  assert missingness.removal_masks(0, box, shape=(64, 64), patch=8, fraction=1.0,
                                   draws=1) is None  # 64 patches, 60 free


def test_movement_is_the_flip_the_drop_and_scipys_kl():
  p = np.array([0.7, 0.2, 0.1])
  q = np.array([[0.7, 0.2, 0.1], [0.3, 0.6, 0.1], [0.5, 0.1, 0.4]])
  changed, drop, kl = missingness.movement(p, q - p)
  np.testing.assert_array_equal(changed, [False, True, False])
  np.testing.assert_allclose(drop, [0.0, 0.4, 0.2], atol=1e-12)
  np.testing.assert_allclose(kl, [scipy.stats.entropy(p, qi) for qi in q], rtol=1e-12)


def test_table_prints_each_row_of_a_record():
  row = {"images": 3, "prediction_changed": [0.5, 0.25, 0.75],
         "clean_probability_drop": [0.1, 0.0, 0.2], "kl": [1.0, 0.5, 1.5]}
  record = {"models": {"vit": {"preset": "vit_synthetic", "step": 9,
                               "zero fill 0.25": row, "token drop 0.25": row}}}
  lines = missingness.table(record).splitlines()
  assert len(lines) == 4
  assert lines[3] == ("| vit | token drop | 25% | 0.500 [0.250, 0.750] | "
                      "0.100 [0.000, 0.200] | 1.000 [0.500, 1.500] |")
