"""Checks of user input shared by the library: they raise ``ValueError`` on concrete
values and stay silent on tracers (under ``jit`` the functions' NaN contract applies)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def check_floating(image):
  """``image`` must be floating point (a soft mask would be rounded away otherwise)."""
  if not jnp.issubdtype(jnp.result_type(image), jnp.floating):
    raise ValueError(f"image must be floating point, got dtype {jnp.result_type(image)}; "
                     "convert it (e.g. image.astype(jnp.float32)) in the model's input "
                     "space first.")


def check_mask_range(masks):
  """Concrete masks must lie in [0, 1]."""
  if isinstance(masks, jax.core.Tracer):
    return
  m = np.asarray(masks)
  if not m.size:
    return
  if not np.isfinite(m).all():
    raise ValueError(f"masks must lie in [0, 1] (1 = intervene); got "
                     f"{int((~np.isfinite(m)).sum())} NaN or infinite values.")
  if m.min() < 0 or m.max() > 1:
    raise ValueError(f"masks must lie in [0, 1] (1 = intervene); got values in "
                     f"[{m.min():.3g}, {m.max():.3g}].")


def check_batch_size(batch_size, num):
  """``batch_size`` or a default of ``min(num, 64)``, never more than ``num``."""
  if batch_size is None:
    return min(num, 64)
  if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
    raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}.")
  return int(min(batch_size, num))


_CHANNELS = (1, 3, 4)  # grey, RGB, RGBA: what a channels-first image leads with


def check_channels_last(shape, what: str = "image") -> None:
  """Refuses a shape that is channels-first: ``(..., c, h, w)`` with ``c`` in 1, 3 or 4
  and a last axis wider than that (an image of 1, 3 or 4 rows with more than 4 channels
  is not one cejax's models take)."""
  shape = tuple(shape)
  if len(shape) >= 3 and shape[-3] in _CHANNELS and shape[-1] not in _CHANNELS \
      and shape[-1] > 4:
    raise ValueError(
        f"{what} must be channels-last ({'n, ' if len(shape) == 4 else ''}h, w, c); got "
        f"shape {shape}, which looks channels-first (c = {shape[-3]}): use "
        f"jnp.moveaxis({what}, {len(shape) - 3}, -1), and cejax.adapters.from_nchw for a "
        "model that takes NCHW.")


def check_image(image):
  """One ``(h, w, c)`` floating-point image, finite when concrete."""
  if np.ndim(image) != 3:
    raise ValueError(f"image must be (h, w, c); got shape {np.shape(image)}. Use jax.vmap "
                     "over causal_effect for a batch of images.")
  check_channels_last(np.shape(image))
  check_floating(image)
  # Value checks only where values exist (not under tracing); numpy, so that jit
  # around a closed-over image does not turn the check itself into a tracer.
  if not isinstance(image, jax.core.Tracer) and not np.isfinite(np.asarray(image)).all():
    raise ValueError("image contains NaN or infinite values.")


def check_target_type(target):
  """``target`` is None or one integer class index (a float would be truncated)."""
  if target is None:
    return
  if np.ndim(target) != 0 or not jnp.issubdtype(jnp.result_type(target), jnp.integer):
    raise ValueError(f"target must be one integer class index, got {target!r}.")


def check_target(target, num_classes):
  """A concrete ``target`` must be a class index in ``[0, num_classes)``."""
  check_target_type(target)
  if target is not None and not isinstance(target, jax.core.Tracer):
    if not 0 <= int(target) < num_classes:
      raise ValueError(f"target must be a class index in [0, {num_classes}), got {target}.")
