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

The effects equal the full-forward sweep (``effects.causal_effect``) up to float32
round-off, for every estimand and intervention that is not random (the fill is
computed on the whole image once, then cut to the box). ``plan`` says whether the path
applies to given masks, and why not when it does not.

Example::

    grid = masks.grid(shape=(224, 224), n=10)
    decision = incremental.plan(model, image.shape, grid)  # .applies, .reason
    result = incremental.causal_effect(model, image, grid, batch_size=1)
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from cejax import interventions, sharding, validation
from cejax import masks as masks_lib
from cejax.estimands import CEResult, activate, check_activation, check_estimand, estimand_value
from cejax.incremental_plan import (  # noqa: F401  (re-exported: the planning API)
  FULL_FRACTION,
  Decision,
  Step,
  layer_ops,
  mask_boxes,
  plan,
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
  (benchmarks/RESULTS.md, incremental recompute)."""
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
  plans = {s.name: s.plans for s in steps}
  cache = {}
  x = image.astype(model.dtype)
  if plans["stem.conv"] is not None:
    cache["stem.conv"] = _pad(x, plans["stem.conv"], 0)
  h = nnx.relu(model.stem.norm(model.stem.conv(x[None])))[0]
  if model.stem.pool:
    if plans["stem.pool"] is not None:
      cache["stem.pool"] = _pad(h, plans["stem.pool"], -jnp.inf)
    h = _max_pool(jnp.pad(h, ((1, 1), (1, 1), (0, 0)), constant_values=-jnp.inf))
  for b, block in enumerate(model.blocks):
    for i, layer in enumerate(block.layers):
      name = f"block{b + 1}.layer{i + 1}"
      v = _dense_inner(layer, h)
      if plans[name] is not None:
        cache[name] = _pad(v, plans[name], 0)
      h = jnp.concatenate([h, layer.conv2(v[None])[0]], -1)
    cache[f"block{b + 1}"] = h
    if b < len(model.transitions):
      name = f"transition{b + 1}"
      tr = model.transitions[b]
      t = densenet.pointwise(tr.conv, nnx.relu(tr.norm(h)))
      if plans[name] is not None:
        cache[name] = _pad(t, plans[name], 0)
      h = _avg_pool(t)
  cache["features"] = model.feature_map(h[None])[0]
  cache["mean"] = cache["features"].mean((0, 1))
  return cache


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
    y, at = _windowed(step.plans, cache[step.name], _dense_inner(layer, v), at,
                      _conv_by_shifts(layer.conv2))
    buffer = jax.lax.dynamic_update_slice(buffer, y.astype(buffer.dtype),
                                          (at[0] - last[0], at[1] - last[1], width))
    width += y.shape[-1]
  return buffer[..., :width], last


def masked_logits(model: densenet.DenseNet, cache, steps, patch, start) -> jax.Array:
  """Logits ``(k,)`` of the image with its box at ``start`` replaced by ``patch``."""
  by_name = {s.name: s for s in steps}
  x = patch.astype(model.dtype)
  full = False

  def advance(name, x, start, full_fn, window_fn, pre=None):
    """One windowed layer: in full, or on the patch (then maybe switching to full)."""
    nonlocal full
    step = by_name[name]
    if full or step.plans is None:
      full = True
      return full_fn(x), start
    y, start = _windowed(step.plans, cache[name], pre(x) if pre else x, start, window_fn)
    full = (y.shape[0], y.shape[1]) == (step.ops[0].size_out, step.ops[1].size_out)
    return y, start

  stem = model.stem
  x, start = advance("stem.conv", x, start, lambda x: stem.conv(x[None])[0],
                     _conv_valid(stem.conv))
  x = nnx.relu(stem.norm(x))
  if stem.pool:
    x, start = advance("stem.pool", x, start, lambda x: _max_pool(jnp.pad(
        x, ((1, 1), (1, 1), (0, 0)), constant_values=-jnp.inf)), _max_pool)
  for b, block in enumerate(model.blocks):
    names = [f"block{b + 1}.layer{i + 1}" for i in range(len(block.layers))]
    clean = cache[f"block{b + 1}"]
    done = 0
    if not full:
      done = next((i for i, n in enumerate(names) if by_name[n].plans is None), len(names))
      if done:
        x, start = _block_on_patches(block.layers[:done],
                                     [by_name[n] for n in names[:done]], cache, clean, x,
                                     start)
        if done < len(names):  # switch part-way: the whole map from here
          x, full = _whole(clean[..., :x.shape[-1]], x, start), True
        else:
          full = (x.shape[0], x.shape[1]) == clean.shape[:2]
      elif names:  # switch at the block's first layer
        x, start, full = _whole(clean[..., :x.shape[-1]], x, start), None, True
    for layer in block.layers[done:]:
      x = layer(x[None])[0]
    if b < len(model.transitions):
      tr = model.transitions[b]
      if not full and by_name[f"transition{b + 1}"].plans is None:
        x, start, full = _whole(cache[f"block{b + 1}"], x, start), None, True
      if full:
        x = tr(x[None])[0]
      else:
        x, start = advance(f"transition{b + 1}", x, start, None, _avg_pool,
                           pre=lambda x, tr=tr: densenet.pointwise(
                               tr.conv, nnx.relu(tr.norm(x))))
  if full:
    return model.head(x[None])[0]
  f = model.feature_map(x[None])[0]
  clean = jax.lax.dynamic_slice(cache["features"], (start[0], start[1], 0), f.shape)
  area = cache["features"].shape[0] * cache["features"].shape[1]
  mean = cache["mean"] + (f - clean).astype(jnp.float32).sum((0, 1)) / area
  return model.classifier(mean[None].astype(f.dtype))[0].astype(jnp.float32)


# --- the effect ----------------------------------------------------------------------

def causal_effect(model: densenet.DenseNet, image, masks, *, intervention="zero",
                  estimand="expected", target: int | None = None,
                  batch_size: int | None = None, activation: str = "softmax",
                  mesh: jax.sharding.Mesh | None = None,
                  full_fraction: float = FULL_FRACTION) -> CEResult:
  """``effects.causal_effect`` of ``model`` (a DenseNet in eval mode) by incremental
  recompute; the same arguments and result (up to float32 round-off).
  ``full_fraction`` as in ``plan``.

  Raises:
    ValueError: what ``effects.causal_effect`` raises, or the path does not apply to
      these masks or this intervention (the message says why; use
      ``effects.causal_effect`` then).
  """
  from cejax import effects

  validation.check_image(image)
  image = jnp.asarray(image)
  intervention = interventions.resolve(intervention)
  check_estimand(estimand)
  check_activation(activation)
  masks = effects.check_masks(masks, image.shape[:2])
  decision = plan(model, image.shape, masks, intervention=intervention,
                  full_fraction=full_fraction)
  if not decision.applies:
    raise ValueError(f"Incremental recompute does not apply: {decision.reason} Use "
                     "effects.causal_effect.")
  batch_size = validation.check_batch_size(batch_size, masks_lib.num_masks(masks))
  graphdef, state = nnx.split(model)
  dyn_fill, static_fill = effects.split_static(intervention, "intervention")
  dyn_masks, static_masks = effects.split_static(masks, "mask source")
  result = _effect(graphdef, state, image, jnp.asarray(decision.starts), dyn_masks, dyn_fill,
                   target, steps=decision.steps, box=decision.box,
                   static_masks=static_masks, static_fill=static_fill, estimand=estimand,
                   batch_size=batch_size, activation=activation, mesh=mesh)
  validation.check_target(target, result.clean_logits.shape[-1])
  return result


@functools.partial(jax.jit, static_argnames=(
    "graphdef", "steps", "box", "static_masks", "static_fill", "estimand", "batch_size",
    "activation", "mesh"))
def _effect(graphdef, state, image, starts, masks, fill, target, *, steps, box,
            static_masks, static_fill, estimand, batch_size, activation, mesh):
  model = nnx.merge(graphdef, state)
  masks = static_masks if masks is None else masks
  fill = static_fill if fill is None else fill
  recipe = masks_lib.is_recipe(masks)
  cache = clean_cache(model, image, steps)
  # The clean logits from the cached features: the forward pass the cache already is.
  clean_logits = model.classifier(cache["mean"][None])[0].astype(jnp.float32)
  t = jnp.argmax(clean_logits) if target is None else jnp.asarray(target)
  t = t.astype(jnp.int32)
  value = fill.fill(image, None)

  def one(mask, start, cache):
    cut = lambda a: jax.lax.dynamic_slice(a, (start[0], start[1], 0), (*box, a.shape[-1]))
    patch = interventions.intervene(cut(image), cut(mask[..., None])[..., 0], cut(value))
    return masked_logits(model, cache, steps, patch, start)

  leaves, treedef = jax.tree.flatten(cache)

  def chunk_fn(indices, data, image, *leaves):
    cache = jax.tree.unflatten(treedef, leaves)
    chunk_starts, mask_data = data
    chunk = masks(indices) if recipe else mask_data
    if chunk.shape[0] == 1:  # one mask: plain slices, no gathers
      logits = one(chunk[0], chunk_starts[0], cache)[None]
    else:
      logits = jax.vmap(one, in_axes=(0, 0, None))(chunk, chunk_starts, cache)
    probs = activate(logits, activation)
    value = estimand_value(estimand, clean_logits, logits, probs, t, activation)
    ok = ((chunk >= 0) & (chunk <= 1)).all((1, 2)) & jnp.isfinite(image).all()
    return jnp.where(ok.reshape(ok.shape + (1,) * (value.ndim - 1)), value, jnp.nan)

  effects = sharding.sweep(chunk_fn, starts.shape[0], (starts, None if recipe else masks),
                           batch_size=batch_size, mesh=mesh, args=(image, *leaves))
  return CEResult(effects, clean_logits, t)


__all__ = ["Decision", "Step", "causal_effect", "clean_cache", "layer_ops", "mask_boxes",
           "masked_logits", "plan"]
