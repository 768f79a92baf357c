"""Planning incremental recompute (``cejax.forwards.incremental``) for a DenseNet: which layers
are windowed ops and how their patches grow (``layer_ops``, ``steps_for``), the box
every mask's support fits in (``mask_boxes``), the multiply-accumulates saved
(``macs``), and whether the path applies at all, or why not (``plan``).

Region arithmetic for incremental recompute: which outputs of a windowed op (a
convolution or pooling) a change in a box of its input can reach, per spatial axis.

An op along one axis has a kernel ``k``, stride ``s``, low padding ``p`` and input
size ``n``; output ``o`` reads inputs ``o s - p .. o s - p + k - 1``. A change in the
inputs ``lo .. hi`` (inclusive) reaches the outputs ``ceil((lo + p - k + 1) / s) ..
floor((hi + p) / s)``, clipped to the output. ``changed`` is that exact rule (the test
checks it against brute-force differences of activations).

For one compiled program the sizes must be static while the positions vary from mask
to mask: a change of at most ``r`` inputs reaches at most ``patch_size(r)`` outputs, so
every mask gets a *patch* of that static size, placed at a dynamic start that is
clamped to stay inside the map (a clamped patch still contains the changed outputs).
``Plan`` holds the static window and padding an op needs to recompute a patch.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from cejax import interventions
from cejax import masks as masks_lib
from cejax.models import densenet


# --- region arithmetic -----------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class AxisOp:
  """A windowed op along one spatial axis: ``kernel``, ``stride``, low ``padding``,
  and the input size ``size``."""

  kernel: int
  stride: int
  padding: int
  size: int

  @property
  def size_out(self) -> int:
    return (self.size + 2 * self.padding - self.kernel) // self.stride + 1

  def changed(self, lo: int, hi: int) -> tuple[int, int]:
    """The outputs (inclusive, clipped) that a change of inputs ``lo .. hi`` reaches;
    ``lo > hi`` when none."""
    first = -(-(lo + self.padding - self.kernel + 1) // self.stride)
    last = (hi + self.padding) // self.stride
    return max(first, 0), min(last, self.size_out - 1)

  def patch_size(self, size_in: int) -> int:
    """The static output patch size for an input patch of ``size_in`` (at most the
    output size): the most outputs any ``size_in`` consecutive inputs reach."""
    return min((size_in + self.kernel - 2) // self.stride + 1, self.size_out)


@dataclasses.dataclass(frozen=True)
class Plan:
  """How to recompute an op's output patch of size ``size_out`` from an input patch of
  size ``size_in`` along one axis.

  ``window`` inputs starting at ``start_out * stride`` of the clean input padded with
  ``padding`` before and ``pad_after`` after always contain the input patch, and the
  op applied to the window without padding gives (at least) the output patch.
  """

  op: AxisOp
  size_in: int
  size_out: int
  window: int
  pad_after: int

  @classmethod
  def make(cls, op: AxisOp, size_in: int) -> Plan:
    size_in = min(size_in, op.size)
    size_out = op.patch_size(size_in)
    k, s, p, n = op.kernel, op.stride, op.padding, op.size
    # How far into the window the input patch can start: k - 1 when the output start
    # is not clamped, more when it is clamped to the end of the map (an op that drops
    # the last inputs, e.g. 2x2 pooling of an odd size).
    lead = max(k - 1, n - size_in - (op.size_out - size_out) * s + p)
    window = max((size_out - 1) * s + k, size_in + lead)
    pad_after = max(0, (op.size_out - size_out) * s - p + window - n)
    return cls(op, size_in, size_out, window, pad_after)

  def start_out(self, start_in):
    """The (traced) output patch start for an input patch at ``start_in``."""
    op = self.op
    first = -((-(start_in + op.padding - op.kernel + 1)) // op.stride)
    return jnp.clip(first, 0, op.size_out - self.size_out)


__all__ = ["AxisOp", "Plan"]


# --- the DenseNet's plan ------------------------------------------------------------------

STEM_CONV, STEM_POOL, DENSE, TRANSITION = "stem_conv", "stem_pool", "dense", "transition"


@dataclasses.dataclass(frozen=True)
class Layer:
  """Where a windowed layer sits in a DenseNet: its ``kind`` (``STEM_CONV``,
  ``STEM_POOL``, ``DENSE``, ``TRANSITION``), its dense ``block`` and, for dense layers,
  its ``index`` in the block (both from 1, as in the paper's tables)."""

  kind: str
  block: int = 0
  index: int = 0

  @property
  def name(self) -> str:
    """``"stem.conv"``, ``"stem.pool"``, ``"block2.layer3"`` or ``"transition1"``."""
    return {STEM_CONV: "stem.conv", STEM_POOL: "stem.pool",
            DENSE: f"block{self.block}.layer{self.index}",
            TRANSITION: f"transition{self.block}"}[self.kind]


@dataclasses.dataclass(frozen=True)
class Step:
  """One windowed layer of the walk: where it is, its op per axis, and its ``plans``
  (``(y, x)``), or ``None`` once the patch covers the map (run in full)."""

  layer: Layer
  ops: tuple[AxisOp, AxisOp]
  plans: tuple[Plan, Plan] | None

  @property
  def name(self) -> str:
    return self.layer.name


@dataclasses.dataclass(frozen=True)
class Decision:
  """Whether the incremental path applies: ``reason`` says why not; the masks' box
  (``box``, ``starts`` as ``mask_boxes`` gives them), ``steps`` and the
  multiply-accumulate counts of one masked forward pass (``macs_full``,
  ``macs_incremental``) describe it when it does."""

  applies: bool
  reason: str
  box: tuple[int, int] | None = None
  steps: tuple[Step, ...] = ()
  macs_full: int = 0
  macs_incremental: int = 0
  starts: np.ndarray | None = None


def layer_ops(model: densenet.DenseNet, image_shape) -> list[tuple[Layer, AxisOp, AxisOp]]:
  """The windowed layers of ``model`` in order, with their per-axis ops for images of
  ``image_shape`` ``(h, w[, c])``."""
  size = list(image_shape[:2])
  out = []

  def add(layer, kernel, stride, padding):
    ops = tuple(AxisOp(kernel, stride, padding, n) for n in size)
    out.append((layer, *ops))
    size[:] = [op.size_out for op in ops]

  conv = model.stem.conv
  add(Layer(STEM_CONV), conv.kernel_size[0], conv.strides[0], conv.padding[0][0])
  if model.stem.pool:
    add(Layer(STEM_POOL), 3, 2, 1)
  for b, block in enumerate(model.blocks):
    for i in range(len(block.layers)):
      add(Layer(DENSE, b + 1, i + 1), 3, 1, 1)
    if b < len(model.transitions):
      add(Layer(TRANSITION, b + 1), 2, 2, 0)
  return out


# Above this fraction of a map, a patch costs about what the full map does (and more
# in copies): from there on the network runs in full (docs/benchmarks.md).
FULL_FRACTION = 0.6


def steps_for(model, image_shape, box, full_fraction=FULL_FRACTION) -> tuple[Step, ...]:
  """The walk for masks whose support fits in ``box``: a patch plan per layer until the
  patch covers ``full_fraction`` of a dense layer's or transition's map."""
  size_in, full, steps = tuple(box), False, []
  for layer, oy, ox in layer_ops(model, image_shape):
    plans = None if full else (Plan.make(oy, size_in[0]), Plan.make(ox, size_in[1]))
    if plans is not None and layer.kind in (DENSE, TRANSITION):
      # Dense layers and transitions may switch early: their clean inputs are cached.
      area = plans[0].size_out * plans[1].size_out
      full = area >= full_fraction * oy.size_out * ox.size_out
      plans = None if full else plans
    steps.append(Step(layer, (oy, ox), plans))
    if plans is not None:
      size_in = (plans[0].size_out, plans[1].size_out)
      full = size_in == (oy.size_out, ox.size_out)
  return tuple(steps)


def macs(model, steps) -> tuple[int, int]:
  """Multiply-accumulates of one forward pass, full and incremental (convolutions and
  1x1 products; pooling and pointwise layers are not counted)."""
  full = incremental = 0
  for step in steps:
    oy, ox = step.ops
    area_in, area_out = oy.size * ox.size, oy.size_out * ox.size_out
    if step.plans is not None:
      py, px = step.plans
      patch_in, patch_out = py.size_in * px.size_in, py.size_out * px.size_out
    else:
      patch_in, patch_out = area_in, area_out
    layer = step.layer
    if layer.kind == STEM_CONV:
      conv = model.stem.conv
      per = conv.kernel_size[0] * conv.kernel_size[1] * conv.in_features * conv.out_features
      full, incremental = full + area_out * per, incremental + patch_out * per
    elif layer.kind == DENSE:
      dense = model.blocks[layer.block - 1].layers[layer.index - 1]
      one = dense.conv1.in_features * dense.conv1.out_features
      three = 9 * dense.conv2.in_features * dense.conv2.out_features
      full += area_in * one + area_out * three
      incremental += patch_in * one + patch_out * three
    elif layer.kind == TRANSITION:
      conv = model.transitions[layer.block - 1].conv
      per = conv.in_features * conv.out_features
      full, incremental = full + area_in * per, incremental + patch_in * per
  return full, incremental


def support_boxes(masks) -> tuple[np.ndarray, tuple[int, int]]:
  """Where each mask can differ from zero, on the host: box starts ``(m, 2)`` (row,
  column) and one box size ``(bh, bw)`` that holds every mask's support from its start.

  A source with a ``support_boxes()`` method answers itself (grids and windows from
  their geometry, RISE masks by refusing); any other is made chunk by chunk and
  scanned (an empty mask: a box at (0, 0)).

  Raises:
    ValueError: the masks are not local (RISE), or traced (inside ``jit``: their
      values are not known when the program is built).
  """
  source = masks_lib.as_source(masks)
  own = getattr(source, "support_boxes", None)
  if own is not None:
    return own()
  (h, w), num = source.shape, source.num
  lo, hi = np.zeros((num, 2), np.int64), np.zeros((num, 2), np.int64)
  for first in range(0, num, 256):
    idx = np.arange(first, min(first + 256, num))
    try:
      chunk = np.asarray(source(jnp.asarray(idx)))
    except (jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError):
      raise ValueError("The masks are traced (inside jit): their supports are not "
                       "known when the program is built.") from None
    rows, cols = chunk.any(2), chunk.any(1)  # (b, h), (b, w)
    lo[idx] = np.stack([rows.argmax(1), cols.argmax(1)], -1)
    hi[idx] = np.where(rows.any(1)[:, None], np.stack(
        [h - 1 - rows[:, ::-1].argmax(1), w - 1 - cols[:, ::-1].argmax(1)], -1), 0)
  return lo, tuple(int(s) for s in (hi - lo).max(0) + 1)


def mask_boxes(masks, image_shape) -> tuple[np.ndarray, tuple[int, int]]:
  """Per-mask box starts ``(m, 2)`` and the static box size ``(bh, bw)`` that holds
  every mask's support (``support_boxes``), each box inside the image.

  Raises:
    ValueError: the masks are not local or not known on the host (the reason).
  """
  h, w = image_shape[:2]
  starts, size = support_boxes(masks)
  starts = np.minimum(starts, np.array([h - size[0], w - size[1]]))
  if size == (h, w):
    raise ValueError("The masks' supports span the whole image (a box of "
                     f"{h} x {w}): nothing to save.")
  return starts.astype(np.int32), size


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
    starts, box = mask_boxes(masks, image_shape)
  except ValueError as e:
    return Decision(False, str(e))
  steps = steps_for(model, image_shape, box, full_fraction)
  full, inc = macs(model, steps)
  return Decision(True, "", box, steps, full, inc, starts)
