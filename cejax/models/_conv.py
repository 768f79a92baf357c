"""A 2-D convolution whose input gradient XLA:CPU also runs fast inside loops.

JAX transposes ``conv(x, kernel)`` with respect to ``x`` into a convolution that reads
the kernel with its feature axes swapped (``HWOI``). XLA:CPU rewrites such
convolutions to its canonical ``HWIO`` form only in a program's entry computation
(``ConvCanonicalization`` visits nothing else), so inside a ``lax.scan`` or
``fori_loop`` body -- extremal perturbations, PGD, any optimisation over the input --
they fall back to a generic loop: DenseNet-121's input gradient (batch 4, 224 px) took
3.3 s per step inside a loop against 0.9 s outside (benchmarks/RESULTS.md).

``conv`` computes the same forward pass as ``nnx.Conv`` and, as its VJP, JAX's own
transposes, except that the input's reads a kernel transposed to ``HWIO`` beforehand,
which XLA:CPU runs as its fast convolution everywhere. Same operations, same values
(tests/test_densenet.py). Forward-mode differentiation (``jax.jvp``) is not defined
for it (a ``custom_vjp``).
"""

from __future__ import annotations

import functools

import jax
from flax import nnx

_NHWC = ("NHWC", "HWIO", "NHWC")


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def conv(x, kernel, strides, padding):
  """``lax.conv_general_dilated`` on NHWC images and an HWIO kernel."""
  return jax.lax.conv_general_dilated(x, kernel, strides, padding, dimension_numbers=_NHWC)


def _conv_fwd(x, kernel, strides, padding):
  # Which inputs are differentiated decides which cotangents bwd computes (an input's
  # gradient alone, as in attacks, needs no kernel gradient: JAX's own AD skips it too).
  out = conv(x.value, kernel.value, strides, padding)
  return out, (x.value, kernel.value, x.perturbed, kernel.perturbed)


def _dilated(size, dilation):
  return 0 if size == 0 else 1 + dilation * (size - 1)


def _conv_bwd(strides, padding, residuals, cotangent):
  x, kernel, input_wanted, kernel_wanted = residuals
  # The input's cotangent: JAX's transpose (a stride-1 convolution of the cotangent,
  # dilated by the strides, with the kernel reversed and its feature axes swapped),
  # the kernel transposed here so that XLA gets it in HWIO order.
  pads = []
  for size, k, s, (lo, _), out in zip(x.shape[1:3], kernel.shape[:2], strides, padding,
                                      cotangent.shape[1:3], strict=True):
    before = k - lo - 1
    pads.append((before, _dilated(size, 1) + k - 1 - _dilated(out, s) - before))
  dx = dk = None  # None: a zero cotangent
  if input_wanted:
    flipped = kernel[::-1, ::-1].swapaxes(2, 3)
    dx = jax.lax.conv_general_dilated(cotangent, flipped, (1, 1), pads,
                                      lhs_dilation=strides, dimension_numbers=_NHWC)
  if kernel_wanted:
    _, kernel_vjp = jax.vjp(lambda k: jax.lax.conv_general_dilated(
        x, k, strides, padding, dimension_numbers=_NHWC), kernel)
    dk = kernel_vjp(cotangent)[0]
  return dx, dk


conv.defvjp(_conv_fwd, _conv_bwd, symbolic_zeros=True)


def spatial(layer: nnx.Conv, x: jax.Array) -> jax.Array:
  """``layer(x)`` for a bias-free ``nnx.Conv`` on NHWC images, through ``conv``."""
  dtype = layer.dtype or jax.numpy.result_type(x, layer.kernel[...])
  padding = tuple(tuple(p) for p in layer.padding)
  return conv(x.astype(dtype), layer.kernel[...].astype(dtype), tuple(layer.strides), padding)
