"""Adapters that turn other models' calling conventions into cejax's ``logits_fn``.

cejax calls ``logits_fn(images (n, h, w, c)) -> logits (n, k)``: NHWC, batched, pure.
Wrapping a model takes two lines; see the README ("Any model"):

- Flax NNX: ``graphdef, state = nnx.split(model)``;
  ``logits_fn = lambda x: nnx.merge(graphdef, state)(x)``.
- Flax Linen: ``logits_fn = functools.partial(module.apply, variables)``.
- Equinox (one example per call): ``logits_fn = jax.vmap(model)``.
- A model that takes NCHW input (PyTorch's layout): ``from_nchw(fn)``.
"""

from __future__ import annotations

from collections.abc import Callable

import jax.numpy as jnp


def from_nchw(nchw_logits_fn: Callable) -> Callable:
  """``logits_fn`` on NHWC images for a model that takes ``(n, c, h, w)`` input.

  Masks, maps and attack budgets stay in cejax's NHWC layout; only the model call is
  transposed, so every result equals running the model on the transposed image.
  """

  def logits_fn(images):
    return nchw_logits_fn(jnp.transpose(images, (0, 3, 1, 2)))

  logits_fn.__wrapped__ = nchw_logits_fn
  return logits_fn
