"""Saliency baselines and localization metrics, on hand-made cases with known answers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from cejax import checkpoint, metrics, saliency
from cejax.models import densenet

H = W = 8


def _box(y0, y1, x0, x1, n=1):
  b = np.zeros((n, H, W), bool)
  b[:, y0:y1, x0:x1] = True
  return b


def test_pointing_game_hits_misses_and_ties():
  box = _box(2, 5, 2, 5)
  peak_in = np.zeros((1, H, W)); peak_in[0, 3, 3] = 1
  peak_out = np.zeros((1, H, W)); peak_out[0, 7, 7] = 1
  flat = np.ones((1, H, W))
  tie_split = np.zeros((1, H, W)); tie_split[0, 3, 3] = tie_split[0, 7, 7] = 1
  tie_even = np.zeros((1, H, W)); tie_even[0, 2:5, 4:6] = 1  # column 4 in, 5 out: 3 and 3
  maps = np.concatenate([peak_in, peak_out, flat, tie_split, tie_even])
  boxes = np.repeat(box, 5, 0)
  np.testing.assert_array_equal(metrics.pointing_game(maps, boxes),
                                [True, False, False, False, False])
  # A peak block with 4 of 6 pixels inside is a majority hit but not a strict one.
  block = np.zeros((1, H, W)); block[0, 3:5, 3:6] = 1  # columns 3, 4 in; 5 out
  assert bool(metrics.pointing_game(block, box)[0])
  assert not bool(metrics.pointing_game(block, box, ties="strict")[0])
  with pytest.raises(ValueError, match=r"\(n, h, w\)"):
    metrics.pointing_game(np.zeros((H, W)), box)


def test_mass_iou_and_localization_accuracy():
  box = _box(0, 4, 0, 4)  # 16 pixels
  m = np.zeros((1, H, W)); m[0, 0:4, 0:4] = 1.0; m[0, 7, 7] = 3.0; m[0, 6, 6] = -5
  np.testing.assert_allclose(metrics.mass_in_box(m, box), [16 / 19])
  region = np.zeros((1, H, W)); region[0, 0:4, 0:2] = 1  # 8 pixels, all inside
  np.testing.assert_allclose(metrics.iou(region, box), [0.5])
  np.testing.assert_allclose(metrics.iou(np.ones((1, H, W)), box), [0.0])  # flat map
  acc = metrics.localization_accuracy(np.array([0.05, 0.35, 0.65, 0.9]))
  np.testing.assert_allclose(acc, [0.75, 0.75, 0.75, 0.5, 0.5, 0.5, 0.25])


def test_spearman_and_roc_helpers():
  a = np.arange(16.0).reshape(1, 4, 4)
  np.testing.assert_allclose(metrics.spearman(a, a ** 3), [1.0], atol=1e-6)
  np.testing.assert_allclose(metrics.spearman(a, -a), [-1.0], atol=1e-6)
  scores = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4])
  labels = np.array([1, 1, 0, 1, 0, 0])
  fpr, tpr = metrics.roc_curve(scores, labels)
  np.testing.assert_allclose(fpr, [0, 0, 0, 1 / 3, 1 / 3, 2 / 3, 1])
  np.testing.assert_allclose(tpr, [0, 1 / 3, 2 / 3, 2 / 3, 1, 1, 1])
  assert metrics.tpr_at_fpr(scores, labels, fpr=0.05) == pytest.approx(2 / 3)
  assert metrics.auroc(scores, labels) == pytest.approx(np.trapezoid(tpr, fpr))
  mean, lo, hi = metrics.bootstrap_interval(np.r_[np.zeros(50), np.ones(50)])
  assert mean == 0.5 and 0.35 < lo < 0.5 < hi < 0.65


def _linear_model(k=3, c=2, seed=0):
  w = jax.random.normal(jax.random.key(seed), (H * W * c, k))
  return lambda x: x.reshape(len(x), -1) @ w, w


def test_deletion_insertion_on_a_linear_model():
  # One class's logit is the sum of pixels; the other's is 0. Deleting the largest
  # pixels first (fill 0) must give a lower deletion AUC than deleting the smallest.
  logits_fn = lambda x: jnp.stack([x.sum((1, 2, 3)), jnp.zeros(len(x))], 1)
  image = jnp.linspace(0, 1, H * W).reshape(1, H, W, 1) * 0.2
  good, bad = image[..., 0], -image[..., 0]
  d, i = metrics.deletion_insertion(logits_fn, jnp.concatenate([image, image]),
                                    jnp.concatenate([good, bad]), jnp.array([0, 0]),
                                    steps=8)
  assert d[0] < d[1] and i[0] > i[1]
  # Full-image endpoints: step 0 of deletion and the last of insertion are the clean
  # probability; the curves are monotone for this model.
  assert 0 < float(d[0]) < float(i[0]) < 1


def test_integrated_gradients_completeness_and_gradient_closed_forms():
  logits_fn, w = _linear_model()
  x = jax.random.normal(jax.random.key(1), (2, H, W, 2))
  t = jnp.array([0, 2])
  grads = saliency.input_gradient(logits_fn, x, t)
  expect = w[:, t].T.reshape(2, H, W, 2)
  np.testing.assert_allclose(grads, expect, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(saliency.gradient_x_input(logits_fn, x, t),
                             (x * expect).sum(-1), rtol=1e-5, atol=1e-5)
  # Completeness on a non-linear model: the trained-size tiny DenseNet.
  model = densenet.create_densenet("tiny", num_classes=3, in_channels=1, rngs=nnx.Rngs(0))
  model.eval()
  g, p, s = nnx.split(model, nnx.Param, nnx.BatchStat)
  f = checkpoint.make_logits_fn(g, nnx.to_pure_dict(p), nnx.to_pure_dict(s))
  x = jax.random.normal(jax.random.key(2), (2, 32, 32, 1))
  t = jnp.array([1, 2])
  ig = saliency.integrated_gradients(f, x, t, steps=256)
  gap = jnp.take_along_axis(f(x) - f(jnp.zeros_like(x)), t[:, None], 1)[:, 0]
  np.testing.assert_allclose(ig.sum((1, 2)), gap, rtol=1e-2, atol=1e-3)


def test_cam_and_grad_cam_match_hand_computation():
  # Feature map = the image itself (4x4, 3 channels); head = GAP + linear.
  wc = jnp.array([[1.0, -2.0], [0.5, 1.0], [-1.0, 0.3]])  # (C=3, k=2)
  features_fn = lambda x: x
  classify_fn = lambda a: a.mean((1, 2)) @ wc + jnp.array([0.1, -0.2])
  x = jax.random.normal(jax.random.key(0), (1, 4, 4, 3))
  t = jnp.array([1])
  hand_cam = (x[0] * wc[:, 1]).sum(-1)  # sum_c W[c, t] A_c
  np.testing.assert_allclose(saliency.cam(features_fn, classify_fn, x, t)[0], hand_cam,
                             rtol=1e-5, atol=1e-5)
  # Grad-CAM: alpha_c = mean gradient = W[c, t] / 16, then ReLU.
  hand_grad_cam = jax.nn.relu((x[0] * wc[:, 1] / 16).sum(-1))
  np.testing.assert_allclose(saliency.grad_cam(features_fn, classify_fn, x, t)[0],
                             hand_grad_cam, rtol=1e-5, atol=1e-6)
  pp = saliency.grad_cam_pp(features_fn, classify_fn, x, t)
  assert pp.shape == (1, 4, 4) and bool(jnp.all(pp >= 0))


def test_maps_on_tiny_densenet_have_image_shape_and_are_deterministic():
  model = densenet.create_densenet("tiny", num_classes=3, in_channels=1, rngs=nnx.Rngs(0))
  model.eval()
  g, p, s = nnx.split(model, nnx.Param, nnx.BatchStat)
  p, s = nnx.to_pure_dict(p), nnx.to_pure_dict(s)
  f = checkpoint.make_logits_fn(g, p, s)
  features_fn, classify_fn = checkpoint.make_cam_fns(g, p, s)
  np.testing.assert_allclose(classify_fn(features_fn(jnp.ones((1, 32, 32, 1)))),
                             f(jnp.ones((1, 32, 32, 1))), rtol=1e-5)
  x = jax.random.normal(jax.random.key(3), (2, 32, 32, 1))
  t = jnp.array([0, 1])
  key = jax.random.key(4)
  outs = {
      "smoothgrad": saliency.smoothgrad(f, x, t, key=key, num_samples=4),
      "sgcampp": saliency.smooth_grad_cam_pp(features_fn, classify_fn, x, t, key=key,
                                             num_samples=4),
      "rise": saliency.rise(f, x, t, key=key, num_masks=50, cells=4, batch_size=16),
      "occlusion": saliency.occlusion(f, x, t, window=8, stride=4),
  }
  for name, m in outs.items():
    assert m.shape == (2, 32, 32), name
    assert bool(jnp.isfinite(m).all()), name
  np.testing.assert_array_equal(outs["rise"],
                                saliency.rise(f, x, t, key=key, num_masks=50, cells=4,
                                              batch_size=16))
  with pytest.raises(ValueError, match="targets must have shape"):
    saliency.vanilla_gradient(f, x, jnp.array([0]))
