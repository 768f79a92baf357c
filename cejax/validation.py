"""Checks of user input shared by the CE sweeps: they raise ``ValueError`` on concrete
values and stay silent on tracers (under ``jit`` the sweeps' NaN contract applies)."""

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
  if m.size and (not np.isfinite(m).all() or m.min() < 0 or m.max() > 1):
    raise ValueError(f"masks must lie in [0, 1] (1 = intervene); got values in "
                     f"[{np.nanmin(m):.3g}, {np.nanmax(m):.3g}].")


def check_batch_size(batch_size, num):
  """``batch_size`` or a default of ``min(num, 64)``, never more than ``num``."""
  if batch_size is None:
    return min(num, 64)
  if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
    raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}.")
  return int(min(batch_size, num))


def check_image(image):
  """One ``(h, w, c)`` floating-point image, finite when concrete."""
  if np.ndim(image) != 3:
    raise ValueError(f"image must be (h, w, c); got shape {np.shape(image)}. Use jax.vmap "
                     "over causal_effect for a batch of images.")
  check_floating(image)
  # Value checks only where values exist (not under tracing); numpy, so that jit
  # around a closed-over image does not turn the check itself into a tracer.
  if not isinstance(image, jax.core.Tracer) and not np.isfinite(np.asarray(image)).all():
    raise ValueError("image contains NaN or infinite values.")


def check_target(target, num_classes):
  """A concrete ``target`` must be a class index in ``[0, num_classes)``."""
  if target is not None and not isinstance(target, jax.core.Tracer):
    t = np.asarray(target)
    if t.ndim != 0 or not 0 <= int(t) < num_classes:
      raise ValueError(f"target must be a class index in [0, {num_classes}), got {target}.")
