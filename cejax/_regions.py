"""Region arithmetic for incremental recompute: which outputs of a windowed op (a
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

import jax.numpy as jnp


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
