"""Saliency baselines to compare causal-effect maps against.

Every method is pure and batched: ``images (n, h, w, c)`` and int ``targets (n,)`` in,
maps ``(n, h, w)`` out, where **larger means more important for the target class**.
Gradient methods need only ``logits_fn``; the CAM family also needs the model split
at its last feature map, ``features_fn(images) -> (n, h', w', C)`` and
``classify_fn(features) -> logits`` (``checkpoint.make_cam_fns`` builds both), and
their maps are upsampled bilinearly to the image size. Scores are target *logits*,
as in the papers. Random methods take an explicit ``key``.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from cejax import effects as effects_lib
from cejax import masks as masks_lib


def _score_fn(logits_fn: Callable, targets):
  """Sum of the target logits over the batch: its gradient is per-image (the input may
  be images, or features for a ``classify_fn``)."""

  def score(images):
    logits = logits_fn(images).astype(jnp.float32)
    return jnp.take_along_axis(logits, targets[:, None], axis=1).sum()

  return score


def _check(images, targets):
  images = jnp.asarray(images, jnp.float32)
  if images.ndim != 4:
    raise ValueError(f"images must be (n, h, w, c), got shape {images.shape}.")
  targets = jnp.asarray(targets, jnp.int32)
  if targets.shape != images.shape[:1]:
    raise ValueError(f"targets must have shape ({images.shape[0]},), got {targets.shape}.")
  return images, targets


def input_gradient(logits_fn, images, targets):
  """``d logit_t / d x`` with the image's shape ``(n, h, w, c)``."""
  images, targets = _check(images, targets)
  return jax.grad(_score_fn(logits_fn, targets))(images)


def vanilla_gradient(logits_fn, images, targets):
  """Simonyan et al. (2014): max over channels of ``|d logit_t / d x|``."""
  return jnp.abs(input_gradient(logits_fn, images, targets)).max(-1)


def gradient_x_input(logits_fn, images, targets):
  """Shrikumar et al. (2016): ``sum_c x * d logit_t / d x``."""
  images, targets = _check(images, targets)
  return (images * input_gradient(logits_fn, images, targets)).sum(-1)


def _noisy(images, key, num_samples, sigma):
  """``num_samples`` noisy copies; noise std is ``sigma`` times each image's range."""
  spread = images.max((1, 2, 3)) - images.min((1, 2, 3))
  noise = jax.random.normal(key, (num_samples,) + images.shape)
  return images[None] + sigma * spread[None, :, None, None, None] * noise


def smoothgrad(logits_fn, images, targets, *, key, num_samples: int = 16,
               sigma: float = 0.15):
  """Smilkov et al. (2017): the vanilla gradient map averaged over noisy copies."""
  images, targets = _check(images, targets)
  noisy = _noisy(images, key, num_samples, sigma)
  maps = jax.lax.map(lambda x: vanilla_gradient(logits_fn, x, targets), noisy)
  return maps.mean(0)


def integrated_gradients(logits_fn, images, targets, *, baseline=None, steps: int = 32,
                         per_channel: bool = False):
  """Sundararajan et al. (2017), midpoint Riemann sum over ``steps``.

  Completeness: the attributions sum to ``logit_t(x) - logit_t(baseline)`` up to the
  quadrature error, which falls as ``steps`` grows.

  Args:
    baseline: ``(h, w, c)`` or per-image ``(n, h, w, c)``; default zeros (the data
      mean in normalised space).
    per_channel: return ``(n, h, w, c)`` instead of the channel sum.
  """
  images, targets = _check(images, targets)
  baseline = jnp.zeros_like(images) if baseline is None else jnp.broadcast_to(
      jnp.asarray(baseline, jnp.float32), images.shape)
  alphas = (jnp.arange(steps, dtype=jnp.float32) + 0.5) / steps
  grad = jax.grad(_score_fn(logits_fn, targets))
  total = jax.lax.map(lambda a: grad(baseline + a * (images - baseline)), alphas).mean(0)
  attributions = (images - baseline) * total
  return attributions if per_channel else attributions.sum(-1)


def _upsample(maps, shape):
  return jax.image.resize(maps, (maps.shape[0],) + tuple(shape), "bilinear")


def _feature_grads(features_fn, classify_fn, images, targets):
  feats = features_fn(images).astype(jnp.float32)
  return feats, jax.grad(_score_fn(classify_fn, targets))(feats)


def cam(features_fn, classify_fn, images, targets):
  """Zhou et al. (2016): ``sum_c W[c, t] A_c`` for a global-average-pool + linear head.

  Computed as ``H'W' * sum_c A_c dlogit_t/dA_c``, which equals the class activation map
  exactly when the head is GAP followed by a linear layer (as in DenseNet).
  """
  images, targets = _check(images, targets)
  feats, grads = _feature_grads(features_fn, classify_fn, images, targets)
  hw = feats.shape[1] * feats.shape[2]
  return _upsample(hw * (feats * grads).sum(-1), images.shape[1:3])


def grad_cam(features_fn, classify_fn, images, targets):
  """Selvaraju et al. (2017): ``ReLU(sum_c alpha_c A_c)``, ``alpha_c`` = mean gradient."""
  images, targets = _check(images, targets)
  feats, grads = _feature_grads(features_fn, classify_fn, images, targets)
  alpha = grads.mean((1, 2), keepdims=True)
  return _upsample(jax.nn.relu((alpha * feats).sum(-1)), images.shape[1:3])


def _grad_cam_pp_maps(feats, grads):
  # Chattopadhay et al. (2018), eq. 19 with an exponential score, whose higher
  # derivatives are powers of the first one.
  g2, g3 = grads**2, grads**3
  denom = 2 * g2 + feats.sum((1, 2), keepdims=True) * g3
  alpha = g2 / jnp.where(denom != 0, denom, 1.0)
  weights = (alpha * jax.nn.relu(grads)).sum((1, 2), keepdims=True)
  return jax.nn.relu((weights * feats).sum(-1))


def grad_cam_pp(features_fn, classify_fn, images, targets):
  """Grad-CAM++ (Chattopadhay et al., 2018)."""
  images, targets = _check(images, targets)
  feats, grads = _feature_grads(features_fn, classify_fn, images, targets)
  return _upsample(_grad_cam_pp_maps(feats, grads), images.shape[1:3])


def smooth_grad_cam_pp(features_fn, classify_fn, images, targets, *, key,
                       num_samples: int = 16, sigma: float = 0.15):
  """Smooth Grad-CAM++ (Omeiza et al., 2019): Grad-CAM++ averaged over noisy copies."""
  images, targets = _check(images, targets)
  noisy = _noisy(images, key, num_samples, sigma)
  maps = jax.lax.map(lambda x: grad_cam_pp(features_fn, classify_fn, x, targets), noisy)
  return maps.mean(0)


def rise(logits_fn, images, targets, *, key, num_masks: int = 1000, cells: int = 8,
         p: float = 0.5, batch_size: int = 100, activation: str = "softmax"):
  """RISE (Petsiuk et al., 2018) on the CE machinery.

  ``ce_map(weighting="rise")`` of the probability effect: ``sum_i (q_i - p) kept_i /
  (N p)``, which is RISE's saliency minus a constant (the clean probability), so it
  ranks pixels identically. Mask draws come from ``key`` (the same for every image).
  """
  images, targets = _check(images, targets)
  recipe = masks_lib.rise_masks(key, num=num_masks, shape=images.shape[1:3], cells=cells,
                                p=p)

  def one(image, target):
    result = effects_lib.causal_effect(
        logits_fn, image, recipe, estimand="probability", target=target,
        batch_size=batch_size, activation=activation, intervention="zero")
    return effects_lib.ce_map(result.effects, recipe, weighting="rise",
                              batch_size=batch_size)

  return jax.lax.map(lambda a: one(*a), (images, targets))


def occlusion(logits_fn, images, targets, *, window: int, stride: int, batch_size: int = 64,
              activation: str = "softmax"):
  """Zeiler & Fergus (2014), averaged over overlapping windows like Captum's Occlusion:
  the drop in target probability when a window is filled with zeros."""
  images, targets = _check(images, targets)
  mask_set = masks_lib.sliding_window_masks(shape=images.shape[1:3], window=window,
                                            stride=stride)

  def one(image, target):
    result = effects_lib.causal_effect(
        logits_fn, image, mask_set, estimand="probability", target=target,
        batch_size=batch_size, activation=activation, intervention="zero")
    return -effects_lib.ce_map(result.effects, mask_set, batch_size=batch_size)

  return jax.lax.map(lambda a: one(*a), (images, targets))
