"""Metrics against references nobody here wrote: scipy, scikit-learn, Quantus, and
Petsiuk et al.'s deletion/insertion procedure (their ``CausalMetric``) in PyTorch."""

import jax
import numpy as np
import pytest
import scipy.ndimage
import scipy.stats

from cejax import filters, metrics

RNG = np.random.default_rng(0)


def _boxes(n, h, w, rng):
  b = np.zeros((n, h, w), bool)
  for i in range(n):
    y, x = rng.integers(0, h - 4), rng.integers(0, w - 4)
    b[i, y:y + rng.integers(2, 5), x:x + rng.integers(2, 5)] = True
  return b


def test_spearman_equals_scipy_with_ties_and_is_nan_for_constant_maps():
  a = RNG.integers(0, 4, (6, 9, 7)).astype(np.float32)  # heavily tied, like grid maps
  b = RNG.integers(0, 3, (6, 9, 7)).astype(np.float32)
  b[0] = a[0] * 2 + 1
  ref = [scipy.stats.spearmanr(a[i].ravel(), b[i].ravel()).statistic for i in range(6)]
  np.testing.assert_allclose(metrics.spearman(a, b), ref, rtol=1e-5, atol=1e-6)
  # A tied block structure correlated with position only: position must not leak in.
  blocky = np.repeat(np.repeat(RNG.normal(size=(1, 3, 3)), 3, 1), 3, 2)
  flat_blocks = np.repeat(np.repeat(np.zeros((1, 3, 3)), 3, 1), 3, 2)
  flat_blocks[0, :3, :3] = 1
  ref = scipy.stats.spearmanr(blocky.ravel(), flat_blocks.ravel()).statistic
  np.testing.assert_allclose(metrics.spearman(blocky, flat_blocks), [ref], rtol=1e-5)
  with np.errstate(invalid="ignore"):
    assert np.isnan(scipy.stats.spearmanr(np.ones(9), np.arange(9.0)).statistic)
  assert np.isnan(np.asarray(metrics.spearman(np.ones((1, 3, 3)), blocky[:, :3, :3]))).all()


def test_pointing_game_without_tolerance_and_any_tie_equals_quantus():
  quantus = pytest.importorskip("quantus")
  maps = RNG.integers(0, 3, (40, 10, 10)).astype(np.float32)  # many tied maxima
  maps[0] = 1.0  # flat
  boxes = _boxes(40, 10, 10, RNG)
  ref = quantus.PointingGame(disable_warnings=True).evaluate_batch(a_batch=maps,
                                                                    s_batch=boxes)
  ours = np.asarray(metrics.pointing_game(maps, boxes, tolerance=0, ties="any"))
  # Documented difference: a flat map is a miss here; Quantus counts any pixel of it.
  assert ref[0] and not ours[0]
  np.testing.assert_array_equal(ours[1:], np.asarray(ref[1:], bool))


@pytest.mark.parametrize("tolerance", [0.0, 1.0, 2.5, 15 * 32 / 224, 6.0])
def test_standard_pointing_game_equals_argmax_within_tolerance(tolerance):
  """TorchRay's rule: the first argmax hits when its distance to the box (scipy's exact
  Euclidean distance transform) is below the tolerance."""
  maps = RNG.normal(size=(60, 32, 32)).astype(np.float32)
  maps[:10] = np.round(maps[:10])  # ties: the first maximum in row-major order counts
  boxes = _boxes(60, 32, 32, RNG)
  ref = []
  for m, b in zip(maps, boxes, strict=True):
    point = np.unravel_index(np.argmax(m), m.shape)
    dist = scipy.ndimage.distance_transform_edt(~b)[point]
    ref.append(dist == 0 or dist < tolerance)
  np.testing.assert_array_equal(metrics.pointing_game(maps, boxes, tolerance=tolerance), ref)


def test_pointing_game_default_tolerance_is_zhangs_15px_at_224():
  assert metrics.pointing_tolerance((224, 224)) == 15.0
  assert metrics.pointing_tolerance((64, 80)) == pytest.approx(15 * 64 / 224)
  box = np.zeros((1, 64, 64), bool)
  box[0, 20:30, 20:30] = True
  near, far = np.zeros((2, 64, 64), np.float32)
  near[33, 25] = 1.0  # 4 px below the box: within 4.29 px
  far[35, 25] = 1.0  # 6 px: outside
  hits = metrics.pointing_game(np.stack([near, far]), np.repeat(box, 2, 0))
  np.testing.assert_array_equal(hits, [True, False])
  # The documented tie rules on a peak block with 4 of 6 pixels inside the box.
  block = np.zeros((1, 64, 64), np.float32)
  block[0, 28:30, 28:31] = 1.0
  block[0, 28:30, 31:34] = 0.5
  box2 = np.zeros((1, 64, 64), bool)
  box2[0, 20:30, 20:30] = True
  block[0, 28:30, 30] = 1.0  # the peak: columns 28, 29 inside, 30 outside
  for ties, hit in (("first", True), ("any", True), ("majority", True), ("strict", False)):
    assert bool(metrics.pointing_game(block, box2, tolerance=0, ties=ties)[0]) == hit, ties
  with pytest.raises(ValueError, match="ties must be one of"):
    metrics.pointing_game(block, box2, ties="median")
  with pytest.raises(ValueError, match=r"\(n, h, w\)"):
    metrics.pointing_game(block[0], box2)


def test_mass_in_box_is_quantus_relevance_mass_of_the_positive_part():
  quantus = pytest.importorskip("quantus")
  maps = RNG.normal(size=(20, 12, 12)).astype(np.float32)
  boxes = _boxes(20, 12, 12, RNG)
  ref = quantus.RelevanceMassAccuracy(disable_warnings=True).evaluate_batch(
      a_batch=np.maximum(maps, 0), s_batch=boxes)
  # Documented: we take the positive part first (Quantus would use signed values).
  np.testing.assert_allclose(metrics.mass_in_box(maps, boxes), ref, rtol=1e-5)


def test_iou_and_localization_accuracy_by_hand():
  maps = RNG.normal(size=(15, 10, 10)).astype(np.float32)
  maps[0] = 3.0  # flat: no region
  boxes = _boxes(15, 10, 10, RNG)
  ref = []
  for m, b in zip(maps, boxes, strict=True):
    if m.max() == m.min():
      ref.append(0.0)
      continue
    region = (m - m.min()) / (m.max() - m.min()) >= 0.5
    ref.append((region & b).sum() / (region | b).sum())
  np.testing.assert_allclose(metrics.iou(maps, boxes), ref, rtol=1e-6)
  acc = metrics.localization_accuracy(np.array([0.05, 0.35, 0.65, 0.9]))
  np.testing.assert_allclose(acc, [0.75, 0.75, 0.75, 0.5, 0.5, 0.5, 0.25])


def test_roc_helpers_equal_scikit_learn():
  sklearn_metrics = pytest.importorskip("sklearn.metrics")
  scores = np.round(RNG.normal(size=300), 1)  # ties
  labels = (RNG.random(300) < 0.3 + 0.3 * (scores > 0)).astype(int)
  assert metrics.auroc(scores, labels) == pytest.approx(
      sklearn_metrics.roc_auc_score(labels, scores), abs=1e-12)
  fpr, tpr, _ = sklearn_metrics.roc_curve(labels, scores, drop_intermediate=False)
  ours_fpr, ours_tpr = metrics.roc_curve(scores, labels)
  np.testing.assert_allclose(ours_fpr, fpr)
  np.testing.assert_allclose(ours_tpr, tpr)
  for at in (0.01, 0.05, 0.2):
    assert metrics.tpr_at_fpr(scores, labels, fpr=at) == pytest.approx(tpr[fpr <= at].max())
  assert np.isnan(metrics.auroc(scores, np.ones(300)))


def test_bootstrap_interval_equals_scipy_percentile_bootstrap():
  values = RNG.normal(1.0, 2.0, 400)
  mean, lo, hi = metrics.bootstrap_interval(values, num=10_000)
  ref = scipy.stats.bootstrap((values,), np.mean, method="percentile", n_resamples=10_000,
                              random_state=1).confidence_interval
  assert mean == pytest.approx(values.mean())
  # Two Monte Carlo estimates of the same quantiles: they agree to a few thousandths
  # of the interval, and both match the normal approximation 1.96 s / sqrt(n).
  assert lo == pytest.approx(ref.low, abs=0.02) and hi == pytest.approx(ref.high, abs=0.02)
  half = 1.96 * values.std(ddof=1) / np.sqrt(len(values))
  assert lo == pytest.approx(mean - half, abs=0.03) and hi == pytest.approx(mean + half,
                                                                           abs=0.03)
  assert np.isnan(metrics.bootstrap_interval([np.nan])[0])


def test_bootstrap_is_the_percentile_interval_on_skewed_data():
  """On skewed data the percentile and basic intervals differ by several times their
  Monte Carlo error: ours must be the percentile one (the symmetric test above could
  not tell them apart)."""
  values = np.random.default_rng(7).lognormal(0.0, 1.5, 60)
  mean, lo, hi = metrics.bootstrap_interval(values, num=20_000)
  kw = dict(n_resamples=20_000, random_state=1)
  pct = scipy.stats.bootstrap((values,), np.mean, method="percentile",
                              **kw).confidence_interval
  basic = scipy.stats.bootstrap((values,), np.mean, method="basic", **kw).confidence_interval
  gap = min(abs(pct.low - basic.low), abs(pct.high - basic.high))
  assert gap > 0.1  # skewed enough to tell them apart
  assert abs(lo - pct.low) < gap / 4 and abs(hi - pct.high) < gap / 4
  assert abs(lo - basic.low) > gap / 2 and abs(hi - basic.high) > gap / 2


def _petsiuk_causal_metric(model, image_nchw, explanation, *, mode, step, substrate_fn,
                           argsort=np.argsort):
  """Petsiuk et al.'s ``CausalMetric.single_run`` (RISE repository, evaluation.py),
  transcribed: pixels in decreasing saliency, ``step`` at a time, class = prediction.
  ``argsort``: their ``np.argsort`` (numpy's default sort), or another to try."""
  torch = pytest.importorskip("torch")
  n_ch, hw = image_nchw.shape[1], image_nchw.shape[2] * image_nchw.shape[3]
  c = int(torch.argmax(model(image_nchw), 1)[0])
  n_steps = (hw + step - 1) // step
  if mode == "del":
    start, finish = image_nchw.clone(), substrate_fn(image_nchw)
  else:
    start, finish = substrate_fn(image_nchw), image_nchw.clone()
  scores = np.empty(n_steps + 1)
  order = np.flip(argsort(explanation.reshape(-1, hw), axis=1), axis=-1)
  for i in range(n_steps + 1):
    scores[i] = float(model(start)[0, c])
    if i < n_steps:
      coords = order[:, step * i:step * (i + 1)]
      s = start.numpy().reshape(1, n_ch, hw)
      s[0, :, coords] = finish.numpy().reshape(1, n_ch, hw)[0, :, coords]
      start = torch.tensor(s.reshape(start.shape))
  return (scores.sum() - scores[0] / 2 - scores[-1] / 2) / (len(scores) - 1), c


def test_deletion_insertion_equal_petsiuks_causal_metric():
  """Their step rule (one image row a step), their class (the prediction) and their
  order: identical on maps without ties; on maps with ties (2 x 2 blocks) identical to
  their code with a stable sort, and our tie rule is exactly "later pixel first" (their
  own code on the map with its ties broken that way gives our numbers)."""
  torch = pytest.importorskip("torch")
  h, w, ch, k = 8, 8, 2, 3
  weights = RNG.normal(0, 0.5, (h * w * ch, k)).astype(np.float32)
  logits_fn = lambda x: x.reshape(len(x), -1) @ weights

  def torch_model(x_nchw):  # the same linear model + softmax, on NCHW
    x = x_nchw.permute(0, 2, 3, 1).reshape(len(x_nchw), -1).double()
    return torch.softmax(x @ torch.tensor(weights, dtype=torch.float64), 1)

  kern = np.zeros((ch, ch, 11, 11))
  for i in range(ch):
    kern[i, i] = filters.petsiuk_kernel(11, 5.0)
  blur = lambda x: torch.nn.functional.conv2d(x.double(), torch.tensor(kern), padding=5)
  images = RNG.normal(size=(3, h, w, ch)).astype(np.float32)
  untied = RNG.normal(size=(3, h, w)).astype(np.float32)
  blocks = np.repeat(np.repeat(RNG.integers(0, 5, (3, h // 2, w // 2)), 2, 1), 2, 2)
  blocks = blocks.astype(np.float32)
  # The same order as ``blocks`` under "ties: later pixel first", without ties.
  broken = blocks + np.arange(h * w).reshape(h, w)[None] * 1e-3 / (h * w)
  stable = lambda a, axis: np.argsort(a, axis=axis, kind="stable")  # noqa: E731

  def theirs(maps, argsort, step):
    refs = {"deletion_zero": [], "deletion_blur": [], "insertion_blur": []}
    targets = []
    for x, m in zip(images, maps, strict=True):
      x_nchw = torch.tensor(x.transpose(2, 0, 1)[None], dtype=torch.float64)
      for name, mode, sub in (("deletion_zero", "del", torch.zeros_like),
                              ("deletion_blur", "del", blur),
                              ("insertion_blur", "ins", blur)):
        auc, c = _petsiuk_causal_metric(torch_model, x_nchw, m, mode=mode, step=step,
                                        substrate_fn=sub, argsort=argsort)
        refs[name].append(auc)
      targets.append(c)
    return refs, np.array(targets)

  for maps, ref_maps, argsort, step in ((untied, untied, np.argsort, None),
                                        (untied, untied, np.argsort, 20),
                                        (blocks, blocks, stable, None),
                                        (blocks, broken, np.argsort, None)):
    refs, targets = theirs(ref_maps, argsort, w if step is None else step)
    ours = metrics.deletion_insertion(logits_fn, images, maps, targets, step=step)
    for name, ref in refs.items():
      np.testing.assert_allclose(ours[name], ref, rtol=1e-5, atol=1e-6, err_msg=name)
  # What the old order (ties by position, first pixel first) gave on the block maps.
  first_first = lambda a, axis: np.flip(np.argsort(-a, axis=axis, kind="stable"), axis)  # noqa: E731
  old, targets = theirs(blocks, first_first, w)
  ours = metrics.deletion_insertion(logits_fn, images, blocks, targets)
  assert not np.allclose(ours["deletion_zero"], old["deletion_zero"], rtol=1e-3)
  with pytest.raises(ValueError, match="Unknown activation"):
    metrics.deletion_insertion(logits_fn, images, untied, targets, activation="softmx")
  with pytest.raises(ValueError, match="Unknown curve"):
    metrics.deletion_insertion(logits_fn, images, untied, targets,
                               curves=("deletion_noise",))


def test_substrates_are_the_documented_fills():
  x = jax.random.normal(jax.random.key(0), (2, 9, 7, 3))
  np.testing.assert_array_equal(metrics.substrate(x, "zero"), np.zeros(x.shape))
  np.testing.assert_allclose(metrics.substrate(x, "blur"), filters.petsiuk_blur(x))
  with pytest.raises(ValueError, match="Unknown substrate"):
    metrics.substrate(x, "noise")


def test_paired_auroc_interval_resamples_images_with_their_pair():
  from cejax.jobs import evaluators

  separated = np.r_[np.zeros(50), np.ones(50)]
  assert evaluators.paired_auroc_interval(separated) == (1.0, 1.0)
  noise = RNG.normal(size=400)
  lo, hi = evaluators.paired_auroc_interval(noise)
  assert lo < metrics.auroc(noise, np.r_[np.zeros(200), np.ones(200)]) < hi
  # Hanley & McNeil's standard error at AUROC 0.5 with 200 + 200 scores is 0.029, so the
  # 95 % interval is about 0.113 wide.
  assert 0.09 < hi - lo < 0.14
