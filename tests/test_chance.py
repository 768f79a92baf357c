"""The chance rows every localization and faithfulness table carries, the columns they
mark uninformative, and T(IoBB)'s flat maps counted as misses (Wang et al.)."""

import jax
import jax.numpy as jnp
import numpy as np
import scipy.ndimage
import scipy.stats

from cejax import metrics
from cejax.jobs.evaluators import localization
from cejax.jobs.evaluators.common import Inputs
from cejax.metrics import chestxray


def test_chance_maps_are_noise_a_centred_gaussian_and_random_boxes():
  num, shape, box = 400, (30, 40), (6, 9)
  maps = metrics.chance_maps(jax.random.key(0), num=num, shape=shape, box_shape=box)
  noise = np.asarray(maps["chance_noise"])
  assert noise.shape == (num, *shape) and noise.min() >= 0 and noise.max() < 1
  # Uniform on [0, 1): Kolmogorov-Smirnov against scipy's uniform distribution.
  assert scipy.stats.kstest(noise[:8].ravel(), "uniform").pvalue > 1e-3
  # A Gaussian centred on the image, sigma a quarter of each side (scipy's pdf, peak 1).
  rows = scipy.stats.norm.pdf(np.arange(30), loc=14.5, scale=30 / 4)
  cols = scipy.stats.norm.pdf(np.arange(40), loc=19.5, scale=40 / 4)
  peak = scipy.stats.norm.pdf(0, scale=30 / 4) * scipy.stats.norm.pdf(0, scale=40 / 4)
  want = np.outer(rows, cols) / peak
  np.testing.assert_allclose(maps["chance_center"][3], want, rtol=1e-5)
  boxes = np.asarray(maps["chance_box"])
  tops = []
  for b in boxes:
    labels, count = scipy.ndimage.label(b)
    (rs, cs), = scipy.ndimage.find_objects(labels)
    assert count == 1 and b.sum() == 6 * 9 and (rs.stop - rs.start, cs.stop - cs.start) == box
    tops.append((rs.start, cs.start))
  tops = np.array(tops)
  # Every position is possible: the corners are reached and the rows spread uniformly.
  assert tops[:, 0].min() == 0 and tops[:, 0].max() == 30 - 6
  assert tops[:, 1].min() == 0 and tops[:, 1].max() == 40 - 9
  assert scipy.stats.chisquare(np.bincount(tops[:, 0], minlength=25)).pvalue > 1e-3


def _row(mean, lo=None, hi=None):
  return (mean, mean if lo is None else lo, mean if hi is None else hi)


def test_a_column_is_uninformative_where_noise_reaches_the_best_methods_interval():
  """Intervals that overlap do not separate noise from the best method, whichever mean
  lies in the other's interval (T(IoBB) at 0.5 on the evaluation: noise 0.998 [0.99,
  1.00] against the gradient's 1.00 [1.00, 1.00])."""
  rows = {
      "good": {"pointing": _row(0.9, 0.85, 0.95), "deletion_zero": _row(0.2, 0.18, 0.22),
               "t_iobb": [_row(1.0, 1.0, 1.0), _row(0.6, 0.55, 0.65)]},
      "bad": {"pointing": _row(0.3, 0.2, 0.4), "deletion_zero": _row(0.5, 0.45, 0.55),
              "t_iobb": [_row(0.5), _row(0.1)]},
      "chance_noise": {"pointing": _row(0.87), "deletion_zero": _row(0.4),
                       "t_iobb": [_row(1.0), _row(0.3)]},
      "chance_box": {"pointing": _row(0.99)},  # a chance row is never "the best method"
  }
  flags = metrics.uninformative(rows)
  # noise within the best's interval; deletion: lower is better, noise above it;
  # T(IoBB) per level: noise equal to the best at 0.1, below its interval at 0.25.
  assert flags == {"pointing": True, "deletion_zero": False, "t_iobb": [True, False]}
  rows["chance_noise"]["deletion_zero"] = _row(0.19)  # beyond the best: uninformative too
  assert metrics.uninformative(rows)["deletion_zero"] is True
  rows["chance_noise"]["pointing"] = _row(0.8, 0.75, 0.86)  # mean below, intervals overlap
  assert metrics.uninformative(rows)["pointing"] is True
  rows["chance_noise"]["pointing"] = _row(0.8, 0.75, 0.84)  # apart
  assert metrics.uninformative(rows)["pointing"] is False
  assert metrics.uninformative({"good": rows["good"]}) == {}  # no chance row, no flags


def test_noise_scores_t_iobb_near_one_against_small_boxes_and_is_marked():
  """The review's finding, measured: uniform noise against 12 x 12 boxes in 64 px
  images. One bright pixel inside the box is a detected box wholly inside it."""
  n = 60
  boxes = jnp.zeros((n, 64, 64), bool).at[:, 20:32, 36:48].set(True)
  noise = metrics.chance_maps(jax.random.key(1), num=n, shape=(64, 64),
                              box_shape=(12, 12))["chance_noise"]
  iobb = chestxray.t_iobb(noise, boxes)
  assert all(float(v.mean()) > 0.95 for v in iobb.values())
  assert float(metrics.pointing_game(noise, boxes).mean()) < 0.2
  perfect = boxes.astype(jnp.float32)
  loc = localization.Localization(
      pointing={"box": metrics.pointing_game(perfect, boxes).astype(jnp.float32),
                "chance_noise": metrics.pointing_game(noise, boxes).astype(jnp.float32)},
      mass={m: metrics.mass_in_box(x, boxes) for m, x in (("box", perfect),
                                                          ("chance_noise", noise))},
      iou={m: metrics.iou(x, boxes) for m, x in (("box", perfect), ("chance_noise", noise))},
      iobb={m: chestxray.best_iobb(x, boxes) for m, x in (("box", perfect),
                                                            ("chance_noise", noise))},
      otsu_iou={m: jnp.zeros(n) for m in ("box", "chance_noise")},
      hit={m: chestxray.hit(x, boxes) for m, x in (("box", perfect), ("chance_noise", noise))},
      curves={c: {m: jnp.zeros(n) for m in ("box", "chance_noise")} for c in metrics.CURVES})
  summary = localization.LocalizationEvaluator.summarize(
      localization.LocalizationEvaluator.__new__(localization.LocalizationEvaluator),
      {"localization": loc}, _inputs(boxes))
  assert summary["uninformative"]["t_iobb"] == [True, True, True]
  assert summary["uninformative"]["pointing"] is False
  assert summary["methods"]["chance_noise"]["t_iobb"][2][0] > 0.95
  mean, lo, hi = summary["methods"]["box"]["mass"]  # every metric with its interval
  assert lo <= mean <= hi


def _inputs(boxes):
  n = boxes.shape[0]
  return Inputs(index=np.arange(n), label=np.zeros(n), target=np.zeros(n, np.int32),
                has_box=np.ones(n, bool), box=np.asarray(boxes), correct=np.ones(n),
                pixels=None)


def test_flat_maps_are_t_iobb_misses_in_the_summary():
  """A flat map detects no region: Wang et al. count the image as a miss. The summary
  once dropped it from the denominator (T(IoBB) 1.0 here instead of 0.5)."""
  boxes = jnp.zeros((2, 8, 8), bool).at[:, 2:5, 2:5].set(True)
  maps = jnp.zeros((2, 8, 8)).at[0, 3, 3].set(1.0)  # image 0: inside; image 1: flat
  iobb = chestxray.best_iobb(maps, boxes)
  np.testing.assert_array_equal(iobb, [1.0, 0.0])
  zeros = {"m": jnp.zeros(2)}
  loc = localization.Localization(pointing=zeros, mass=zeros, iou=zeros,
                                  iobb={"m": jnp.array([1.0, jnp.nan])}, otsu_iou=zeros,
                                  hit=zeros, curves={c: zeros for c in metrics.CURVES})
  summary = localization.LocalizationEvaluator.summarize(
      localization.LocalizationEvaluator.__new__(localization.LocalizationEvaluator),
      {"localization": loc}, _inputs(boxes))
  assert [v[0] for v in summary["methods"]["m"]["t_iobb"]] == [0.5, 0.5, 0.5]
