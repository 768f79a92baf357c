"""Saliency baselines against references nobody here wrote: Captum on the same network
in PyTorch (imported with ``cejax.convert``), scikit-image for RISE's masks, and the
papers' formulas written out in numpy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cejax import masks, saliency
from cejax.jobs import checkpoint, convert

torch = pytest.importorskip("torch")
captum_attr = pytest.importorskip("captum.attr")
from compile_count import Compilations  # noqa: E402
from torch_densenet import tiny  # noqa: E402

SIZE, CLASSES = 32, 5


class _WithReLU(torch.nn.Module):
  """The DenseNet with its final ReLU as a module, so Captum can hook the feature map."""

  def __init__(self, net):
    super().__init__()
    self.net, self.relu = net, torch.nn.ReLU()

  def forward(self, x):
    h = self.relu(self.net.features(x))
    return self.net.classifier(torch.flatten(torch.nn.functional.adaptive_avg_pool2d(h, 1), 1))


@pytest.fixture(scope="module")
def pair():
  """The same random tiny DenseNet in PyTorch and, imported, in JAX; images and targets."""
  # Two blocks of two layers (the smoke runs' network): every method compiles it in.
  net = tiny(seed=3, classes=CLASSES, in_channels=1, blocks=(2, 2))
  graphdef, params, stats, _ = convert.import_densenet(net.state_dict())
  logits_fn = checkpoint.make_logits_fn(graphdef, params, stats)
  features_fn, classify_fn = checkpoint.make_cam_fns(graphdef, params, stats)
  x = np.asarray(jax.random.normal(jax.random.key(0), (3, SIZE, SIZE, 1)), np.float32)
  targets = np.array([0, 3, 4])
  return _WithReLU(net).eval(), logits_fn, features_fn, classify_fn, x, targets


def _nchw(x):
  return torch.tensor(np.asarray(x).transpose(0, 3, 1, 2)).requires_grad_(True)


def _hw(attr):
  return attr.detach().numpy().transpose(0, 2, 3, 1)  # NCHW -> NHWC


def test_gradient_methods_equal_captum(pair):
  torch_model, logits_fn, _, _, x, t = pair
  target = torch.tensor(t)
  ref = _hw(captum_attr.Saliency(torch_model).attribute(_nchw(x), target=target, abs=True))
  np.testing.assert_allclose(saliency.vanilla_gradient(logits_fn, x, t), ref.max(-1),
                             rtol=1e-4, atol=1e-6)
  ref = _hw(captum_attr.InputXGradient(torch_model).attribute(_nchw(x), target=target))
  np.testing.assert_allclose(saliency.gradient_x_input(logits_fn, x, t), ref.sum(-1),
                             rtol=1e-4, atol=1e-6)
  ig = captum_attr.IntegratedGradients(torch_model)
  ref = _hw(ig.attribute(_nchw(x), baselines=0.0, target=target))  # Captum's defaults
  np.testing.assert_allclose(saliency.integrated_gradients(logits_fn, x, t), ref.sum(-1),
                             rtol=1e-3, atol=1e-5)
  ref = _hw(ig.attribute(_nchw(x), baselines=0.0, target=target, n_steps=16,
                         method="riemann_middle"))
  np.testing.assert_allclose(saliency.integrated_gradients(
      logits_fn, x, t, steps=16, method="riemann_middle"), ref.sum(-1), rtol=1e-3, atol=1e-5)


def test_smoothgrad_is_the_noise_tunnel_mean_of_captum_saliency(pair):
  torch_model, logits_fn, _, _, x, t = pair
  key, n, sigma = jax.random.key(7), 6, 0.15
  ours = saliency.smoothgrad(logits_fn, x, t, key=key, num_samples=n, sigma=sigma)
  # The documented noise, then NoiseTunnel's averaging of |gradient| as a loop.
  spread = x.max((1, 2, 3)) - x.min((1, 2, 3))
  noise = np.asarray(jax.random.normal(key, (n,) + x.shape))
  sal = captum_attr.Saliency(torch_model)
  ref = np.mean([_hw(sal.attribute(_nchw(x + sigma * spread[:, None, None, None] * e),
                                   target=torch.tensor(t), abs=True)) for e in noise], 0)
  np.testing.assert_allclose(ours, ref.max(-1), rtol=1e-4, atol=1e-6)


def test_grad_cam_equals_captum_layer_grad_cam(pair):
  torch_model, _, features_fn, classify_fn, x, t = pair
  cam = captum_attr.LayerGradCam(torch_model, torch_model.relu)
  attr = cam.attribute(_nchw(x), target=torch.tensor(t), relu_attributions=True)
  ref = captum_attr.LayerAttribution.interpolate(attr, (SIZE, SIZE), "bilinear")
  np.testing.assert_allclose(saliency.grad_cam(features_fn, classify_fn, x, t),
                             _hw(ref)[..., 0], rtol=1e-4, atol=1e-6)


def test_occlusion_equals_captum_including_a_truncated_last_window(pair):
  torch_model, logits_fn, _, _, x, t = pair
  probs = lambda inp: torch.softmax(torch_model(inp), -1)
  # (32 - 7) % 5 == 0 and (32 - 6) % 4 == 2: the second leaves a cut last window.
  for window, stride in ((7, 5), (6, 4)):
    ref = captum_attr.Occlusion(probs).attribute(
        _nchw(x), target=torch.tensor(t), sliding_window_shapes=(1, window, window),
        strides=(1, stride, stride), baselines=0)
    ours = saliency.occlusion(logits_fn, x, t, window=window, stride=stride)
    np.testing.assert_allclose(ours, _hw(ref)[..., 0], rtol=1e-4, atol=2e-6)
  with pytest.raises(ValueError, match="larger than window"):
    saliency.occlusion(logits_fn, x, t, window=4, stride=5)


def _linear_softmax(seed, *, h=12, w=10, c=2, k=3):
  """A linear softmax model and two images: ``(logits_fn, weights, x)``."""
  rng = np.random.default_rng(seed)
  weights = rng.normal(size=(h * w * c, k)).astype(np.float32)
  x = rng.normal(size=(2, h, w, c)).astype(np.float32)
  return (lambda im: im.reshape(len(im), -1) @ weights), weights, x


def _kept_target_probs(image, kept, weights, target):
  """Numpy (float64): the target's softmax probability of ``image * kept_i``, ``(n,)``."""
  z = (image[None] * kept[..., None]).reshape(len(kept), -1) @ weights.astype(np.float64)
  prob = np.exp(z - z.max(1, keepdims=True))
  return (prob / prob.sum(1, keepdims=True))[:, target]


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_rise_is_petsiuks_formula(p):
  """``S = sum_i f_t(I * M_i) M_i / (N p)``, in numpy from the materialised kept masks,
  on a linear softmax model, at Petsiuk's released p = 0.1 and at 0.5 (where a swapped
  p / 1 - p could not be seen)."""
  logits_fn, weights, x = _linear_softmax(0)
  h, w = x.shape[1:3]
  t = np.array([2, 0])
  key, n = jax.random.key(3), 37
  ours = saliency.rise(logits_fn, x, t, key=key, num_masks=n, cells=3, p=p, batch_size=8)
  kept = 1.0 - np.asarray(masks.rise(key, num=n, shape=(h, w), cells=3, p=p)(
      jnp.arange(n)), np.float64)
  for i in range(2):
    ref = np.tensordot(_kept_target_probs(x[i], kept, weights, t[i]), kept, 1) / (n * p)
    np.testing.assert_allclose(ours[i], ref, rtol=1e-5, atol=1e-6)


def test_adaptive_rise_stops_by_its_rule_and_equals_fixed_count_rise():
  """Tolerance 0: all masks, the fixed-count RISE map. A looser tolerance stops at the
  first check N (8, 16, 32, ... masks) whose map moved by at most the tolerance from the
  map of N/2 (checked in numpy from the materialised masks, norm and rank rules), with
  the fixed-count map of the masks it used, whatever the batch size."""
  from scipy.stats import spearmanr

  logits_fn, weights, x = _linear_softmax(1, c=1)
  h, w = x.shape[1:3]
  t = np.array([1, 2])
  key, n = jax.random.key(5), 60
  maps, used = saliency.adaptive_rise(logits_fn, x, t, key=key, tolerance=0.0, max_masks=n,
                                      first=8, cells=3, p=0.5, batch_size=8)
  np.testing.assert_array_equal(used, [n, n])
  fixed = saliency.rise(logits_fn, x, t, key=key, num_masks=n, cells=3, p=0.5,
                        batch_size=8)
  np.testing.assert_allclose(maps, fixed, rtol=1e-5, atol=1e-7)
  kept = 1.0 - np.asarray(masks.to_array(masks.rise(key, num=n, shape=(h, w), cells=3)),
                          np.float64)
  for i in range(2):  # and Petsiuk's formula over all n masks, in numpy
    full = np.tensordot(_kept_target_probs(x[i], kept, weights, t[i]), kept, 1) / (n * 0.5)
    np.testing.assert_allclose(maps[i], full, rtol=1e-5, atol=1e-6)
  checks = [8, 16, 32, 60]
  for rule, tol in (("norm", 0.3), ("rank", 0.1)):
    # Batches that split a check's masks and that straddle checks (one rule is enough:
    # the chunking is the same code for both).
    runs = [saliency.adaptive_rise(logits_fn, x, t, key=key, tolerance=tol, rule=rule,
                                   first=8, max_masks=n, cells=3, p=0.5,
                                   batch_size=b)
            for b in ((8, 5, 13) if rule == "norm" else (8,))]
    for maps, used in runs[1:]:  # the batch size changes nothing
      np.testing.assert_array_equal(used, runs[0][1])
      np.testing.assert_allclose(maps, runs[0][0], rtol=1e-5, atol=1e-7)
    maps, used = runs[0]
    for i in range(2):
      prob = _kept_target_probs(x[i], kept, weights, t[i])
      at = {m: np.tensordot(prob[:m], kept[:m], 1) / (m * 0.5) for m in checks}
      change = {m: (np.linalg.norm(at[m] - at[prev]) / np.linalg.norm(at[m]) if rule == "norm"
                    else 1 - spearmanr(at[m].ravel(), at[prev].ravel()).statistic)
                for prev, m in zip(checks, checks[1:], strict=False)}
      stop = next((m for m in checks[1:] if change[m] <= tol), n)
      assert used[i] == stop, (rule, change, used)
      np.testing.assert_allclose(maps[i], at[stop], rtol=1e-4, atol=1e-6)
    assert min(np.asarray(used)) < n, (rule, used)  # the rule did stop somewhere early


def test_adaptive_rise_gives_nan_for_a_target_out_of_range_under_jit():
  """Found: under jit a target of 7 or -1 of a 3-class model returned class 2's map."""
  logits_fn, _, x = _linear_softmax(1, c=1)
  run = jax.jit(lambda t: saliency.adaptive_rise(logits_fn, x, t, key=jax.random.key(5),
                                                 tolerance=0.1, first=8, max_masks=16,
                                                 cells=3, batch_size=8)[0])
  good = np.asarray(run(jnp.array([1, 2])))
  assert np.isfinite(good).all()
  for bad in ([7, 2], [-1, 2]):
    out = np.asarray(run(jnp.array(bad)))
    assert np.isnan(out[0]).all() and np.isfinite(out[1]).all()
    np.testing.assert_allclose(out[1], good[1], rtol=1e-6)


@pytest.mark.parametrize("shape,cells", [((32, 32), 8), ((24, 17), 5), ((9, 9), 1)])
def test_rise_masks_equal_petsiuks_generator(shape, cells):
  """Petsiuk's code: ``resize(grid, (s + 1) * cell, order=1, mode='reflect')`` cropped at
  a shift in [0, cell) (scikit-image is the reference for the upsampling)."""
  resize = pytest.importorskip("skimage.transform").resize
  recipe = masks.rise(jax.random.key(1), num=40, shape=shape, cells=cells, p=0.5)
  idx = jnp.arange(40)
  grids, shifts = map(np.asarray, recipe.grids(idx))
  ours = np.asarray(recipe(idx))
  cell = np.ceil(np.array(shape) / cells).astype(int)
  assert ((shifts >= 0) & (shifts < cell)).all()
  for i in range(40):
    up = resize(grids[i], (cells + 1) * cell, order=1, mode="reflect", anti_aliasing=False)
    dy, dx = shifts[i]
    np.testing.assert_allclose(1 - ours[i], up[dy:dy + shape[0], dx:dx + shape[1]],
                               atol=1e-6)
  # Every shift value is drawn; the grids keep a cell with probability p (Bernoulli(p),
  # checked at p = 0.1 too, where keeping with 1 - p would show).
  many = np.asarray(recipe.grids(jnp.arange(2000))[1])
  for axis in (0, 1):
    assert set(np.unique(many[:, axis])) == set(range(cell[axis]))
  for p in (0.1, 0.5):
    kept = np.asarray(masks.rise(jax.random.key(2), num=2000, shape=shape, cells=cells,
                                 p=p).grids(jnp.arange(2000))[0])
    # The binomial standard error of 2000 * cells^2 cells, four times over.
    assert abs(float(kept.mean()) - p) < 4 * np.sqrt(p * (1 - p) / kept.size), p


def _quadratic_head(weights):
  """Score ``S_t = sum_k W[k, t] mean_ab A_abk^2``: its feature gradient depends on A."""
  classify_fn = lambda a: (a**2).mean((1, 2)) @ weights
  grad = lambda a, t: 2 * a * weights[:, t][None, None, :] / (a.shape[0] * a.shape[1])
  return classify_fn, grad


def _grad_cam_pp_numpy(a, d1, d2, d3):
  # Chattopadhay et al. (2018), eq. 19 with exp(S): alpha = d2 / (2 d2 + sum A d3).
  denom = 2 * d2 + a.sum((0, 1), keepdims=True) * d3
  alpha = np.where(denom != 0, d2 / np.where(denom != 0, denom, 1), 0)
  weights = (alpha * np.maximum(d1, 0)).sum((0, 1))
  return np.maximum((weights * a).sum(-1), 0)


def test_grad_cam_pp_and_smooth_grad_cam_pp_equal_the_papers_formulas():
  rng = np.random.default_rng(2)
  weights = rng.normal(size=(3, 2)).astype(np.float32)
  classify_fn, grad = _quadratic_head(weights)
  features_fn = lambda x: x  # the 6x6x3 "image" is the feature map
  x = rng.normal(size=(2, 6, 6, 3)).astype(np.float32)
  t = np.array([1, 0])
  pp = saliency.grad_cam_pp(features_fn, classify_fn, x, t)
  for i in range(2):
    g = grad(x[i].astype(np.float64), t[i])
    np.testing.assert_allclose(pp[i], _grad_cam_pp_numpy(x[i], g, g**2, g**3),
                               rtol=1e-4, atol=1e-6)
  # Omeiza et al.: average D1, D2, D3 over noisy inputs, apply to the clean activations.
  key, n, sigma = jax.random.key(5), 7, 0.2
  ours = saliency.smooth_grad_cam_pp(features_fn, classify_fn, x, t, key=key,
                                     num_samples=n, sigma=sigma)
  spread = x.max((1, 2, 3)) - x.min((1, 2, 3))
  noise = np.asarray(jax.random.normal(key, (n,) + x.shape), np.float64)
  for i in range(2):
    gs = np.stack([grad(x[i] + sigma * spread[i] * noise[j, i], t[i]) for j in range(n)])
    ref = _grad_cam_pp_numpy(x[i], gs.mean(0), (gs**2).mean(0), (gs**3).mean(0))
    np.testing.assert_allclose(ours[i], ref, rtol=1e-4, atol=1e-6)
    # Not the mean of Grad-CAM++ maps of noisy inputs (the method it replaced).
    naive = np.mean([_grad_cam_pp_numpy(x[i] + sigma * spread[i] * noise[j, i], g, g**2,
                                        g**3) for j, g in enumerate(gs)], 0)
    assert np.abs(naive - ref).max() > 1e-3


def test_grad_cam_pp_with_a_linear_head_is_closed_form():
  # GAP + linear head: dS/dA = W[k, t] / (h w) everywhere, so alpha_k = 1 / (2 + sum A_k
  # W[k, t] / (h w)) and the weight is h w alpha_k ReLU(W[k, t]) / (h w).
  wc = np.array([[1.0, -2.0], [0.5, 1.0], [-1.0, 0.3]], np.float32)
  x = np.abs(np.random.default_rng(0).normal(size=(1, 4, 4, 3))).astype(np.float32)
  ours = saliency.grad_cam_pp(lambda a: a, lambda a: a.mean((1, 2)) @ wc, x, np.array([1]))
  g = wc[:, 1] / 16
  alpha = g**2 / (2 * g**2 + x[0].sum((0, 1)) * g**3)
  ref = np.maximum((16 * alpha * np.maximum(g, 0) * x[0]).sum(-1), 0)
  np.testing.assert_allclose(ours[0], ref, rtol=1e-5, atol=1e-6)


def test_cam_and_grad_cam_match_hand_computation():
  # Feature map = the image itself (4x4, 3 channels); head = GAP + linear.
  wc = jnp.array([[1.0, -2.0], [0.5, 1.0], [-1.0, 0.3]])  # (C=3, k=2)
  classify_fn = lambda a: a.mean((1, 2)) @ wc + jnp.array([0.1, -0.2])
  x = jax.random.normal(jax.random.key(0), (1, 4, 4, 3))
  t = jnp.array([1])
  np.testing.assert_allclose(saliency.cam(lambda a: a, classify_fn, x, t)[0],
                             (x[0] * wc[:, 1]).sum(-1), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(saliency.grad_cam(lambda a: a, classify_fn, x, t)[0],
                             jax.nn.relu((x[0] * wc[:, 1] / 16).sum(-1)), rtol=1e-5, atol=1e-6)


def test_integrated_gradients_completeness_on_a_nonlinear_model(pair):
  _, logits_fn, _, _, x, t = pair
  x, t = x[:1], t[:1]  # completeness holds image by image: one is enough (and 3x cheaper)
  ig = saliency.integrated_gradients(logits_fn, x, t)  # Gauss-Legendre, 50 nodes
  gap = np.take_along_axis(np.asarray(logits_fn(x) - logits_fn(np.zeros_like(x))),
                           t[:, None], 1)[:, 0]
  np.testing.assert_allclose(ig.sum((1, 2)), gap, rtol=1e-2, atol=1e-3)


def test_bad_targets_raise_eagerly_and_give_nan_under_jit(pair):
  _, logits_fn, features_fn, classify_fn, x, _ = pair
  with pytest.raises(ValueError, match=r"class indices in \[0, 5\)"):
    saliency.vanilla_gradient(logits_fn, x, np.array([0, 1, 5]))
  with pytest.raises(ValueError, match="targets must have shape"):
    saliency.vanilla_gradient(logits_fn, x, np.array([0]))
  with pytest.raises(ValueError, match="floating point"):
    saliency.vanilla_gradient(logits_fn, x.astype(np.int32), np.array([0, 1, 2]))
  jitted = jax.jit(lambda t: saliency.grad_cam(features_fn, classify_fn, x, t))
  out = np.asarray(jitted(jnp.array([0, 7, 1])))
  assert np.isnan(out[1]).all() and np.isfinite(out[[0, 2]]).all()
  out = np.asarray(jax.jit(lambda t: saliency.occlusion(logits_fn, x, t, window=8,
                                                          stride=8))(jnp.array([0, 1, -1])))
  assert np.isnan(out[2]).all() and np.isfinite(out[:2]).all()


def test_repeated_eager_calls_compile_once(pair):
  _, logits_fn, features_fn, classify_fn, x, t = pair
  other = x + 1.0
  calls = [
      lambda im: saliency.vanilla_gradient(logits_fn, im, t),
      lambda im: saliency.smoothgrad(logits_fn, im, t, key=jax.random.key(0), num_samples=3),
      lambda im: saliency.integrated_gradients(logits_fn, im, t, steps=4),
      lambda im: saliency.grad_cam_pp(features_fn, classify_fn, im, t),
      lambda im: saliency.occlusion(logits_fn, im, t, window=8, stride=8),
      lambda im: saliency.rise(logits_fn, im, t, key=jax.random.key(0), num_masks=16,
                               cells=4, batch_size=8),
  ]
  for i, call in enumerate(calls):
    call(x)
    with Compilations() as compiled:
      call(other)
    assert compiled.count == 0, i
