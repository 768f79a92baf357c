"""The chest X-ray field's localization metrics against their references: Wang et al.'s
boxes around connected regions (scipy.ndimage.label, find_objects), CheXlocalize's Otsu
segmentation (skimage.filters.threshold_otsu on the uint8 map) and hit rate."""

import jax
import numpy as np
import pytest
import scipy.ndimage

from cejax.metrics import chestxray

EIGHT = np.ones((3, 3), int)  # 8-connected regions


def _maps(n=6, h=24, w=20, seed=0):
  """Blobs of different sizes and heights on noise, so regions and thresholds vary.
  Every even map's box holds its maximum (a hit), every odd map's box lies away from it
  (a miss). Each call draws from its own generator: tests run in any order, on any worker."""
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[0:h, 0:w]
  maps = rng.normal(0, 0.3, (n, h, w))
  for m in maps:
    for _ in range(3):
      cy, cx, s = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(1.5, 4)
      m += rng.uniform(1, 4) * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * s * s))
  maps = maps.astype(np.float32)
  gt = np.zeros((n, h, w), bool)
  for i, (m, g) in enumerate(zip(maps, gt, strict=True)):
    py, px = np.unravel_index(np.argmax(m), m.shape)
    bh, bw = rng.integers(3, 8), rng.integers(3, 8)
    if i % 2 == 0:  # around the peak
      r0, c0 = np.clip(py - bh // 2, 0, h - bh), np.clip(px - bw // 2, 0, w - bw)
    else:  # in the corner farthest from the peak
      r0 = 0 if py >= h // 2 else h - bh
      c0 = 0 if px >= w // 2 else w - bw
    g[r0:r0 + bh, c0:c0 + bw] = True
  return maps, gt


def _uint8(m):  # CheXlocalize's normalisation, in numpy
  m = m - m.min()
  return np.uint8(255 * m / m.max())


def test_boxes_around_regions_equal_scipy():
  maps, _ = _maps()
  for m in maps:
    binary = _uint8(m) >= 180
    labels, count = scipy.ndimage.label(binary, structure=EIGHT)
    want = sorted((s[0].start, s[1].start, s[0].stop - 1, s[1].stop - 1)
                  for s in scipy.ndimage.find_objects(labels))
    boxes = np.asarray(chestxray.region_boxes(jax.numpy.asarray(binary)))
    got = sorted(tuple(int(v) for v in b) for b in boxes if b[0] <= b[2])
    assert got == want and count == len(want) > 0


def test_t_iobb_is_wang_et_als_detected_box_rule():
  maps, gt = _maps()
  want = []
  for m, g in zip(maps, gt, strict=True):
    best = 0.0
    for t in (60, 180):
      labels, _ = scipy.ndimage.label(_uint8(m) >= t, structure=EIGHT)
      for s in scipy.ndimage.find_objects(labels):
        best = max(best, g[s].sum() / g[s].size)  # intersection over the detected box
    want.append(best)
  np.testing.assert_allclose(chestxray.best_iobb(maps, gt), want, rtol=1e-6)
  got = chestxray.t_iobb(maps, gt, levels=(0.1, 0.25, 0.5))
  for level, hits in got.items():
    np.testing.assert_array_equal(hits, (np.array(want) > level).astype(np.float32))
  # A flat map detects nothing: a miss that counts (Wang et al.), not a NaN left out.
  flat = chestxray.t_iobb(np.ones((1, 8, 8)), np.ones((1, 8, 8), bool), levels=(0.1,))
  assert float(flat[0.1][0]) == 0.0


def test_otsu_threshold_equals_scikit_image():
  skimage_filters = pytest.importorskip("skimage.filters")
  # Seeds 103 and 125 hold near-ties that float32 sums resolve to a neighbouring level.
  maps = np.concatenate([_maps(n=8, seed=seed)[0] for seed in (0, 103, 125)])
  u8 = np.stack([_uint8(m) for m in maps])
  assert (u8.min((1, 2)) == 0).all() and (u8.max((1, 2)) >= 254).all()  # 255*m rounds first
  want = [float(skimage_filters.threshold_otsu(u)) for u in u8]
  np.testing.assert_array_equal(jax.jit(chestxray.otsu_threshold)(u8), want)
  np.testing.assert_array_equal(jax.vmap(chestxray.otsu_threshold)(u8), want)
  flat = np.full((5, 6), 7, np.uint8)
  assert float(chestxray.otsu_threshold(flat)) == skimage_filters.threshold_otsu(flat)


def test_otsu_iou_and_hit_rate_are_chexlocalizes():
  skimage_filters = pytest.importorskip("skimage.filters")
  maps, gt = _maps()
  want_iou, want_hit = [], []
  for m, g in zip(maps, gt, strict=True):
    u8 = _uint8(m)
    region = u8 > skimage_filters.threshold_otsu(u8)
    want_iou.append((region & g).sum() / (region | g).sum())
    x, y = np.unravel_index(np.argmax(m), m.shape)  # their hit rate: argmax in the mask
    want_hit.append(float(g[x, y]))
  np.testing.assert_allclose(chestxray.otsu_iou(maps, gt), want_iou, rtol=1e-6)
  np.testing.assert_array_equal(chestxray.hit(maps, gt), want_hit)
  assert want_hit == [1.0, 0.0] * 3 and 0 < np.mean(want_iou) < 1  # the cases differ
  assert np.isnan(chestxray.otsu_iou(np.zeros((1, 8, 8)), np.ones((1, 8, 8), bool))[0])
