"""Causal effects of interventions on images and on hidden features.

A model is any pure ``logits_fn(images (n, h, w, c)) -> logits (n, k)``. For each
mask ``M`` the intervention ``do(X_M = v)`` gives the input ``x * (1 - M) + v * M``
(soft masks blend), and an *estimand* compares the prediction under it with the
clean one. With ``p = act(logits(x))`` and ``q = act(logits(do))``, ``act`` softmax
(multi-class) or sigmoid (multi-label), target class ``t``:

=========== ================================================================
expected    softmax: ``sum_c p_c (q_c - p_c)``, the paper's expected causal effect
            (ECE). Sigmoid: each finding ``c`` is its own binary variable, and the
            paper's definition applied to it gives ``p_c (q_c - p_c) + (1 - p_c)
            ((1 - q_c) - (1 - p_c)) = (2 p_c - 1)(q_c - p_c)``; ``expected`` is
            the sum of these over findings. It does not depend on ``target``.
probability ``q_t - p_t``
logit       ``z'_t - z_t``
kl          ``KL(p || q)`` (softmax), or the sum of per-finding Bernoulli KLs (sigmoid)
per_class   ``q - p`` for every class, shape ``(m, k)`` (per-finding effects)
=========== ================================================================

Bad values and transformations: called eagerly, a non-finite image, a mask outside
[0, 1] or a target outside ``[0, k)`` raise ``ValueError``. Under ``jit``/``vmap``/
``grad`` the values are not known when the function is traced, so the contract is a
visible failure instead: the effects of a non-finite image are all NaN, those of a
mask outside [0, 1] are NaN for that mask, and with a target out of range the target
estimands (``probability``, ``logit``) are NaN (never a silently clamped class).

Random interventions (``GaussianNoise``, ``ImageSet``) average the prediction over
``num_draws`` draws, the Monte Carlo form of ``E[Y | do(X_M = V)]``: probabilities
are averaged for the probability estimands, logits for ``logit``. Draw ``d`` for mask
``i`` uses ``fold_in(fold_in(key, i), d)``, so results do not depend on batch size
or device count.

Memory is bounded by ``batch_size``: masks are processed ``batch_size`` at a time in a
``lax.map``; with ``mesh=`` the mask axis is split over the mesh's devices with
``jax.shard_map`` (parameters replicated). Padding masks never change a result.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any, ClassVar, NamedTuple, Protocol, runtime_checkable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from cejax import filters
from cejax import masks as masks_lib

ESTIMANDS = ("expected", "probability", "logit", "kl", "per_class")
ACTIVATIONS = ("softmax", "sigmoid")


class CEResult(NamedTuple):
  """Per-mask effects and the clean prediction.

  Attributes:
    effects: ``(m,)``, or ``(m, k)`` for ``per_class``.
    clean_logits: ``(k,)`` logits of the unmodified input.
    target: ``()`` int32, the class the target estimands refer to.
  """

  effects: jax.Array
  clean_logits: jax.Array
  target: jax.Array


# --- interventions ---------------------------------------------------------------

@runtime_checkable
class Intervention(Protocol):
  """What ``do(X_M = v)`` writes under a mask: any object with these members works.

  ``fill(image, key)`` returns ``v``, an array of the image's shape ``(h, w, c)``;
  ``key`` is ``None`` unless ``random`` is true, in which case the prediction is
  averaged over ``num_draws`` fills, draw ``d`` of mask ``i`` with key
  ``fold_in(fold_in(key, i), d)``. To pass one through ``jax.jit`` as an argument,
  register it as a pytree with its arrays as data and ``num_draws``/``random`` as
  static metadata (``jax.tree_util.register_dataclass``, as the built-ins are);
  otherwise it must be hashable, and is treated as a static setting.
  """

  num_draws: int
  random: bool

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
  """Fill with i.i.d. ``N(mean, std^2)`` noise in model input space, ``num_draws`` times."""

  std: float = 1.0
  mean: float = 0.0
  num_draws: int = 8
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


def _intervention(spec):
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
  return spec


def _is_random(intervention) -> bool:
  return bool(getattr(intervention, "random", False))


def intervene(image, mask, value):
  """``do(X_M = v)``: ``image * (1 - mask) + value * mask``; mask ``(h, w)`` in [0, 1].

  Raises:
    ValueError: the image is not floating point (a soft mask would be rounded away),
      or a concrete mask has values outside [0, 1].
  """
  _check_floating(image)
  _check_mask_range(mask)
  m = jnp.asarray(mask).astype(image.dtype)[..., None]
  return image * (1 - m) + value * m


def _check_floating(image):
  if not jnp.issubdtype(jnp.result_type(image), jnp.floating):
    raise ValueError(f"image must be floating point, got dtype {jnp.result_type(image)}; "
                     "convert it (e.g. image.astype(jnp.float32)) in the model's input "
                     "space first.")


def _check_mask_range(masks):
  if isinstance(masks, jax.core.Tracer):
    return
  m = np.asarray(masks)
  if m.size and (not np.isfinite(m).all() or m.min() < 0 or m.max() > 1):
    raise ValueError(f"masks must lie in [0, 1] (1 = intervene); got values in "
                     f"[{np.nanmin(m):.3g}, {np.nanmax(m):.3g}].")


# --- estimands --------------------------------------------------------------------

def check_activation(activation: str) -> str:
  """``activation`` if it is one of ``ACTIVATIONS``, else a ``ValueError``."""
  if activation not in ACTIVATIONS:
    raise ValueError(f"Unknown activation {activation!r}; valid are {list(ACTIVATIONS)}.")
  return activation


def activate(logits, activation: str):
  """Probabilities: softmax over the last axis, or an elementwise sigmoid."""
  check_activation(activation)
  return jax.nn.softmax(logits, -1) if activation == "softmax" else jax.nn.sigmoid(logits)



def _take_class(values, target):
  """``values[..., target]``, NaN when ``target`` is outside ``[0, k)`` (never clamped,
  never wrapped like a negative numpy index)."""
  k = values.shape[-1]
  picked = jnp.take(values, jnp.clip(target, 0, k - 1), axis=-1)
  return jnp.where((target >= 0) & (target < k), picked, jnp.nan)


class Estimand(Protocol):
  """A user-defined estimand: any hashable callable with this signature (a plain
  function will do). ``clean_logits (k,)``, ``do_logits``/``do_probs`` ``(b, k)`` (the
  mean over draws for random interventions), ``target ()`` int32; returns ``(b, ...)``.
  """

  def __call__(self, clean_logits: jax.Array, do_logits: jax.Array, do_probs: jax.Array,
               target: jax.Array, activation: str) -> jax.Array: ...


def _check_estimand(estimand):
  if isinstance(estimand, str):
    if estimand not in ESTIMANDS:
      raise ValueError(f"Unknown estimand {estimand!r}; valid estimands are "
                       f"{list(ESTIMANDS)} or a callable (see Estimand).")
  elif not callable(estimand):
    raise ValueError(f"Unknown estimand {estimand!r}; valid estimands are "
                     f"{list(ESTIMANDS)} or a callable (see Estimand).")
  return estimand


def estimand_value(estimand, clean_logits, do_logits, do_probs, target, activation):
  """The estimand for one or more interventions (leading axes broadcast)."""
  if callable(estimand):
    return estimand(clean_logits, do_logits, do_probs, target, activation)
  p = activate(clean_logits, activation)
  q = do_probs
  if estimand == "expected":
    weight = p if activation == "softmax" else 2 * p - 1
    return jnp.sum(weight * (q - p), -1)
  if estimand == "probability":
    return _take_class(q, target) - _take_class(p, target)
  if estimand == "logit":
    return _take_class(do_logits, target) - _take_class(clean_logits, target)
  if estimand == "per_class":
    return q - p
  if estimand == "kl":
    eps = 1e-12
    if activation == "softmax":
      logp = jax.nn.log_softmax(clean_logits)
      return jnp.sum(p * (logp - jnp.log(q + eps)), -1)
    qc = jnp.clip(q, eps, 1 - eps)
    return jnp.sum(p * (jnp.log(p + eps) - jnp.log(qc))
                   + (1 - p) * (jnp.log(1 - p + eps) - jnp.log(1 - qc)), -1)
  raise ValueError(f"Unknown estimand {estimand!r}; valid estimands are {list(ESTIMANDS)}.")


# --- the sweep --------------------------------------------------------------------

def _padded_size(m, batch_size, devices):
  per = batch_size * devices
  return -(-m // per) * per


def sweep(chunk_fn: Callable, num: int, data=None, *, batch_size: int,
          mesh: jax.sharding.Mesh | None = None, axis: str | None = None, args=()):
  """Maps ``chunk_fn(indices (b,), data_chunk, *args)`` over ``num`` items in chunks.

  Items are padded to a multiple of ``batch_size`` (times the mesh size) and the
  padding is cut from the result. ``data`` (leading axis ``num``) is split with the
  indices; ``args`` are passed whole (replicated). With ``mesh``, the item axis is
  sharded over mesh axis ``axis`` (default: all of the mesh's axes).

  Returns:
    ``chunk_fn``'s outputs concatenated over items, leading axis ``num``.
  """
  devices = 1 if mesh is None else mesh.size
  total = _padded_size(num, batch_size, devices)
  indices = jnp.arange(total, dtype=jnp.int32)
  data = jax.tree.map(
      lambda d: jnp.pad(d, [(0, total - num)] + [(0, 0)] * (d.ndim - 1)), data)

  def local(indices, data, *args):
    chunks = indices.reshape(-1, batch_size)
    dchunks = jax.tree.map(lambda d: d.reshape(-1, batch_size, *d.shape[1:]), data)
    out = jax.lax.map(lambda c: chunk_fn(c[0], c[1], *args), (chunks, dchunks))
    return jax.tree.map(lambda o: o.reshape(-1, *o.shape[2:]), out)

  if mesh is None:
    out = local(indices, data, *args)
  else:
    spec = P(axis if axis is not None else mesh.axis_names)
    specs = (spec, jax.tree.map(lambda _: spec, data)) + (P(),) * len(args)

    def run(*inputs):
      # Lay inputs out on the mesh (a no-op when they already are), then split.
      inputs = jax.tree.map(
          lambda x, sp: None if x is None else jax.reshard(
              x, jax.sharding.NamedSharding(mesh, sp)), inputs, specs,
          is_leaf=lambda x: x is None)
      out = jax.shard_map(local, mesh=mesh, in_specs=specs, out_specs=spec,
                          check_vma=False)(*inputs)
      # Effects are small (m numbers per image): gather them to cut the padding.
      return jax.tree.map(
          lambda o: jax.reshard(o, jax.sharding.NamedSharding(mesh, P())), out)

    out = jax.jit(run)(indices, data, *args)
  return jax.tree.map(lambda o: o[:num], out)


def _check_batch_size(batch_size, num):
  if batch_size is None:
    return min(num, 64)
  if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
    raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}.")
  return int(min(batch_size, num))


def _check_image(image):
  if np.ndim(image) != 3:
    raise ValueError(f"image must be (h, w, c); got shape {np.shape(image)}. Use jax.vmap "
                     "over causal_effect for a batch of images.")
  _check_floating(image)
  # Value checks only where values exist (not under tracing); numpy, so that jit
  # around a closed-over image does not turn the check itself into a tracer.
  if not isinstance(image, jax.core.Tracer) and not np.isfinite(np.asarray(image)).all():
    raise ValueError("image contains NaN or infinite values.")


def _check_target(target, num_classes):
  if target is not None and not isinstance(target, jax.core.Tracer):
    t = np.asarray(target)
    if t.ndim != 0 or not 0 <= int(t) < num_classes:
      raise ValueError(f"target must be a class index in [0, {num_classes}), got {target}.")


def _do_predictions(forward, inputs_fn, indices, keys_base, num_draws, random):
  """Mean logits and mean probabilities over draws, ``(b, k)`` each."""
  if not random:
    logits = forward(inputs_fn(indices, None))
    return logits, None
  draws = jnp.arange(num_draws)
  keys = jax.vmap(lambda i: jax.vmap(lambda d: jax.random.fold_in(
      jax.random.fold_in(keys_base, i), d))(draws))(indices)  # (b, K)
  x = inputs_fn(indices, keys)  # (b, K, ...)
  b = x.shape[0]
  logits = forward(x.reshape(b * num_draws, *x.shape[2:]))
  return logits.reshape(b, num_draws, -1), True


def _split_static(obj, what: str):
  """``(dynamic, static)``: a pytree of arrays and numbers passes through ``jit`` as an
  argument; anything else must be hashable and becomes part of the program's identity."""
  leaves = jax.tree.leaves(obj)
  if all(isinstance(x, (jax.Array, np.ndarray, np.generic, int, float, bool, complex))
         for x in leaves):
    return obj, None
  try:
    hash(obj)
  except TypeError as e:
    raise ValueError(f"The {what} {obj!r} is neither a pytree of arrays nor hashable: "
                     "register it as a pytree (jax.tree_util.register_dataclass) or make "
                     "it hashable (a frozen dataclass).") from e
  return None, obj


def _check_masks(masks, image_shape):
  if masks_lib.is_recipe(masks):
    shape = tuple(masks.shape)
  else:
    masks = jnp.asarray(masks)
    if masks.ndim != 3:
      raise ValueError(f"masks must be (m, h, w); got shape {masks.shape}.")
    shape = tuple(masks.shape[1:])
    _check_mask_range(masks)
  if shape != tuple(image_shape):
    raise ValueError(f"masks have spatial shape {shape} but the image is "
                     f"{tuple(image_shape)}.")
  if masks_lib.num_masks(masks) == 0:
    raise ValueError("masks is empty: pass at least one mask.")
  return masks


def causal_effect(logits_fn: Callable, image, masks, *, intervention="zero",
                  estimand="expected", target=None, batch_size: int | None = None,
                  activation: str = "softmax", key=None,
                  mesh: jax.sharding.Mesh | None = None) -> CEResult:
  """Causal effect of ``do(X_M = v)`` on the prediction, for every mask ``M``.

  Pure: works under ``jit``, under ``vmap`` over images, and under ``grad`` with
  respect to ``image``. Compiled once: eager calls with the same ``logits_fn``,
  settings and shapes reuse one compiled program (``logits_fn``, the estimand,
  ``batch_size``, ``activation`` and ``mesh`` are its static settings; the image,
  masks, target, key and the intervention's arrays are its arguments).

  Args:
    logits_fn: pure ``images (n, h, w, c) -> logits (n, k)``; hashable (a function).
    image: ``(h, w, c)`` floating point, in the model's input space.
    masks: ``(m, h, w)`` masks in [0, 1], or a mask recipe (``masks.RiseMasks`` or any
      object with ``num``, ``shape`` and ``__call__(indices) -> (b, h, w)``).
    intervention: what replaces masked pixels: one of ``INTERVENTIONS``, the names
      ``"zero"`` (normalised 0, the data mean), ``"mean"``, ``"blur"``, or any
      ``Intervention``.
    estimand: one of ``ESTIMANDS`` or a callable (``Estimand``).
    target: class for ``probability``/``logit`` (default: the predicted class).
    batch_size: masks per forward call (bounds memory); need not divide ``m``.
    activation: ``"softmax"`` (multi-class) or ``"sigmoid"`` (multi-label).
    key: PRNG key, required by random interventions.
    mesh: shard the mask axis over this mesh's devices.

  Returns:
    A ``CEResult``.

  Raises:
    ValueError: mask shape not matching the image, no masks, masks outside [0, 1],
      a non-finite or integer image, bad batch size, target out of range, unknown
      estimand, intervention or activation, or a random intervention without ``key``
      (under ``jit``, bad values give NaN instead; see the module doc).
  """
  _check_image(image)
  image = jnp.asarray(image)
  intervention = _intervention(intervention)
  _check_estimand(estimand)
  check_activation(activation)
  if _is_random(intervention) and key is None:
    raise ValueError(f"{type(intervention).__name__} is random: pass key=.")
  masks = _check_masks(masks, image.shape[:2])
  batch_size = _check_batch_size(batch_size, masks_lib.num_masks(masks))
  key = jax.random.key(0) if key is None else key
  dyn_intervention, static_intervention = _split_static(intervention, "intervention")
  dyn_masks, static_masks = _split_static(masks, "mask source")
  result = _causal_effect(logits_fn, image, dyn_masks, dyn_intervention, key, target,
                          static_masks=static_masks,
                          static_intervention=static_intervention, estimand=estimand,
                          batch_size=batch_size, activation=activation, mesh=mesh)
  # Checked after the call, which tells the class count without another trace.
  _check_target(target, result.clean_logits.shape[-1])
  return result


@functools.partial(jax.jit, static_argnames=(
    "logits_fn", "static_masks", "static_intervention", "estimand", "batch_size",
    "activation", "mesh"))
def _causal_effect(logits_fn, image, masks, intervention, key, target, *, static_masks,
                   static_intervention, estimand, batch_size, activation, mesh):
  masks = static_masks if masks is None else masks
  intervention = static_intervention if intervention is None else intervention
  random = _is_random(intervention)
  recipe = masks_lib.is_recipe(masks)
  num = masks_lib.num_masks(masks)
  clean_logits = logits_fn(image[None])[0].astype(jnp.float32)
  t = jnp.argmax(clean_logits) if target is None else jnp.asarray(target)
  t = t.astype(jnp.int32)

  def chunk_fn(indices, mask_chunk, image, key):
    chunk = masks(indices) if recipe else mask_chunk

    def inputs(indices, keys):
      if keys is None:
        value = intervention.fill(image, None)
        return jax.vmap(lambda m: intervene(image, m, value))(chunk)
      return jax.vmap(lambda m, ks: jax.vmap(
          lambda k: intervene(image, m, intervention.fill(image, k)))(ks))(chunk, keys)

    logits, drawn = _do_predictions(
        lambda x: logits_fn(x).astype(jnp.float32), inputs, indices, key,
        intervention.num_draws, random)
    if drawn:
      probs = activate(logits, activation).mean(1)
      logits = logits.mean(1)
    else:
      probs = activate(logits, activation)
    value = estimand_value(estimand, clean_logits, logits, probs, t, activation)
    # Traced inputs cannot raise: make bad values visible as NaN (see module doc).
    ok = ((chunk >= 0) & (chunk <= 1)).all((1, 2)) & jnp.isfinite(image).all()
    return jnp.where(ok.reshape(ok.shape + (1,) * (value.ndim - 1)), value, jnp.nan)

  effects = sweep(chunk_fn, num, None if recipe else masks, batch_size=batch_size,
                  mesh=mesh, args=(image, key))
  return CEResult(effects, clean_logits, t)


def ce_map(effects, masks, *, weighting: str = "coverage",
           batch_size: int | None = None) -> jax.Array:
  """Per-pixel map from per-mask effects.

  ``weighting="coverage"``: ``sum_i e_i M_i / sum_i M_i``, the mean effect of the
  interventions covering each pixel (0 where none does); overlapping sliding windows
  are averaged this way, as Captum's Occlusion does. For estimands that fall when
  evidence is removed (``probability``, ``logit``), important pixels are negative.

  ``weighting="rise"``: ``sum_i e_i (1 - M_i) / (N p)``, RISE's weighting of each
  value by the pixels *kept* (``1 - M_i``); ``p`` is the RISE keep probability (masks
  must be a ``RiseMasks`` recipe). Given the target probabilities ``f_t(I * kept_i)``
  as ``effects`` this is RISE itself (``saliency.rise``). Given CE effects it is a
  RISE-weighted CE map; note that ``sum_i kept_i(x) / (N p)`` varies from pixel to
  pixel at finite ``N``, so it is *not* RISE shifted by a constant and can rank
  pixels differently.

  Args:
    effects: ``(m,)`` or ``(m, k)``.
    masks: the masks the effects were computed with (array or mask recipe).

  Returns:
    ``(h, w)`` or ``(h, w, k)``. Compiled once per shapes and settings, like
    ``causal_effect``.
  """
  effects = jnp.asarray(effects, jnp.float32)
  num = masks_lib.num_masks(masks)
  if effects.shape[0] != num:
    raise ValueError(f"effects has {effects.shape[0]} rows but there are {num} masks.")
  if weighting not in ("coverage", "rise"):
    raise ValueError(f"Unknown weighting {weighting!r}; valid are ['coverage', 'rise'].")
  recipe = masks_lib.is_recipe(masks)
  if weighting == "rise" and not (recipe and hasattr(masks, "p")):
    raise ValueError("weighting='rise' needs the RiseMasks recipe (it knows p).")
  batch_size = _check_batch_size(batch_size, num)
  if not recipe:
    masks = jnp.asarray(masks, jnp.float32)
  dyn_masks, static_masks = _split_static(masks, "mask source")
  return _ce_map(effects, dyn_masks, static_masks=static_masks, weighting=weighting,
                 batch_size=batch_size)


@functools.partial(jax.jit, static_argnames=("static_masks", "weighting", "batch_size"))
def _ce_map(effects, masks, *, static_masks, weighting, batch_size):
  masks = static_masks if masks is None else masks
  recipe = masks_lib.is_recipe(masks)
  num = masks_lib.num_masks(masks)
  h, w = masks_lib.mask_shape(masks)
  total = _padded_size(num, batch_size, 1)
  e = jnp.pad(effects, [(0, total - num)] + [(0, 0)] * (effects.ndim - 1))
  e = e.reshape(-1, batch_size, *effects.shape[1:])
  valid = (jnp.arange(total) < num).reshape(-1, batch_size)
  idx = jnp.arange(total, dtype=jnp.int32).reshape(-1, batch_size)
  data = None if recipe else jnp.pad(jnp.asarray(masks, jnp.float32),
                                     ((0, total - num), (0, 0), (0, 0)))
  data = None if recipe else data.reshape(-1, batch_size, h, w)

  def body(carry, xs):
    num_acc, den_acc = carry
    i, e_chunk, ok, m_chunk = xs
    m = masks(i) if recipe else m_chunk
    m = m * ok[:, None, None]
    weight = (1.0 - m) * ok[:, None, None] if weighting == "rise" else m
    num_acc = num_acc + jnp.tensordot(weight, e_chunk, axes=((0,), (0,)))
    return (num_acc, den_acc + m.sum(0)), None

  init = (jnp.zeros((h, w) + effects.shape[1:], jnp.float32), jnp.zeros((h, w)))
  (acc, coverage), _ = jax.lax.scan(body, init, (idx, e, valid, data))
  if weighting == "rise":
    return acc / (num * masks.p)
  cov = coverage.reshape(coverage.shape + (1,) * (acc.ndim - 2))
  return jnp.where(cov > 0, acc / jnp.where(cov > 0, cov, 1.0), 0.0)


# --- latent interventions ------------------------------------------------------------

class LatentInterventions(NamedTuple):
  """``do(h_k = v)`` on feature channels, optionally restricted to spatial regions.

  Attributes:
    channels: int ``(m,)``, the channel ``k`` of each intervention.
    values: float ``(m,)``, the value ``v`` written.
    regions: float ``(m, h', w')`` in [0, 1] (soft regions blend), or None for
      the whole feature map.
  """

  channels: Any
  values: Any
  regions: Any = None


def latent_interventions(*, channels, values=(0.0,), regions=None) -> LatentInterventions:
  """Every combination of ``channels`` x ``regions`` x ``values``.

  Args:
    channels: channel indices.
    values: values to write.
    regions: ``(r, h', w')`` masks, or None for whole maps.
  """
  channels = np.asarray(channels, np.int32).reshape(-1)
  values = np.asarray(values, np.float32).reshape(-1)
  if regions is None:
    c, v = np.meshgrid(channels, values, indexing="ij")
    return LatentInterventions(jnp.asarray(c.ravel()), jnp.asarray(v.ravel()))
  regions = np.asarray(regions, np.float32)
  c, r, v = np.meshgrid(channels, np.arange(len(regions)), values, indexing="ij")
  return LatentInterventions(jnp.asarray(c.ravel()), jnp.asarray(v.ravel()),
                             jnp.asarray(regions[r.ravel()]))


def intervene_latent(h, channel, value, region=None):
  """``h`` with ``h[..., channel] = value`` (inside ``region`` if given); h ``(h', w', C)``."""
  onehot = jax.nn.one_hot(channel, h.shape[-1], dtype=h.dtype)
  m = onehot if region is None else region[..., None].astype(h.dtype) * onehot
  return h * (1 - m) + jnp.asarray(value, h.dtype) * m


def latent_causal_effect(prefix_fn: Callable, suffix_fn: Callable, image,
                         interventions: LatentInterventions, *, estimand="expected",
                         target=None, batch_size=None, activation="softmax",
                         mesh=None) -> CEResult:
  """Causal effects of interventions on hidden features at one stage.

  The prefix runs once; the suffix is vmapped over the interventions in chunks of
  ``batch_size``, sharded over ``mesh`` like pixel masks. Same estimands and result
  as ``causal_effect``; ``clean_logits`` is ``suffix(prefix(x))``.

  Args:
    prefix_fn: ``images (n, h, w, c) -> features (n, h', w', C)``.
    suffix_fn: ``features -> logits (n, k)``.
    image: ``(h, w, c)``.
    interventions: a ``LatentInterventions``.
  """
  _check_image(image)
  image = jnp.asarray(image)
  _check_estimand(estimand)
  check_activation(activation)
  feature_shape = _feature_shape(prefix_fn, image.shape, image.dtype)
  raw_channels = interventions.channels
  channels = jnp.asarray(interventions.channels, jnp.int32)
  values = jnp.asarray(interventions.values, jnp.float32)
  num = int(channels.shape[0])
  if num == 0:
    raise ValueError("interventions is empty.")
  if values.shape != (num,):
    raise ValueError(f"values must have shape ({num},), got {values.shape}.")
  if not isinstance(raw_channels, jax.core.Tracer) and (
      np.asarray(raw_channels).min() < 0
      or np.asarray(raw_channels).max() >= feature_shape[-1]):
    raise ValueError(f"channels must be in [0, {feature_shape[-1]}).")
  regions = interventions.regions
  if regions is not None:
    regions = jnp.asarray(regions, jnp.float32)
    if regions.shape != (num,) + feature_shape[:2]:
      raise ValueError(f"regions must have shape {(num,) + feature_shape[:2]}, got "
                       f"{regions.shape}.")
  batch_size = _check_batch_size(batch_size, num)
  data = (channels, values) if regions is None else (channels, values, regions)
  result = _latent_causal_effect(prefix_fn, suffix_fn, image, data, target,
                                 estimand=estimand, batch_size=batch_size,
                                 activation=activation, mesh=mesh)
  _check_target(target, result.clean_logits.shape[-1])
  return result


@functools.lru_cache(maxsize=256)
def _feature_shape(prefix_fn, shape, dtype):
  """The prefix's feature shape ``(h', w', C)`` for one image, traced once per shape."""
  return tuple(jax.eval_shape(prefix_fn, jax.ShapeDtypeStruct((1,) + shape, dtype)).shape[1:])


@functools.partial(jax.jit, static_argnames=("prefix_fn", "suffix_fn", "estimand",
                                             "batch_size", "activation", "mesh"))
def _latent_causal_effect(prefix_fn, suffix_fn, image, data, target, *, estimand,
                          batch_size, activation, mesh):
  h = prefix_fn(image[None])[0]
  num = data[0].shape[0]
  clean_logits = suffix_fn(h[None])[0].astype(jnp.float32)
  t = (jnp.argmax(clean_logits) if target is None else jnp.asarray(target)).astype(jnp.int32)

  def chunk_fn(indices, chunk, h):
    del indices
    hs = jax.vmap(lambda *a: intervene_latent(h, *a))(*chunk)
    logits = suffix_fn(hs).astype(jnp.float32)
    value = estimand_value(estimand, clean_logits, logits, activate(logits, activation), t,
                           activation)
    # Traced values cannot raise (see the module doc): a non-finite image or a channel
    # outside [0, C) gives NaN, never a silent no-op.
    ok = jnp.isfinite(h).all() & (chunk[0] >= 0) & (chunk[0] < h.shape[-1])
    return jnp.where(ok.reshape(ok.shape + (1,) * (value.ndim - 1)), value, jnp.nan)

  effects = sweep(chunk_fn, num, data, batch_size=batch_size, mesh=mesh, args=(h,))
  return CEResult(effects, clean_logits, t)
