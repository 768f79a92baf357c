"""The Flax ViT against timm's ``VisionTransformer`` (PyTorch), weights copied across.

The reference is timm's own model (``tests/timm_vit.py`` loads it where torchvision's
compiled operators cannot). Tolerances: float32 on a CPU, summed in a different order.
"""

import json

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
  reference = timm_vit.randomised(**CONFIG)
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


# Token interventions (cejax.forwards.tokens) against timm on the reduced sequence.

def _timm_reduced_logits(reference, image, keep):
  """timm's logits for one image with only the patches ``keep (N,)`` in the sequence."""
  with torch.no_grad():
    tokens = reference._pos_embed(reference.patch_embed(_torch(image[None])))
    index = torch.from_numpy(np.concatenate([[0], 1 + np.flatnonzero(keep)]))
    return reference.forward_head(reference.norm(reference.blocks(tokens[:, index])))[0].numpy()


def _softmax(z):
  e = np.exp(z - z.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def _patch_masks(rng, num, dropped_counts):
  """``(num, 32, 32)`` masks on the 4 x 4 patch grid, mask i dropping ``counts[i]``."""
  masks = np.zeros((num, 4, 4), np.float32)
  for mask, count in zip(masks, dropped_counts, strict=True):
    mask.reshape(-1)[rng.choice(16, count, replace=False)] = 1
  return np.kron(masks, np.ones((8, 8), np.float32))


@pytest.mark.parametrize("counts", ["equal", "different"])
def test_token_drop_equals_timm_on_each_reduced_sequence(pair, counts):
  """The paper's expected CE of dropping each mask's patches, against a Python loop over
  the masks running timm on the sequence without them; with every mask dropping 5
  patches (no padding) and with 1 to 15 (padding and a key mask)."""
  import cejax
  from cejax.forwards import tokens

  reference, model, images = pair
  rng = np.random.default_rng(4)
  dropped = [5] * 12 if counts == "equal" else list(rng.integers(1, 16, 12))
  masks = _patch_masks(rng, 12, dropped)
  forward = tokens.from_vit(model, mode="drop")
  got = cejax.causal_effect(forward, jnp.asarray(images[0]), masks, batch_size=5)
  with torch.no_grad():
    clean = reference(_torch(images[:1]))[0].numpy()
  p = _softmax(clean.astype(np.float64))
  want = [np.sum(p * (_softmax(_timm_reduced_logits(reference, images[0], keep)
                                .astype(np.float64)) - p))
          for keep in np.asarray(tokens.patch_keep(jnp.asarray(masks), 8))]
  np.testing.assert_allclose(np.asarray(got.effects), want, atol=2e-5)
  assert np.ptp(want) > 1e-3
  prepared = forward.prepare(masks, image=jnp.asarray(images[0]), intervention=None)
  assert prepared.length == 16 - min(dropped)
  assert prepared.padded == (counts == "different")
  kept = 16 - np.array(dropped)
  np.testing.assert_allclose(prepared.padding, np.mean(kept.max() - kept) / kept.max())
  attention = cejax.causal_effect(tokens.from_vit(model, mode="attention"),
                                  jnp.asarray(images[0]), masks)
  np.testing.assert_allclose(np.asarray(attention.effects), want, atol=2e-5)


def test_repeated_token_drop_calls_compile_nothing_new(pair):
  """A forward built once and called again, on another image and other masks of the same
  kept count, compiles nothing: on the old code ``prepare`` counted each mask's kept
  patches with a new ``jax.jit(lambda ...)`` per call, one compilation every call (a
  token-drop sweep of 32 masks ran at 350 masks/s where the attention mask ran 9,600)."""
  from compile_count import Compilations

  import cejax
  from cejax.forwards import tokens

  _, model, images = pair
  rng = np.random.default_rng(7)
  forward = tokens.from_vit(model, mode="drop")
  cejax.causal_effect(forward, jnp.asarray(images[0]), _patch_masks(rng, 12, [5] * 12),
                      batch_size=4)  # compiles
  with Compilations() as compiled:
    cejax.causal_effect(forward, jnp.asarray(images[1]), _patch_masks(rng, 12, [5] * 12),
                        batch_size=4)
  assert compiled.count == 0


def test_token_drop_under_a_callers_jit_equals_eager_and_traced_masks_are_named(pair):
  """Inside a user's ``jax.jit`` (the image traced, the masks closed over) token drop
  gives the eager values; on the old code its kept counts were read from tracers
  (TracerArrayConversionError). Masks that are themselves traced cannot size the
  sequences: a clear error naming the way out (mode "attention", which works)."""
  import cejax
  from cejax.forwards import tokens

  _, model, images = pair
  masks = jnp.asarray(_patch_masks(np.random.default_rng(8), 6, [3, 5, 5, 7, 2, 9]))
  image = jnp.asarray(images[0])
  drop = tokens.from_vit(model, mode="drop")
  eager = cejax.causal_effect(drop, image, masks, batch_size=4).effects
  jitted = jax.jit(lambda x: cejax.causal_effect(drop, x, masks, batch_size=4).effects)
  np.testing.assert_allclose(jitted(image), eager, atol=1e-6)
  with pytest.raises(ValueError, match="needs the masks' values.*mode='attention'"):
    jax.jit(lambda x, m: cejax.causal_effect(drop, x, m).effects)(image, masks)
  attention = tokens.from_vit(model, mode="attention")
  np.testing.assert_allclose(
      jax.jit(lambda x, m: cejax.causal_effect(attention, x, m).effects)(image, masks),
      eager, atol=2e-5)


def test_token_drop_of_patch_subsets_with_a_traced_key_equals_their_arrays(pair):
  """Patch subsets keep a fixed count by construction, so token drop sizes their
  sequences without their values: under a ``jax.jit`` whose key is traced (the analysis
  draws each chunk's masks from its key) it equals the same masks as a concrete array,
  whose kept counts are read patch by patch; for subsets on the model's 8 px patches and
  on 16 px patches (four tokens each). On the old code the traced key was refused."""
  import cejax
  from cejax.forwards import tokens

  _, model, images = pair
  image = jnp.asarray(images[0])
  drop = tokens.from_vit(model, mode="drop")
  for patch_size, keep in ((8, 0.25), (16, 0.5)):
    def effects(key, patch_size=patch_size, keep=keep):
      subsets = cejax.patch_subsets(key, num=5, shape=(32, 32), patch_size=patch_size,
                                    keep=keep)
      return cejax.causal_effect(drop, image, subsets, batch_size=4).effects
    key = jax.random.key(3)
    arrays = cejax.to_array(cejax.patch_subsets(key, num=5, shape=(32, 32),
                                                patch_size=patch_size, keep=keep))
    want = cejax.causal_effect(drop, image, arrays, batch_size=4).effects
    np.testing.assert_allclose(jax.jit(effects)(key), want, atol=1e-6)


def _joint_attention(att_mat, add_residual=True):
  """Abnar & Zuidema's ``compute_joint_attention`` (samiraabnar/attention_flow,
  ``attention_graph_util.py``), transcribed in float64: ``att_mat (layers, T, T)``,
  heads already averaged."""
  if add_residual:
    aug_att_mat = att_mat + np.eye(att_mat.shape[1])[None, ...]
    aug_att_mat = aug_att_mat / aug_att_mat.sum(axis=-1)[..., None]
  else:
    aug_att_mat = att_mat
  joint_attentions = np.zeros(aug_att_mat.shape)
  joint_attentions[0] = aug_att_mat[0]
  for i in np.arange(1, joint_attentions.shape[0]):
    joint_attentions[i] = aug_att_mat[i].dot(joint_attentions[i - 1])
  return joint_attentions


def _timm_capture(reference, images, modules, targets=None):
  """The outputs of timm's ``modules`` on ``images`` (forward hooks; attention on its
  unfused path, where ``attn_drop`` sees the weights), float64 ``(len(modules), ...)``,
  and, given ``targets``, their gradients of the target logits summed over the batch
  (in the modules' order), else None."""
  outs, grads, hooks = [], [], []

  def keep(module, args, out):
    outs.append(out)
    if targets is not None:
      out.register_hook(grads.append)

  for block in reference.blocks:
    block.attn.fused_attn = False
  for module in modules:
    hooks.append(module.register_forward_hook(keep))
  try:
    with torch.set_grad_enabled(targets is not None):
      logits = reference(_torch(images))
      if targets is not None:
        logits.gather(1, torch.from_numpy(targets)[:, None]).sum().backward()
  finally:
    for hook in hooks:
      hook.remove()
    for block in reference.blocks:
      block.attn.fused_attn = True
  stack = lambda xs: np.stack([x.detach().double().numpy() for x in xs])  # noqa: E731
  return stack(outs), (stack(grads[::-1]) if targets is not None else None)  # backward order


@pytest.mark.parametrize("residual", [True, False])
def test_attention_rollout_equals_the_authors_code_on_timms_attention(pair, residual):
  """The attention weights are timm's (captured at each block's attention dropout, the
  unfused path), heads averaged and rolled out by the authors' code in float64; the map
  is the class token's row over the patches, each patch's value on its pixels."""
  from cejax import saliency

  reference, model, images = pair
  captured, _ = _timm_capture(reference, images,
                              [block.attn.attn_drop for block in reference.blocks])
  weights = model.attentions(jnp.asarray(images))
  np.testing.assert_allclose(np.asarray(weights), captured, atol=1e-5)
  got = saliency.attention_rollout(weights, image_shape=images.shape[1:3],
                                   residual=residual)
  size, patch = images.shape[1], model.patch_size
  for i in range(len(images)):
    joint = _joint_attention(captured[:, i].mean(1), add_residual=residual)
    want = joint[-1][0, 1:].reshape(size // patch, size // patch)
    want = np.kron(want, np.ones((patch, patch)))
    np.testing.assert_allclose(np.asarray(got[i]), want, atol=1e-5)
  with pytest.raises(ValueError, match="do not tile a 32 x 32 image"):
    saliency.attention_rollout(weights, image_shape=(32, 32), num_prefix=2)
  with pytest.raises(ValueError, match=r"\(layers, n, heads, T, T\)"):
    saliency.attention_rollout(weights[0], image_shape=images.shape[1:3])


def test_patch_subsets_drop_a_fixed_count_and_token_drop_takes_them_unpadded(pair):
  """``cejax.patch_subsets``: every mask intervenes on exactly the requested number of
  whole patches, mask i depends on i alone (the same through any chunking), and each
  patch is chosen about equally often (400 masks: within 5 standard deviations of
  the binomial mean). Token drop takes them without padding, and their expected CE
  equals a Python loop running timm on each reduced sequence."""
  import cejax
  from cejax.forwards import tokens

  reference, model, images = pair
  source = cejax.patch_subsets(jax.random.key(3), num=400, shape=(32, 32), patch_size=8,
                               keep=0.75)
  masks = np.asarray(cejax.to_array(source))
  patches = masks[:, ::8, ::8]  # (400, 4, 4): one value per patch
  np.testing.assert_array_equal(masks, np.kron(patches, np.ones((8, 8))))
  assert set(np.unique(masks)) == {0.0, 1.0} and (patches.sum((1, 2)) == 4).all()
  np.testing.assert_array_equal(np.asarray(source(jnp.array([7, 2]))), masks[[7, 2]])
  counts = patches.reshape(400, 16).sum(0)  # Binomial(400, 1/4) per patch
  assert np.abs(counts - 100).max() < 5 * np.sqrt(400 * 0.25 * 0.75), counts
  first = cejax.patch_subsets(jax.random.key(3), num=12, shape=(32, 32), patch_size=8,
                              keep=0.75)
  drop = tokens.from_vit(model, mode="drop")
  assert not drop.prepare(first, image=jnp.asarray(images[0]), intervention=None).padded
  got = cejax.causal_effect(drop, jnp.asarray(images[0]), first, batch_size=5)
  with torch.no_grad():
    clean = reference(_torch(images[:1]))[0].numpy()
  p = _softmax(clean.astype(np.float64))
  want = [np.sum(p * (_softmax(_timm_reduced_logits(reference, images[0], keep)
                                .astype(np.float64)) - p))
          for keep in np.asarray(tokens.patch_keep(jnp.asarray(masks[:12]), 8))]
  np.testing.assert_allclose(np.asarray(got.effects), want, atol=2e-5)
  with pytest.raises(ValueError, match="whole number of patch_size"):
    cejax.patch_subsets(jax.random.key(0), num=2, shape=(30, 32), patch_size=8, keep=0.5)
  with pytest.raises(ValueError, match=r"keep must be in \[0, 1\)"):
    cejax.patch_subsets(jax.random.key(0), num=2, shape=(32, 32), patch_size=8, keep=1.0)


def _chefer_relevance(cams, grads):
  """Chefer et al.'s ICCV'21 rule for self-attention (hila-chefer/
  Transformer-MM-Explainability, ``avg_heads``, ``apply_self_attention_rules`` and the
  loop of ``generate_relevance``), transcribed in float64 for one image:
  ``cams``/``grads`` are ``(layers, heads, T, T)``."""
  num_tokens = cams.shape[-1]
  relevance = np.eye(num_tokens)
  for cam, grad in zip(cams, grads, strict=True):
    cam = np.clip(grad * cam, 0, None).mean(0)  # avg_heads
    relevance = relevance + cam @ relevance  # apply_self_attention_rules
  return relevance[0, 1:]


def test_attention_relevance_equals_chefers_rule_on_timms_attention_and_gradients(pair):
  """timm's attention weights and their gradients (hooks at each block's attention
  dropout, the unfused path; the target logits summed over the batch and
  backpropagated) through the authors' rule in float64, against
  ``saliency.attention_relevance`` on the same weights. Targets out of range are named."""
  from cejax import saliency

  reference, model, images = pair
  targets = np.array([0, 3, 1])
  cams, grads = _timm_capture(reference, images,  # (L, n, H, T, T) each
                              [block.attn.attn_drop for block in reference.blocks], targets)
  got = np.asarray(saliency.attention_relevance(model, jnp.asarray(images), targets))
  size, patch = images.shape[1], model.patch_size
  for i in range(len(images)):
    want = _chefer_relevance(cams[:, i], grads[:, i]).reshape(size // patch, -1)
    np.testing.assert_allclose(got[i], np.kron(want, np.ones((patch, patch))), atol=1e-5)
    assert np.ptp(want) > 1e-3
  with pytest.raises(ValueError, match=r"targets must be classes in \[0, 5\)"):
    saliency.attention_relevance(model, jnp.asarray(images), np.array([0, 5, 1]))


def _pytorch_grad_cam(activations, grads, rows, cols):
  """pytorch-grad-cam's GradCAM on a ViT (jacobgil/pytorch-grad-cam: the tutorial's
  ``reshape_transform``, ``GradCAM.get_cam_weights``, ``BaseCAM.get_cam_image`` and the
  ReLU of ``compute_cam_per_layer``), transcribed in float64 for ``(n, T, D)`` tokens;
  returns the cam before ``scale_cam_image`` and that min-max scaling (without its
  cv2 resize)."""
  def reshape_transform(tensor):
    result = tensor[:, 1:, :].reshape(tensor.shape[0], rows, cols, tensor.shape[2])
    return result.transpose(0, 3, 1, 2)  # (n, C, h, w)

  activations, grads = reshape_transform(activations), reshape_transform(grads)
  weights = np.mean(grads, axis=(2, 3))
  cam = (weights[:, :, None, None] * activations).sum(axis=1)
  cam = np.maximum(cam, 0)
  scaled = [(c - c.min()) / (1e-7 + (c - c.min()).max()) for c in cam]
  return cam, np.stack(scaled)


def test_token_grad_cam_equals_pytorch_grad_cams_vit_recipe_on_timm(pair):
  """timm's tokens at ``blocks[-1].norm1`` and their gradients (hooks), through
  pytorch-grad-cam's GradCAM transcribed in float64: equal to ``token_grad_cam`` on the
  patch grid; the documented difference (no per-image [0, 1] scaling) is exactly the
  scaling. Bad targets and layers are named."""
  from cejax import saliency

  reference, model, images = pair
  targets = np.array([2, 0, 4])
  acts, grads = _timm_capture(reference, images, [reference.blocks[-1].norm1], targets)
  rows = images.shape[1] // model.patch_size
  cam, scaled = _pytorch_grad_cam(acts[0], grads[0], rows, rows)
  got = np.asarray(saliency.token_grad_cam(model, jnp.asarray(images), targets))
  patch = model.patch_size
  np.testing.assert_allclose(got, np.kron(cam, np.ones((1, patch, patch))), atol=1e-5)
  assert (cam.max((1, 2)) > 1e-3).all()
  ours = got[:, ::patch, ::patch]
  ours = (ours - ours.min((1, 2), keepdims=True)) / (
      1e-7 + (ours - ours.min((1, 2), keepdims=True)).max((1, 2), keepdims=True))
  np.testing.assert_allclose(ours, scaled, atol=1e-4)
  with pytest.raises(ValueError, match=r"targets must be classes in \[0, 5\)"):
    saliency.token_grad_cam(model, jnp.asarray(images), np.array([0, -1, 1]))
  with pytest.raises(ValueError, match=r"layer must be a block index in \[-2, 2\)"):
    saliency.token_grad_cam(model, jnp.asarray(images), targets, layer=2)


def test_token_grad_cam_equals_pytorch_grad_cam_itself(pair):
  """pytorch-grad-cam's own ``GradCAM`` on timm's model (``target_layers`` the last
  block's ``norm1``, its ViT tutorial's ``reshape_transform``): its maps are our patch
  values min-max scaled per image, resized bilinearly by cv2 and scaled again (its
  multi-layer aggregation), the documented difference; applied to our values, they
  agree."""
  import cv2
  from pytorch_grad_cam import GradCAM
  from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

  from cejax import saliency

  reference, model, images = pair
  targets = [2, 0, 4]
  rows = images.shape[1] // model.patch_size

  def reshape_transform(tensor):
    result = tensor[:, 1:, :].reshape(tensor.size(0), rows, rows, tensor.size(2))
    return result.transpose(2, 3).transpose(1, 2)

  with GradCAM(model=reference, target_layers=[reference.blocks[-1].norm1],
               reshape_transform=reshape_transform) as cam:
    theirs = cam(input_tensor=_torch(images),
                 targets=[ClassifierOutputTarget(t) for t in targets])
  ours = np.asarray(saliency.token_grad_cam(model, jnp.asarray(images),
                                            np.array(targets)))[:, ::model.patch_size,
                                                                ::model.patch_size]
  side = images.shape[1]

  def scale(img):  # pytorch-grad-cam's scale_cam_image, per image
    img = img - np.min(img)
    return img / (1e-7 + np.max(img))

  for got, want in zip(ours, theirs, strict=True):
    # Scaled per layer, resized, then (aggregate_multi_layer) scaled again.
    resized = scale(cv2.resize(scale(got).astype(np.float32), (side, side)))
    np.testing.assert_allclose(resized, want, atol=1e-4)
    assert np.ptp(want) > 0.5


@pytest.mark.heavy
def test_a_plain_jax_vit_works_through_the_protocol():
  """A user's ViT in plain JAX (one attention layer, no Flax): dropping tokens equals the
  model run on the shortened sequence, written without a key mask."""
  import cejax
  from cejax.forwards import tokens

  k = jax.random.split(jax.random.key(0), 4)
  w_embed = jax.random.normal(k[0], (4 * 4, 8)) * 0.5
  pos = jax.random.normal(k[1], (1 + 16, 8))
  w_qkv = jax.random.normal(k[2], (8, 24)) * 0.3
  w_head = jax.random.normal(k[3], (8, 3))

  def embed(images):
    n = images.shape[0]
    patches = images[..., 0].reshape(n, 4, 4, 4, 4).transpose(0, 1, 3, 2, 4).reshape(n, 16, 16)
    return jnp.broadcast_to(pos[:1], (n, 1, 8)), patches @ w_embed + pos[1:]

  def blocks(t, key_mask=None):
    q, kk, v = jnp.split(t @ w_qkv, 3, -1)
    s = jnp.einsum("nqd,nkd->nqk", q, kk)
    if key_mask is not None:
      s = jnp.where(key_mask[:, None, :], s, -jnp.inf)
    return t + jax.nn.softmax(s, -1) @ v

  head = lambda t: t[:, 0] @ w_head  # noqa: E731
  image = jax.random.normal(jax.random.key(5), (16, 16, 1))
  masks = _patch_masks(np.random.default_rng(6), 6, [2, 4, 6, 8, 10, 3])
  masks = np.kron(masks[:, ::8, ::8], np.ones((4, 4), np.float32))  # on the 4 px grid
  got = cejax.causal_effect(tokens.token_forward(embed, blocks, head, patch_size=4),
                            image, masks, estimand="logit")
  prefix, patches = embed(image[None])
  for effect, mask in zip(np.asarray(got.effects), masks, strict=True):
    keep = np.flatnonzero(mask[::4, ::4].reshape(-1) < 0.5)
    short = head(blocks(jnp.concatenate([prefix, patches[:, keep]], 1)))
    full = head(blocks(jnp.concatenate([prefix, patches], 1)))
    np.testing.assert_allclose(effect, short[0, got.target] - full[0, got.target],
                               atol=1e-5)


def test_repeated_eager_baselines_compile_once(pair):
  """Each ViT baseline is one compiled program: a second eager call on other images of
  the same shapes compiles nothing (attention_relevance and token_grad_cam ran op by op,
  about 5 s a call on the job test's model; the assertion fails on that code)."""
  from compile_count import Compilations

  import cejax

  _, model, images = pair
  targets = jnp.array([0, 1, 2])
  calls = [cejax.saliency.attention_relevance, cejax.saliency.transformer_attribution,
           cejax.saliency.token_grad_cam, cejax.saliency.legrad]
  for call in calls:
    call(model, images, targets)
    with Compilations() as compiled:
      call(model, images + 1.0, targets)
    assert compiled.count == 0, call.__name__


def test_token_forward_bad_input_is_named(pair):
  import cejax
  from cejax.forwards import tokens

  _, model, images = pair
  forward = tokens.from_vit(model)
  with pytest.raises(ValueError, match="intervention= is for pixel fills"):
    cejax.causal_effect(forward, jnp.asarray(images[0]), cejax.grid(shape=(32, 32), n=4),
                        intervention="zero")
  with pytest.raises(ValueError, match=r"whole number of 8 x 8 patches"):
    cejax.causal_effect(forward, jnp.zeros((30, 30, 3)), cejax.grid(shape=(30, 30), n=3))
  with pytest.raises(ValueError, match="mode must be one of"):
    tokens.from_vit(model, mode="fill")


@pytest.mark.heavy(60)
def test_train_py_trains_a_vit_preset_that_the_sweep_runs_with_token_interventions(
    tmp_path, data_dir):
  """The smoke run with ``config.model.preset = "vit_synthetic"``: trained and
  checkpointed like a DenseNet, its best checkpoint reloads as the same function; the
  sweep computes zero fill, token drop and attention masking on the same patch-grid
  masks, each map what ``causal_effect`` and ``ce_map`` give with that forward (the token
  forwards themselves are checked against timm above); masks that cut through patches
  and DenseNet runs are refused for token interventions. The analysis computes the token
  CE maps (each what ``causal_effect`` and ``ce_map`` give with the token forward) and
  the attention baselines (each what its ``cejax.saliency`` function gives) and runs the
  sanity check on them; DenseNet-only methods and masks that cut through
  patches are refused by name."""
  import conftest

  import cejax
  from cejax.data import pipeline
  from cejax.forwards import tokens
  from cejax.jobs import analysis, checkpoint, evaluators, sweep, training
  from cejax.jobs.sweep import plan as sweep_plan
  from cejax.models import densenet

  config = conftest.smoke_config(data_dir)
  config.model.preset = "vit_synthetic"
  config.model.overrides.block_config = None
  config.train.num_epochs = 1
  training.train_and_evaluate(config, tmp_path, devices=jax.devices()[:1])
  graphdef, params, stats, run = checkpoint.load_model(tmp_path)
  assert run["preset"] == "vit_synthetic"
  model = nnx.merge(graphdef, params, stats)
  assert isinstance(model, vit.VisionTransformer) and model.img_size == 32
  logits_fn, _ = cejax.load_logits_fn(tmp_path)
  images = jax.random.normal(jax.random.key(0), (2, 32, 32, 1))
  np.testing.assert_allclose(logits_fn(images), model(images), atol=1e-5)

  s, m = config.sweep, config.masks
  # The patch subsets here; grids and windows in the analysis below.
  s.num_images, s.chunk_size, s.batch_size, s.families = 2, 2, 4, ("patches",)
  m.patch_masks, m.patch_keep = 6, 0.25  # 4 of the 16 patch tokens kept
  s.interventions = ("zero", "token_drop", "attention_mask")
  s.estimands = ("expected",)
  m.grid_cells = 4  # the 4 x 4 grid of 8 px patches
  summary = sweep.run(config, tmp_path, out=tmp_path / "sweep", devices=jax.devices()[:1],
                      progress=False)
  assert {p["path"] for p in summary["paths"].values()} == {"full"}
  assert "gflops_per_s" not in summary and "token interventions" in summary["flops_note"]
  recorded = json.loads((tmp_path / "sweep" / "settings.json").read_text())["compute"]
  assert recorded["token_forwards"] == {"token_drop": "drop", "attention_mask": "attention"}
  got = sweep.load(tmp_path / "sweep")
  image = jnp.asarray(pipeline.load_dataset(config.data).batch("test", [1])["image"][0])
  forwards = {"zero": logits_fn, "token_drop": tokens.from_vit(model, mode="drop"),
              "attention_mask": tokens.from_vit(model, mode="attention")}
  # The documented patch-subset key (mask_spec.PATCHES_STREAM), drawn here independently.
  subsets = cejax.patch_subsets(jax.random.fold_in(jax.random.key(s.seed), 0xFFFFFFFF),
                                num=6, shape=(32, 32), patch_size=8, keep=0.25)
  for family, source in {"patches": subsets}.items():
    for name, forward in forwards.items():
      fill = "zero" if name == "zero" else None
      want = cejax.ce_map(cejax.causal_effect(forward, image, source, intervention=fill,
                                              batch_size=4).effects, source, batch_size=4)
      np.testing.assert_allclose(got.maps[family][name]["expected"][1], want, atol=1e-6,
                                 err_msg=(family, name))
  assert not np.allclose(got.maps["patches"]["zero"]["expected"],
                         got.maps["patches"]["token_drop"]["expected"])

  s.path = "incremental"
  with pytest.raises(ValueError, match="path='incremental' is DenseNet's recompute"):
    sweep.run(config, tmp_path, out=tmp_path / "incremental", progress=False)
  s.path = "auto"
  config.sweep.families = ("rise",)  # what the sweep checks before it starts
  with pytest.raises(ValueError, match="the 'rise' masks do not cover whole patches"):
    sweep_plan.token_forwards(model, s.interventions,
                              sweep_plan.mask_sources(config, (32, 32)))
  net = densenet.DenseNet(growth_rate=4, block_config=(1,), num_init_features=4,
                          bn_size=2, in_channels=1, num_classes=5, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"token interventions remove a Vision "
                                       r"Transformer's patch tokens.*DenseNet"):
    sweep_plan.token_forwards(net, ("zero", "token_drop"), {"patches": subsets})

  # The analysis: token CE maps and the attention baselines beside a pixel fill's.
  a = config.analysis
  a.num_images, a.chunk_size, a.batch_size = 2, 2, 4
  a.evaluators = ("maps", "sanity")  # scoring a map is the same code for any model
  a.methods = ("ce_grid", "ce_grid_token_drop", "ce_sliding_attention_mask", "ce_patches",
               "ce_patches_token_drop", "attention_rollout", "attention_relevance",
               "transformer_attribution", "token_grad_cam", "legrad")
  m.window, m.stride = 16, 8  # sliding windows of 2 x 2 patches, a patch apart
  analysis.analyze(config, tmp_path, out=tmp_path / "analysis", progress=False)
  metrics = json.loads((tmp_path / "analysis" / "metrics.json").read_text())
  stored, results = analysis.load_results(
      sorted((tmp_path / "analysis" / "chunks").glob("*.npz")), evaluators.select(a.evaluators))
  got_maps = results["maps"].maps
  images = jnp.asarray(pipeline.load_dataset(config.data).batch("test", [0, 1])["image"])
  targets = jnp.asarray(stored.target)
  windows = cejax.sliding_windows(shape=(32, 32), window=16, stride=8)
  grid = cejax.grid(shape=(32, 32), n=4)
  for name, forward, source in (
      ("ce_grid", logits_fn, grid), ("ce_grid_token_drop", forwards["token_drop"], grid),
      ("ce_sliding_attention_mask", forwards["attention_mask"], windows),
      ("ce_patches", logits_fn, None), ("ce_patches_token_drop", forwards["token_drop"], None)):
    fill = "zero" if name in ("ce_grid", "ce_patches") else None
    for i in range(2) if name == "ce_patches_token_drop" else (1,):
      if source is None:  # the chunk's patch subsets: drawn from its key, as documented
        key = jax.random.fold_in(jax.random.fold_in(jax.random.key(a.seed), 0), 0)
        source = cejax.patch_subsets(jax.random.fold_in(key, 0xFFFFFFFF), num=6,
                                     shape=(32, 32),
                                     patch_size=8, keep=0.25)
      want = -cejax.ce_map(cejax.causal_effect(
          forward, images[i], source, intervention=fill, target=int(targets[i]),
          batch_size=4).effects, source)
      # Stored as float16: relative round-off; the values are small (about 1e-4).
      assert np.abs(want).max() > 0, name
      np.testing.assert_allclose(got_maps[name][i], want, rtol=2e-3,
                                 atol=1e-3 * np.abs(want).max(), err_msg=name)
  for name, want in (
      ("attention_rollout", cejax.saliency.attention_rollout(model.attentions(images),
                                                             image_shape=(32, 32))),
      ("attention_relevance", cejax.saliency.attention_relevance(model, images, targets)),
      ("transformer_attribution", cejax.saliency.transformer_attribution(model, images,
                                                                         targets)),
      ("token_grad_cam", cejax.saliency.token_grad_cam(model, images, targets)),
      ("legrad", cejax.saliency.legrad(model, images, targets))):
    assert np.abs(want).max() > 0, name
    np.testing.assert_allclose(got_maps[name], want, rtol=2e-3,
                               atol=1e-3 * np.abs(want).max(), err_msg=name)
  sanity = metrics["methods"]
  assert {"ce_grid", "ce_grid_token_drop", "token_grad_cam"} <= set(sanity)
  assert all("sanity_spearman" in sanity[m] for m in sanity)
  a.methods = ("ce_grid", "grad_cam")
  with pytest.raises(ValueError, match=r"\['grad_cam'\], which need DenseNet's stages.*"
                                       r"Vision Transformer"):
    analysis.analyze(config, tmp_path, out=tmp_path / "refused")
  a.methods, a.evaluators = ("ce_grid",), ("maps", "attacks", "detection")
  with pytest.raises(ValueError, match=r"\['attacks', 'detection'\]: the attacks' CE "
                                       r"features include the latent CE"):
    analysis.analyze(config, tmp_path, out=tmp_path / "refused")
  a.evaluators = ("maps",)
  a.methods, m.stride = ("ce_sliding_token_drop",), 4
  with pytest.raises(ValueError, match=r"analysis.methods has \['ce_sliding_token_drop'\].*"
                                       r"'sliding' masks do not cover whole patches"):
    analysis.analyze(config, tmp_path, out=tmp_path / "refused")
  # Subsets of 4 px patches cut the 8 px tokens; a keep that leaves no patch makes every
  # subset the same mask. Both refused before anything is written.
  a.methods, m.stride, m.patch_size = ("ce_patches_token_drop",), 8, 4
  with pytest.raises(ValueError, match=r"subsets of 4 px patches; use "
                                       r"config.masks.patch_size a multiple of 8"):
    analysis.analyze(config, tmp_path, out=tmp_path / "refused")
  m.patch_size, m.patch_keep = 8, 0.01
  with pytest.raises(ValueError, match=r"patch_keep 0.01 keeps 0 of the 16 patches"):
    analysis.analyze(config, tmp_path, out=tmp_path / "refused")
  assert not (tmp_path / "refused").exists()
  config.model.overrides.growth_rate = 8
  with pytest.raises(ValueError, match=r"overrides \['growth_rate'\] are DenseNet's"):
    training.train_and_evaluate(config, tmp_path / "other", devices=jax.devices()[:1])


def _legrad_authors(reference, images, targets, *, start, pooling):
  """The loop of LeGrad's released code (WalBouss/LeGrad, ``compute_legrad_clip``)
  transcribed on timm's ViT in float64: each block's output tokens (their
  ``feat_post_mlp``) pooled, normed and classified (their ``ln_post(...) @ proj`` and
  image-text similarity: here the classifier's head and the target logits, summed over
  the batch); ``autograd.grad`` to the block's attention map, clamped at zero, averaged
  over heads then queries, the patch columns summed over the blocks; ``min_max`` per
  image. Their bilinear resize of each block's map is left out (patch level)."""
  import copy

  net = copy.deepcopy(reference).double()
  feats, maps, hooks = [], [], []
  for block in net.blocks:
    block.attn.fused_attn = False
    hooks.append(block.register_forward_hook(lambda m, a, out: feats.append(out)))
    hooks.append(block.attn.attn_drop.register_forward_hook(
        lambda m, a, out: maps.append(out)))
  net(_torch(images).double())
  for hook in hooks:
    hook.remove()
  total = 0
  for layer in range(start, len(net.blocks)):
    feat = feats[layer]
    pooled = feat[:, 0] if pooling == "token" else feat.mean(dim=1)
    logits = net.head(net.norm(pooled))
    score = logits.gather(1, torch.from_numpy(targets)[:, None]).sum()
    grad = torch.autograd.grad(score, [maps[layer]], retain_graph=True)[0]
    grad = torch.clamp(grad, min=0.0)
    total = total + grad.mean(dim=1).mean(dim=1)[:, 1:]
  low = total.min(dim=-1, keepdim=True)[0]
  high = total.max(dim=-1, keepdim=True)[0]
  return ((total - low) / (high - low)).detach().numpy()


@pytest.mark.parametrize("pooling,start", [("token", 0), ("mean", 1)])
def test_legrad_equals_the_authors_loop_on_timm(pair, pooling, start):
  """``saliency.legrad`` against the authors' loop transcribed on timm's weights in
  float64, at patch level (each patch's value on its pixels), for the classifier's
  class-token pooling and for their CLIP code's mean pooling; a map with no positive
  gradient is zeros (the authors' scaling gives NaN); bad settings are named."""
  from cejax import saliency

  reference, model, images = pair
  targets = np.array([2, 0, 4])
  first = start - len(model.blocks_)
  got = np.asarray(saliency.legrad(model, jnp.asarray(images), targets,
                                   first_layer=first, pooling=pooling))
  want = _legrad_authors(reference, images, targets, start=start, pooling=pooling)
  rows = images.shape[1] // model.patch_size
  for i in range(len(images)):
    np.testing.assert_allclose(
        got[i], np.kron(want[i].reshape(rows, -1), np.ones((model.patch_size,) * 2)),
        atol=2e-5)
  assert got.min() == 0 and got.max() == 1
  flat = nnx.clone(model)
  flat.head_.kernel.value = jnp.zeros_like(flat.head_.kernel.value)  # constant logits
  assert not np.asarray(saliency.legrad(flat, jnp.asarray(images), targets)).any()
  with pytest.raises(ValueError, match="pooling must be one of"):
    saliency.legrad(model, jnp.asarray(images), targets, pooling="max")
  np.testing.assert_array_equal(  # -5 of 2 blocks: every block
      np.asarray(saliency.legrad(model, jnp.asarray(images), targets, first_layer=-5,
                                 pooling="mean")),
      np.asarray(saliency.legrad(model, jnp.asarray(images), targets, first_layer=0,
                                 pooling="mean")))
  with pytest.raises(ValueError, match=r"first_layer must be a block index below 2"):
    saliency.legrad(model, jnp.asarray(images), targets, first_layer=len(model.blocks_))
