"""Optimised masks against references nobody here wrote or a closed form: TorchRay's
extremal perturbations as a PyTorch reference written from its documented algorithm
(``torch_extremal_reference``, by a helper that never saw cejax.optimised.extremal), a linear
model whose best deletion is known, a model with a known causal box, one device against
four."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cejax import sharding
from cejax.optimised import ce_optimal, counterfactual, extremal, meaningful, smooth_masks

torch = pytest.importorskip("torch")
import torch_extremal_reference as reference  # noqa: E402  (needs torch)

H, W = 30, 26  # not square, not a multiple of the step: transpositions and crops show


class _Net(torch.nn.Module):
  """conv 3x3 (3 -> 4) -> tanh -> mean -> linear (4 -> 5): small, nonlinear, with bias."""

  def __init__(self):
    super().__init__()
    gen = torch.Generator().manual_seed(0)
    self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
    self.fc = torch.nn.Linear(4, 5)
    with torch.no_grad():
      for p in self.parameters():
        p.copy_(torch.randn(p.shape, generator=gen) * 0.5)

  def forward(self, x):
    return self.fc(torch.tanh(self.conv(x)).mean((2, 3)))


def _jax_model(net):
  """The same network in JAX, NHWC."""
  kernel = jnp.asarray(net.conv.weight.detach().numpy().transpose(2, 3, 1, 0))  # HWIO
  bias = jnp.asarray(net.conv.bias.detach().numpy())
  dense, dense_bias = (jnp.asarray(net.fc.weight.detach().numpy().T),
                       jnp.asarray(net.fc.bias.detach().numpy()))

  def logits_fn(x):
    y = jax.lax.conv_general_dilated(x, kernel, (1, 1), "SAME",
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                     precision=jax.lax.Precision.HIGHEST)
    return jnp.dot(jnp.tanh(y + bias).mean((1, 2)), dense,
                   precision=jax.lax.Precision.HIGHEST) + dense_bias

  return logits_fn


@pytest.fixture(scope="module")
def pair():
  torch.set_num_threads(1)
  net = _Net().eval()
  image = np.random.default_rng(0).uniform(0, 1, (H, W, 3)).astype(np.float32)
  return net, _jax_model(net), image


def test_pieces_equal_the_reference(pair):
  _, _, image = pair
  timage = torch.from_numpy(image.transpose(2, 0, 1)[None])
  for kind in ("blur", "fade"):
    want = reference.perturbation_pyramid(timage, perturbation=kind).numpy()
    got = np.asarray(smooth_masks.blur_pyramid(jnp.asarray(image), kind=kind))
    np.testing.assert_allclose(got.transpose(0, 3, 1, 2), want, atol=2e-6)
  g = smooth_masks.geometry((H, W))
  shapes = reference.mask_generator_shapes((H, W), 7, 21.0)
  assert (list(g.shape_in), list(g.shape_out), g.padding, g.radius) == (
      list(shapes["shape_in"]), list(shapes["shape_out"]), shapes["padding"], shapes["radius"])
  params = np.random.default_rng(1).uniform(0, 1, (3, *g.shape_in)).astype(np.float32)
  cropped, full = reference.generate(torch.from_numpy(params[:, None]), (H, W), 7, 21.0)
  got_cropped, got_full = smooth_masks.smooth_masks(jnp.asarray(params), g)
  np.testing.assert_allclose(got_full, full[:, 0].numpy(), atol=1e-5)  # softmax at 20x
  np.testing.assert_allclose(got_cropped, cropped[:, 0].numpy(), atol=1e-5)
  pyramid = reference.perturbation_pyramid(timage)
  masks = np.random.default_rng(2).uniform(0, 1, (2, H, W)).astype(np.float32)
  want = reference.apply_pyramid(pyramid, torch.from_numpy(masks[:, None])).numpy()
  got = smooth_masks.apply_pyramid(smooth_masks.blur_pyramid(jnp.asarray(image)), jnp.asarray(masks))
  np.testing.assert_allclose(np.asarray(got).transpose(0, 3, 1, 2), want, atol=2e-6)


@pytest.mark.parametrize("shape,step,sigma", [((37, 50), 7, 21.0), ((30, 29), 2, 5.0)])
def test_smooth_mask_gradient_equals_pytorch_autograd(shape, step, sigma):
  """smooth_masks has a gradient of its own (block sums, not a gather's scatter-add):
  against PyTorch's autograd through the reference's unfold."""
  g = smooth_masks.geometry(shape, step=step, sigma=sigma)
  rng = np.random.default_rng(3)
  params = rng.uniform(0, 1, (2, *g.shape_in)).astype(np.float32)
  w_crop = rng.normal(size=(2, *shape)).astype(np.float32)
  w_full = rng.normal(size=(2, *g.shape_out)).astype(np.float32)
  tparams = torch.from_numpy(params[:, None]).requires_grad_(True)
  cropped, full = reference.generate(tparams, shape, step, sigma)
  ((cropped[:, 0] * torch.from_numpy(w_crop)).sum()
   + (full[:, 0] * torch.from_numpy(w_full)).sum()).backward()
  want = tparams.grad[:, 0].numpy()

  def energy(p):
    c, f = smooth_masks.smooth_masks(p, g)
    return (c * w_crop).sum() + (f * w_full).sum()

  got = np.asarray(jax.jit(jax.grad(energy))(jnp.asarray(params)))  # one compilation
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def test_area_constraint_equals_pytorchs_sorted_form():
  """area_gap ranks without sorting; against torch.sort (stable) and autograd, with ties
  (values on a grid of quarters, -0 beside 0) that a rank-by-position rule must break as
  a stable sort does, and the step at every position."""
  rng = np.random.default_rng(4)
  size = 300
  masks = rng.uniform(0, 1, (4, 3, size)).astype(np.float32)
  masks[2:] = np.round(masks[2:] * 4) / 4
  masks[3, :, -40:] = -0.0  # after the zeros: a sign-aware order would put them first
  masks[1, 1, 7] = -np.float32("nan")  # sorts put NaN last, whatever its sign bit
  zeros = rng.integers(0, size, (4, 3)).astype(np.int32)
  zeros[:, 0] = (0, size - 1, 100, 40)  # the ends; a threshold inside the zeros' ties
  cotangent = rng.normal(size=(4, 3)).astype(np.float32)
  tmasks = torch.from_numpy(masks).requires_grad_(True)
  step = (torch.arange(size) >= torch.from_numpy(zeros)[..., None]).float()
  want = ((torch.sort(tmasks, dim=-1, stable=True).values - step) ** 2).mean(-1)
  (want * torch.from_numpy(cotangent)).sum().backward()
  got, grad = jax.value_and_grad(
      lambda m: (smooth_masks.area_gap(m, zeros) * cotangent).sum())(jnp.asarray(masks))
  np.testing.assert_allclose(np.asarray(smooth_masks.area_gap(jnp.asarray(masks), zeros)),
                             want.detach().numpy(), rtol=1e-6)
  want_total = float((want.detach() * torch.from_numpy(cotangent)).sum())
  np.testing.assert_allclose(float(got), want_total, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(grad), tmasks.grad.numpy(), rtol=1e-6, atol=1e-9)
  for dtype in (jnp.bfloat16, jnp.float16):  # keys of the dtype's own width
    low = jnp.asarray(masks, dtype)
    want = ((torch.sort(torch.from_numpy(np.asarray(low, np.float32)), dim=-1,
                        stable=True).values - step) ** 2).mean(-1)
    np.testing.assert_allclose(np.asarray(smooth_masks.area_gap(low, zeros), np.float32),
                               want.numpy(), rtol=1e-2)
    sorted_form = lambda m: jnp.sum(jnp.mean((jnp.sort(m, axis=-1, stable=True)  # noqa: E731
                                              - jnp.asarray(step.numpy(), dtype)) ** 2, -1))
    np.testing.assert_array_equal(  # the ranks: JAX's stable sort routes the same gradient
        np.asarray(jax.grad(lambda m: jnp.sum(smooth_masks.area_gap(m, zeros)))(low),
                   np.float32), np.asarray(jax.grad(sorted_form)(low), np.float32))
  with pytest.raises(ValueError, match="masks must be floating point"):
    smooth_masks.area_gap(jnp.zeros((2, 5), jnp.int32), jnp.zeros(2, jnp.int32))


def test_symmetric_ties_average_the_stable_sorts_gradient_over_each_tie():
  """The symmetric rule: the value of TorchRay's sorted form, and its gradient (PyTorch's
  stable sort, autograd) averaged over each group of equal values. A flat mask then
  gets one gradient everywhere, where the stable rule splits it by position."""
  rng = np.random.default_rng(5)
  size = 200
  masks = (np.round(rng.uniform(0, 1, (3, 4, size)) * 4) / 4).astype(np.float32)
  masks[2, 0] = 0.5  # flat
  zeros = rng.integers(1, size - 1, (3, 4)).astype(np.int32)
  tmasks = torch.from_numpy(masks).requires_grad_(True)
  step = (torch.arange(size) >= torch.from_numpy(zeros)[..., None]).float()
  want = ((torch.sort(tmasks, dim=-1, stable=True).values - step) ** 2).mean(-1)
  want.sum().backward()
  stable_grad = tmasks.grad.numpy()
  want_grad = np.empty_like(stable_grad)
  for idx in np.ndindex(masks.shape[:2]):
    for value in np.unique(masks[idx]):
      tied = masks[idx] == value
      want_grad[idx][tied] = stable_grad[idx][tied].mean()
  value, grad = jax.value_and_grad(
      lambda m: smooth_masks.area_gap(m, zeros, ties="symmetric").sum())(jnp.asarray(masks))
  np.testing.assert_allclose(np.asarray(smooth_masks.area_gap(jnp.asarray(masks), zeros,
                                                              ties="symmetric")),
                             want.detach().numpy(), rtol=1e-6)
  np.testing.assert_allclose(np.asarray(grad), want_grad, rtol=1e-5, atol=1e-9)
  assert np.ptp(np.asarray(grad)[2, 0]) == 0  # flat: one gradient
  assert np.ptp(stable_grad[2, 0]) > 0  # the stable rule's differs by position
  with pytest.raises(ValueError, match="ties must be one of"):
    smooth_masks.area_gap(jnp.asarray(masks), zeros, ties="random")


@pytest.mark.parametrize("variant,perturbation", [("preserve", "blur"), ("delete", "blur"),
                                                  ("dual", "fade")])
def test_masks_after_k_iterations_equal_the_pytorch_reference(pair, variant, perturbation):
  """From the same random initial mask. TorchRay starts from ones, whose smooth mask is
  periodic with exact ties; which of the tied values meet the area step's edge then
  depends on float rounding that differs between the libraries (measured: 3e-4 after
  one update), so the comparison starts from a mask without ties."""
  net, logits_fn, image = pair
  areas, k, target = [0.05, 0.2], 12, 3
  shape_in = smooth_masks.geometry((H, W)).shape_in
  init = np.random.default_rng(10).uniform(0.2, 0.9, (2, *shape_in)).astype(np.float32)
  want, _ = reference.extremal_perturbation(
      net, torch.from_numpy(image.transpose(2, 0, 1)[None]), target, areas=areas,
      iterations=k, variant=variant, perturbation=perturbation,
      init=torch.from_numpy(init[:, None]))
  got = extremal.extremal_perturbation(logits_fn, jnp.asarray(image[None]), jnp.array([target]),
                                       areas=areas, iterations=k, variant=variant,
                                       perturbation=perturbation, init=init)
  assert got.masks.shape == (1, 2, H, W)
  np.testing.assert_allclose(got.masks[0], want[:, 0].numpy(), atol=1e-4)
  assert float(jnp.abs(got.masks[0, 0] - got.masks[0, 1]).max()) > 1e-3  # areas differ


def _linear_logit(weights):
  """Logit 0 = sum of pixel * weight (one channel), logit 1 = 0. The weights are a
  ``Partial``'s leaves, traced: models of other weights share their compiled programs."""
  return jax.tree_util.Partial(_weighted_sum, weights)


def _weighted_sum(weights, x):
  return jnp.stack([jnp.sum(x[..., 0] * weights, (1, 2)), jnp.zeros(x.shape[0])], -1)


def test_delete_mask_of_a_linear_model_covers_its_largest_weights():
  """Logit = sum of weight x pixel, fill 0, an image of ones: deleting a region of
  ``k`` pixels lowers the logit by the sum of their weights, so the best one holds the
  ``k`` largest weights (the disk). The region compared is the optimised mask's ``k``
  strongest pixels; the area is the disk's share of the margined mask. From the default
  flat start of 0, TorchRay's stable tie rule grows the mask from its last rows (IoU
  0.05; 0.67 at sigma 8); the symmetric rule (the default) finds the disk (0.96). Coarse
  masks (sigma = step) compile in about half the time of sigma 8's."""
  size = 48
  yy, xx = np.mgrid[:size, :size]
  disk = (yy - 30) ** 2 + (xx - 18) ** 2 <= 0.15 * size * size / np.pi
  weights = jnp.asarray(np.where(disk, 0.05, 0.004), jnp.float32)  # all positive: only
  image = jnp.ones((1, size, size, 1))                  # the area constraint keeps it small
  out = smooth_masks.geometry((size, size), step=4, sigma=4.0).shape_out
  kwargs = dict(areas=(disk.sum() / (out[0] * out[1]),), estimand="logit",
                intervention="zero", iterations=100, step=4, sigma=4.0)

  def iou(result):
    region = np.asarray(smooth_masks.hard_region(result.masks[0, 0], disk.mean())) > 0
    return (region & disk).sum() / (region | disk).sum()

  assert iou(ce_optimal.ce_optimal_mask(_linear_logit(weights), image, jnp.array([0]),
                                      **kwargs)) >= 0.9
  assert iou(ce_optimal.ce_optimal_mask(_linear_logit(weights), image, jnp.array([0]),
                                      ties="stable", **kwargs)) < 0.8
  blind = ce_optimal.ce_optimal_mask(_linear_logit(jnp.zeros_like(weights)), image,
                                   jnp.array([0]), **kwargs)  # a model that ignores x
  assert iou(blind) < 0.5


def _region_model(region):
  """Logit 0 is 10 x the mean over the region, logit 1 is 1: on an image of ones, class 0
  until 90 % of the region is deleted (zero fill); on 0.8, until 87.5 %."""
  area = region.sum()
  return lambda x: jnp.stack([10 * jnp.sum(x[..., 0] * region, (1, 2)) / area,
                              jnp.ones(x.shape[0])], -1)


@pytest.mark.heavy
def test_minimal_counterfactual_region_is_the_causal_region_on_any_mesh():
  """The known causal region is a disk: smooth masks (Gaussian bumps) cannot draw a
  square's corners, so a box would measure the mask family, not the search. No region
  smaller than 90 % (87.5 %) of the disk can flip the decision: that is the bound."""
  size = 32
  yy, xx = np.mgrid[:size, :size]
  disk = ((yy - 12) ** 2 + (xx - 18) ** 2 <= 49).astype(np.float32)  # 149 px, 15 %
  images = jnp.ones((2, size, size, 1)).at[1].multiply(0.8)
  kwargs = dict(areas=(0.05, 0.1, 0.2, 0.4), bisection_steps=3, estimand="logit",
                iterations=30, step=3, sigma=3.0)
  result = counterfactual.minimal_counterfactual(_region_model(jnp.asarray(disk)), images, **kwargs)
  assert result.found.all() and (result.flipped_to == 1).all()
  bound = np.array([0.9, 0.875]) * disk.mean()
  assert (result.area >= bound).all() and (result.area <= bound + 0.04).all(), result.area
  for mask in result.mask:
    assert (mask * disk).sum() / np.maximum(mask, disk).sum() >= 0.75  # IoU with the disk
  # On a mesh: the same search, bit for bit (one area and one bisection step are enough
  # to run both of its stages; the full search above would only compile longer).
  kwargs.update(areas=(0.2,), bisection_steps=1, iterations=10)
  model = _region_model(jnp.asarray(disk))
  one = counterfactual.minimal_counterfactual(model, images, **kwargs)
  sharded = counterfactual.minimal_counterfactual(
      model, images, mesh=sharding.mask_mesh(jax.devices()[:2]), **kwargs)
  assert one.found.any()
  for got, want in zip(sharded, one, strict=True):
    np.testing.assert_array_equal(got, want)


def test_minimal_counterfactual_runs_the_network_only_compiled():
  """Users pass un-jitted networks (``load_logits_fn`` returns one). The decisions
  between optimisations once called it eagerly: op by op, each operation compiled in
  turn on first use (a third of the sweep test's time on the tiny DenseNet)."""
  concrete = []

  def logits_fn(x):
    concrete.append(not isinstance(x, jax.core.Tracer))
    return _region_model(jnp.ones((8, 8)))(x)

  counterfactual.minimal_counterfactual(logits_fn, jnp.ones((1, 8, 8, 1)), areas=(0.5,),
                                        bisection_steps=1, iterations=2, step=2, sigma=2.0)
  assert concrete and not any(concrete)


def test_a_sharded_run_equals_one_device_bit_for_bit(pair):
  _, logits_fn, image = pair
  rng = np.random.default_rng(3)
  images = jnp.asarray(np.clip(image[None] + rng.normal(0, 0.1, (4, H, W, 3)), 0, 1),
                       jnp.float32)
  targets = jnp.array([0, 1, 2, 3])
  # Coarse masks (sigma = step): what is compared is the mesh, not the mask family.
  kwargs = dict(areas=(0.1, 0.3), iterations=6, batch_size=1, step=7, sigma=7.0)
  one = extremal.extremal_perturbation(logits_fn, images, targets, **kwargs)
  four = extremal.extremal_perturbation(logits_fn, images, targets,
                                        mesh=sharding.mask_mesh(jax.devices()[:4]), **kwargs)
  np.testing.assert_array_equal(one.masks, four.masks)
  np.testing.assert_array_equal(one.reward, four.reward)


def test_bad_input_is_named():
  logits_fn = _linear_logit(jnp.ones((8, 8)))
  image = jnp.ones((1, 8, 8, 1))
  with pytest.raises(ValueError, match="areas must lie in"):
    extremal.extremal_perturbation(logits_fn, image, jnp.array([0]), areas=(0.0,))
  with pytest.raises(ValueError, match="Unknown variant"):
    extremal.extremal_perturbation(logits_fn, image, jnp.array([0]), variant="keep")
  with pytest.raises(ValueError, match="integer classes"):
    extremal.extremal_perturbation(logits_fn, image, jnp.array([0.0]))
  with pytest.raises(ValueError, match=r"\(n, h, w, c\)"):
    extremal.extremal_perturbation(logits_fn, image[0], jnp.array([0]))
  with pytest.raises(ValueError, match="per_class"):
    ce_optimal.ce_optimal_mask(logits_fn, image, jnp.array([0]), estimand="per_class")
  with pytest.raises(ValueError, match="step must be a positive integer"):
    extremal.extremal_perturbation(logits_fn, image, jnp.array([0]), step=2.5)
  with pytest.raises(ValueError, match="sigma=1.0 is too small for step=5"):
    smooth_masks.geometry((15, 22), step=5, sigma=1.0)  # once a reshape's TypeError


def test_total_variation_is_fong_and_vedaldis_tv_beta():
  m = np.random.default_rng(4).uniform(0, 1, (2, 5, 6)).astype(np.float32)
  want = []
  for mask in m:
    total = 0.0
    for i in range(5):
      for j in range(6):
        dy = mask[i + 1, j] - mask[i, j] if i < 4 else 0.0
        dx = mask[i, j + 1] - mask[i, j] if j < 5 else 0.0
        total += (dy * dy + dx * dx) ** 1.5
    want.append(total)
  np.testing.assert_allclose(meaningful.total_variation(jnp.asarray(m), beta=3.0), want,
                             rtol=1e-5)


def test_meaningful_perturbation_deletes_where_the_evidence_is():
  size = 32
  yy, xx = np.mgrid[:size, :size]
  disk = (yy - 12) ** 2 + (xx - 18) ** 2 <= 49
  logits_fn = _linear_logit(jnp.asarray(np.where(disk, 0.03, 0.0), jnp.float32))
  image = jnp.asarray(np.random.default_rng(0).uniform(0.5, 1, (1, size, size, 1)),
                      jnp.float32)
  maps = np.asarray(meaningful.meaningful_perturbation(
      logits_fn, image, jnp.array([0]), key=jax.random.PRNGKey(0), iterations=100,
      mask_size=16))
  assert maps[0][disk].mean() > 0.9 and maps[0][~disk].mean() < 0.6
