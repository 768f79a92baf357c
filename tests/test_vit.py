"""The Flax ViT against timm's ``VisionTransformer`` (PyTorch), weights copied across.

The reference is timm's own model (``tests/timm_vit.py`` loads it where torchvision's
compiled operators cannot). Tolerances: float32 on a CPU, summed in a different order.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import timm_vit  # tests/, on the path
import torch
from flax import nnx

from cejax.models import vit

CONFIG = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4)


@pytest.fixture(scope="module")
def pair():
  torch.manual_seed(0)
  reference = timm_vit.vision_transformer()(num_classes=5, in_chans=3, **CONFIG).eval()
  with torch.no_grad():  # timm zero-inits the head and leaves cls_token near 0: randomise
    for param in reference.parameters():
      param.add_(0.05 * torch.randn_like(param))
  model = vit.VisionTransformer(num_classes=5, rngs=nnx.Rngs(1), **CONFIG)
  vit.load_timm(model, reference.state_dict())
  images = np.random.default_rng(2).normal(size=(3, 32, 32, 3)).astype(np.float32)
  return reference, model, images


def _torch(images):
  return torch.from_numpy(images.transpose(0, 3, 1, 2).copy())


def test_logits_equal_timms(pair):
  reference, model, images = pair
  with torch.no_grad():
    want = reference(_torch(images)).numpy()
  got = np.asarray(jax.jit(lambda x: model(x))(jnp.asarray(images)))
  np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
  assert np.abs(want).max() > 0.1  # not a zero head


def test_the_state_dict_layout_is_timms(pair):
  reference, model, _ = pair
  assert vit.timm_state(model) == {k: tuple(v.shape)
                                   for k, v in reference.state_dict().items()}


def test_a_key_mask_equals_timm_on_the_reduced_sequence(pair):
  """Masking the attention keys of dropped patch tokens gives the class token what timm
  computes on the sequence without them (any order-free token drop is exact)."""
  reference, model, images = pair
  keep = np.zeros((3, 1 + 16), bool)
  keep[:, 0] = True
  rng = np.random.default_rng(3)
  for row in keep:
    row[1 + rng.choice(16, 6, replace=False)] = True
  with torch.no_grad():
    tokens = reference._pos_embed(reference.patch_embed(_torch(images)))
    want = np.stack([
        reference.head(reference.norm(reference.blocks(tokens[i:i + 1, torch.from_numpy(
            np.flatnonzero(keep[i]))]))[:, 0])[0].numpy() for i in range(3)])
  prefix, patches = model.embed(jnp.asarray(images))
  tokens = jnp.concatenate([prefix, patches], 1)
  got = model.head(model.blocks(tokens, jnp.asarray(keep)))
  np.testing.assert_allclose(np.asarray(got), want, atol=1e-4, rtol=1e-4)
  full = model.head(model.blocks(tokens))
  assert float(jnp.abs(full - got).max()) > 1e-3  # the drop changed the answer


def test_bad_input_is_named(pair):
  reference, model, _ = pair
  with pytest.raises(ValueError, match="images must be 32 x 32, got 64 x 64"):
    model(jnp.zeros((1, 64, 64, 3)))
  state = dict(reference.state_dict())
  state.pop("head.bias")
  state["blocks.0.norm1.weight"] = state["blocks.0.norm1.weight"][:3]
  with pytest.raises(ValueError, match=r"missing \['head.bias'\].*blocks.0.norm1.weight"):
    vit.load_timm(model, state)
  with pytest.raises(ValueError, match="Unknown ViT preset 'vit_huge'"):
    vit.create_vit("vit_huge", rngs=nnx.Rngs(0))
