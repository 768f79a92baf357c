"""Attacks and defenses: closed forms on linear models, budgets, and the trained model."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from compile_count import Compilations

from cejax import attacks, sharding
from cejax.attacks import defenses
from cejax.data import pipeline
from cejax.jobs import checkpoint

H = W = 6
PIXELS = attacks.PixelSpace()  # these toy models take [0, 1] pixels as they are


def _ce_grad(w, x, y):
  """d CE / dx of the linear model ``x @ w`` by hand: ``W (softmax(z) - onehot(y))``."""
  z = x.reshape(len(x), -1) @ w
  p = np.exp(z - z.max(1, keepdims=True))
  p /= p.sum(1, keepdims=True)
  return ((p - np.eye(w.shape[1])[y]) @ w.T).reshape(x.shape)


def _linear(k=3, c=1, seed=0):
  w = jax.random.normal(jax.random.key(seed), (H * W * c, k))
  return (lambda x: x.reshape(len(x), -1) @ w), w


def test_fgsm_equals_closed_form_on_a_linear_model():
  logits_fn, w = _linear()
  x = jax.random.uniform(jax.random.key(1), (4, H, W, 1), minval=0.3, maxval=0.7)
  y = jnp.array([0, 1, 2, 1])
  eps = 0.05
  # d CE / dx = W (softmax(z) - onehot(y)), by hand.
  z = x.reshape(4, -1) @ w
  grad = ((jax.nn.softmax(z) - jax.nn.one_hot(y, 3)) @ w.T).reshape(x.shape)
  res = attacks.fgsm(logits_fn, x, y, eps=eps, space=PIXELS)
  np.testing.assert_allclose(res.images, x + eps * jnp.sign(grad), atol=1e-6)
  np.testing.assert_allclose(res.linf, eps, rtol=1e-5)
  targeted = attacks.fgsm(logits_fn, x, y, eps=eps, targeted=True, space=PIXELS)
  np.testing.assert_allclose(targeted.images, x - eps * jnp.sign(grad), atol=1e-6)


def test_gradient_matches_finite_differences_through_normalization():
  logits_fn, _ = _linear(c=1)
  f = lambda x: jnp.tanh(logits_fn(x)) * 3.0  # non-linear
  space = attacks.PixelSpace(mean=0.4, std=0.2)
  x = jax.random.uniform(jax.random.key(2), (2, H, W, 1), minval=0.2, maxval=0.8)
  y = jnp.array([2, 0])
  loss = attacks.attack_loss(f, space, y)
  g = jax.grad(lambda z: loss(z).sum())(x)
  h = 1e-3
  for idx in [(0, 1, 2, 0), (1, 5, 0, 0), (1, 3, 3, 0)]:
    e = jnp.zeros_like(x).at[idx].set(h)
    fd = (loss(x + e).sum() - loss(x - e).sum()) / (2 * h)
    np.testing.assert_allclose(g[idx], fd, rtol=2e-2, atol=1e-4)


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_pgd_equals_a_numpy_loop_iterate_by_iterate(norm):
  """Without a random start PGD is deterministic: every step (ascent, projection onto
  the ball, clip to pixels) is checked by running 1..5 steps against a numpy loop."""
  logits_fn, w = _linear()
  w = np.asarray(w, np.float64)
  x = np.asarray(jax.random.uniform(jax.random.key(3), (5, H, W, 1)))  # touches bounds
  y = np.array([0, 1, 2, 0, 1])
  eps = 0.1 if norm == "linf" else 0.5
  ref = x.astype(np.float64)
  for steps in range(1, 6):
    g = _ce_grad(w, ref, y)
    if norm == "linf":
      ref = np.clip(np.clip(ref + eps / 2 * np.sign(g), x - eps, x + eps), 0, 1)
    else:
      ref = ref + eps / 2 * g / np.linalg.norm(g.reshape(5, -1), axis=1)[:, None, None, None]
      d = (ref - x).reshape(5, -1)
      d *= np.minimum(1, eps / np.linalg.norm(d, axis=1))[:, None]
      ref = np.clip(x + d.reshape(x.shape), 0, 1)
    res = attacks.pgd(logits_fn, x, y, key=jax.random.key(0), eps=eps, steps=steps,
                      step_size=eps / 2, norm=norm, random_start=False, space=PIXELS)
    np.testing.assert_allclose(res.images, ref, atol=1e-5, err_msg=f"step {steps}")
  assert float(jnp.abs(res.images - x).max()) > 0.05  # it moved


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_pgd_with_random_restarts_stays_in_the_ball_and_raises_the_loss(norm):
  logits_fn, w = _linear()
  x = jax.random.uniform(jax.random.key(3), (5, H, W, 1))
  y = jnp.array([0, 1, 2, 0, 1])
  eps = 0.1 if norm == "linf" else 0.5
  res = attacks.pgd(logits_fn, x, y, key=jax.random.key(0), eps=eps, steps=10,
                    norm=norm, restarts=3, space=PIXELS)
  assert float(res.images.min()) >= 0.0 and float(res.images.max()) <= 1.0
  bound = res.linf if norm == "linf" else res.l2
  assert float(bound.max()) <= eps * (1 + 1e-5)
  ce = lambda z: -jnp.take_along_axis(jax.nn.log_softmax(z), y[:, None], 1)[:, 0]
  assert bool((ce(res.logits) > ce(logits_fn(x)) + 1e-3).all())


def test_bim_equals_foolbox_and_mifgsm_equals_a_numpy_loop():
  fb = pytest.importorskip("foolbox")
  logits_fn, w = _linear(k=4)
  x = jax.random.uniform(jax.random.key(9), (6, H, W, 1))
  y = jnp.array([0, 1, 2, 3, 0, 1])
  eps = 0.05
  model = fb.JAXModel(logits_fn, bounds=(0, 1))
  _, ref, _ = fb.attacks.LinfBasicIterativeAttack(abs_stepsize=0.01, steps=7)(
      model, x, y, epsilons=eps)
  ours = attacks.bim(logits_fn, x, y, eps=eps, steps=7, step_size=0.01, space=PIXELS)
  np.testing.assert_allclose(ours.images, np.asarray(ref), atol=1e-6)
  # MI-FGSM (Dong et al., 2018, Alg. 1): g <- mu g + grad / ||grad||_1; x <- x + a sign(g).
  w64, x0, yn = np.asarray(w, np.float64), np.asarray(x, np.float64), np.asarray(y)
  ref, momentum = x0.copy(), np.zeros_like(x0)
  for _ in range(6):
    g = _ce_grad(w64, ref, yn)
    momentum = 0.8 * momentum + g / np.abs(g).reshape(6, -1).sum(1)[:, None, None, None]
    ref = np.clip(np.clip(ref + eps / 6 * np.sign(momentum), x0 - eps, x0 + eps), 0, 1)
  ours = attacks.mifgsm(logits_fn, x, y, eps=eps, steps=6, decay=0.8, space=PIXELS)
  np.testing.assert_allclose(ours.images, ref, atol=1e-5)


def test_bpda_pgd_differentiates_through_the_defense_as_the_identity():
  logits_fn, w = _linear()
  w64 = np.asarray(w, np.float64)
  x = np.asarray(jax.random.uniform(jax.random.key(4), (4, H, W, 1)))
  y = np.array([0, 1, 2, 1])
  defense = lambda p: defenses.bit_depth(p, bits=3)
  quantize = lambda p: np.round(p * 7) / 7
  eps, ref = 0.08, x.astype(np.float64)
  for _ in range(5):  # the gradient is taken at the defended input, passed straight back
    g = _ce_grad(w64, quantize(ref), y)
    ref = np.clip(np.clip(ref + 0.02 * np.sign(g), x - eps, x + eps), 0, 1)
  res = attacks.bpda_pgd(logits_fn, x, y, key=jax.random.key(0), defense=defense, eps=eps,
                         steps=5, step_size=0.02, random_start=False, space=PIXELS)
  np.testing.assert_allclose(res.images, ref, atol=1e-5)
  # Logits and success are the defended model's.
  np.testing.assert_allclose(res.logits, quantize(ref).reshape(4, -1) @ w64, atol=1e-4)


def test_attacks_require_the_pixel_space():
  logits_fn, _ = _linear()
  x = jax.random.uniform(jax.random.key(6), (2, H, W, 1))
  with pytest.raises(TypeError, match="space"):
    attacks.fgsm(logits_fn, x, jnp.array([0, 1]), eps=0.1)


def _binary(seed):
  w = jax.random.normal(jax.random.key(seed), (H * W,))
  b = 0.3
  logits_fn = lambda x: jnp.stack([jnp.zeros(len(x)), x.reshape(len(x), -1) @ w + b], 1)
  return logits_fn, w, b


def test_deepfool_reaches_the_analytic_boundary_of_a_linear_binary_model():
  logits_fn, w, b = _binary(4)
  x = jax.random.normal(jax.random.key(5), (4, H, W, 1))
  labels = jnp.argmax(logits_fn(x), -1)
  space = attacks.PixelSpace(low=-100.0, high=100.0)
  res = attacks.deepfool(logits_fn, x, labels, overshoot=0.0, space=space)
  dist = jnp.abs(x.reshape(4, -1) @ w + b) / jnp.linalg.norm(w)
  np.testing.assert_allclose(res.l2, dist, rtol=1e-3, atol=2e-4)
  assert bool(res.success.all())


def _foolbox_torch_model(fb, first, second=None, *, scale):
  """``tanh(x w1) [w2] * scale`` in PyTorch, for Foolbox's PyTorch backend, and a call
  that takes and returns numpy. (Its JAX backend runs op by op through eagerpy: about 30
  times slower here, for the same images to 1e-6.)"""
  import torch

  w1 = torch.from_numpy(np.asarray(first))
  w2 = None if second is None else torch.from_numpy(np.asarray(second))

  class Net(torch.nn.Module):
    def forward(self, z):
      h = torch.tanh(z.reshape(len(z), -1) @ w1)
      return (h if w2 is None else h @ w2) * scale

  model = fb.PyTorchModel(Net().eval(), bounds=(0, 1))

  def run(attack, x, y):
    _, clipped, success = attack(model, torch.from_numpy(np.asarray(x)),
                                 torch.from_numpy(np.asarray(y)), epsilons=None)
    return clipped.numpy(), success.numpy()

  return run


def test_deepfool_equals_foolbox_with_top_candidates():
  fb = pytest.importorskip("foolbox")
  w = jax.random.normal(jax.random.key(10), (H * W, 12)) * 0.5
  logits_fn = lambda x: jnp.tanh(x.reshape(len(x), -1) @ w) * 3.0
  x = jax.random.uniform(jax.random.key(11), (5, H, W, 1))
  y = jnp.argmax(logits_fn(x), -1)  # correctly "classified" by construction
  foolbox_run = _foolbox_torch_model(fb, w, scale=3.0)
  for candidates in (3, 12):
    attack = fb.attacks.L2DeepFoolAttack(steps=30, candidates=candidates, overshoot=0.02)
    ref, _ = foolbox_run(attack, x, y)
    ours = attacks.deepfool(logits_fn, x, y, steps=30, candidates=candidates, space=PIXELS)
    np.testing.assert_allclose(ours.images, np.asarray(ref), atol=1e-5)
  with pytest.raises(ValueError, match="candidates must be >= 2"):
    attacks.deepfool(logits_fn, x, y, candidates=1, space=PIXELS)


@pytest.mark.parametrize("confidence", [0.0, 1.0])
def test_carlini_wagner_finds_the_analytic_boundary_distance(confidence):
  """On ``[0, x.w + b]`` the smallest L2 change reaching a margin of ``confidence`` is
  ``(|x.w + b| + confidence) / ||w||``; C&W's search must end just past it."""
  logits_fn, w, b = _binary(12)
  x = jax.random.uniform(jax.random.key(13), (6, H, W, 1), minval=-0.4, maxval=0.4)
  labels = jnp.argmax(logits_fn(x), -1)
  space = attacks.PixelSpace(low=-2.0, high=2.0)
  res = attacks.carlini_wagner_l2(logits_fn, x, labels, steps=500, learning_rate=0.002,
                                  c=1e-3, confidence=confidence, search_steps=10,
                                  space=space)
  dist = (np.abs(np.asarray(x.reshape(6, -1) @ w + b)) + confidence) / float(
      jnp.linalg.norm(w))
  assert bool(res.success.all())
  margin = np.abs(np.asarray(res.logits[:, 1] - res.logits[:, 0]))
  assert (margin >= confidence - 1e-4).all()
  assert (np.asarray(res.l2) >= dist * (1 - 1e-4)).all()  # nothing beats the boundary
  np.testing.assert_allclose(res.l2, dist, rtol=0.05)  # and the search gets close to it


def test_pgd_l2_start_is_uniform_in_the_ball_as_foolbox_samples_it():
  """Radii of uniform points in a d-ball: P(r <= t eps) = t^d. The old start drew the
  radius uniformly, which puts most starts deep inside the ball: the KS test of
  (r / eps)^d against U(0, 1) rejects it, and accepts ours and Foolbox's sampler."""
  fb_base = pytest.importorskip("foolbox.attacks.gradient_descent_base")
  import eagerpy as ep
  import scipy.stats

  images = jnp.zeros((2000, 3, 3, 1))
  d, eps = 9, 0.5
  start = attacks.uniform_in_ball(jax.random.key(0), images, eps=eps, norm="l2")
  radii = np.linalg.norm(np.asarray(start).reshape(2000, -1), axis=-1)
  assert radii.max() <= eps * (1 + 1e-6)
  assert scipy.stats.kstest((radii / eps) ** d, "uniform").pvalue > 1e-3
  theirs = np.asarray(fb_base.uniform_l2_n_balls(ep.astensor(images), 2000, d).raw)
  assert scipy.stats.ks_2samp(np.linalg.norm(theirs, axis=-1), radii / eps).pvalue > 1e-3
  uniform_radius = np.random.default_rng(0).uniform(size=2000)  # the old start's radii
  assert scipy.stats.kstest(uniform_radius ** d, "uniform").pvalue < 1e-6
  box = attacks.uniform_in_ball(jax.random.key(1), images, eps=eps, norm="linf")
  assert np.abs(np.asarray(box)).max() <= eps


def test_carlini_wagner_equals_foolbox_run_for_run():
  """Foolbox 3's L2CarliniWagnerAttack (Carlini's algorithm: Adam in tanh space, the
  binary search on c, with 10+ search steps a last run at the upper bound, optional
  early abort) at the same hyperparameters, on a nonlinear model where c matters: the
  same adversarial images. On a linear model any large enough c reaches the boundary,
  so the analytic test above could not tell a broken search (c *= 10) from the right
  one; this comparison does (its distortions grow with c here)."""
  fb = pytest.importorskip("foolbox")
  rng = np.random.default_rng(3)
  w1 = jnp.asarray(rng.normal(0, 1.0, (16, 12)), jnp.float32)
  w2 = jnp.asarray(rng.normal(0, 1.0, (12, 3)), jnp.float32)
  logits_fn = lambda x: jnp.tanh(x.reshape(len(x), -1) @ w1) @ w2 * 2  # noqa: E731
  x = jnp.asarray(rng.uniform(0.2, 0.8, (8, 4, 4, 1)), jnp.float32)
  y = jnp.argmax(logits_fn(x), -1)
  foolbox_run = _foolbox_torch_model(fb, w1, w2, scale=2.0)
  for search, abort in ((5, False), (10, True)):  # the search; the repeat and the abort
    kw = dict(steps=30, confidence=0.5)
    ref, ok = foolbox_run(fb.attacks.L2CarliniWagnerAttack(
        binary_search_steps=search, stepsize=0.05, initial_const=0.01, abort_early=abort,
        **kw), x, y)
    res = attacks.carlini_wagner_l2(logits_fn, x, y, learning_rate=0.05, c=0.01,
                                    search_steps=search, abort_early=abort,
                                    space=attacks.PixelSpace(), **kw)
    assert ok.sum() >= 4, (search, abort, ok)
    np.testing.assert_array_equal(np.asarray(res.success), ok)
    np.testing.assert_allclose(np.asarray(res.images)[ok], np.asarray(ref)[ok], atol=2e-3)
    ref_l2 = np.linalg.norm((np.asarray(ref) - np.asarray(x)).reshape(8, -1), axis=-1)
    np.testing.assert_allclose(np.asarray(res.l2)[ok], ref_l2[ok], rtol=1e-3, atol=1e-5)


def test_multi_label_attack_turns_a_finding_on():
  logits_fn, _ = _linear(k=4)
  x = jax.random.uniform(jax.random.key(6), (3, H, W, 1))
  on = (logits_fn(x) > 0).astype(jnp.float32)
  goal = on.at[:, 2].set(1 - on[:, 2])  # switch finding 2
  res = attacks.pgd(logits_fn, x, goal, key=jax.random.key(1), eps=0.5, steps=40,
                    targeted=True, activation="sigmoid", space=PIXELS)
  assert bool(res.success.all())
  with pytest.raises(ValueError, match="multi-hot"):
    attacks.pgd(logits_fn, x, jnp.array([0, 1, 2]), key=jax.random.key(1), eps=0.1,
                activation="sigmoid", space=PIXELS)
  with pytest.raises(ValueError, match="pixel space"):
    attacks.fgsm(logits_fn, x * 3 - 1, jnp.array([0, 1, 2]), eps=0.1, space=PIXELS)


def test_defenses():
  x = jax.random.uniform(jax.random.key(7), (2, 9, 11, 2))
  # Floyd-Steinberg against a plain numpy loop.
  ref = np.array(x).copy()
  out = np.zeros_like(ref)
  for n in range(2):
    for c in range(2):
      img = ref[n, :, :, c].astype(np.float64)
      for i in range(9):
        for j in range(11):
          old = img[i, j]
          new = float(old >= 0.5)
          out[n, i, j, c] = new
          err = old - new
          if j + 1 < 11: img[i, j + 1] += err * 7 / 16
          if i + 1 < 9:
            if j > 0: img[i + 1, j - 1] += err * 3 / 16
            img[i + 1, j] += err * 5 / 16
            if j + 1 < 11: img[i + 1, j + 1] += err * 1 / 16
  np.testing.assert_array_equal(defenses.error_diffusion(x), out)
  # Halftones keep the mean grey level approximately; outputs are binary.
  flat = jnp.full((1, 16, 16, 1), 0.3)
  for fn in (defenses.ordered_dither, defenses.error_diffusion):
    h = fn(flat)
    assert set(np.unique(h)) <= {0.0, 1.0}
    assert abs(float(h.mean()) - 0.3) < 0.05
  np.testing.assert_allclose(defenses.bit_depth(jnp.array([0.0, 0.2, 0.9]), bits=1),
                             [0, 0, 1])
  spike = jnp.zeros((1, 5, 5, 1)).at[0, 2, 2, 0].set(1.0)
  assert float(defenses.median_smoothing(spike).max()) == 0.0


def test_feature_squeezing_is_xu_et_als_per_squeezer_maximum():
  """Their squeezers (scipy's median_filter with mode "reflect", np.rint bit depth),
  each scored on its own, the largest L1 distance kept. The old code squeezed once with
  both combined and a 3 x 3 median (its docstring said 2 x 2)."""
  import scipy.ndimage

  rng = np.random.default_rng(0)
  x = rng.uniform(size=(3, 9, 8, 2)).astype(np.float32)
  for size in (2, 3, 4):
    ref = scipy.ndimage.median_filter(x, size=(1, size, size, 1), mode="reflect")
    np.testing.assert_array_equal(defenses.median_smoothing(jnp.asarray(x), size=size), ref)
  weights = rng.normal(size=(9 * 8 * 2, 4)).astype(np.float32)
  space = attacks.PixelSpace(mean=0.4, std=0.3)
  logits_fn = lambda z: z.reshape(len(z), -1) @ weights  # noqa: E731
  def probs(z):
    logits = ((z - 0.4) / 0.3).reshape(len(z), -1).astype(np.float64) @ weights
    e = np.exp(logits - logits.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)
  squeezed = [np.rint(x * 31) / 31,
              scipy.ndimage.median_filter(x, size=(1, 2, 2, 1), mode="reflect")]
  ref = np.max([np.abs(probs(x) - probs(q)).sum(-1) for q in squeezed], 0)
  got = defenses.squeeze_score(logits_fn, jnp.asarray(x), space=space, bits=5, median=2)
  np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-6)
  combined = np.abs(probs(x) - probs(scipy.ndimage.median_filter(
      np.rint(x * 15) / 15, size=(1, 3, 3, 1), mode="reflect"))).sum(-1)
  assert not np.allclose(got, combined, rtol=1e-3)  # what the old code scored


@pytest.fixture(scope="module")
def trained(trained_tiny):
  config, workdir = trained_tiny
  graphdef, params, stats, run = checkpoint.load_model(workdir)
  # Jitted: the eager calls below would compile each of the network's operations.
  logits_fn = jax.jit(checkpoint.make_logits_fn(graphdef, params, stats))
  data = pipeline.load_dataset(config.data)
  batch = data.batch("test", np.arange(64))
  space = attacks.PixelSpace(mean=np.asarray(run["mean"], np.float32),
                             std=np.asarray(run["std"], np.float32))
  pixels = np.clip(data.normalization.invert(batch["image"]), 0, 1).astype(np.float32)
  logits = logits_fn(space.normalize(jnp.asarray(pixels)))
  correct = np.asarray(jnp.argmax(logits, -1) == batch["label"])
  assert correct.sum() >= 8, "the smoke model should classify some test images"
  return logits_fn, space, pixels[correct][:8], batch["label"][correct][:8]


@pytest.mark.xdist_group("trained_tiny")
def test_pgd_beats_random_noise_on_the_trained_model_and_is_deterministic(trained):
  logits_fn, space, x, y = trained
  eps = 8 / 255
  # 10 steps (each a forward and backward pass of the batch; the attack's runtime) are
  # as strong as 20 on this model. On these 8 images PGD succeeds on every one at 8/255
  # and at 2/255, where random noise flips none (at 8/255 it flips one).
  steps = 10
  res = attacks.pgd(logits_fn, x, y, key=jax.random.key(0), eps=eps, steps=steps,
                    space=space)
  assert float(res.success.mean()) >= 0.9

  def noise_success(e):
    noisy = jnp.clip(x + e * jnp.sign(jax.random.normal(jax.random.key(1), x.shape)), 0, 1)
    return float((jnp.argmax(logits_fn(space.normalize(noisy)), -1) != y).mean())

  # Random sign noise of the same L-inf norm flips fewer predictions. This small model,
  # trained on clean images only, is noise-fragile at 8/255 (a quarter to half flip), so
  # "far fewer" is checked at 2/255, where PGD still succeeds almost everywhere.
  noise = {e: noise_success(e) for e in (eps, 2 / 255)}
  assert noise[eps] < float(res.success.mean())
  small = attacks.pgd(logits_fn, x, y, key=jax.random.key(0), eps=2 / 255, steps=steps,
                      space=space)
  print("PGD success at 8/255, 2/255; noise at 8/255, 2/255:", float(res.success.mean()),
        float(small.success.mean()), noise[eps], noise[2 / 255])
  assert noise[2 / 255] <= 0.25 * float(small.success.mean())
  again = attacks.pgd(logits_fn, x, y, key=jax.random.key(0), eps=eps, steps=steps,
                      space=space)
  np.testing.assert_array_equal(res.images, again.images)
  # The same attack with the batch split over 4 devices gives the same images. The 8
  # images split evenly, so the unsplit run to compare with is the one above.
  mesh = sharding.mask_mesh(jax.devices()[:4])
  assert len(x) % 4 == 0
  attack = lambda a, b: attacks.pgd(logits_fn, a, b, key=jax.random.key(0), eps=eps,
                                    steps=steps, space=space).images
  np.testing.assert_allclose(sharding.shard_batch(attack, mesh)(x, y), res.images, atol=1e-6)


@pytest.mark.xdist_group("trained_tiny")
def test_epsilon_sweep_is_one_vmapped_call(trained):
  logits_fn, space, x, y = trained
  eps = jnp.array([0.0, 2 / 255, 8 / 255])
  res = attacks.epsilon_sweep(attacks.fgsm, logits_fn, x, y, eps=eps, space=space)
  assert res.images.shape == (3,) + x.shape
  np.testing.assert_allclose(res.linf.max(1), np.minimum(eps, 1.0), atol=1e-6)
  single = attacks.fgsm(logits_fn, x, y, eps=8 / 255, space=space)
  np.testing.assert_allclose(res.images[2], single.images, atol=1e-6)
  assert float(res.success[0].mean()) == 0.0  # eps 0 changes nothing on correct images


def test_fgsm_and_pgd_agree_with_foolbox():
  """Independent reference: Foolbox 3's JAX backend (through eagerpy)."""
  fb = pytest.importorskip("foolbox")
  w = jax.random.normal(jax.random.key(8), (H * W * 1, 4))
  logits_fn = lambda x: jnp.tanh(x.reshape(len(x), -1) @ w) * 4.0
  x = jax.random.uniform(jax.random.key(9), (6, H, W, 1))
  y = jnp.array([0, 1, 2, 3, 0, 1])
  model = fb.JAXModel(logits_fn, bounds=(0, 1))
  eps = 0.03
  _, ref, _ = fb.attacks.FGSM()(model, x, y, epsilons=eps)
  ours = attacks.fgsm(logits_fn, x, y, eps=eps, space=PIXELS)
  np.testing.assert_allclose(ours.images, np.asarray(ref), atol=1e-6)
  pgd_ref = fb.attacks.LinfPGD(abs_stepsize=0.01, steps=7, random_start=False)
  _, ref, _ = pgd_ref(model, x, y, epsilons=eps)
  ours = attacks.pgd(logits_fn, x, y, key=jax.random.key(0), eps=eps, steps=7,
                     step_size=0.01, random_start=False, space=PIXELS)
  np.testing.assert_allclose(ours.images, np.asarray(ref), atol=1e-6)


def test_repeated_eager_attacks_compile_once():
  logits_fn, _ = _linear()
  x = jax.random.uniform(jax.random.key(20), (3, H, W, 1))
  other = jnp.clip(x + 0.1, 0, 1)
  y = jnp.array([0, 1, 2])
  calls = [
      lambda im: attacks.fgsm(logits_fn, im, y, eps=0.1, space=PIXELS),
      lambda im: attacks.pgd(logits_fn, im, y, key=jax.random.key(0), eps=0.1, steps=3,
                             space=PIXELS),
      lambda im: attacks.deepfool(logits_fn, im, y, steps=3, space=PIXELS),
      lambda im: attacks.carlini_wagner_l2(logits_fn, im, y, steps=3, search_steps=2,
                                           space=PIXELS),
  ]
  for i, call in enumerate(calls):
    call(x)
    with Compilations() as compiled:
      call(other)
      call(other)  # a new budget is a traced argument too
    assert compiled.count == 0, i
  attacks.fgsm(logits_fn, x, y, eps=0.2, space=PIXELS)
  with Compilations() as compiled:
    attacks.fgsm(logits_fn, other, y, eps=0.05, space=PIXELS)
  assert compiled.count == 0
