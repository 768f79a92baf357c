"""``saliency.transformer_attribution`` (Chefer, Gur & Wolf, CVPR 2021) against the
authors' released code, transcribed in float64 PyTorch (``tests/chefer_lrp_reference.py``)
and run on the weights of the timm ViT that our ViT loads (the set-up of ``test_vit``).

Tolerances: in float64 (``jax.enable_x64``) the two agree to round-off. In float32 their
rules are ill-conditioned where they divide by a residual-stream value near 0 (their
``Add`` and ``Clone`` rules, down to 1e-5 of the largest value on these images): the
authors' own code in float32 is 1.2e-4 of the map's maximum from itself in float64 here,
and ours 2.6e-4, so float32 is checked at 1e-3 of the maximum.
"""

import chefer_lrp_reference as chefer  # tests/, on the path
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import timm_vit
import torch
from flax import nnx

from cejax import saliency
from cejax.models import vit

CONFIG = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4)
TARGETS = np.array([2, 0, 4])


def _ours(state, dtype=jnp.float32):
  """Our ViT with timm's ``state`` (no initialisation run: every parameter is loaded)."""
  model = nnx.eval_shape(lambda: vit.VisionTransformer(num_classes=5, dtype=dtype,
                                                       rngs=nnx.Rngs(1), **CONFIG))
  return vit.load_timm(model, state)


@pytest.fixture(scope="module")
def pair():
  """timm's ViT with random weights, ours and the authors' (float64) with the same."""
  reference = timm_vit.randomised(**CONFIG)
  theirs = chefer.from_timm(reference.state_dict(), in_chans=3, num_classes=5, **CONFIG)
  images = np.random.default_rng(2).normal(size=(3, 32, 32, 3)).astype(np.float32)
  return reference, _ours(reference.state_dict()), theirs, images


def _torch(images):
  return torch.from_numpy(images.transpose(0, 3, 1, 2).copy())


@pytest.fixture(scope="module")
def authors(pair):
  """Their ``generate_LRP(method="transformer_attribution")`` for each start_layer, one
  image at a time as their code runs: ``{start_layer: (patch maps (n, patches), the
  relevance that reaches the first block's input (n, T, D))}``."""
  _, _, theirs, images = pair
  threads = torch.get_num_threads()
  torch.set_num_threads(1)  # tiny ops: threads only contend (30 times slower on 2 cores)
  try:
    results = {}
    for start_layer in (0, 1):
      maps, inputs = [], []
      for image, target in zip(_torch(images).double(), TARGETS, strict=True):
        cam = chefer.LRP(theirs).generate_LRP(image[None], index=int(target),
                                              start_layer=start_layer)
        maps.append(cam[0].detach().numpy())
        inputs.append(theirs.input_relevance[0].detach().numpy())
      results[start_layer] = np.stack(maps), np.stack(inputs)
  finally:
    torch.set_num_threads(threads)
  return results


def _on_pixels(patch_maps, patch):
  side = int(round(patch_maps.shape[1] ** 0.5))
  return np.kron(patch_maps.reshape(-1, side, side), np.ones((1, patch, patch)))


def test_the_transcription_is_timms_network(pair):
  """The authors' model, loaded from timm's state dict (every tensor, strict), computes
  timm's logits: the maps below are of the same network."""
  reference, _, theirs, images = pair
  with torch.no_grad():
    want = reference(_torch(images)).double().numpy()
  got = theirs(_torch(images).double()).detach().numpy()
  np.testing.assert_allclose(got, want, atol=1e-5)
  assert np.abs(want).max() > 0.1


@pytest.mark.parametrize("start_layer", [0, 1])
def test_transformer_attribution_equals_the_authors_code(pair, authors, start_layer):
  """A batch of three images with different targets against their code run on each
  image alone: to round-off in float64, and within float32's conditioning (module
  docstring) by default."""
  reference, model, _, images = pair
  want = _on_pixels(authors[start_layer][0], model.patch_size)
  scale = np.abs(want).max((1, 2), keepdims=True)
  assert (np.ptp(want, (1, 2)) > 0.9 * scale[:, 0, 0]).all()  # not flat maps
  got = np.asarray(saliency.transformer_attribution(model, jnp.asarray(images), TARGETS,
                                                    start_layer=start_layer))
  assert got.shape == (3, 32, 32) and got.dtype == np.float32
  assert (np.abs(got - want) <= 1e-3 * scale).all(), np.abs(got - want).max((1, 2))
  with jax.enable_x64(True):
    exact = _ours(reference.state_dict(), jnp.float64)  # float32 weights, float64 math
    got = np.asarray(saliency.transformer_attribution(
        exact, jnp.asarray(images, jnp.float64), TARGETS, start_layer=start_layer))
  assert got.dtype == np.float64
  assert (np.abs(got - want) <= 1e-10 * scale).all(), np.abs(got - want).max((1, 2))


def test_relevance_is_conserved_and_the_map_is_not_the_iccv_rule(pair, authors):
  """The paper's conservation, as their code keeps it: the one-hot relevance (sum 1)
  reaches the first block's input whole (their ``safe_divide``'s 1e-9 aside). And the
  map is not ``attention_relevance`` (their ICCV'21 rule, which weights the attention
  weights instead of their LRP relevance)."""
  _, model, _, images = pair
  relevance = authors[0][1]
  np.testing.assert_allclose(relevance.sum((1, 2)), 1.0, atol=1e-6)
  assert np.abs(relevance).max() > 1e-3
  ours = np.asarray(saliency.transformer_attribution(model, jnp.asarray(images), TARGETS))
  iccv = np.asarray(jax.jit(lambda x, t: saliency.attention_relevance(model, x, t))(
      jnp.asarray(images), TARGETS))
  assert (np.abs(ours - iccv).max((1, 2)) > 0.1 * np.abs(ours).max((1, 2))).all()


def test_under_jit_and_bad_input(pair):
  """One jitted program: under a caller's ``jit`` the maps are the eager ones and a
  target outside the classes gives that image a NaN map; eagerly bad input is named."""
  _, model, _, images = pair
  x = jnp.asarray(images)
  eager = np.asarray(saliency.transformer_attribution(model, x, TARGETS))
  jitted = jax.jit(lambda x, t: saliency.transformer_attribution(model, x, t))
  got = np.asarray(jitted(x, jnp.asarray([2, 5, 4])))
  np.testing.assert_allclose(got[[0, 2]], eager[[0, 2]], rtol=1e-5, atol=1e-9)
  assert np.isnan(got[1]).all()
  with pytest.raises(ValueError, match=r"targets must be classes in \[0, 5\)"):
    saliency.transformer_attribution(model, x, np.array([0, 5, 1]))
  with pytest.raises(ValueError, match="targets must be integer class indices"):
    saliency.transformer_attribution(model, x, np.array([0.0, 1.0, 2.0]))
  with pytest.raises(ValueError, match=r"start_layer must be a block index in \[0, 2\)"):
    saliency.transformer_attribution(model, x, TARGETS, start_layer=2)
  with pytest.raises(ValueError, match="images must be 32 x 32, got 64 x 64"):
    saliency.transformer_attribution(model, jnp.zeros((1, 64, 64, 3)), np.array([0]))
  with pytest.raises(ValueError, match="needs a cejax.models.vit.VisionTransformer, got "
                                       "Linear"):
    saliency.transformer_attribution(nnx.Linear(3, 5, rngs=nnx.Rngs(0)), x, TARGETS)
