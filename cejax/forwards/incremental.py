"""Exact incremental recompute of DenseNet for local masks (Nakandala et al., SIGMOD
2019, "Krypton"): the clean activations are computed once per image, and each mask
recomputes every layer only on the patch its change can reach.

A mask whose support lies in a box of ``(bh, bw)`` pixels changes only that box of the
input. Through each convolution or pooling the changed region grows by the kernel's
halo and shrinks by its stride (``cejax.regions``); pointwise layers (BatchNorm in eval
mode, ReLU, 1x1 convolutions) keep it. Each layer is recomputed on a patch of static
size at a per-mask (traced) position: the clean input around the patch is cut from the
cached clean activation (padded as the layer pads), the recomputed input patch is laid
over it, and the layer runs on that window without padding. Within a dense block the
features live in one buffer, the clean block output cut to the block's last patch,
into which each layer writes its new features in place (no concatenation per layer),
and the 3x3 convolutions on patches run as one matrix product over the kernel's taps
plus shifted sums. From the first layer whose patch covers ``full_fraction`` of its
map, the rest of the network runs in full with the model's own layers. Global average
pooling adds the patch's change to the clean mean, and the clean logits come from the
cached clean features.

``forward(model)`` is this path as a forward of ``effects.causal_effect``. Its effects
equal full forward passes up to float32 round-off, for every estimand and intervention
that is not random (the fill is computed on the whole image once, then cut to the
box). ``plan`` says whether the path applies to given masks, and why not when it does
not.

Example::

    grid = masks.grid(shape=(224, 224), n=10)
    decision = incremental.plan(model, image.shape, grid)  # .applies, .reason
    result = effects.causal_effect(incremental.forward(model), image, grid, batch_size=1)
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from cejax import effects, interventions
from cejax import masks as masks_lib
from cejax.forwards import full
from cejax.forwards._incremental_plan import (
  DENSE,
  FULL_FRACTION,
  STEM_CONV,
  STEM_POOL,
  TRANSITION,
  AxisOp,
  Decision,
  Layer,
  Plan,
  Step,
  layer_ops,
  macs,
  mask_boxes,
  plan,
  steps_for,
  support_boxes,
)
from cejax.models import densenet

# --- the walk ----------------------------------------------------------------------

def _pad(x, plans, value):
  (py, px) = plans
  return jnp.pad(x, ((py.op.padding, py.pad_after), (px.op.padding, px.pad_after), (0, 0)),
                 constant_values=value)


def _windowed(plans, clean_padded, patch, start, fn):
  """The op ``fn`` (no padding) recomputed on the output patch: the clean padded input
  around it with ``patch`` (at input ``start``) laid over it."""
  py, px = plans
  out_start = jnp.stack([py.start_out(start[0]), px.start_out(start[1])])
  ws = out_start * jnp.array([py.op.stride, px.op.stride])
  window = jax.lax.dynamic_slice(clean_padded, (ws[0], ws[1], 0),
                                 (py.window, px.window, clean_padded.shape[-1]))
  at = start + jnp.array([py.op.padding, px.op.padding]) - ws
  window = jax.lax.dynamic_update_slice(window, patch.astype(window.dtype),
                                        (at[0], at[1], 0))
  return fn(window)[:py.size_out, :px.size_out], out_start


def _conv_valid(conv: nnx.Conv):
  def fn(x):
    dtype = conv.dtype or x.dtype
    y = jax.lax.conv_general_dilated(
        x[None].astype(dtype), conv.kernel[...].astype(dtype), conv.strides, "VALID",
        dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return y[0]
  return fn


def _conv_by_shifts(conv: nnx.Conv):
  """``_conv_valid`` for a stride-1 convolution as one matrix product over all kernel
  taps and a sum of shifted slices: a patch is small and its convolution has few output
  channels, where XLA:CPU's convolution runs well below its matrix-product rate
  (docs/benchmarks.md, incremental recompute)."""
  def fn(x):
    dtype = conv.dtype or x.dtype
    kh, kw, c, k = conv.kernel.shape
    h, w = x.shape[0] - kh + 1, x.shape[1] - kw + 1
    taps = conv.kernel[...].astype(dtype).transpose(2, 0, 1, 3).reshape(c, kh * kw * k)
    z = jnp.dot(x.astype(dtype), taps).reshape(*x.shape[:2], kh, kw, k)
    return sum(z[dy:dy + h, dx:dx + w, dy, dx] for dy in range(kh) for dx in range(kw))
  return fn


def _max_pool(x):
  return nnx.max_pool(x[None], window_shape=(3, 3), strides=(2, 2))[0]


def _avg_pool(x):
  return nnx.avg_pool(x[None], window_shape=(2, 2), strides=(2, 2))[0]


def _dense_inner(layer, x):
  """A dense layer up to the 3x3 convolution's input (all pointwise)."""
  t = densenet.pointwise(layer.conv1, nnx.relu(layer.norm1(x)))
  return nnx.relu(layer.norm2(t))


def clean_cache(model: densenet.DenseNet, image, steps) -> dict[str, jax.Array]:
  """The clean activations the walk needs for ``image`` ``(h, w, c)``: each patch
  layer's input, padded as its plans say, the blocks' outputs, the final feature map."""
  plans = {s.layer: s.plans for s in steps}
  cache = {}
  x = image.astype(model.dtype)
  stem_conv, stem_pool = Layer(STEM_CONV), Layer(STEM_POOL)
  if plans[stem_conv] is not None:
    cache[stem_conv.name] = _pad(x, plans[stem_conv], 0)
  h = nnx.relu(model.stem.norm(model.stem.conv(x[None])))[0]
  if model.stem.pool:
    if plans[stem_pool] is not None:
      cache[stem_pool.name] = _pad(h, plans[stem_pool], -jnp.inf)
    h = _max_pool(jnp.pad(h, ((1, 1), (1, 1), (0, 0)), constant_values=-jnp.inf))
  for b, block in enumerate(model.blocks):
    for i, layer in enumerate(block.layers):
      where = Layer(DENSE, b + 1, i + 1)
      v = _dense_inner(layer, h)
      if plans[where] is not None:
        cache[where.name] = _pad(v, plans[where], 0)
      h = jnp.concatenate([h, layer.conv2(v[None])[0]], -1)
    cache[_block_key(b + 1)] = h
    if b < len(model.transitions):
      where = Layer(TRANSITION, b + 1)
      tr = model.transitions[b]
      t = densenet.pointwise(tr.conv, nnx.relu(tr.norm(h)))
      if plans[where] is not None:
        cache[where.name] = _pad(t, plans[where], 0)
      h = _avg_pool(t)
  cache["features"] = model.feature_map(h[None])[0]
  cache["mean"] = cache["features"].mean((0, 1))
  return cache


def _block_key(block: int) -> str:
  """The cache key of a dense block's clean output."""
  return f"block{block}"


def _whole(clean, patch, start):
  """The whole map: ``clean`` with ``patch`` laid over it at ``start``."""
  return jax.lax.dynamic_update_slice(clean, patch.astype(clean.dtype),
                                      (start[0], start[1], 0))


def _block_on_patches(layers, steps, cache, clean, x, start):
  """A dense block's ``layers`` (each with a patch plan in ``steps``) on patches: the
  block's input patch ``x`` at ``start`` in, the block's features on the last layer's
  output patch and its start out.

  The features are kept in one buffer, the clean block output cut to that last patch,
  into which the input patch and each layer's new features are written in place: a
  layer reads its input patch from it, so nothing is concatenated per layer.
  """
  last = start
  for step in steps:
    py, px = step.plans
    last = jnp.stack([py.start_out(last[0]), px.start_out(last[1])])
  py, px = steps[-1].plans
  buffer = jax.lax.dynamic_slice(clean, (last[0], last[1], 0),
                                 (py.size_out, px.size_out, clean.shape[-1]))
  buffer = jax.lax.dynamic_update_slice(buffer, x.astype(buffer.dtype),
                                        (start[0] - last[0], start[1] - last[1], 0))
  at, width = start, x.shape[-1]
  for layer, step in zip(layers, steps, strict=True):
    py, px = step.plans
    v = jax.lax.dynamic_slice(buffer, (at[0] - last[0], at[1] - last[1], 0),
                              (py.size_in, px.size_in, buffer.shape[-1]))[..., :width]
    y, at = _windowed(step.plans, cache[step.layer.name], _dense_inner(layer, v), at,
                      _conv_by_shifts(layer.conv2))
    buffer = jax.lax.dynamic_update_slice(buffer, y.astype(buffer.dtype),
                                          (at[0] - last[0], at[1] - last[1], width))
    width += y.shape[-1]
  return buffer[..., :width], last


def masked_logits(model: densenet.DenseNet, cache, steps, patch, start) -> jax.Array:
  """Logits ``(k,)`` of the image with its box at ``start`` replaced by ``patch``."""
  by_layer = {s.layer: s for s in steps}
  x = patch.astype(model.dtype)
  full = False

  def advance(layer, x, start, full_fn, window_fn, pre=None):
    """One windowed layer: in full, or on the patch (then maybe switching to full)."""
    nonlocal full
    step = by_layer[layer]
    if full or step.plans is None:
      full = True
      return full_fn(x), start
    y, start = _windowed(step.plans, cache[layer.name], pre(x) if pre else x, start,
                         window_fn)
    full = (y.shape[0], y.shape[1]) == (step.ops[0].size_out, step.ops[1].size_out)
    return y, start

  stem = model.stem
  x, start = advance(Layer(STEM_CONV), x, start, lambda x: stem.conv(x[None])[0],
                     _conv_valid(stem.conv))
  x = nnx.relu(stem.norm(x))
  if stem.pool:
    x, start = advance(Layer(STEM_POOL), x, start, lambda x: _max_pool(jnp.pad(
        x, ((1, 1), (1, 1), (0, 0)), constant_values=-jnp.inf)), _max_pool)
  for b, block in enumerate(model.blocks):
    block_steps = [by_layer[Layer(DENSE, b + 1, i + 1)] for i in range(len(block.layers))]
    clean = cache[_block_key(b + 1)]
    done = 0
    if not full:
      done = next((i for i, st in enumerate(block_steps) if st.plans is None),
                  len(block_steps))
      if done:
        x, start = _block_on_patches(block.layers[:done], block_steps[:done], cache, clean,
                                     x, start)
        if done < len(block_steps):  # switch part-way: the whole map from here
          x, full = _whole(clean[..., :x.shape[-1]], x, start), True
        else:
          full = (x.shape[0], x.shape[1]) == clean.shape[:2]
      elif block_steps:  # switch at the block's first layer
        x, start, full = _whole(clean[..., :x.shape[-1]], x, start), None, True
    for layer in block.layers[done:]:
      x = layer(x[None])[0]
    if b < len(model.transitions):
      tr = model.transitions[b]
      where = Layer(TRANSITION, b + 1)
      if not full and by_layer[where].plans is None:
        x, start, full = _whole(cache[_block_key(b + 1)], x, start), None, True
      if full:
        x = tr(x[None])[0]
      else:
        x, start = advance(where, x, start, None, _avg_pool,
                           pre=lambda x, tr=tr: densenet.pointwise(
                               tr.conv, nnx.relu(tr.norm(x))))
  if full:
    return model.head(x[None])[0]
  f = model.feature_map(x[None])[0]
  clean = jax.lax.dynamic_slice(cache["features"], (start[0], start[1], 0), f.shape)
  area = cache["features"].shape[0] * cache["features"].shape[1]
  mean = cache["mean"] + (f - clean).astype(jnp.float32).sum((0, 1)) / area
  return model.classifier(mean[None].astype(f.dtype))[0].astype(jnp.float32)


# --- the forward ---------------------------------------------------------------------

@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class IncrementalForward:
  """Incremental recompute as a forward of ``effects.causal_effect``; ``forward``
  builds it, ``prepare`` plans it for the masks (and raises if it does not apply).

  Attributes:
    graphdef, state: the DenseNet in eval mode (``nnx.split``).
    full_fraction: as in ``plan``.
    steps, box, starts: the plan of the masks (set by ``prepare``).
    masks, intervention: set by ``prepare``.
  """

  graphdef: Any = dataclasses.field(metadata=dict(static=True))
  state: Any
  full_fraction: float = dataclasses.field(default=FULL_FRACTION,
                                           metadata=dict(static=True))
  steps: tuple[Step, ...] = dataclasses.field(default=(), metadata=dict(static=True))
  box: tuple[int, int] | None = dataclasses.field(default=None, metadata=dict(static=True))
  starts: Any = None
  masks: Any = None
  intervention: Any = None

  @property
  def num(self) -> int:
    return self.masks.num

  def prepare(self, what, *, image, intervention) -> IncrementalForward:
    intervention = interventions.resolve("zero" if intervention is None else intervention)
    source = masks_lib.as_source(what, image.shape[:2])
    decision = plan(nnx.merge(self.graphdef, self.state), image.shape, source,
                    intervention=intervention, full_fraction=self.full_fraction)
    if not decision.applies:
      raise ValueError(f"Incremental recompute does not apply: {decision.reason} Use the "
                       "full forward (pass the logits_fn).")
    return dataclasses.replace(self, steps=decision.steps, box=decision.box,
                               starts=jnp.asarray(decision.starts), masks=source,
                               intervention=intervention)

  def setup(self, image):
    model = nnx.merge(self.graphdef, self.state)
    cache = clean_cache(model, image, self.steps)
    # The clean logits from the cached features: the forward pass the cache already is.
    clean_logits = model.classifier(cache["mean"][None])[0]
    return clean_logits, (cache, self.intervention.fill(image, None), image)

  def logits(self, context, indices, keys):
    del keys  # random interventions do not apply (prepare refuses them)
    cache, value, image = context
    model = nnx.merge(self.graphdef, self.state)
    chunk, starts = self.masks(indices), self.starts[indices]

    def one(mask, start):
      cut = lambda a: jax.lax.dynamic_slice(a, (start[0], start[1], 0),
                                            (*self.box, a.shape[-1]))
      patch = interventions.intervene(cut(image), cut(mask[..., None])[..., 0], cut(value))
      return masked_logits(model, cache, self.steps, patch, start)

    if chunk.shape[0] == 1:  # one mask: plain slices, no gathers
      logits = one(chunk[0], starts[0])[None]
    else:
      logits = jax.vmap(one)(chunk, starts)
    return logits, full.masks_ok(chunk, image)


def forward(model: densenet.DenseNet, *, full_fraction: float = FULL_FRACTION
            ) -> IncrementalForward:
  """Incremental recompute of ``model`` (a cejax DenseNet, put in eval mode first) as a
  forward of ``effects.causal_effect``.

  Raises:
    ValueError: ``model`` is not a cejax DenseNet.
  """
  if not isinstance(model, densenet.DenseNet):
    raise ValueError(f"Incremental recompute needs a cejax DenseNet, got "
                     f"{type(model).__name__}.")
  graphdef, state = nnx.split(model)
  return IncrementalForward(graphdef, state, full_fraction)


def _causal_effect(model, image, masks, *, full_fraction=FULL_FRACTION, **kwargs):
  return effects.causal_effect(forward(model, full_fraction=full_fraction), image, masks,
                               **kwargs)

__all__ = ["DENSE", "FULL_FRACTION", "STEM_CONV", "STEM_POOL", "TRANSITION", "AxisOp",
           "Decision", "IncrementalForward", "Layer", "Plan", "Step", "clean_cache",
           "forward", "layer_ops", "macs", "mask_boxes", "masked_logits", "plan",
           "steps_for", "support_boxes"]
