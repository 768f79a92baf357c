"""Exact incremental recompute of DenseNet for local masks (Nakandala et al., SIGMOD
2019, "Krypton"): the clean activations are computed once per image, and each mask
recomputes every layer only on the patch its change can reach.

A mask whose support lies in a box of ``(bh, bw)`` pixels changes only that box of the
input. Through each convolution or pooling the changed region grows by the kernel's
halo and shrinks by its stride (``cejax.regions``); pointwise layers (BatchNorm in eval
mode, ReLU, 1x1 convolutions) keep it. Each layer is recomputed on a patch of static
size at a per-mask (traced) position: the clean input around the patch is cut from the
cached clean activation (padded as the layer pads), the recomputed input patch is laid
over it, and the layer runs on that window without padding. From the first layer whose
patch covers its whole map, the rest of the network runs in full. Global average
pooling adds the patch's change to the clean mean.

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

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cejax import interventions, sharding, validation
from cejax import masks as masks_lib
from cejax.estimands import CEResult, activate, check_activation, check_estimand, estimand_value
from cejax.models import densenet
from cejax.regions import AxisOp, Plan


@dataclasses.dataclass(frozen=True)
class Step:
  """One windowed layer of the walk: its name, its op per axis, and its ``plans``
  (``(y, x)``), or ``None`` once the patch covers the map (run in full)."""

  name: str
  ops: tuple[AxisOp, AxisOp]
  plans: tuple[Plan, Plan] | None


@dataclasses.dataclass(frozen=True)
class Decision:
  """Whether the incremental path applies: ``reason`` says why not; ``steps`` and the
  multiply-accumulate counts of one masked forward pass (``macs_full``,
  ``macs_incremental``) describe it when it does."""

  applies: bool
  reason: str
  box: tuple[int, int] | None = None
  steps: tuple[Step, ...] = ()
  macs_full: int = 0
  macs_incremental: int = 0


def layer_ops(model: densenet.DenseNet, image_shape) -> list[tuple[str, AxisOp, AxisOp]]:
  """The windowed layers of ``model`` in order, with their per-axis ops for images of
  ``image_shape`` ``(h, w[, c])``."""
  size = list(image_shape[:2])
  out = []

  def add(name, kernel, stride, padding):
    ops = tuple(AxisOp(kernel, stride, padding, n) for n in size)
    out.append((name, *ops))
    size[:] = [op.size_out for op in ops]

  conv = model.stem.conv
  add("stem.conv", conv.kernel_size[0], conv.strides[0], conv.padding[0][0])
  if model.stem.pool:
    add("stem.pool", 3, 2, 1)
  for b, block in enumerate(model.blocks):
    for i in range(len(block.layers)):
      add(f"block{b + 1}.layer{i + 1}", 3, 1, 1)
    if b < len(model.transitions):
      add(f"transition{b + 1}", 2, 2, 0)
  return out


# Above this fraction of a map, a patch costs about what the full map does (and more
# in copies): from there on the network runs in full (benchmarks/RESULTS.md).
FULL_FRACTION = 0.6


def _steps(model, image_shape, box, full_fraction=FULL_FRACTION) -> tuple[Step, ...]:
  size_in, full, steps = tuple(box), False, []
  for name, oy, ox in layer_ops(model, image_shape):
    plans = None if full else (Plan.make(oy, size_in[0]), Plan.make(ox, size_in[1]))
    if plans is not None and not name.startswith("stem"):
      # Dense layers and transitions may switch early: their clean inputs are cached.
      area = plans[0].size_out * plans[1].size_out
      full = area >= full_fraction * oy.size_out * ox.size_out
      plans = None if full else plans
    steps.append(Step(name, (oy, ox), plans))
    if plans is not None:
      size_in = (plans[0].size_out, plans[1].size_out)
      full = size_in == (oy.size_out, ox.size_out)
  return tuple(steps)


def _macs(model, steps, image_shape) -> tuple[int, int]:
  """Multiply-accumulates of one forward pass, full and incremental (convolutions and
  1x1 products; pooling and pointwise layers are not counted)."""
  full = incremental = 0
  stem = model.stem.conv
  c_in = stem.in_features
  for step in steps:
    oy, ox = step.ops
    area_in, area_out = oy.size * ox.size, oy.size_out * ox.size_out
    if step.plans is not None:
      py, px = step.plans
      patch_in, patch_out = py.size_in * px.size_in, py.size_out * px.size_out
    else:
      patch_in, patch_out = area_in, area_out
    if step.name == "stem.conv":
      per = stem.kernel_size[0] * stem.kernel_size[1] * c_in * stem.out_features
      full, incremental = full + area_out * per, incremental + patch_out * per
    elif step.name.startswith("block"):
      b, i = (int(s) for s in step.name[5:].split(".layer"))
      layer = model.blocks[b - 1].layers[i - 1]
      one = layer.conv1.in_features * layer.conv1.out_features
      three = 9 * layer.conv2.in_features * layer.conv2.out_features
      full += area_in * one + area_out * three
      incremental += patch_in * one + patch_out * three
    elif step.name.startswith("transition"):
      conv = model.transitions[int(step.name[10:]) - 1].conv
      per = conv.in_features * conv.out_features
      full, incremental = full + area_in * per, incremental + patch_in * per
  return full, incremental


def mask_boxes(masks, image_shape) -> tuple[np.ndarray, tuple[int, int]]:
  """Per-mask box starts ``(m, 2)`` and the static box size ``(bh, bw)`` that holds
  every mask's support, each box inside the image.

  Raises:
    ValueError: the masks are not local or not known on the host (the reason).
  """
  h, w = image_shape[:2]
  if isinstance(masks, masks_lib.RiseMasks):
    raise ValueError("RISE masks are not local (each covers the whole image).")
  if isinstance(masks, masks_lib.Grid):
    n = masks.n
    rows = np.minimum((np.arange(h) * n) // h, n - 1)
    cols = np.minimum((np.arange(w) * n) // w, n - 1)
    r0 = np.array([np.flatnonzero(rows == i)[0] for i in range(n)])
    c0 = np.array([np.flatnonzero(cols == i)[0] for i in range(n)])
    size = (int(np.bincount(rows).max()), int(np.bincount(cols).max()))
    starts = np.stack(np.meshgrid(r0, c0, indexing="ij"), -1).reshape(-1, 2)
  elif isinstance(masks, masks_lib.SlidingWindows):
    (wh, ww), (sh, sw) = masks.window, masks.stride
    ys = masks_lib.window_starts(h, wh, sh)
    xs = masks_lib.window_starts(w, ww, sw)
    size = (min(wh, h), min(ww, w))
    starts = np.stack(np.meshgrid(ys, xs, indexing="ij"), -1).reshape(-1, 2)
  else:
    starts, size = _support_boxes(masks, h, w)
  starts = np.minimum(starts, np.array([h - size[0], w - size[1]]))
  if size == (h, w):
    raise ValueError("The masks' supports span the whole image (a box of "
                     f"{h} x {w}): nothing to save.")
  return starts.astype(np.int32), size


def _support_boxes(masks, h, w):
  num = masks_lib.num_masks(masks)
  lo, hi = np.zeros((num, 2), np.int64), np.zeros((num, 2), np.int64)
  for first in range(0, num, 256):
    idx = np.arange(first, min(first + 256, num))
    try:
      chunk = np.asarray(masks(jnp.asarray(idx)) if masks_lib.is_recipe(masks)
                         else masks[first:first + len(idx)])
    except jax.errors.ConcretizationTypeError:
      raise ValueError("The masks are traced (inside jit): their supports are not "
                       "known when the program is built.") from None
    rows, cols = chunk.any(2), chunk.any(1)
    for j, (r, c) in enumerate(zip(rows, cols, strict=True)):
      if r.any():
        lo[first + j] = (r.argmax(), c.argmax())
        hi[first + j] = (h - 1 - r[::-1].argmax(), w - 1 - c[::-1].argmax())
  size = tuple(int(s) for s in (hi - lo).max(0) + 1)
  return lo, size


def plan(model: densenet.DenseNet, image_shape, masks, *, intervention="zero",
         full_fraction: float = FULL_FRACTION) -> Decision:
  """Whether the incremental path applies to ``masks`` (and how), or why not.

  ``full_fraction``: dense layers and transitions whose patch would cover at least
  this fraction of their map run in full, and so does the rest of the network.
  """
  if not isinstance(model, densenet.DenseNet):
    return Decision(False, f"{type(model).__name__} is not a cejax DenseNet.")
  if interventions.is_random(interventions.resolve(intervention)):
    return Decision(False, "random interventions draw a new fill per mask and draw.")
  try:
    _, box = mask_boxes(masks, image_shape)
  except ValueError as e:
    return Decision(False, str(e))
  steps = _steps(model, image_shape, box, full_fraction)
  full, inc = _macs(model, steps, image_shape)
  return Decision(True, "", box, steps, full, inc)


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


class _Popper:
  """``next(popper)`` takes the first step off ``steps`` (which shows what is left)."""

  def __init__(self, steps):
    self.steps = steps

  def __next__(self):
    return self.steps.pop(0)


def _whole(clean, patch, start):
  """The whole map: ``clean`` with ``patch`` laid over it at ``start``."""
  return jax.lax.dynamic_update_slice(clean, patch.astype(clean.dtype),
                                      (start[0], start[1], 0))


def masked_logits(model: densenet.DenseNet, cache, steps, patch, start) -> jax.Array:
  """Logits ``(k,)`` of the image with its box at ``start`` replaced by ``patch``."""
  plans_left = list(steps)
  plans = _Popper(plans_left)
  x = patch.astype(model.dtype)
  full = False

  def advance(name, x, start, full_fn, window_fn, pre=None):
    """One windowed layer: in full, or on the patch (then maybe switching to full)."""
    nonlocal full
    step = next(plans)
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
    for i, layer in enumerate(block.layers):
      name = f"block{b + 1}.layer{i + 1}"
      if not full and plans_left[0].plans is None:  # switch: the whole map from here
        x, start, full = _whole(cache[f"block{b + 1}"][..., :x.shape[-1]], x, start), None, True
      if full:
        next(plans)
        x = layer(x[None])[0]
        continue
      width = x.shape[-1]
      y, new_start = advance(name, x, start, None, _conv_valid(layer.conv2),
                             pre=functools.partial(_dense_inner, layer))
      clean = cache[f"block{b + 1}"][..., :width]
      around = jax.lax.dynamic_slice(clean, (new_start[0], new_start[1], 0),
                                     (y.shape[0], y.shape[1], width))
      around = jax.lax.dynamic_update_slice(around, x, (start[0] - new_start[0],
                                                        start[1] - new_start[1], 0))
      x, start = jnp.concatenate([around, y.astype(around.dtype)], -1), new_start
    if b < len(model.transitions):
      tr = model.transitions[b]
      if not full and plans_left[0].plans is None:
        x, start, full = _whole(cache[f"block{b + 1}"], x, start), None, True
      if full:
        next(plans)
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
  starts, _ = mask_boxes(masks, image.shape)
  batch_size = validation.check_batch_size(batch_size, masks_lib.num_masks(masks))
  graphdef, state = nnx.split(model)
  dyn_fill, static_fill = effects.split_static(intervention, "intervention")
  dyn_masks, static_masks = effects.split_static(masks, "mask source")
  result = _effect(graphdef, state, image, jnp.asarray(starts), dyn_masks, dyn_fill,
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
  clean_logits = model(image[None])[0].astype(jnp.float32)
  t = jnp.argmax(clean_logits) if target is None else jnp.asarray(target)
  t = t.astype(jnp.int32)
  value = fill.fill(image, None)
  cache = clean_cache(model, image, steps)

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
