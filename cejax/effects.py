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

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from cejax import interventions, validation
from cejax import masks as masks_lib
from cejax.estimands import (  # noqa: F401  (re-exported: the estimand API lives here too)
  ACTIVATIONS,
  ESTIMANDS,
  CEResult,
  Estimand,
  activate,
  check_activation,
  check_estimand,
  estimand_value,
)
from cejax.interventions import (  # noqa: F401  (re-exported)
  INTERVENTIONS,
  Blur,
  Constant,
  GaussianNoise,
  ImageMean,
  ImageSet,
  Intervention,
  Reference,
  intervene,
)
from cejax.latent import (  # noqa: F401  (re-exported)
  LatentInterventions,
  intervene_latent,
  latent_causal_effect,
  latent_interventions,
)
from cejax.sharding import padded_size, sweep  # noqa: F401  (re-exported)
from cejax.types import Effects, Image, LogitsFn, Masks, PRNGKey


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


def split_static(obj, what: str):
  """``(dynamic, static)``: a pytree of arrays and numbers passes through ``jit`` as an
  argument; anything else must be hashable and becomes part of the program's identity
  (shared with the other sweeps' programs, e.g. ``cejax.incremental``)."""
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


def check_masks(masks, image_shape):
  """``masks`` (an array, checked to be in [0, 1], or a recipe) for images of spatial
  ``image_shape``; raises ``ValueError`` naming what is wrong."""
  if masks_lib.is_recipe(masks):
    shape = tuple(masks.shape)
  else:
    masks = jnp.asarray(masks)
    if masks.ndim != 3:
      raise ValueError(f"masks must be (m, h, w); got shape {masks.shape}.")
    shape = tuple(masks.shape[1:])
    validation.check_mask_range(masks)
  if shape != tuple(image_shape):
    raise ValueError(f"masks have spatial shape {shape} but the image is "
                     f"{tuple(image_shape)}.")
  if masks_lib.num_masks(masks) == 0:
    raise ValueError("masks is empty: pass at least one mask.")
  return masks


def causal_effect(logits_fn: LogitsFn, image: Image, masks: Masks | masks_lib.MaskSource, *,
                  intervention="zero", estimand="expected", target: int | None = None,
                  batch_size: int | None = None, activation: str = "softmax",
                  key: PRNGKey | None = None,
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
  validation.check_image(image)
  image = jnp.asarray(image)
  intervention = interventions.resolve(intervention)
  check_estimand(estimand)
  check_activation(activation)
  if interventions.is_random(intervention) and key is None:
    raise ValueError(f"{type(intervention).__name__} is random: pass key=.")
  masks = check_masks(masks, image.shape[:2])
  batch_size = validation.check_batch_size(batch_size, masks_lib.num_masks(masks))
  key = jax.random.key(0) if key is None else key
  dyn_intervention, static_intervention = split_static(intervention, "intervention")
  dyn_masks, static_masks = split_static(masks, "mask source")
  result = _causal_effect(logits_fn, image, dyn_masks, dyn_intervention, key, target,
                          static_masks=static_masks,
                          static_intervention=static_intervention, estimand=estimand,
                          batch_size=batch_size, activation=activation, mesh=mesh)
  # Checked after the call, which tells the class count without another trace.
  validation.check_target(target, result.clean_logits.shape[-1])
  return result


@functools.partial(jax.jit, static_argnames=(
    "logits_fn", "static_masks", "static_intervention", "estimand", "batch_size",
    "activation", "mesh"))
def _causal_effect(logits_fn, image, masks, intervention, key, target, *, static_masks,
                   static_intervention, estimand, batch_size, activation, mesh):
  masks = static_masks if masks is None else masks
  intervention = static_intervention if intervention is None else intervention
  random = interventions.is_random(intervention)
  recipe = masks_lib.is_recipe(masks)
  num = masks_lib.num_masks(masks)
  clean_logits = logits_fn(image[None])[0].astype(jnp.float32)
  t = jnp.argmax(clean_logits) if target is None else jnp.asarray(target)
  t = t.astype(jnp.int32)

  def chunk_fn(indices, mask_chunk, image, key):
    chunk = masks(indices) if recipe else mask_chunk
    # Materialise the masks and the image: XLA then fuses the blend x (1 - m) + v m the
    # same way in every program (one device or a mesh, one chunk or many), so soft
    # masks with a non-zero fill round identically whatever the device count.
    chunk, image = jax.lax.optimization_barrier((chunk, image))

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


def ce_map(effects: Effects, masks: Masks | masks_lib.MaskSource, *,
           weighting: str = "coverage", batch_size: int | None = None
           ) -> Float[Array, "h w"] | Float[Array, "h w k"]:
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
  batch_size = validation.check_batch_size(batch_size, num)
  if not recipe:
    masks = jnp.asarray(masks, jnp.float32)
  dyn_masks, static_masks = split_static(masks, "mask source")
  return _ce_map(effects, dyn_masks, static_masks=static_masks, weighting=weighting,
                 batch_size=batch_size)


@functools.partial(jax.jit, static_argnames=("static_masks", "weighting", "batch_size"))
def _ce_map(effects, masks, *, static_masks, weighting, batch_size):
  masks = static_masks if masks is None else masks
  recipe = masks_lib.is_recipe(masks)
  num = masks_lib.num_masks(masks)
  h, w = masks_lib.mask_shape(masks)
  total = padded_size(num, batch_size, 1)
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
