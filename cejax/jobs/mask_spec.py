"""The one mask specification of the analysis and the sweep (``config.masks``): the mask
families it builds for an image shape."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from cejax import masks

MASK_FAMILIES = ("grid", "sliding", "rise", "patches")


def sliding_geometry(spec, shape) -> tuple[int, int]:
  """The sliding window and stride in pixels: ``spec.window``/``spec.stride``, or
  image height / 4 and / 16 where they are 0."""
  h = shape[0]
  return spec.window or max(1, h // 4), spec.stride or max(1, h // 16)


def mask_sources(spec, shape, *, key, families=MASK_FAMILIES) -> dict[str, Any]:
  """The mask sources of ``families`` for images of ``shape`` (``h, w``), from
  ``spec`` (``config.masks``: ``grid_cells``, ``window``, ``stride``, ``rise_masks``,
  ``rise_cells``, ``rise_p``, ``patch_masks``, ``patch_size``, ``patch_keep``); ``key``
  draws the RISE masks, ``fold_in(key, 1)`` the patch subsets."""
  window, stride = sliding_geometry(spec, shape)
  made = {
      "grid": lambda: masks.grid(shape=shape, n=spec.grid_cells),
      "sliding": lambda: masks.sliding_windows(shape=shape, window=window, stride=stride),
      "rise": lambda: masks.rise(key, num=spec.rise_masks, shape=shape,
                                 cells=spec.rise_cells, p=spec.rise_p),
      "patches": lambda: masks.patch_subsets(jax.random.fold_in(key, 1),
                                             num=spec.patch_masks, shape=shape,
                                             patch_size=spec.patch_size,
                                             keep=spec.patch_keep),
  }
  return {f: made[f]() for f in families}


def check_fits(spec, shape, families=MASK_FAMILIES) -> None:
  """Raises ``ValueError`` when a family of ``families`` cannot be built from ``spec``
  for ``shape`` images (the data's image size; ``config.check_masks`` checked the values
  themselves)."""
  try:
    mask_sources(spec, shape, key=jax.random.key(0), families=families)
  except ValueError as e:
    raise ValueError(f"config.masks does not fit {tuple(shape)} images: {e}") from e


def check_whole_patches(sources, patch_size: int, *, wanted, where: str) -> None:
  """Raises ``ValueError`` unless every mask of ``sources`` (``{family: source}``) is
  binary and constant on each ``patch_size`` patch, so that a token intervention
  (``wanted``, named in the message with the config key ``where``) takes or leaves whole
  patch tokens."""
  p = int(patch_size)
  for family, source in sources.items():
    for start in range(0, source.num, 256):
      chunk = np.asarray(source(jnp.arange(start, min(start + 256, source.num))))
      b, h, w = chunk.shape
      patches = chunk.reshape(b, h // p, p, w // p, p)
      if not (np.isin(chunk, (0, 1)).all()
              and (patches.min((2, 4)) == patches.max((2, 4))).all()):
        raise ValueError(
            f"{where} has {list(wanted)}, which take or leave whole {p} x {p} patch "
            f"tokens, but the {family!r} masks do not cover whole patches (binary and "
            f"constant on each patch); use grid cells or sliding windows on the patch "
            f"grid (config.masks: grid_cells, window and stride multiples of {p}).")


__all__ = ["MASK_FAMILIES", "check_fits", "check_whole_patches", "mask_sources",
           "sliding_geometry"]
