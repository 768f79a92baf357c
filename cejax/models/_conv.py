"""A 2-D convolution whose input gradient XLA:CPU also runs fast inside loops.

JAX transposes ``conv(x, kernel)`` with respect to ``x`` into a convolution that reads
the kernel with its feature axes swapped (``HWOI``). XLA:CPU rewrites such
convolutions to its canonical ``HWIO`` form only in a program's entry computation
(``ConvCanonicalization`` visits nothing else), so inside a ``lax.scan`` or
``fori_loop`` body -- extremal perturbations, PGD, any optimisation over the input --
they fell back to a generic loop: three input-gradient steps of DenseNet-121 (batch 4,
224 px) in a ``fori_loop`` took 9.7 s, 2.4 s with this module
(``benchmarks/loop_gradient.py``, docs/benchmarks.md).

``conv`` is ``lax.conv_general_dilated`` forward. Its VJP is JAX's own, except that the
input's cotangent is computed with the kernel reversed and transposed to ``HWIO``
beforehand, which XLA:CPU runs as its fast convolution everywhere: the same operations,
the same values (tests/test_densenet.py). Only the cotangents asked for are computed.
The kernel's cotangent keeps JAX's layout, so weight gradients inside loops (training
in a ``scan``) are not sped up. Forward-mode differentiation (``jax.jvp``, ``jacfwd``)
is not defined for it (a ``custom_vjp``).
"""

from __future__ import annotations

import functools

import jax
from flax import nnx

_NHWC = ("NHWC", "HWIO", "NHWC")


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def conv(x, kernel, strides, padding, precision=None):
  """``lax.conv_general_dilated`` on NHWC images and an HWIO kernel; ``strides`` and
  ``padding`` (``((lo, hi), (lo, hi))``) are tuples of ints."""
  return jax.lax.conv_general_dilated(x, kernel, strides, padding, dimension_numbers=_NHWC,
                                      precision=precision)


def _conv_fwd(x, kernel, strides, padding, precision):
  # Which inputs are differentiated decides which cotangents bwd computes (an input's
  # gradient alone, as in attacks, needs no kernel gradient: JAX's own AD skips it too).
  out = conv(x.value, kernel.value, strides, padding, precision)
  return out, (x.value, kernel.value, x.perturbed, kernel.perturbed)


def _dilated(size, dilation):
  return 0 if size == 0 else 1 + dilation * (size - 1)


def _conv_bwd(strides, padding, precision, residuals, cotangent):
  x, kernel, input_wanted, kernel_wanted = residuals
  dx = dk = None  # None: a zero cotangent
  if input_wanted:
    # JAX's transpose: a stride-1 convolution of the cotangent dilated by the strides,
    # the kernel reversed and its feature axes swapped (here, physically: HWIO).
    pads = []
    for size, k, s, (lo, _), out in zip(x.shape[1:3], kernel.shape[:2], strides, padding,
                                        cotangent.shape[1:3], strict=True):
      before = k - lo - 1
      pads.append((before, size + k - 1 - _dilated(out, s) - before))
    flipped = kernel[::-1, ::-1].swapaxes(2, 3)
    dx = jax.lax.conv_general_dilated(cotangent, flipped, (1, 1), pads,
                                      lhs_dilation=strides, dimension_numbers=_NHWC,
                                      precision=precision)
  if kernel_wanted:
    transpose = jax.linear_transpose(lambda k: jax.lax.conv_general_dilated(
        x, k, strides, padding, dimension_numbers=_NHWC, precision=precision), kernel)
    (dk,) = transpose(cotangent)
  return dx, dk


conv.defvjp(_conv_fwd, _conv_bwd, symbolic_zeros=True)


def _pair(value, name):
  pair = (value, value) if isinstance(value, int) else tuple(value)
  if len(pair) != 2 or not all(isinstance(v, int) for v in pair):
    raise ValueError(f"{name} must be an int or two ints, got {value!r}.")
  return pair


def spatial(layer: nnx.Conv, x: jax.Array) -> jax.Array:
  """``layer(x)`` through ``conv``, for the convolutions DenseNet builds: batched NHWC
  images, explicit ``((lo, hi), (lo, hi))`` padding, no bias, dilation or groups.

  Raises:
    ValueError: any other setting (it would be computed differently from ``layer``).
  """
  padding = layer.padding
  explicit = (not isinstance(padding, str | int) and len(padding) == 2
              and all(not isinstance(p, str | int) and len(p) == 2 for p in padding))
  unsupported = [name for name, bad in (
      ("use_bias", layer.use_bias), ("feature_group_count", layer.feature_group_count != 1),
      ("kernel_dilation", _pair(layer.kernel_dilation or 1, "kernel_dilation") != (1, 1)),
      ("input_dilation", _pair(layer.input_dilation or 1, "input_dilation") != (1, 1)),
      ("padding", not explicit), ("input rank", x.ndim != 4)) if bad]
  if unsupported:
    raise ValueError(f"spatial() takes bias-free, undilated, ungrouped convolutions with "
                     f"explicit padding pairs on (n, h, w, c) images; this one has "
                     f"unsupported {unsupported} (padding {padding!r}, input {x.shape}).")
  dtype = layer.dtype or jax.numpy.result_type(x, layer.kernel[...])
  return conv(x.astype(dtype), layer.kernel[...].astype(dtype),
              _pair(layer.strides, "strides"), tuple(tuple(int(v) for v in p) for p in padding),
              layer.precision)
