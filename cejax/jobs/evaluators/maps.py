"""The maps evaluator: CE maps and the saliency baselines for every image of a chunk.

Map convention: larger = more important for the target class. CE maps are therefore
``-ce_map(effects)``: removing evidence for the prediction lowers it. ``"occlusion"``
is the CE map of the target-probability estimand with sliding windows (Captum's
Occlusion); the ``"ce_*"`` maps use the expected estimand, which sums over classes
and so does not depend on the target.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from cejax import effects, masks, metrics, saliency
from cejax.forwards import latent, tokens
from cejax.jobs.evaluators.common import Context, Inputs, Model, field
from cejax.jobs.mask_spec import (
    MASK_FAMILIES,
    check_whole_patches,
    mask_sources,
    sliding_geometry,
)
from cejax.optimised import ce_optimal, extremal, meaningful

_log = logging.getLogger(__name__)

# The optimised masks' methods (their settings: config.optimised).
OPTIMISED_METHODS = ("extremal_perturbation", "ce_optimal", "meaningful_perturbation")
# A Vision Transformer's CE maps under token interventions (cejax.forwards.tokens), on
# the grid, sliding-window and patch-subset masks: {method: (mask family, token mode)}.
TOKEN_CE_METHODS = {f"ce_{family}_{name}": (family, mode)
                    for name, mode in (("token_drop", "drop"), ("attention_mask", "attention"))
                    for family in ("grid", "sliding", "patches")}
# The methods that need a ViT, and those that need DenseNet's stages and CAM split.
VIT_METHODS = (*TOKEN_CE_METHODS, "attention_rollout", "attention_relevance",
               "transformer_attribution", "token_grad_cam", "legrad")
CNN_METHODS = ("ce_latent", "cam", "grad_cam", "grad_cam_pp", "smooth_grad_cam_pp")
MAP_METHODS = ("ce_sliding", "ce_grid", "ce_rise", "ce_patches", "ce_latent", "gradient",
               "gradient_x_input", "smoothgrad", "integrated_gradients", "cam", "grad_cam",
               "grad_cam_pp", "smooth_grad_cam_pp", "rise", "occlusion", *OPTIMISED_METHODS,
               *VIT_METHODS)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Maps:
  """``maps[method]``: ``(n, h, w)`` attribution maps, larger = more important (stored
  as float16; the other evaluators of a chunk see float32). ``completeness_gap``: for
  integrated gradients, ``|sum of attributions - (logit_t(x) - logit_t(0))|`` relative
  to ``|logit_t(x) - logit_t(0)|`` per image (the quadrature's error; empty without IG).
  ``gradient_ratio``: for the optimised masks (``extremal_perturbation``, ``ce_optimal``),
  ``(n, K, 2)`` their objective's gradient norm over the area term's at the first and
  last iteration (``extremal.gradient_ratio``; a dead objective is below
  ``extremal.DEAD_RATIO``).
  """

  maps: dict[str, Any] = field(dtype=np.float16)
  completeness_gap: dict[str, Any] = field()
  gradient_ratio: dict[str, Any] = field()


def check_methods(methods) -> tuple[str, ...]:
  """``methods`` as a tuple; raises ``ValueError`` naming the valid ones."""
  unknown = [m for m in methods if m not in MAP_METHODS]
  if unknown:
    raise ValueError(f"Unknown map methods {unknown} in analysis.methods; valid are "
                     f"{MAP_METHODS}.")
  return tuple(methods)


# The mask family (config.masks) each method's masks come from.
METHOD_FAMILIES = {"ce_grid": "grid", "ce_sliding": "sliding", "occlusion": "sliding",
                   "ce_rise": "rise", "rise": "rise", "ce_patches": "patches",
                   **{m: family for m, (family, _) in TOKEN_CE_METHODS.items()}}


def families_of(methods) -> tuple[str, ...]:
  """The mask families ``methods`` draw on, in ``MASK_FAMILIES`` order."""
  used = {METHOD_FAMILIES[m] for m in methods if m in METHOD_FAMILIES}
  return tuple(f for f in MASK_FAMILIES if f in used)


def check_methods_for_model(methods, model: Model, mask_spec, shape) -> None:
  """Raises ``ValueError`` where ``methods`` need another kind of model than ``model``
  (``CNN_METHODS`` on a ViT, ``VIT_METHODS`` on a DenseNet), or where a token CE map's
  masks (``mask_spec`` for ``shape`` images) do not cover whole patches."""
  vit = model.vit is not None
  other_kinds = CNN_METHODS if vit else VIT_METHODS
  wrong = [m for m in methods if m in other_kinds]
  if wrong:
    kind, other = (("a Vision Transformer", "DenseNet's stages and CAM split") if vit
                   else ("a DenseNet", "a Vision Transformer's tokens and attention"))
    raise ValueError(f"analysis.methods has {wrong}, which need {other}; this run's model "
                     f"is {kind}. Methods for it: "
                     f"{[m for m in MAP_METHODS if m not in other_kinds]}.")
  wanted = [m for m in methods if m in TOKEN_CE_METHODS]
  if wanted:
    families = sorted({TOKEN_CE_METHODS[m][0] for m in wanted})
    check_whole_patches(mask_sources(mask_spec, shape, key=jax.random.key(0),
                                     families=families),
                        model.vit.patch_size, wanted=wanted, where="analysis.methods")


def expected_ce(model: Model, image, mask_set, target, *, settings):
  """Per-mask expected CE of filling each mask with zero (the data mean), ``(m,)``."""
  return effects.causal_effect(model.logits_fn, image, mask_set, estimand="expected",
                               target=target, batch_size=settings.batch_size,
                               activation=model.activation).effects


def latent_effects(model: Model, image, target, *, settings):
  """Expected CE of zeroing each channel at the latent stage, ``(channels,)``."""
  width = model.prefix_fn(image[None]).shape[-1]
  inter = latent.latent_interventions(channels=np.arange(width), values=[0.0])
  return effects.causal_effect(latent.forward(model.prefix_fn, model.suffix_fn), image,
                               inter, target=target, batch_size=settings.batch_size,
                               activation=model.activation).effects


def compute_maps(model: Model, images, targets, *, key, settings, mask_spec,
                 methods=MAP_METHODS, optimised=None,
                 diagnostics: dict | None = None) -> dict[str, jax.Array]:
  """Every attribution map in ``methods`` for a batch, ``{name: (n, h, w)}``; the masks
  of the CE maps, occlusion and RISE from ``mask_spec`` (``config.masks``), the
  optimised masks' settings from ``optimised`` (``config.optimised``). The optimised
  masks' gradient ratios (``extremal.gradient_ratio``) go into ``diagnostics`` when a
  dict is given."""
  diagnostics = {} if diagnostics is None else diagnostics

  def optimised_map(name, result):
    diagnostics[name] = _ratio(result)
    return extremal.saliency(result)
  shape = images.shape[1:3]
  window, stride = sliding_geometry(mask_spec, shape)
  # The families' masks are the same for every method that uses them (the patch subsets
  # of ce_patches and its token CE maps, say); built from constants and the chunk's key.
  with jax.ensure_compile_time_eval():
    sources = mask_sources(mask_spec, shape, key=jax.random.fold_in(key, 0),
                           families=families_of(methods))
  # Grids and windows as arrays (as the analysis always made them); random masks lazily.
  lazy = ("rise", "patches")
  mask_sets = {f"ce_{f}": (lambda f=f: sources[f] if f in lazy else masks.to_array(sources[f]))
               for f in sources}

  def per_image(fn):
    return jax.lax.map(lambda a: fn(*a), (images, targets))

  def ce_map(name):
    mask_set = mask_sets[name]()
    # Random masks are a lazy recipe, drawn chunk by chunk; grids and windows are dense.
    chunk = ({"batch_size": settings.batch_size} if name in ("ce_rise", "ce_patches")
             else {})
    return per_image(lambda x, t: -effects.ce_map(
        expected_ce(model, x, mask_set, t, settings=settings), mask_set, **chunk))

  def token_map(name):
    family, mode = TOKEN_CE_METHODS[name]
    # The pixel CE map's masks (token drop reads their kept counts when it is traced:
    # grids and windows are constants, patch subsets keep a fixed count).
    mask_set = sources[family]
    forward = tokens.from_vit(model.vit, mode=mode)
    return per_image(lambda x, t: -effects.ce_map(effects.causal_effect(
        forward, x, mask_set, estimand="expected", target=t,
        batch_size=settings.batch_size, activation=model.activation).effects, mask_set,
        batch_size=settings.batch_size))

  def latent_map():
    def one(x, t):
      e = latent_effects(model, x, t, settings=settings)
      h = model.prefix_fn(x[None])[0]
      # Causal weights on the stage's channels, like CAM's class weights.
      return jax.image.resize((h * -e).sum(-1), shape, "bilinear")
    return per_image(one)

  f, fc, logits_fn = model.features_fn, model.classify_fn, model.logits_fn
  k1, k2, k3, k4 = jax.random.split(jax.random.fold_in(key, 1), 4)
  noise = dict(num_samples=settings.noise_samples, sigma=settings.noise_level)
  chunked = dict(batch_size=settings.batch_size, activation=model.activation)
  o = optimised
  optimised = {} if o is None else dict(areas=tuple(o.areas), iterations=o.iterations,
                                        step=o.step, sigma=o.sigma, batch_size=len(images))
  methods_fns = {
      "ce_sliding": lambda: ce_map("ce_sliding"),
      "ce_grid": lambda: ce_map("ce_grid"),
      "ce_rise": lambda: ce_map("ce_rise"),
      "ce_patches": lambda: ce_map("ce_patches"),
      "ce_latent": latent_map,
      "gradient": lambda: saliency.vanilla_gradient(logits_fn, images, targets),
      "gradient_x_input": lambda: saliency.gradient_x_input(logits_fn, images, targets),
      "smoothgrad": lambda: saliency.smoothgrad(logits_fn, images, targets, key=k1, **noise),
      "integrated_gradients": lambda: saliency.integrated_gradients(
          logits_fn, images, targets, steps=settings.ig_steps),
      "cam": lambda: saliency.cam(f, fc, images, targets),
      "grad_cam": lambda: saliency.grad_cam(f, fc, images, targets),
      "grad_cam_pp": lambda: saliency.grad_cam_pp(f, fc, images, targets),
      "smooth_grad_cam_pp": lambda: saliency.smooth_grad_cam_pp(f, fc, images, targets,
                                                                key=k2, **noise),
      "rise": lambda: saliency.rise(logits_fn, images, targets, key=k3,
                                    num_masks=mask_spec.rise_masks,
                                    cells=mask_spec.rise_cells, p=mask_spec.rise_p,
                                    **chunked),
      "occlusion": lambda: saliency.occlusion(logits_fn, images, targets, window=window,
                                              stride=stride, **chunked),
      # Optimised masks: the sum of each image's masks over the areas (TorchRay's map).
      "extremal_perturbation": lambda: optimised_map(
          "extremal_perturbation", extremal.extremal_perturbation(
              logits_fn, images, targets, progress=False, **optimised)),
      "ce_optimal": lambda: optimised_map("ce_optimal", ce_optimal.ce_optimal_mask(
          logits_fn, images, targets, estimand="expected", intervention="zero",
          activation=model.activation, progress=False, **optimised)),
      "meaningful_perturbation": lambda: meaningful.meaningful_perturbation(
          logits_fn, images, targets, key=k4, iterations=o.meaningful_iterations,
          activation=model.activation),
      **{name: functools.partial(token_map, name) for name in TOKEN_CE_METHODS},
      "attention_rollout": lambda: saliency.attention_rollout(
          model.vit.attentions(images), image_shape=shape),
      "attention_relevance": lambda: saliency.attention_relevance(model.vit, images,
                                                                  targets),
      "transformer_attribution": lambda: saliency.transformer_attribution(
          model.vit, images, targets),
      "token_grad_cam": lambda: saliency.token_grad_cam(model.vit, images, targets),
      "legrad": lambda: saliency.legrad(model.vit, images, targets),
  }
  return {name: methods_fns[name]() for name in MAP_METHODS if name in methods}


def _ratio(result):
  """``extremal.gradient_ratio`` in JAX (traced inside the maps' program)."""
  area = result.area_grad
  return jnp.where(area > 0, result.reward_grad / jnp.where(area > 0, area, 1), jnp.inf)


class MapsEvaluator:
  """CE maps (grid, sliding windows, RISE masks, patch subsets, latent; on a ViT also
  under token interventions) and the saliency baselines
  named in ``analysis.methods``, computed in one compiled program per chunk shape, and
  the chance maps (``metrics.CHANCE_MAPS``) that give every metric its chance level."""

  name: ClassVar[str] = "maps"
  requires: ClassVar[tuple[str, ...]] = ()
  result_type: ClassVar[type] = Maps

  def __init__(self, context: Context, *, methods=None):
    settings = context.settings
    methods = check_methods(settings.methods if methods is None else methods)
    self._box_shape = context.box_shape

    def compute(x, t, k):
      diagnostics = {}
      maps = compute_maps(context.model, x, t, key=k, settings=settings,
                          mask_spec=context.masks, methods=methods,
                          optimised=context.optimised, diagnostics=diagnostics)
      return maps, diagnostics

    self._compute = jax.jit(compute)

    logits_fn = context.model.logits_fn

    def gap(images, targets, ig):
      picked = lambda z: jnp.take_along_axis(z, targets[:, None], 1)[:, 0]  # noqa: E731
      rise = picked(logits_fn(images)) - picked(logits_fn(jnp.zeros_like(images)))
      return jnp.abs(ig.sum((1, 2)) - rise) / jnp.maximum(jnp.abs(rise), 1e-12)

    self._gap = jax.jit(gap)

  def evaluate(self, inputs: Inputs, earlier, *, key) -> Maps:
    del earlier
    maps, ratios = self._compute(inputs.images, inputs.target, key)
    maps = dict(maps)
    n, h, w = inputs.images.shape[:3]
    box_shape = self._box_shape or (h / 5, w / 5)
    # The chance rows: scored by the same code as every method (metrics.chance_maps).
    maps.update(metrics.chance_maps(jax.random.fold_in(key, 2), num=n, shape=(h, w),
                                    box_shape=box_shape))
    gaps = ({"integrated_gradients": self._gap(inputs.images, inputs.target,
                                               maps["integrated_gradients"])}
            if "integrated_gradients" in maps else {})
    return Maps(maps=maps, completeness_gap=gaps, gradient_ratio=ratios)

  def summarize(self, results, inputs: Inputs) -> dict[str, Any]:
    """IG's completeness gap: mean with a 95 % bootstrap interval, and the median; the
    optimised masks' gradient diagnostics: the median ratio at the first and the last
    iteration and the share of masks with a dead objective (warned about in the log)."""
    del inputs
    gaps = results[self.name].completeness_gap
    out = {m: {"completeness_gap": metrics.bootstrap_interval(g),
               "completeness_gap_median": float(np.median(g))} for m, g in gaps.items()}
    for m, ratio in (results[self.name].gradient_ratio or {}).items():
      ratio = np.asarray(ratio, np.float64)
      dead = float((ratio < extremal.DEAD_RATIO).any(-1).mean())
      out.setdefault(m, {}).update(
          gradient_ratio_median=[float(np.median(ratio[..., 0])),
                                 float(np.median(ratio[..., 1]))],
          dead_objective_share=dead)
      if dead:
        _log.warning("%s: %.0f%% of the optimised masks had a dead objective (the "
                     "objective's gradient below %g of the area term's): they are shaped "
                     "by the area constraint, not by the model.", m, 100 * dead,
                     extremal.DEAD_RATIO)
    return {"methods": out}
