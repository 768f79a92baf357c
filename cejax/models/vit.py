"""Vision Transformer in Flax NNX, laid out exactly like timm's ``VisionTransformer``.

A class token and learned position embeddings (the class token's included), pre-norm
blocks (LayerNorm, multi-head self-attention with a fused ``qkv`` projection, LayerNorm,
GELU MLP), a final LayerNorm and a linear head on the class token: timm's defaults
(``global_pool="token"``, ``class_token=True``, ``no_embed_class=False``, LayerNorm
``eps=1e-6``, exact GELU). ``cejax.models.convert_timm`` loads a timm state dict.

The model is three pure stages, the token interface of ``cejax.forwards.tokens``::

    prefix, patches = model.embed(images)   # (n, 1, D) class token, (n, N, D) patches,
                                            # position embeddings added
    tokens = model.blocks(jnp.concatenate([prefix, patches], 1), key_mask)
    logits = model.head(tokens)             # from the class token

``key_mask`` ``(n, T)`` (True = may be attended to) makes tokens unattendable without
removing them; ``None`` lets every token attend to every other.

Example::

    model = vit.create_vit("vit_small_patch16_224", num_classes=14, rngs=nnx.Rngs(0))
    logits = model(jnp.zeros((1, 224, 224, 3)))
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from cejax.models import initializers

_LN_EPSILON = 1e-6  # timm's ViT: partial(nn.LayerNorm, eps=1e-6)


def _linear(din, dout, *, dtype, rngs):
  # timm's init: trunc_normal(std=0.02) weights, zero biases.
  return nnx.Linear(din, dout, kernel_init=initializers.truncated_normal(0.02),
                    bias_init=nnx.initializers.zeros, dtype=dtype, rngs=rngs)


def _layer_norm(dim, *, dtype, rngs):
  return nnx.LayerNorm(dim, epsilon=_LN_EPSILON, dtype=dtype, rngs=rngs)


class Attention(nnx.Module):
  """Multi-head self-attention: ``softmax(q k^T / sqrt(d_head)) v`` per head."""

  def __init__(self, dim: int, num_heads: int, *, dtype, rngs: nnx.Rngs):
    if dim % num_heads:
      raise ValueError(f"embed_dim {dim} must be divisible by num_heads {num_heads}.")
    self.num_heads = num_heads
    self.qkv = _linear(dim, 3 * dim, dtype=dtype, rngs=rngs)
    self.proj = _linear(dim, dim, dtype=dtype, rngs=rngs)

  def weights(self, x, key_mask=None):
    """Attention weights ``(n, heads, T, T)`` and values ``(n, heads, T, d)``."""
    n, t, dim = x.shape
    head = dim // self.num_heads
    qkv = self.qkv(x).reshape(n, t, 3, self.num_heads, head).transpose(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    scores = jnp.einsum("nhqd,nhkd->nhqk", q * head ** -0.5, k)
    if key_mask is not None:
      scores = jnp.where(key_mask[:, None, None, :], scores, -jnp.inf)
    return jax.nn.softmax(scores, axis=-1), v

  def forward(self, x, key_mask=None, offset=None):
    """``(output, attention weights)``. ``offset (n, heads, T, T)``, added to the
    weights, exists for its gradient: at zero, the gradient with respect to them."""
    n, t, dim = x.shape
    attn, v = self.weights(x, key_mask)
    mixed = attn if offset is None else attn + offset
    out = jnp.einsum("nhqk,nhkd->nqhd", mixed, v).reshape(n, t, dim)
    return self.proj(out), attn

  def __call__(self, x, key_mask=None):
    return self.forward(x, key_mask)[0]


class Mlp(nnx.Module):
  def __init__(self, dim: int, hidden: int, *, dtype, rngs: nnx.Rngs):
    self.fc1 = _linear(dim, hidden, dtype=dtype, rngs=rngs)
    self.fc2 = _linear(hidden, dim, dtype=dtype, rngs=rngs)

  def __call__(self, x):
    return self.fc2(jax.nn.gelu(self.fc1(x), approximate=False))


class Block(nnx.Module):
  """``x + attn(norm1(x))``, then ``x + mlp(norm2(x))`` (timm's pre-norm block)."""

  def __init__(self, dim: int, num_heads: int, mlp_ratio: float, *, dtype, rngs: nnx.Rngs):
    self.norm1 = _layer_norm(dim, dtype=dtype, rngs=rngs)
    self.attn = Attention(dim, num_heads, dtype=dtype, rngs=rngs)
    self.norm2 = _layer_norm(dim, dtype=dtype, rngs=rngs)
    self.mlp = Mlp(dim, int(dim * mlp_ratio), dtype=dtype, rngs=rngs)

  def forward(self, x, key_mask=None, offset=None, tap=None):
    """``(output, attention weights, norm1's output)``. ``offset``: added to the
    attention weights; ``tap (n, T, D)``: added to ``norm1``'s output. Both exist for
    their gradients (at zero)."""
    normed = self.norm1(x)
    attended, attn = self.attn.forward(normed if tap is None else normed + tap, key_mask,
                                       offset)
    x = x + attended
    return x + self.mlp(self.norm2(x)), attn, normed

  def __call__(self, x, key_mask=None):
    return self.forward(x, key_mask)[0]


class VisionTransformer(nnx.Module):
  """timm's ``VisionTransformer`` (module docstring). Images are NHWC."""

  def __init__(self, *, img_size: int = 224, patch_size: int = 16, in_channels: int = 3,
               num_classes: int = 1000, embed_dim: int = 768, depth: int = 12,
               num_heads: int = 12, mlp_ratio: float = 4.0, dtype=jnp.float32,
               rngs: nnx.Rngs):
    if img_size % patch_size:
      raise ValueError(f"img_size {img_size} must be a multiple of patch_size {patch_size}.")
    self.img_size, self.patch_size, self.in_channels = img_size, patch_size, in_channels
    self.num_classes, self.embed_dim = num_classes, embed_dim
    grid = img_size // patch_size
    self.grid = (grid, grid)
    self.patch_embed = nnx.Conv(in_channels, embed_dim, kernel_size=(patch_size, patch_size),
                                strides=(patch_size, patch_size), padding="VALID",
                                kernel_init=initializers.lecun_normal(), dtype=dtype, rngs=rngs)
    init = initializers.truncated_normal(0.02)
    self.cls_token = nnx.Param(jnp.zeros((1, 1, embed_dim)) + 1e-6 * init(
        rngs.params(), (1, 1, embed_dim)))
    self.pos_embed = nnx.Param(init(rngs.params(), (1, 1 + grid * grid, embed_dim)))
    self.blocks_ = nnx.List([Block(embed_dim, num_heads, mlp_ratio, dtype=dtype, rngs=rngs)
                             for _ in range(depth)])
    self.norm = _layer_norm(embed_dim, dtype=dtype, rngs=rngs)
    self.head_ = _linear(embed_dim, num_classes, dtype=dtype, rngs=rngs)

  @property
  def num_patches(self) -> int:
    return self.grid[0] * self.grid[1]

  def embed(self, images):
    """``(prefix (n, 1, D), patches (n, N, D))``: the class token and the patch tokens
    in row-major patch order, each with its position embedding added."""
    n, h, w, _ = images.shape
    if (h, w) != (self.img_size, self.img_size):
      raise ValueError(f"images must be {self.img_size} x {self.img_size}, got {h} x {w}.")
    patches = self.patch_embed(images).reshape(n, self.num_patches, self.embed_dim)
    pos = self.pos_embed[...]
    prefix = jnp.broadcast_to(self.cls_token[...] + pos[:, :1], (n, 1, self.embed_dim))
    return prefix, patches + pos[:, 1:]

  def blocks(self, tokens, key_mask=None):
    """The encoder blocks and the final LayerNorm on ``tokens (n, T, D)``."""
    for block in self.blocks_:
      tokens = block(tokens, key_mask)
    return self.norm(tokens)

  def trace(self, images, *, offsets=None, tap=None, layer: int = -1):
    """One forward pass that keeps what attribution baselines need: ``(logits,
    attention weights (depth, n, heads, T, T), norm1's output (n, T, D) at block
    layer)``. ``offsets (depth, n, heads, T, T)`` are added to the attention weights and
    ``tap (n, T, D)`` to block ``layer``'s ``norm1`` output, for their gradients (at
    zero: the gradients with respect to the weights and to those tokens)."""
    prefix, patches = self.embed(images)
    tokens = jnp.concatenate([prefix, patches], 1)
    index, weights, tapped = layer % len(self.blocks_), [], None
    for i, block in enumerate(self.blocks_):
      tokens, attn, normed = block.forward(
          tokens, None, None if offsets is None else offsets[i],
          tap if i == index else None)
      weights.append(attn)
      tapped = normed if i == index else tapped
    return self.head(self.norm(tokens)), jnp.stack(weights), tapped

  def attentions(self, images):
    """The attention weights of every block, ``(depth, n, heads, T, T)`` (``T``: the
    class token and the patch tokens), for attribution baselines such as
    ``cejax.saliency.attention_rollout``."""
    return self.trace(images)[1]

  def head(self, tokens):
    """Logits ``(n, k)`` from the class token of the encoded ``tokens``."""
    return self.head_(tokens[:, 0])

  def __call__(self, images):
    prefix, patches = self.embed(images)
    return self.head(self.blocks(jnp.concatenate([prefix, patches], 1)))


# timm's names and sizes; "vit_synthetic" is the small model of the embedded 64 px set.
PRESETS = {
    "vit_tiny_patch16_224": functools.partial(VisionTransformer, patch_size=16,
                                              embed_dim=192, depth=12, num_heads=3),
    "vit_small_patch16_224": functools.partial(VisionTransformer, patch_size=16,
                                               embed_dim=384, depth=12, num_heads=6),
    "vit_base_patch16_224": functools.partial(VisionTransformer, patch_size=16,
                                              embed_dim=768, depth=12, num_heads=12),
    "vit_synthetic": functools.partial(VisionTransformer, img_size=64, patch_size=8,
                                       embed_dim=128, depth=4, num_heads=4),
}


def create_vit(preset: str, *, rngs: nnx.Rngs, **overrides) -> VisionTransformer:
  """Builds a preset by name; ``overrides`` replace any constructor argument."""
  if preset not in PRESETS:
    raise ValueError(f"Unknown ViT preset {preset!r}; valid presets are {sorted(PRESETS)}.")
  return PRESETS[preset](rngs=rngs, **overrides)


def timm_state(model: VisionTransformer) -> dict[str, tuple[int, ...]]:
  """The timm state-dict keys ``model`` takes and the shape each must have."""
  d, c, p = model.embed_dim, model.in_channels, model.patch_size
  shapes = {"cls_token": (1, 1, d), "pos_embed": (1, 1 + model.num_patches, d),
            "patch_embed.proj.weight": (d, c, p, p), "patch_embed.proj.bias": (d,),
            "norm.weight": (d,), "norm.bias": (d,),
            "head.weight": (model.num_classes, d), "head.bias": (model.num_classes,)}
  for i, block in enumerate(model.blocks_):
    hidden = block.mlp.fc1.kernel.shape[1]
    shapes.update({
        f"blocks.{i}.norm1.weight": (d,), f"blocks.{i}.norm1.bias": (d,),
        f"blocks.{i}.attn.qkv.weight": (3 * d, d), f"blocks.{i}.attn.qkv.bias": (3 * d,),
        f"blocks.{i}.attn.proj.weight": (d, d), f"blocks.{i}.attn.proj.bias": (d,),
        f"blocks.{i}.norm2.weight": (d,), f"blocks.{i}.norm2.bias": (d,),
        f"blocks.{i}.mlp.fc1.weight": (hidden, d), f"blocks.{i}.mlp.fc1.bias": (hidden,),
        f"blocks.{i}.mlp.fc2.weight": (d, hidden), f"blocks.{i}.mlp.fc2.bias": (d,)})
  return shapes


def load_timm(model: VisionTransformer, state) -> VisionTransformer:
  """Copies a timm ``VisionTransformer`` state dict (``{name: array}``, numpy or torch
  tensors) into ``model`` in place: linear weights ``(out, in)`` transposed to Flax's
  ``(in, out)``, the patch convolution ``(D, C, p, p)`` to ``(p, p, C, D)``.

  Raises:
    ValueError: missing, unexpected or misshapen tensors, all named (nothing is loaded
      partially).
  """
  import numpy as np

  state = {k: np.asarray(v.detach().cpu().numpy() if hasattr(v, "detach") else v)
           for k, v in state.items()}
  want = timm_state(model)
  missing = sorted(set(want) - set(state))
  unexpected = sorted(set(state) - set(want))
  wrong = sorted(f"{k}: {state[k].shape} (want {want[k]})" for k in set(want) & set(state)
                 if tuple(state[k].shape) != want[k])
  if missing or unexpected or wrong:
    raise ValueError(f"The state dict does not fit this ViT: missing {missing}, unexpected "
                     f"{unexpected}, misshapen {wrong}.")

  def put(param, value):
    param.value = jnp.asarray(value, param.value.dtype)

  def linear(layer, prefix):
    put(layer.kernel, state[f"{prefix}.weight"].T)
    put(layer.bias, state[f"{prefix}.bias"])

  def norm(layer, prefix):
    put(layer.scale, state[f"{prefix}.weight"])
    put(layer.bias, state[f"{prefix}.bias"])

  put(model.cls_token, state["cls_token"])
  put(model.pos_embed, state["pos_embed"])
  put(model.patch_embed.kernel, state["patch_embed.proj.weight"].transpose(2, 3, 1, 0))
  put(model.patch_embed.bias, state["patch_embed.proj.bias"])
  for i, block in enumerate(model.blocks_):
    norm(block.norm1, f"blocks.{i}.norm1")
    linear(block.attn.qkv, f"blocks.{i}.attn.qkv")
    linear(block.attn.proj, f"blocks.{i}.attn.proj")
    norm(block.norm2, f"blocks.{i}.norm2")
    linear(block.mlp.fc1, f"blocks.{i}.mlp.fc1")
    linear(block.mlp.fc2, f"blocks.{i}.mlp.fc2")
  norm(model.norm, "norm")
  linear(model.head_, "head")
  return model


__all__ = ["PRESETS", "Attention", "Block", "Mlp", "VisionTransformer", "create_vit",
           "load_timm", "timm_state"]
