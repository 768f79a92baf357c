"""Saliency baselines to compare causal-effect maps against.

Every method is pure and batched: ``images (n, h, w, c)`` and int ``targets (n,)`` in,
maps ``(n, h, w)`` out, where **larger means more important for the target class**.
Gradient methods need only ``logits_fn``; the CAM family also needs the model split
at its last feature map, ``features_fn(images) -> (n, h', w', C)`` and
``classify_fn(features) -> logits`` (``checkpoint.make_cam_fns`` builds both), and
their maps are upsampled bilinearly to the image size. Scores are target *logits*,
as in the papers. Random methods take an explicit ``key``.

``attention_rollout`` (Abnar & Zuidema 2020) maps a Vision Transformer's attention
weights instead of calling a model; ``attention_relevance`` (Chefer et al. 2021)
weights them by their gradients, and ``transformer_attribution`` (their CVPR 2021
method) weights the attention weights' LRP relevance by them; ``token_grad_cam`` is
Grad-CAM on the patch tokens; ``legrad`` (Bousselham et al.) sums each block's attention
gradients.

Each method is compiled once (``cejax._compile.jit``): eager calls with the same model
functions, hyperparameters and shapes reuse one program. Called eagerly, a target
outside the model's classes raises ``ValueError``; under ``jit`` it gives a NaN map.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cejax import effects as effects_lib
from cejax import estimands, interventions, metrics
from cejax import masks as masks_lib
from cejax import precision as precision_lib
from cejax._compile import jit, output_shape
from cejax._validation import check_channels_last
from cejax.models import vit
from cejax.types import ClassifyFn, FeaturesFn, Images, LogitsFn, Maps, PRNGKey, Targets


def _score_fn(logits_fn: Callable, targets):
  """Sum of the target logits over the batch: its gradient is per-image (the input may
  be images, or features for a ``classify_fn``).

  Concrete targets are range-checked before the compiled call (``_validate``); here
  targets are traced, so an image whose target is outside ``[0, k)`` has its score
  scaled by NaN and every map built from it is NaN.
  """

  def score(images):
    logits = logits_fn(images).astype(jnp.float32)
    k = logits.shape[-1]
    valid = (targets >= 0) & (targets < k)
    picked = jnp.take_along_axis(logits, jnp.clip(targets, 0, k - 1)[:, None], axis=1)[:, 0]
    return (picked * jnp.where(valid, 1.0, jnp.nan)).sum()

  return score


def _check(images, targets):
  if not jnp.issubdtype(jnp.result_type(images), jnp.floating):
    raise ValueError(f"images must be floating point in the model's input space, got "
                     f"dtype {jnp.result_type(images)}.")
  images = jnp.asarray(images, jnp.float32)
  if images.ndim != 4:
    raise ValueError(f"images must be (n, h, w, c), got shape {images.shape}.")
  check_channels_last(images.shape, "images")
  if not jnp.issubdtype(jnp.result_type(targets), jnp.integer):
    raise ValueError(f"targets must be integer class indices, got dtype "
                     f"{jnp.result_type(targets)} (a float would be truncated).")
  targets = jnp.asarray(targets, jnp.int32)
  if targets.shape != images.shape[:1]:
    raise ValueError(f"targets must have shape ({images.shape[0]},), got {targets.shape}.")
  return images, targets


def _num_classes(args, image_shape, dtype) -> int:
  """The model's class count from its output shape (traced once per shape, never run)."""
  if "logits_fn" in args:
    return output_shape(args["logits_fn"], image_shape, dtype)[-1]
  features = output_shape(args["features_fn"], image_shape, dtype)
  return output_shape(args["classify_fn"], features, jnp.float32)[-1]


def _validate(args):
  """Eager checks before the compiled call: shapes, dtype, and the target range."""
  images, targets = args["images"], args["targets"]
  if isinstance(images, jax.core.Tracer):
    return args
  images, targets = _check(images, targets)
  if isinstance(targets, jax.core.Tracer):
    return args  # traced: the NaN contract of _score_fn applies
  k = _num_classes(args, (1,) + images.shape[1:], images.dtype)
  t = np.asarray(targets)
  if t.size and (t.min() < 0 or t.max() >= k):
    raise ValueError(f"targets must be class indices in [0, {k}), got {t.tolist()}.")
  return args


# Images, targets, keys, baselines and tolerances are traced; models, sizes, flags static.
_compiled = jit(data=("images", "targets", "key", "baseline", "tolerance"),
                prepare=_validate)


@_compiled
def input_gradient(logits_fn: LogitsFn, images: Images, targets: Targets) -> Images:
  """``d logit_t / d x`` with the image's shape ``(n, h, w, c)``."""
  images, targets = _check(images, targets)
  return jax.grad(_score_fn(logits_fn, targets))(images)


@_compiled
def vanilla_gradient(logits_fn: LogitsFn, images: Images, targets: Targets) -> Maps:
  """Simonyan et al. (2014): max over channels of ``|d logit_t / d x|``."""
  return jnp.abs(input_gradient(logits_fn, images, targets)).max(-1)


@_compiled
def gradient_x_input(logits_fn: LogitsFn, images: Images, targets: Targets) -> Maps:
  """Shrikumar et al. (2016): ``sum_c x * d logit_t / d x``."""
  images, targets = _check(images, targets)
  return (images * input_gradient(logits_fn, images, targets)).sum(-1)


def _noisy(images, key, num_samples, sigma):
  """``num_samples`` noisy copies; noise std is ``sigma`` times each image's range."""
  spread = images.max((1, 2, 3)) - images.min((1, 2, 3))
  noise = jax.random.normal(key, (num_samples,) + images.shape)
  return images[None] + sigma * spread[None, :, None, None, None] * noise


@_compiled
def smoothgrad(logits_fn: LogitsFn, images: Images, targets: Targets, *,
               key: PRNGKey, num_samples: int = 50,
               sigma: float = 0.15):
  """SmoothGrad (Smilkov et al., 2017): ``max_c mean_i |d logit_t / d x_c (x + e_i)|``.

  The mean over ``num_samples`` noisy copies of the absolute gradient, then the
  maximum over channels: Captum's ``NoiseTunnel(Saliency(model), nt_type="smoothgrad")``
  followed by the channel max of Simonyan et al.'s map. Defaults follow the paper:
  50 samples at 15 % noise (they recommend 10-20 % and see little change past 50).

  Args:
    key: PRNG key; noise ``e = sigma * (max(x) - min(x)) * normal(key, (num_samples,
      n, h, w, c))``, the spread taken per image.
    num_samples: noisy copies.
    sigma: noise level relative to each image's range.
  """
  images, targets = _check(images, targets)
  noisy = _noisy(images, key, num_samples, sigma)
  grads = jax.lax.map(lambda x: jnp.abs(input_gradient(logits_fn, x, targets)), noisy)
  return grads.mean(0).max(-1)


@_compiled
def integrated_gradients(logits_fn: LogitsFn, images: Images, targets: Targets, *,
                         baseline=None, steps: int = 50, method: str = "gausslegendre",
                         per_channel: bool = False):
  """Sundararajan et al. (2017): ``(x - x') * int_0^1 d logit_t / d x (x' + a (x - x')) da``.

  The integral by Gauss-Legendre quadrature with ``steps`` nodes on [0, 1] (Captum's
  default: ``method="gausslegendre"``, 50 steps), or the midpoint Riemann sum
  (``method="riemann_middle"``). Completeness: the attributions sum to
  ``logit_t(x) - logit_t(x')`` up to the quadrature error, which falls as ``steps``
  grows (the analysis reports the gap it leaves on each image).

  Args:
    baseline: ``(h, w, c)`` or per-image ``(n, h, w, c)``; default zeros (the data
      mean in normalised space).
    steps: quadrature nodes.
    method: ``"gausslegendre"`` or ``"riemann_middle"``.
    per_channel: return ``(n, h, w, c)`` instead of the channel sum.
  """
  images, targets = _check(images, targets)
  baseline = jnp.zeros_like(images) if baseline is None else jnp.broadcast_to(
      jnp.asarray(baseline, jnp.float32), images.shape)
  alphas, weights = quadrature(steps, method)
  grad = jax.grad(_score_fn(logits_fn, targets))
  path = jax.lax.map(lambda a: grad(baseline + a * (images - baseline)), jnp.asarray(alphas))
  attributions = (images - baseline) * jnp.tensordot(jnp.asarray(weights), path, 1)
  return attributions if per_channel else attributions.sum(-1)


def quadrature(steps: int, method: str) -> tuple[np.ndarray, np.ndarray]:
  """Nodes and weights of a quadrature rule on [0, 1], as Captum makes them:
  ``"gausslegendre"`` (Legendre nodes mapped from [-1, 1]) or ``"riemann_middle"``."""
  if method == "gausslegendre":
    x, w = np.polynomial.legendre.leggauss(steps)
    return (0.5 * (1 + x)).astype(np.float32), (0.5 * w).astype(np.float32)
  if method == "riemann_middle":
    return ((np.arange(steps) + 0.5) / steps).astype(np.float32), np.full(
        steps, 1.0 / steps, np.float32)
  raise ValueError(f"method must be 'gausslegendre' or 'riemann_middle', got {method!r}.")


def _upsample(maps, shape):
  return jax.image.resize(maps, (maps.shape[0],) + tuple(shape), "bilinear")


def _feature_grads(features_fn, classify_fn, images, targets):
  feats = features_fn(images).astype(jnp.float32)
  return feats, jax.grad(_score_fn(classify_fn, targets))(feats)


@_compiled
def cam(features_fn: FeaturesFn, classify_fn: ClassifyFn, images: Images,
        targets: Targets) -> Maps:
  """Zhou et al. (2016): ``sum_c W[c, t] A_c`` for a global-average-pool + linear head.

  Computed as ``H'W' * sum_c A_c dlogit_t/dA_c``, which equals the class activation map
  exactly when the head is GAP followed by a linear layer (as in DenseNet).
  """
  images, targets = _check(images, targets)
  feats, grads = _feature_grads(features_fn, classify_fn, images, targets)
  hw = feats.shape[1] * feats.shape[2]
  return _upsample(hw * (feats * grads).sum(-1), images.shape[1:3])


@_compiled
def grad_cam(features_fn: FeaturesFn, classify_fn: ClassifyFn, images: Images,
             targets: Targets) -> Maps:
  """Selvaraju et al. (2017): ``ReLU(sum_c alpha_c A_c)``, ``alpha_c`` = mean gradient."""
  images, targets = _check(images, targets)
  feats, grads = _feature_grads(features_fn, classify_fn, images, targets)
  alpha = grads.mean((1, 2), keepdims=True)
  return _upsample(jax.nn.relu((alpha * feats).sum(-1)), images.shape[1:3])


def _grad_cam_pp_maps(feats, d1, d2, d3):
  # Chattopadhay et al. (2018), eq. 19: alpha = d2 / (2 d2 + sum_ab A_ab d3), with the
  # derivatives of exp(score), whose common factor exp(score) cancels; the weights
  # are sum_ab alpha ReLU(d1).
  denom = 2 * d2 + feats.sum((1, 2), keepdims=True) * d3
  alpha = d2 / jnp.where(denom != 0, denom, 1.0)
  weights = (alpha * jax.nn.relu(d1)).sum((1, 2), keepdims=True)
  return jax.nn.relu((weights * feats).sum(-1))


@_compiled
def grad_cam_pp(features_fn: FeaturesFn, classify_fn: ClassifyFn, images: Images,
                targets: Targets) -> Maps:
  """Grad-CAM++ (Chattopadhay et al., 2018)."""
  images, targets = _check(images, targets)
  feats, grads = _feature_grads(features_fn, classify_fn, images, targets)
  return _upsample(_grad_cam_pp_maps(feats, grads, grads**2, grads**3), images.shape[1:3])


@_compiled
def smooth_grad_cam_pp(features_fn: FeaturesFn, classify_fn: ClassifyFn, images: Images,
                       targets: Targets, *, key: PRNGKey,
                       num_samples: int = 50, sigma: float = 0.15):
  """Smooth Grad-CAM++ (Omeiza et al., 2019).

  The first, second and third derivatives of the score with respect to the feature
  map are each averaged over ``num_samples`` noisy copies of the input
  (``D^k = mean_i (dS/dA (x + e_i))^k``), then Grad-CAM++'s coefficients are formed
  from the averages and applied to the **clean** input's activations ``A(x)``. Noise
  as in ``smoothgrad`` (50 samples at 15 % by default).
  """
  images, targets = _check(images, targets)
  noisy = _noisy(images, key, num_samples, sigma)
  clean = features_fn(images).astype(jnp.float32)

  def moments(x):
    _, g = _feature_grads(features_fn, classify_fn, x, targets)
    return g, g**2, g**3

  d1, d2, d3 = jax.tree.map(lambda m: m.mean(0), jax.lax.map(moments, noisy))
  return _upsample(_grad_cam_pp_maps(clean, d1, d2, d3), images.shape[1:3])


@_compiled
def rise(logits_fn: LogitsFn, images: Images, targets: Targets, *,
         key: PRNGKey, num_masks: int = 6000, cells: int = 8,
         p: float = 0.1, batch_size: int = 100, activation: str = "softmax"):
  """RISE (Petsiuk et al., 2018): ``S(x) = sum_i f_t(I * M_i) M_i(x) / (N p)``.

  ``M_i`` are the *kept* masks of ``masks.rise`` (Petsiuk's generator: an
  ``s x s`` Bernoulli(p) grid upsampled bilinearly to ``(s + 1) x cell`` and cropped at
  a random shift), ``I * M_i`` keeps the image where ``M_i`` is 1 and puts 0 (in the
  model's input space, as in their code) elsewhere, and ``f_t`` is the target's
  probability. Mask draws come from ``key`` and are the same for every image. The
  defaults are those of Petsiuk et al.'s released code (``N = 6000``, ``s = 8``,
  ``p = 0.1``); their paper reports ``N = 4000`` masks for ResNet-50 at 224 px.
  """
  images, targets = _check(images, targets)
  recipe = masks_lib.rise(key, num=num_masks, shape=images.shape[1:3], cells=cells, p=p)

  def one(image, target):
    result = effects_lib.causal_effect(
        logits_fn, image, recipe, estimand="probability", target=target,
        batch_size=batch_size, activation=activation, intervention="zero")
    # effects are q_i - p_t: add p_t back for RISE's f_t(I * M_i).
    clean = estimands.activate(result.clean_logits, activation)
    probs = result.effects + estimands.take_class(clean, result.target)
    return effects_lib.ce_map(probs, recipe, weighting="rise", batch_size=batch_size)

  return jax.lax.map(lambda a: one(*a), (images, targets))


@_compiled
def adaptive_rise(logits_fn: LogitsFn, images: Images, targets: Targets, *,
                  key: PRNGKey, tolerance, rule: str = "norm", first: int = 250,
                  max_masks: int = 10000, cells: int = 8, p: float = 0.1,
                  batch_size: int = 100,
                  activation: str = "softmax") -> tuple[Maps, jax.Array]:
  """RISE that draws masks until its map stops changing.

  Masks are drawn in ``rise``'s order, inside a ``lax.while_loop`` on the device. The
  map is checked at ``first``, ``2 first``, ``4 first``, ... masks (the last check at
  ``max_masks``): at each check ``N`` the RISE map ``S_N`` of the first ``N`` masks is
  compared with ``S_{N/2}``, and drawing stops when the change is at most
  ``tolerance``: ``||S_N - S_{N/2}|| / ||S_N||`` (Frobenius norms, ``rule="norm"``), or
  ``1 - Spearman(S_N, S_{N/2})`` (``rule="rank"``, for when the ranking of pixels is
  what matters). The checks do not depend on ``batch_size`` (masks made at a time),
  so neither does the result. With ``tolerance=0`` it draws all ``max_masks`` and
  equals ``rise(num_masks=max_masks)`` to float32 round-off. Under ``vmap`` each image
  stops on its own. A target outside the model's classes gives a NaN map under
  ``jit`` (eagerly it raises), never another class's.

  Returns:
    ``(maps (n, h, w), masks_used (n,) int32)``.
  """
  if rule not in ("norm", "rank"):
    raise ValueError(f"rule must be 'norm' or 'rank', got {rule!r}.")
  if first < 1:
    raise ValueError(f"first must be a positive number of masks, got {first}.")
  images, targets = _check(images, targets)
  recipe = masks_lib.rise(key, num=max_masks, shape=images.shape[1:3], cells=cells, p=p)
  h, w = images.shape[1:3]
  offsets = jnp.arange(batch_size, dtype=jnp.int32)

  def change_between(current, previous):
    if rule == "norm":
      return (jnp.linalg.norm(current - previous)
              / jnp.maximum(jnp.linalg.norm(current), 1e-30))
    return 1.0 - metrics.spearman(current[None], previous[None])[0]

  def one(image, target):
    clean = estimands.activate(logits_fn(image[None])[0].astype(jnp.float32), activation)
    p_t = estimands.take_class(clean, target)

    def body(state):
      n, acc, previous, check, change = state
      indices = n + offsets
      limit = jnp.minimum(check, max_masks)
      ok = indices < limit
      masked = recipe(jnp.minimum(indices, max_masks - 1))
      masked, image_ = jax.lax.optimization_barrier((masked, image))
      x = jax.vmap(lambda m: interventions.intervene(image_, m, 0.0))(masked)
      q = estimands.activate(logits_fn(x).astype(jnp.float32), activation)
      # As rise: the probability estimand q_t - p_t, with p_t added back.
      f = (estimands.take_class(q, target) - p_t) + p_t
      acc = acc + jnp.tensordot((1.0 - masked) * ok[:, None, None], f, axes=((0,), (0,)))
      n = n + ok.sum(dtype=jnp.int32)
      at_check = n == limit
      current = acc / (n * p)
      change = jnp.where(at_check & (n > first), change_between(current, previous),
                         jnp.where(at_check, jnp.inf, change))
      previous = jnp.where(at_check, current, previous)
      return n, acc, previous, jnp.where(at_check, 2 * check, check), change

    def keep_going(state):
      n, _, _, _, change = state
      return (n < max_masks) & ~(change <= tolerance)

    zeros = jnp.zeros((h, w), jnp.float32)
    n, _, current, _, _ = jax.lax.while_loop(
        keep_going, body, (jnp.int32(0), zeros, zeros, jnp.int32(first),
                           jnp.float32(jnp.inf)))
    return current, n

  return jax.lax.map(lambda a: one(*a), (images, targets))


@_compiled
def occlusion(logits_fn: LogitsFn, images: Images, targets: Targets, *,
              window: int, stride: int, batch_size: int = 64,
              activation: str = "softmax"):
  """Occlusion (Zeiler & Fergus, 2014), equal to Captum's ``Occlusion``.

  Each pixel gets the mean, over the windows covering it, of the drop in target
  probability when the window is set to 0 (in the model's input space): Captum's
  ``Occlusion(lambda x: softmax(model(x))).attribute(x, target=t,
  sliding_window_shapes=(c, window, window), strides=(c, stride, stride),
  baselines=0)``. Windows are placed as Captum places them
  (``masks.sliding_windows``). This is the CE map of the ``probability``
  estimand with sliding windows and the ``"zero"`` intervention, sign flipped.
  """
  images, targets = _check(images, targets)
  mask_set = masks_lib.to_array(masks_lib.sliding_windows(
      shape=images.shape[1:3], window=window, stride=stride))

  def one(image, target):
    result = effects_lib.causal_effect(
        logits_fn, image, mask_set, estimand="probability", target=target,
        batch_size=batch_size, activation=activation, intervention="zero")
    return -effects_lib.ce_map(result.effects, mask_set, batch_size=batch_size)

  return jax.lax.map(lambda a: one(*a), (images, targets))


def _on_patches(maps, image_shape):
  """Patch-grid maps ``(n, rows, cols)`` at pixel resolution: each patch's value on its
  pixels."""
  (h, w), (rows, cols) = image_shape, maps.shape[1:]
  return jnp.repeat(jnp.repeat(maps, h // rows, axis=1), w // cols, axis=2)


def _vit_map(program, model, images, *args):
  """A ViT method's maps ``(n, h, w)`` from its compiled ``program(graphdef, state,
  images, *args)``, which returns each image's patch values ``(n, patches)``."""
  graphdef, state = nnx.split(model)
  values = program(graphdef, state, images, *args)
  return _on_patches(values.reshape(-1, *model.grid), images.shape[1:3])


def _check_classes(targets, num_classes: int):
  """Concrete targets outside ``[0, num_classes)`` are refused by name."""
  if not isinstance(targets, jax.core.Tracer) and (
      (targets < 0) | (targets >= num_classes)).any():
    raise ValueError(f"targets must be classes in [0, {num_classes}), got "
                     f"{np.asarray(targets).tolist()}.")


def attention_rollout(attentions, *, image_shape: tuple[int, int], residual: bool = True,
                      num_prefix: int = 1) -> Maps:
  """Attention rollout (Abnar & Zuidema, "Quantifying Attention Flow in Transformers",
  ACL 2020): how much each patch token flows into the class token through every layer.

  Per layer the heads' weights are averaged, the residual connection is added as the
  identity and the rows renormalised (``0.5 A + 0.5 I``; ``residual=False``: ``A``),
  and the layers are multiplied from the first, ``R = A_L ... A_1``, as the authors'
  ``compute_joint_attention``. The map is the class token's row of ``R`` over the patch
  tokens, each patch's value on its pixels.

  Args:
    attentions: ``(layers, n, heads, T, T)`` attention weights (rows sum to 1), e.g.
      ``cejax.models.vit.VisionTransformer.attentions(images)``.
    image_shape: ``(h, w)`` of the images: the patch grid is ``T - num_prefix`` patches
      in the images' aspect ratio, each ``h / rows`` pixels high.
    residual: add the residual connection (the paper's rollout) or not (raw attention).
    num_prefix: the tokens before the patches (the class token first among them).

  Returns:
    Maps ``(n, h, w)``.

  Raises:
    ValueError: attentions not ``(layers, n, heads, T, T)``, or ``T - num_prefix``
      patches that do not tile ``image_shape``.
  """
  a = jnp.asarray(attentions)
  if a.ndim != 5 or a.shape[-1] != a.shape[-2]:
    raise ValueError("attentions must be (layers, n, heads, T, T) attention weights, got "
                     f"shape {a.shape}.")
  h, w = (int(s) for s in image_shape)
  patches = a.shape[-1] - num_prefix
  rows = int(round((patches * h / w) ** 0.5))
  cols = patches // rows if rows else 0
  if rows < 1 or rows * cols != patches or h % rows or w % cols:
    raise ValueError(f"{a.shape[-1]} tokens less {num_prefix} prefix tokens are {patches} "
                     f"patches, which do not tile a {h} x {w} image.")
  a = a.mean(2)
  if residual:
    a = a + jnp.eye(a.shape[-1], dtype=a.dtype)
    a = a / a.sum(-1, keepdims=True)
  joint = jax.lax.fori_loop(1, a.shape[0], lambda i, r: a[i] @ r, a[0])
  return _on_patches(joint[:, 0, num_prefix:].reshape(-1, rows, cols), (h, w))


@precision_lib.applied
def attention_relevance(model, images: Images, targets: Targets) -> Maps:
  """Gradient-weighted attention relevance of a Vision Transformer (Chefer, Gur & Wolf,
  "Generic Attention-model Explainability for Interpreting Bi-Modal and
  Encoder-Decoder Transformers", ICCV 2021, their rule for self-attention): per block
  ``A_bar = mean_heads((dy_t/dA * A)^+)`` and ``R <- R + A_bar R`` from ``R = I``; the
  map is the class token's row of ``R`` over the patches, each patch's value on its
  pixels. (Their CVPR 2021 method, which weights LRP relevance instead of the attention
  weights, is ``transformer_attribution``.)

  Args:
    model: a ``cejax.models.vit.VisionTransformer`` (its ``trace``).
    images: ``(n, h, w, c)``.
    targets: int ``(n,)``, the classes whose logits ``y_t`` are explained.

  Returns:
    Maps ``(n, h, w)``, computed under the precision policy in force (``exact`` by
    default).

  Raises:
    ValueError: images not ``(n, h, w, c)`` floats, or targets not integer classes of
      the model.
  """
  images = jnp.asarray(images)
  targets = jnp.asarray(targets)
  _check(images, targets)
  _check_classes(targets, model.num_classes)
  return _vit_map(_attention_relevance_patches, model, images, targets)


@functools.partial(jax.jit, static_argnums=0)
def _attention_relevance_patches(graphdef, state, images, targets):
  """The class token's row of ``R`` over the patches ``(n, patches)``, one compiled
  program."""
  model = nnx.merge(graphdef, state)
  tokens = 1 + model.num_patches
  shape = (len(model.blocks_), images.shape[0], model.blocks_[0].attn.num_heads, tokens,
           tokens)

  def score(offsets):
    logits, weights, _ = model.trace(images, offsets=offsets)
    return jnp.take_along_axis(logits, targets[:, None], axis=1).sum(), weights

  # One forward and backward pass: the weights (L, n, H, T, T) and their gradients.
  grads, weights = jax.grad(score, has_aux=True)(jnp.zeros(shape, images.dtype))
  cams = jnp.maximum(grads * weights, 0.0).mean(2)  # (L, n, T, T)
  relevance = jax.lax.fori_loop(
      0, cams.shape[0], lambda i, r: r + cams[i] @ r,
      jnp.broadcast_to(jnp.eye(tokens, dtype=cams.dtype), cams.shape[1:]))
  return relevance[:, 0, 1:]


def _safe_divide(a, b):
  """``a / b``, 0 where ``b`` is 0: ``safe_divide`` of the authors' ``layers_ours.py``,
  literally (its denominator ``clamp(b, min=1e-9) + clamp(b, max=1e-9)`` is ``b + 1e-9``,
  and 1e-9 where that is 0)."""
  den = jnp.maximum(b, 1e-9) + jnp.minimum(b, 1e-9)
  den = den + jnp.where(den == 0, 1e-9, 0.0)
  return a / den * (b != 0)


def _image_sum(x):
  """Sum over everything but the batch axis, kept for broadcasting."""
  return x.sum(tuple(range(1, x.ndim)), keepdims=True)


def _linear_rule(layer, x, relevance):
  """``Linear.relprop`` with ``alpha=1`` (``beta=0`` drops their inhibitor term): the
  relevance goes back through the positive contributions ``x+ w+`` and ``x- w-``, the
  bias left out."""
  kernel = layer.kernel[...].astype(x.dtype)
  pw, nw = jnp.maximum(kernel, 0.0), jnp.minimum(kernel, 0.0)
  px, nx = jnp.maximum(x, 0.0), jnp.minimum(x, 0.0)
  s = _safe_divide(relevance, px @ pw + nx @ nw)
  return px * (s @ pw.T) + nx * (s @ nw.T)


def _product_rule(equation, a, b, relevance):
  """``RelPropSimple.relprop`` of their ``einsum``: ``S = R / Z`` sent back along the
  product's gradients, each operand times its own (each half conserves ``R``)."""
  z, vjp = jax.vjp(lambda a, b: jnp.einsum(equation, a, b), a, b)
  ca, cb = vjp(_safe_divide(relevance, z))
  return a * ca, b * cb


def _add_rule(a, b, relevance):
  """``Add.relprop``: ``a S`` and ``b S`` (``S = R / (a + b)``), each rescaled to sum to
  its share ``|sum a S| / (|sum a S| + |sum b S|)`` of ``sum R``. Their sums run over the
  whole tensor, of their one image: here over each image's."""
  s = _safe_divide(relevance, a + b)
  ra, rb = a * s, b * s
  sa, sb, total = _image_sum(ra), _image_sum(rb), _image_sum(relevance)
  fa = _safe_divide(jnp.abs(sa), jnp.abs(sa) + jnp.abs(sb)) * total
  fb = _safe_divide(jnp.abs(sb), jnp.abs(sa) + jnp.abs(sb)) * total
  return ra * _safe_divide(fa, sa), rb * _safe_divide(fb, sb)


def _clone_rule(x, *relevances):
  """``Clone.relprop``: ``x sum_i R_i / x``."""
  return x * sum(_safe_divide(r, x) for r in relevances)


def _lrp_forward(model, images, offsets):
  """The ViT's forward pass as the authors' ``ViT_LRP.py`` lays it out, keeping the
  inputs of every layer that has a relevance rule: ``(logits, activations)``. ``offsets
  (depth, n, heads, T, T)`` are added to the attention weights, for their gradients."""
  prefix, patches = model.embed(images)
  x = jnp.concatenate([prefix, patches], 1)
  n, t, dim = x.shape
  saved = []
  for block, offset in zip(model.blocks_, offsets, strict=True):
    heads = block.attn.num_heads
    normed = block.norm1(x)
    qkv = block.attn.qkv(normed).reshape(n, t, 3, heads, dim // heads)
    q, k, v = qkv.transpose(2, 0, 3, 1, 4)
    # Their matmul1 is q k^T; the scale multiplies its output, outside the rule.
    dots = jnp.einsum("nhid,nhjd->nhij", q, k)
    weights = jax.nn.softmax(dots * (dim // heads) ** -0.5, axis=-1)
    mixed = jnp.einsum("nhij,nhjd->nhid", weights + offset, v)
    merged = mixed.transpose(0, 2, 1, 3).reshape(n, t, dim)
    attended = block.attn.proj(merged)
    middle = x + attended
    normed2 = block.norm2(middle)
    hidden = jax.nn.gelu(block.mlp.fc1(normed2), approximate=False)
    mlp_out = block.mlp.fc2(hidden)
    saved.append(dict(x=x, normed=normed, q=q, k=k, v=v, weights=weights, merged=merged,
                      attended=attended, middle=middle, normed2=normed2, hidden=hidden,
                      mlp_out=mlp_out))
    x = middle + mlp_out
  pooled = model.norm(x)[:, 0]
  return model.head_(pooled), (saved, pooled)


def _block_relevance(block, saved, relevance):
  """``Block.relprop`` and ``Attention.relprop`` of ``ViT_LRP.py``: the relevance of the
  block's output ``(n, T, D)`` to ``(the relevance of its input, the attention weights'
  relevance (n, heads, T, T), their get_attn_cam())``. LayerNorm, GELU, Softmax and
  Dropout pass relevance through unchanged (``RelProp.relprop``)."""
  n, t, dim = relevance.shape
  heads = block.attn.num_heads
  r_middle, r_mlp = _add_rule(saved["middle"], saved["mlp_out"], relevance)  # add2
  r_hidden = _linear_rule(block.mlp.fc2, saved["hidden"], r_mlp)
  r_normed2 = _linear_rule(block.mlp.fc1, saved["normed2"], r_hidden)
  relevance = _clone_rule(saved["middle"], r_middle, r_normed2)  # clone2
  r_x, r_attended = _add_rule(saved["x"], saved["attended"], relevance)  # add1
  r_merged = _linear_rule(block.attn.proj, saved["merged"], r_attended)
  r_mixed = r_merged.reshape(n, t, heads, dim // heads).transpose(0, 2, 1, 3)
  r_weights, r_v = _product_rule("nhij,nhjd->nhid", saved["weights"], saved["v"], r_mixed)
  r_weights, r_v = r_weights / 2, r_v / 2  # their cam1 /= 2, cam_v /= 2
  r_q, r_k = _product_rule("nhid,nhjd->nhij", saved["q"], saved["k"], r_weights)
  r_qkv = jnp.stack([r_q / 2, r_k / 2, r_v]).transpose(1, 3, 0, 2, 4).reshape(n, t, 3 * dim)
  r_normed = _linear_rule(block.attn.qkv, saved["normed"], r_qkv)
  return _clone_rule(saved["x"], r_x, r_normed), r_weights  # clone1


@precision_lib.applied
def transformer_attribution(model, images: Images, targets: Targets, *,
                            start_layer: int = 0) -> Maps:
  """Chefer, Gur & Wolf, "Transformer Interpretability Beyond Attention Visualization"
  (CVPR 2021), their ``transformer_attribution`` for a Vision Transformer: LRP relevance
  of the target logit, from its one-hot vector back through every layer, gives each
  block's attention weights a relevance ``R_A``; per block
  ``A_bar = mean_heads((dy_t/dA * R_A)^+)``, and the rollout
  ``(A_bar_L + I) ... (A_bar_s + I)`` from block ``s = start_layer``; the map is the
  class token's row over the patches, each patch's value on its pixels.

  As the authors' released code (hila-chefer/Transformer-Explainability:
  ``ViT_explanation_generator.LRP.generate_LRP``, ``ViT_LRP.VisionTransformer.relprop``
  and its ``compute_rollout_attention``, and the rules of ``modules/layers_ours.py``:
  ``Linear``'s alpha-beta rule with ``alpha=1, beta=0``, bias left out; ``x dZ/dx (R /
  Z)`` for ``einsum`` (each operand's share halved in the attention), ``Add``, ``Clone``
  and ``IndexSelect``, ``Add``'s shares rescaled to ``sum R``; the identity for
  LayerNorm, GELU, Softmax and Dropout; every division their ``safe_divide``, by ``b +
  1e-9``). Computed for a batch: their code explains one image at a time, and their
  ``Add`` rule's sums run over the whole tensor; here they run over each image's, so
  each map is theirs for that image alone. The network is the model's own (timm's
  final LayerNorm, eps 1e-6; their ``ViT_LRP.py`` builds it with PyTorch's default
  1e-5, which moved the maps of the test's model by 5e-5 of their maximum).

  Args:
    model: a ``cejax.models.vit.VisionTransformer``.
    images: ``(n, h, w, c)``.
    targets: int ``(n,)``, the classes whose logits ``y_t`` are explained.
    start_layer: the first block of the rollout.

  Returns:
    Maps ``(n, h, w)``, under the precision policy in force (``exact`` by default). Under
    ``jit``, an image whose target is not a class of the model gets a NaN map.

  Raises:
    ValueError: a model that is not a ``VisionTransformer``, images not ``(n, h, w, c)``
      floats of the model's size, targets not integer classes of the model, or a
      start_layer the model does not have.
  """
  if not isinstance(model, vit.VisionTransformer):
    raise ValueError("transformer_attribution needs a cejax.models.vit.VisionTransformer, "
                     f"got {type(model).__name__}.")
  images = jnp.asarray(images)
  targets = jnp.asarray(targets)
  _check(images, targets)
  _check_classes(targets, model.num_classes)
  depth = len(model.blocks_)
  if not 0 <= start_layer < depth:
    raise ValueError(f"start_layer must be a block index in [0, {depth}), got "
                     f"{start_layer}.")
  return _vit_map(_transformer_attribution_patches, model, images, targets,
                  jnp.int32(start_layer))


@functools.partial(jax.jit, static_argnums=0)
def _transformer_attribution_patches(graphdef, state, images, targets, start_layer):
  """The class token's row of the rollout over the patches ``(n, patches)``, one
  compiled program (for every ``start_layer``, traced)."""
  model = nnx.merge(graphdef, state)
  tokens = 1 + model.num_patches
  shape = (len(model.blocks_), images.shape[0], model.blocks_[0].attn.num_heads, tokens,
           tokens)

  def score(offsets):
    logits, kept = _lrp_forward(model, images, offsets)
    return jnp.take_along_axis(logits, targets[:, None], axis=1).sum(), kept

  # One forward and backward pass: the attention weights' gradients (their hook's
  # save_attn_gradients) and the activations the rules read.
  grads, (saved, pooled) = jax.grad(score, has_aux=True)(jnp.zeros(shape, images.dtype))
  # The rules in at least float32 (their 1e-9 and the relevance sums).
  dtype = jnp.promote_types(pooled.dtype, jnp.float32)
  saved, pooled = jax.tree.map(lambda a: a.astype(dtype), (saved, pooled))
  relevance = jax.nn.one_hot(targets, model.num_classes, dtype=dtype)
  relevance = _linear_rule(model.head_, pooled, relevance)  # the head
  # IndexSelect of the class token (the final LayerNorm passes it through).
  relevance = jnp.zeros((images.shape[0], tokens, model.embed_dim), dtype).at[
      :, 0].set(pooled * _safe_divide(relevance, pooled))
  cams = []
  for block, kept in zip(model.blocks_[::-1], saved[::-1], strict=True):
    relevance, cam = _block_relevance(block, kept, relevance)
    cams.append(cam)
  cams = jnp.stack(cams[::-1])  # (L, n, H, T, T), in block order
  # relprop's "transformer_attribution": (grad * cam).clamp(min=0).mean(heads), and
  # ViT_LRP.compute_rollout_attention: + I, no row normalisation, from start_layer.
  layers = jnp.maximum(grads.astype(dtype) * cams, 0.0).mean(2)
  layers = layers + jnp.eye(tokens, dtype=layers.dtype)
  joint = jax.lax.fori_loop(start_layer + 1, len(model.blocks_),
                            lambda i, r: layers[i] @ r, layers[start_layer])
  valid = (targets >= 0) & (targets < model.num_classes)  # traced targets are unchecked
  return jnp.where(valid[:, None], joint[:, 0, 1:], jnp.nan)


@precision_lib.applied
def token_grad_cam(model, images: Images, targets: Targets, *, layer: int = -1) -> Maps:
  """Grad-CAM on a Vision Transformer's patch tokens (Selvaraju et al. 2017, in
  pytorch-grad-cam's ViT recipe: the tokens of ``blocks[layer].norm1``, the class token
  dropped and the patch tokens laid out on their grid as channels): per image, channel
  weights ``w_c`` = the mean over patches of ``dy_t / dA_c``, and the map
  ``ReLU(sum_c w_c A_c)`` per patch, each patch's value on its pixels.

  Unlike pytorch-grad-cam, the map is not rescaled to [0, 1] per image nor resized
  bilinearly: the values are Grad-CAM's own, constant on each patch.

  Args:
    model: a ``cejax.models.vit.VisionTransformer``.
    images: ``(n, h, w, c)``.
    targets: int ``(n,)``, the classes whose logits ``y_t`` are explained.
    layer: the block whose ``norm1`` tokens are used (default the last).

  Returns:
    Maps ``(n, h, w)``, under the precision policy in force (``exact`` by default).

  Raises:
    ValueError: images not ``(n, h, w, c)`` floats, targets not integer classes of the
      model, or a layer the model does not have.
  """
  images = jnp.asarray(images)
  targets = jnp.asarray(targets)
  _check(images, targets)
  _check_classes(targets, model.num_classes)
  depth = len(model.blocks_)
  if not -depth <= layer < depth:
    raise ValueError(f"layer must be a block index in [{-depth}, {depth}), got {layer}.")
  return _vit_map(_token_grad_cam_patches, model, images, targets, layer)


@functools.partial(jax.jit, static_argnums=(0, 4))
def _token_grad_cam_patches(graphdef, state, images, targets, layer):
  """The Grad-CAM value of each patch ``(n, patches)``, one compiled program."""
  model = nnx.merge(graphdef, state)

  def score(tap):
    logits, _, tokens = model.trace(images, tap=tap, layer=layer)
    return jnp.take_along_axis(logits, targets[:, None], axis=1).sum(), tokens

  # One forward and backward pass: norm1's tokens (n, T, D) and their gradients.
  grads, activations = jax.grad(score, has_aux=True)(
      jnp.zeros((images.shape[0], 1 + model.num_patches, model.embed_dim), images.dtype))
  patches, grads = activations[:, 1:], grads[:, 1:]  # the class token dropped
  weights = grads.mean(1)  # (n, D): the mean over the patch grid
  return jnp.maximum(jnp.einsum("nd,ntd->nt", weights, patches), 0.0)


LEGRAD_POOLINGS = ("token", "mean")


@precision_lib.applied
def legrad(model, images: Images, targets: Targets, *, first_layer: int = -2,
           pooling: str = "token") -> Maps:
  """LeGrad (Bousselham et al., "LeGrad: An Explainability Method for Vision Transformers
  via Feature Formation Sensitivity", ICCV 2025) for a ViT classifier. For each block
  ``l`` from ``first_layer`` to the last: the score ``s_l`` is the target's logit read
  from block ``l``'s output tokens (pooled, the final norm, the head); its gradient with
  respect to block ``l``'s attention weights, clamped at zero, is averaged over the heads
  and the query tokens, and its patch columns summed over the blocks; the sum is
  min-max scaled to [0, 1] per image.

  As the authors' code (``LeWrapper.compute_legrad_clip``), with two differences, both
  tested: the classifier's logit replaces CLIP's image-text similarity (pooling
  ``"token"``, the class token as the classifier pools; ``"mean"`` pools over every
  token as their CLIP code does); each patch's value stays on its pixels (they resize
  every block's patch map bilinearly before summing and scaling), and a map with no
  positive gradient anywhere is zeros (their scaling divides by zero).

  Args:
    model: a ``cejax.models.vit.VisionTransformer``.
    images: ``(n, h, w, c)``.
    targets: int ``(n,)``, the classes whose logits are explained.
    first_layer: the first block summed; negative counts from the end (default -2: the
      last two blocks, the authors' ``layer_index`` default; every block of a model with
      fewer).
    pooling: ``"token"`` (the class token) or ``"mean"`` (every token).

  Returns:
    Maps ``(n, h, w)`` in [0, 1], under the precision policy in force (``exact`` by
    default).

  Raises:
    ValueError: images not ``(n, h, w, c)`` floats, targets not integer classes of the
      model, a block the model does not have or an unknown pooling.
  """
  images = jnp.asarray(images)
  targets = jnp.asarray(targets)
  _check(images, targets)
  _check_classes(targets, model.num_classes)
  depth = len(model.blocks_)
  if first_layer >= depth:
    raise ValueError(f"first_layer must be a block index below {depth} (negative: from "
                     f"the end), got {first_layer}.")
  if pooling not in LEGRAD_POOLINGS:
    raise ValueError(f"pooling must be one of {LEGRAD_POOLINGS}, got {pooling!r}.")
  first = max(first_layer + depth, 0) if first_layer < 0 else first_layer
  return _vit_map(_legrad_patches, model, images, targets, first, pooling)


@functools.partial(jax.jit, static_argnums=(0, 4, 5))
def _legrad_patches(graphdef, state, images, targets, first, pooling):
  """LeGrad's scaled patch values ``(n, patches)``, one compiled program."""
  model = nnx.merge(graphdef, state)
  tokens = 1 + model.num_patches
  zeros = jnp.zeros((images.shape[0], model.blocks_[0].attn.num_heads, tokens, tokens),
                    images.dtype)

  def score(offset, layer):
    # s_layer summed over the images; offset is added to block layer's attention weights.
    prefix, patches = model.embed(images)
    x = jnp.concatenate([prefix, patches], 1)
    for i, block in enumerate(model.blocks_[:layer + 1]):
      x = block.forward(x, None, offset if i == layer else None)[0]
    pooled = x[:, 0] if pooling == "token" else x.mean(1)
    logits = model.head_(model.norm(pooled))
    return jnp.take_along_axis(logits, targets[:, None], axis=1).sum()

  # s_l depends on block l's weights directly and through no later block: one backward
  # pass per block summed.
  total = sum(jnp.maximum(jax.grad(score)(zeros, layer), 0.0).mean((1, 2))[:, 1:]
              for layer in range(first, len(model.blocks_)))
  low = total.min(1, keepdims=True)
  span = total.max(1, keepdims=True) - low
  scaled = (total - low) / jnp.where(span > 0, span, 1.0)
  # XLA may compute total twice in different fusions: keep [0, 1] exact at the ends.
  return jnp.where(span > 0, jnp.clip(scaled, 0.0, 1.0), 0.0)
