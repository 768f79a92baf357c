"""Interventions ``do(X_M = v)``: what replaces the pixels under a mask.

Built-ins are frozen dataclasses registered as pytrees: arrays are leaves (traced under
``jit``), sizes and modes static metadata, so an intervention passes through ``jit`` as
an argument. Any object with ``fill`` and ``num_draws`` works (``Intervention``); one
whose fill draws random values declares ``random = True``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Protocol, runtime_checkable

import jax
import jax.numpy as jnp
import numpy as np

from cejax import filters
from cejax._validation import check_floating, check_mask_range


@runtime_checkable
class Intervention(Protocol):
  """What ``do(X_M = v)`` writes under a mask: any object with these members works.

  ``fill(image, key)`` returns ``v``, an array of the image's shape ``(h, w, c)``.

  Randomness is declared, never guessed: an intervention whose fill draws from its
  key sets ``random = True`` (a class attribute will do); the prediction is then
  averaged over ``num_draws`` fills, draw ``d`` of mask ``i`` with key
  ``fold_in(fold_in(key, i), d)``, and the call needs ``key=``. Without ``random``
  (or with ``random = False``) the fill is called with ``key=None`` once per image and
  ``num_draws`` must be 1; a fill that fails without a key is reported with this hint.

  To pass one through ``jax.jit`` as an argument, register it as a pytree with its
  arrays as data and ``num_draws`` as static metadata
  (``jax.tree_util.register_dataclass``, as the built-ins are); otherwise it must be
  hashable, and is treated as a static setting.
  """

  num_draws: int

  def fill(self, image: jax.Array, key: jax.Array | None) -> jax.Array: ...


def _intervention_type(*, data, meta):
  """A frozen dataclass that is a pytree: ``data`` fields are leaves (arrays, traced
  under ``jit``), ``meta`` fields static (part of the compiled program's identity)."""

  def wrap(cls):
    cls = dataclasses.dataclass(frozen=True)(cls)
    return jax.tree_util.register_dataclass(cls, data_fields=list(data),
                                            meta_fields=list(meta))

  return wrap


@_intervention_type(data=("value", "mean", "std"), meta=("space", "num_draws"))
class Constant:
  """Fill with a constant.

  ``space="normalized"`` (default): ``value`` is in the model's input space, so
  0.0 is the data set mean. ``space="pixel"``: ``value`` is on the [0, 1] pixel
  scale and converted with ``mean``/``std`` (per channel), which are then required.
  """

  value: Any = 0.0
  space: str = "normalized"
  mean: Any = None
  std: Any = None
  num_draws: int = 1
  random: ClassVar[bool] = False

  def fill(self, image, key):
    del key
    if self.space == "normalized":
      v = jnp.asarray(self.value, image.dtype)
    elif self.space == "pixel":
      if self.mean is None or self.std is None:
        raise ValueError("Constant(space='pixel') needs mean= and std= to normalise.")
      v = (jnp.asarray(self.value) - jnp.asarray(self.mean)) / jnp.asarray(self.std)
    else:
      raise ValueError(f"Constant.space must be 'normalized' or 'pixel', got {self.space!r}.")
    return jnp.broadcast_to(v.astype(image.dtype), image.shape)


@_intervention_type(data=(), meta=("num_draws",))
class ImageMean:
  """Fill with the image's own per-channel mean."""

  num_draws: int = 1
  random: ClassVar[bool] = False

  def fill(self, image, key):
    del key
    return jnp.broadcast_to(image.mean(axis=(0, 1)), image.shape)


@_intervention_type(data=(), meta=("sigma", "num_draws"))
class Blur:
  """Fill with a Gaussian-blurred copy of the image (``sigma`` in pixels, static: it
  sets the kernel size).

  Equal to ``scipy.ndimage.gaussian_filter(image, (sigma, sigma, 0), mode="nearest")``
  (``filters.gaussian_blur``).
  """

  sigma: float = 5.0
  num_draws: int = 1
  random: ClassVar[bool] = False

  def fill(self, image, key):
    del key
    return filters.gaussian_blur(image, sigma=self.sigma)


@_intervention_type(data=("image",), meta=("num_draws",))
class Reference:
  """Fill with a reference (baseline) image of the same shape, in model input space."""

  image: Any
  num_draws: int = 1
  random: ClassVar[bool] = False

  def fill(self, image, key):
    del key
    ref = jnp.asarray(self.image, image.dtype)
    if ref.shape != image.shape:
      raise ValueError(f"Reference image has shape {ref.shape}; expected {image.shape}.")
    return ref


@_intervention_type(data=("std", "mean"), meta=("num_draws",))
class GaussianNoise:
  """Fill with i.i.d. ``N(mean, std^2)`` noise in model input space, ``num_draws`` times.

  ``mean`` and ``num_draws`` are keyword-only: ``GaussianNoise(0.5, 4)`` would otherwise
  read as a mean of 4."""

  std: float = 1.0
  mean: float = dataclasses.field(default=0.0, kw_only=True)
  num_draws: int = dataclasses.field(default=8, kw_only=True)
  random: ClassVar[bool] = True

  def fill(self, image, key):
    return self.mean + self.std * jax.random.normal(key, image.shape, image.dtype)


@_intervention_type(data=("images",), meta=("num_draws",))
class ImageSet:
  """Fill with images drawn uniformly from ``images (n, h, w, c)``, ``num_draws`` times."""

  images: Any
  num_draws: int = 8
  random: ClassVar[bool] = True

  def fill(self, image, key):
    images = jnp.asarray(self.images, image.dtype)
    if images.shape[1:] != image.shape:
      raise ValueError(
          f"ImageSet images have shape {images.shape[1:]}; expected {image.shape}.")
    return images[jax.random.randint(key, (), 0, images.shape[0])]


_SHORTCUTS = {"zero": Constant(), "mean": ImageMean(), "blur": Blur()}
INTERVENTIONS = (Constant, ImageMean, Blur, Reference, GaussianNoise, ImageSet)


def resolve(spec) -> Intervention:
  """An ``Intervention`` from a built-in name (``"zero"``, ``"mean"``, ``"blur"``) or any
  object with ``fill`` and ``num_draws``.

  Raises:
    ValueError: an unknown name, a missing member, ``num_draws`` not a positive
      integer, or ``num_draws > 1`` on an intervention that is not random (every draw
      would be the same).
  """
  if isinstance(spec, str):
    if spec not in _SHORTCUTS:
      raise ValueError(f"Unknown intervention {spec!r}; valid names are "
                       f"{sorted(_SHORTCUTS)} or one of "
                       f"{[c.__name__ for c in INTERVENTIONS]}.")
    return _SHORTCUTS[spec]
  missing = [name for name in ("fill", "num_draws") if not hasattr(spec, name)]
  if missing or not callable(spec.fill):
    raise ValueError(f"Unknown intervention {spec!r}: an intervention needs fill(image, "
                     f"key) and num_draws (missing {missing}); use one of "
                     f"{[c.__name__ for c in INTERVENTIONS]}, {sorted(_SHORTCUTS)} or any "
                     "object with those members (see Intervention).")
  if not isinstance(spec.num_draws, (int, np.integer)) or spec.num_draws < 1:
    raise ValueError(f"num_draws must be a positive integer, got {spec.num_draws!r}.")
  if spec.num_draws > 1 and not is_random(spec):
    raise ValueError(f"{type(spec).__name__} has num_draws={spec.num_draws} but does not "
                     "declare random = True: every draw would be the same fill. Set "
                     "random = True if fill draws from its key, else num_draws = 1.")
  return spec


def check_fill(intervention, image) -> None:
  """Traces a user's ``fill(image, None)`` once (no FLOPs) and names what is wrong.

  Raises:
    ValueError: the fill fails without a key (it needs ``random = True``) or does not
      return the image's shape.
  """
  if type(intervention) in INTERVENTIONS or is_random(intervention):
    return
  name = type(intervention).__name__
  try:
    out = jax.eval_shape(lambda x: intervention.fill(x, None), image)
  except Exception as e:  # the user's code: any failure gets the hint
    raise ValueError(f"{name}.fill(image, key=None) failed ({type(e).__name__}: {e}). If "
                     "it draws random values, declare random = True on the intervention "
                     "and pass key= (see Intervention).") from e
  if tuple(out.shape) != tuple(image.shape):
    raise ValueError(f"{name}.fill must return the image's shape {tuple(image.shape)}; "
                     f"got {tuple(out.shape)}.")


def is_random(intervention) -> bool:
  """Whether the intervention draws random fills (``random`` attribute, default False)."""
  return bool(getattr(intervention, "random", False))


def intervene(image, mask, value):
  """``do(X_M = v)``: ``image * (1 - mask) + value * mask``; mask ``(h, w)`` in [0, 1].

  Raises:
    ValueError: the image is not floating point (a soft mask would be rounded away),
      or a concrete mask has values outside [0, 1].
  """
  check_floating(image)
  check_mask_range(mask)
  m = jnp.asarray(mask).astype(image.dtype)[..., None]
  return image * (1 - m) + value * m
