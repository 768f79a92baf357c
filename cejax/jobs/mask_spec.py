"""The one mask specification of the analysis and the sweep (``config.masks``): the mask
families it builds for an image shape."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from cejax import masks

MASK_FAMILIES = ("grid", "sliding", "rise", "patches")
# The patch subsets' key is fold_in(key, PATCHES_STREAM): RISE mask i uses fold_in(key, i)
# (and split(k)[i] equals fold_in(k, i) under partitionable threefry), so any small
# constant would share a key with a RISE mask.
PATCHES_STREAM = 0xFFFFFFFF


def sliding_geometry(spec, shape) -> tuple[int, int]:
  """The sliding window and stride in pixels: ``spec.window``/``spec.stride``, or
  image height / 4 and / 16 where they are 0."""
  h = shape[0]
  return spec.window or max(1, h // 4), spec.stride or max(1, h // 16)


def mask_sources(spec, shape, *, key, families=MASK_FAMILIES) -> dict[str, Any]:
  """The mask sources of ``families`` for images of ``shape`` (``h, w``), from
  ``spec`` (``config.masks``: ``grid_cells``, ``window``, ``stride``, ``rise_masks``,
  ``rise_cells``, ``rise_p``, ``patch_masks``, ``patch_size``, ``patch_keep``); ``key``
  draws the RISE masks, ``fold_in(key, PATCHES_STREAM)`` the patch subsets (RISE mask
  ``i`` draws from ``fold_in(key, i)``: a stream no RISE mask reaches)."""
  window, stride = sliding_geometry(spec, shape)
  made = {
      "grid": lambda: masks.grid(shape=shape, n=spec.grid_cells),
      "sliding": lambda: masks.sliding_windows(shape=shape, window=window, stride=stride),
      "rise": lambda: masks.rise(key, num=spec.rise_masks, shape=shape,
                                 cells=spec.rise_cells, p=spec.rise_p),
      "patches": lambda: masks.patch_subsets(jax.random.fold_in(key, PATCHES_STREAM),
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
    sources = mask_sources(spec, shape, key=jax.random.key(0), families=families)
  except ValueError as e:
    raise ValueError(f"config.masks does not fit {tuple(shape)} images: {e}") from e
  if "patches" in sources:
    total = (shape[0] // spec.patch_size) * (shape[1] // spec.patch_size)
    dropped = sources["patches"].dropped
    if not 0 < dropped < total:
      raise ValueError(
          f"config.masks does not fit {tuple(shape)} images: patch_keep "
          f"{spec.patch_keep} keeps {total - dropped} of the {total} patches of "
          f"{spec.patch_size} px, so every patch subset is the same mask; choose a "
          f"patch_keep that keeps between 1 and {total - 1} of them.")


def check_whole_patches(sources, patch_size: int, *, wanted, where: str,
                        otherwise: str = "") -> None:
  """Raises ``ValueError`` unless every mask of ``sources`` (``{family: source}``) is
  binary and constant on each ``patch_size`` patch, so that a token intervention
  (``wanted``, named in the message with the config key ``where``; ``otherwise``: an
  alternative the message offers) takes or leaves whole patch tokens. Patch subsets must
  also be of whole patches (``patch_size`` a multiple of the model's), which sizes their
  token sequences without drawing them."""
  p = int(patch_size)
  hint = {"grid": f"grid cells of a whole number of patches (the image side / "
                  f"config.masks.grid_cells a multiple of {p})",
          "sliding": f"config.masks.window and stride multiples of {p}",
          "rise": "grid, sliding or patches masks (RISE's smooth masks never are)",
          "patches": f"config.masks.patch_size a multiple of {p}"}
  for family, source in sources.items():
    if isinstance(source, masks.PatchSubsets) and source.patch_size % p:
      raise ValueError(
          f"{where} has {list(wanted)}, which take or leave whole {p} x {p} patch "
          f"tokens, but the 'patches' masks are subsets of {source.patch_size} px "
          f"patches; use {hint['patches']}{otherwise}.")
    for start in range(0, source.num, 256):
      chunk = np.asarray(source(jnp.arange(start, min(start + 256, source.num))))
      b, h, w = chunk.shape
      patches = chunk.reshape(b, h // p, p, w // p, p)
      if not (np.isin(chunk, (0, 1)).all()
              and (patches.min((2, 4)) == patches.max((2, 4))).all()):
        raise ValueError(
            f"{where} has {list(wanted)}, which take or leave whole {p} x {p} patch "
            f"tokens, but the {family!r} masks do not cover whole patches (binary and "
            f"constant on each patch); use {hint.get(family, 'masks on the patch grid')}"
            f"{otherwise}.")


__all__ = ["MASK_FAMILIES", "PATCHES_STREAM", "check_fits", "check_whole_patches",
           "mask_sources", "sliding_geometry"]
