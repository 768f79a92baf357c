"""Token interventions on a Vision Transformer: the masked patches' tokens are removed
instead of their pixels being painted over.

A ViT reads an image as patch tokens. ``do(X_M = v)`` on a patch can then leave the
token out (Jain et al., ICLR 2022, "Missingness bias": a CNN shown a blacked-out region
predicts from the masking pattern itself; a ViT with the tokens dropped does not), and a
shorter sequence costs fewer FLOPs. ``token_forward`` is a ``cejax.effects.Forward`` of
the one engine, for ``causal_effect`` with any mask source::

    forward = tokens.token_forward(embed, blocks, head, patch_size=16, mode="drop")
    result = cejax.causal_effect(forward, image, cejax.grid(shape=(224, 224), n=14))

The model is three pure functions (the protocol; ``from_vit`` builds them for
``cejax.models.vit.VisionTransformer``):

- ``embed(images (n, h, w, c)) -> (prefix (n, P, D), patches (n, N, D))``: the prefix
  tokens (a class token) and the patch tokens in row-major patch order, each with its own
  position embedding already added;
- ``blocks(tokens (n, T, D), key_mask (n, T) bool or None) -> tokens (n, T, D)``: the
  encoder, where a False key is attended by no query;
- ``head(tokens) -> logits (n, k)``, from the prefix.

A patch is intervened on when its mask's mean over the patch is at least 0.5 (exactly
the mask for masks on the patch grid). Modes:

- ``"drop"``: the intervened patches' tokens are removed; the prefix and the kept tokens
  keep their position embeddings. Sequences are static: every item of a call has the
  length of the mask that keeps the most patches, and where masks keep different
  counts the shorter ones are padded with a key mask over the padding (``padding`` says
  what share of the tokens computed is padding). Where every mask keeps the same count
  (patch grids, sliding windows, fixed-count masks) there is neither.
- ``"attention"``: the sequence keeps its length and the intervened tokens are masked
  out as keys. For the prefix's output this is the same function as ``"drop"``.

Pixel fills on the same masks are the plain forward: ``causal_effect(logits_fn, ...)``.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from cejax import masks as masks_lib

MODES = ("drop", "attention")
# Masks counted per compiled call when ``prepare`` measures how many patches each keeps.
_COUNT_CHUNK = 256


def patch_keep(masks, patch_size: int):
  """``(b, N)`` bool: the patches each mask ``(b, h, w)`` keeps (its mean over the
  patch below 0.5), row-major."""
  b, h, w = masks.shape
  p = patch_size
  means = masks.reshape(b, h // p, p, w // p, p).mean((2, 4))
  return (means < 0.5).reshape(b, -1)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TokenForward:
  """The forward of token interventions (module docstring); ``token_forward`` builds it.

  Attributes:
    embed_fn, blocks_fn, head_fn: the model's three pure functions (module docstring).
    patch_size: the patch side in pixels.
    mode: ``"drop"`` or ``"attention"``.
    length: drop mode: the patch tokens of every item, the most any mask keeps (set by
      ``prepare``).
    padded: drop mode: whether some masks keep fewer (then a key mask covers the
      padding).
    padding: drop mode: the share of the patch tokens computed that are padding.
    masks: the mask source (set by ``prepare``).
  """

  embed_fn: Callable = dataclasses.field(metadata=dict(static=True))
  blocks_fn: Callable = dataclasses.field(metadata=dict(static=True))
  head_fn: Callable = dataclasses.field(metadata=dict(static=True))
  patch_size: int = dataclasses.field(metadata=dict(static=True))
  mode: str = dataclasses.field(default="drop", metadata=dict(static=True))
  length: int = dataclasses.field(default=0, metadata=dict(static=True))
  padded: bool = dataclasses.field(default=False, metadata=dict(static=True))
  padding: float = dataclasses.field(default=0.0, metadata=dict(static=True))
  masks: Any = None

  @property
  def num(self) -> int:
    return self.masks.num

  def prepare(self, what, *, image, intervention) -> TokenForward:
    if intervention is not None:
      raise ValueError(
          "token interventions remove the masked patches' tokens (mode 'drop') or hide "
          "them from attention ('attention'); intervention= is for pixel fills, which "
          "the plain forward does: causal_effect(logits_fn, image, masks, "
          "intervention=...).")
    h, w = image.shape[:2]
    p = self.patch_size
    if h % p or w % p:
      raise ValueError(f"the image ({h} x {w}) must be a whole number of {p} x {p} "
                       "patches.")
    source = masks_lib.as_source(what, (h, w))
    if self.mode == "attention":
      return dataclasses.replace(self, masks=source)
    counts = _kept_counts(source, p)
    length = int(counts.max())
    padding = float(np.mean(length - counts) / length) if length else 0.0
    return dataclasses.replace(self, masks=source, length=length,
                               padded=bool(counts.min() != length), padding=padding)

  def setup(self, image):
    prefix, patches = self.embed_fn(image[None])
    clean = self.head_fn(self.blocks_fn(jnp.concatenate([prefix, patches], 1), None))[0]
    return clean, (prefix[0], patches[0], image)

  def logits(self, context, indices, keys):
    del keys  # nothing random
    prefix, patches, image = context
    chunk = self.masks(indices)  # (b, h, w)
    keep = patch_keep(chunk, self.patch_size)  # (b, N)
    b = chunk.shape[0]
    prefix = jnp.broadcast_to(prefix, (b, *prefix.shape))
    kept_prefix = jnp.ones((b, prefix.shape[1]), bool)
    if self.mode == "attention":
      tokens = jnp.concatenate([prefix, jnp.broadcast_to(patches, (b, *patches.shape))], 1)
      key_mask = jnp.concatenate([kept_prefix, keep], 1)
    else:
      # The kept patches first, in their order (a stable sort on "dropped").
      order = jnp.argsort(~keep, axis=1, stable=True)[:, :self.length]
      tokens = jnp.concatenate([prefix, patches[order]], 1)
      valid = jnp.take_along_axis(keep, order, axis=1)
      key_mask = jnp.concatenate([kept_prefix, valid], 1) if self.padded else None
    logits = self.head_fn(self.blocks_fn(tokens, key_mask))
    ok = ((chunk >= 0) & (chunk <= 1)).all((1, 2)) & jnp.isfinite(image).all()
    return logits, ok


@functools.partial(jax.jit, static_argnums=2)
def _count_kept(source, indices, patch_size):
  return patch_keep(source(indices), patch_size).sum(1)


def _kept_counts(source, patch_size) -> np.ndarray:
  """``(m,)`` the patches each mask of ``source`` keeps, a chunk at a time.

  One compiled program for every call on sources of the same kind and size: the last
  chunk repeats the final index rather than being shorter (which would compile again).
  """
  if (isinstance(source, masks_lib.PatchSubsets)
      and source.patch_size % patch_size == 0):
    # A fixed count by construction: known without the (possibly traced) key.
    patches = (source.shape[0] // patch_size) * (source.shape[1] // patch_size)
    per_subset_patch = (source.patch_size // patch_size) ** 2
    return np.full(source.num, patches - source.dropped * per_subset_patch, np.int64)
  if any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree.leaves(source)):
    raise ValueError(
        "token drop sizes its sequences by the patches each mask keeps, so it needs the "
        "masks' values when the program is traced: pass masks that are not traced (a "
        "constant closed over, not an argument of your jax.jit), or use "
        "mode='attention', which keeps the sequence length.")
  size = min(_COUNT_CHUNK, source.num)
  out = []
  # Under a caller's jit the counts are still computed now, from the concrete masks.
  with jax.ensure_compile_time_eval():
    for start in range(0, source.num, size):
      idx = np.minimum(np.arange(start, start + size), source.num - 1)
      out.append(np.asarray(_count_kept(source, jnp.asarray(idx), patch_size)))
  return np.concatenate(out)[:source.num]


def token_forward(embed: Callable, blocks: Callable, head: Callable, *, patch_size: int,
                  mode: str = "drop") -> TokenForward:
  """A token-intervention forward of a ViT given as three pure functions (module
  docstring).

  Raises:
    ValueError: an unknown mode or a patch size below 1.
  """
  if mode not in MODES:
    raise ValueError(f"mode must be one of {MODES}, got {mode!r}.")
  if int(patch_size) < 1:
    raise ValueError(f"patch_size must be a positive number of pixels, got {patch_size}.")
  return TokenForward(embed, blocks, head, int(patch_size), mode)


def from_vit(model, *, mode: str = "drop") -> TokenForward:
  """``token_forward`` of a ``cejax.models.vit.VisionTransformer`` (its weights as they
  are now: later changes to ``model`` are not seen).

  Build it once and reuse it: its functions are the compiled program's static part, so
  each call of ``from_vit`` makes a forward that ``causal_effect`` compiles anew.
  """
  from flax import nnx

  graphdef, state = nnx.split(model)
  merged = lambda: nnx.merge(graphdef, state)  # noqa: E731
  return token_forward(lambda x: merged().embed(x),
                       lambda t, key_mask: merged().blocks(t, key_mask),
                       lambda t: merged().head(t), patch_size=model.patch_size, mode=mode)


__all__ = ["MODES", "TokenForward", "from_vit", "patch_keep", "token_forward"]
