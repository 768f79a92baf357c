"""What a sweep computes for each image, and how: the ``config.sweep`` checks, the mask
families, the forward each family takes (incremental or full, per platform; a ViT's token
interventions), all estimands and targets as one stacked estimand, the batch (``"auto"``
resolved on the program that runs) and the FLOPs of one masked forward pass.
``cejax.jobs.sweep`` runs these over a data set."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from cejax import effects, interventions, precision
from cejax.estimands import ESTIMANDS, activate
from cejax.forwards import incremental, tokens
from cejax.jobs import mask_spec, throughput
from cejax.models import vit

FAMILIES = mask_spec.MASK_FAMILIES
PIXEL_INTERVENTIONS = ("zero", "mean", "blur")
# A ViT's token interventions (cejax.forwards.tokens), by the sweep's name: the masked
# patches' tokens removed, or hidden from attention.
TOKEN_INTERVENTIONS = {"token_drop": "drop", "attention_mask": "attention"}
SWEEP_INTERVENTIONS = (*PIXEL_INTERVENTIONS, *TOKEN_INTERVENTIONS)
TARGETS = ("predicted", "all")
PATHS = ("auto", "incremental", "full")
# The forward a family takes under path="auto", per platform, and why. CPUs: measured
# (docs/benchmarks.md, DenseNet-121, 10 x 10 grid, 2 cores: 1.56x the full forward at
# 224 px, 2.50x at 448). GPUs and TPUs: declared until measured there (benchmarks/
# gpu_run.py measures both paths): a batched full forward keeps the matrix units busy,
# while the incremental walk runs many small patch products at per-mask offsets.
AUTO_PATH = {
    "cpu": ("incremental", "measured faster on CPUs"),
    "gpu": ("full", "declared for GPUs: batched full passes keep the tensor cores busy"),
    "tpu": ("full", "declared for TPUs: batched full passes keep the matrix units busy"),
}


@dataclasses.dataclass(frozen=True)
class StackedEstimand:
  """Several estimands from one forward pass, as one ``Estimand`` (``(b, V)``).

  With ``all_targets`` the target estimands (``probability``, ``logit``) are given for
  every class (``k`` columns each, like ``per_class``); ``expected`` and ``kl`` take
  one column, ``per_class`` ``k``.
  """

  names: tuple[str, ...]
  all_targets: bool = False

  def __call__(self, clean_logits, do_logits, do_probs, target, activation):
    cols = []
    for name in self.names:
      if self.all_targets and name == "probability":
        v = do_probs - activate(clean_logits, activation)
      elif self.all_targets and name == "logit":
        v = do_logits - clean_logits
      else:
        v = ESTIMANDS[name](clean_logits, do_logits, do_probs, target, activation)
      cols.append(v if v.ndim == do_logits.ndim else v[..., None])
    return jnp.concatenate(cols, -1)

  def widths(self, num_classes: int) -> list[int]:
    """Columns per estimand, in ``names`` order."""
    per = {"expected": 1, "kl": 1, "per_class": num_classes}
    many = num_classes if self.all_targets else 1
    return [per.get(n, many) for n in self.names]


def mask_sources(config, shape) -> dict[str, Any]:
  """The mask sources of ``config.sweep.families`` for images of ``shape`` (sizes from
  ``config.masks``; ``config.sweep.seed`` draws the RISE masks and the patch subsets)."""
  return mask_spec.mask_sources(config.masks, shape, key=jax.random.key(config.sweep.seed),
                             families=config.sweep.families)


def interventions_of(s) -> dict[str, Any]:
  """The sweep's pixel interventions by name (``blur`` with ``config.sweep.blur_sigma``);
  the token interventions are None (their forward is the intervention:
  ``token_forwards``)."""
  return {"zero": "zero", "mean": "mean", "blur": interventions.Blur(sigma=s.blur_sigma),
          **dict.fromkeys(TOKEN_INTERVENTIONS)}


def token_forwards(model, names, sources) -> dict[str, Any]:
  """The token forwards of the token interventions among ``names``
  (``tokens.from_vit``), after checking that ``model`` is a ViT and that every mask of
  ``sources`` covers whole patches (a token is in or out).

  Raises:
    ValueError: naming the interventions and the model, or the family and the patch.
  """
  wanted = [n for n in names if n in TOKEN_INTERVENTIONS]
  if not wanted:
    return {}
  if not isinstance(model, vit.VisionTransformer):
    raise ValueError(f"config.sweep.interventions has {wanted}: token interventions "
                     f"remove a Vision Transformer's patch tokens, and this run's model "
                     f"is a {type(model).__name__}; use {list(PIXEL_INTERVENTIONS)}.")
  mask_spec.check_whole_patches(sources, model.patch_size, wanted=wanted,
                                where="config.sweep.interventions",
                                otherwise=f", or only {list(PIXEL_INTERVENTIONS)}")
  return {n: tokens.from_vit(model, mode=TOKEN_INTERVENTIONS[n]) for n in wanted}


def forward_for(forward_of, token_of, family: str, name: str):
  """The forward of ``family`` under intervention ``name``: the token forward of a token
  intervention, else the family's pixel forward."""
  return token_of[name] if name in token_of else forward_of[family]


def forwards(logits_fn, model, image_shape, settings, sources, *, platform: str
             ) -> tuple[dict[str, Any], dict[str, dict[str, str]]]:
  """Per family, the forward the sweep runs, and ``{"path", "why"}``: under
  ``settings.path="auto"`` the rule of ``AUTO_PATH`` for ``platform``, else the path
  the config forces; incremental recompute (``incremental.forward(model)``) only where
  ``incremental.plan`` says it applies, full forward passes of ``logits_fn`` otherwise."""
  if settings.path == "auto":
    want, why = AUTO_PATH.get(platform, ("full", f"no rule for platform {platform!r}"))
  else:
    want, why = settings.path, f"config.sweep.path={settings.path!r}"
  chosen, paths = {}, {}
  if isinstance(model, vit.VisionTransformer):  # incremental recompute is DenseNet's
    if settings.path == "incremental":
      raise ValueError("config.sweep.path='incremental' is DenseNet's recompute; this "
                       "run's model is a Vision Transformer: use 'auto' or 'full'.")
    want, why = "full", "a Vision Transformer: the incremental recompute is DenseNet's"
  for family, source in sources.items():
    decision = incremental.plan(model, image_shape, source) if want != "full" else None
    if decision is not None and decision.applies:
      chosen[family] = incremental.forward(model)
      paths[family] = {"path": "incremental", "why": why}
    else:
      chosen[family] = logits_fn
      paths[family] = {"path": "full", "why": why if decision is None else
                       f"incremental does not apply: {decision.reason}"}
  return chosen, paths


def image_results(forward_of, image, *, settings, sources, activation, num_classes,
                  mesh=None, token_of=None) -> dict[str, Any]:
  """One image's maps (and effects): ``{"maps": {family: {intervention: {estimand:
  array}}}, "effects": ...}``; family ``f`` is computed with the forward
  ``forward_of[f]`` (``forwards``) under a pixel intervention and with ``token_of[name]``
  (``token_forwards``) under a token intervention."""
  token_of = token_of or {}
  s = settings
  stacked = StackedEstimand(tuple(s.estimands), all_targets=s.targets == "all")
  widths = stacked.widths(num_classes)
  fills = interventions_of(s)

  def by_estimand(values):  # (..., V) -> {estimand: (...) or (..., k)}
    parts = np.split(np.asarray(values), np.cumsum(widths)[:-1], axis=-1)
    return {e: p[..., 0] if w == 1 else p
            for e, p, w in zip(stacked.names, parts, widths, strict=True)}

  maps, raw = {}, {}
  for family, source in sources.items():
    maps[family], raw[family] = {}, {}
    for name in s.interventions:
      res = effects.causal_effect(forward_for(forward_of, token_of, family, name), image,
                                  source, intervention=fills[name], estimand=stacked,
                                  batch_size=s.batch_size, activation=activation, mesh=mesh)
      # On the host first: the map is then one program on one device whatever the mesh
      # (a replicated input would make it an SPMD program with another reduction order).
      per_mask = np.asarray(res.effects)
      maps[family][name] = by_estimand(
          effects.ce_map(per_mask, source, batch_size=s.batch_size))  # from (h, w, V)
      if s.save_effects:
        raw[family][name] = by_estimand(per_mask)
  return {"maps": maps, "effects": raw} if s.save_effects else {"maps": maps}


def batch_usage(forward, image, source, *, settings, activation,
                intervention=None) -> Callable[[int], int]:
  """``usage(batch)``: the bytes of the per-image program the sweep runs for ``source``
  (``effects.causal_effect`` with the sweep's stacked estimand and ``intervention``, by
  default the first) compiled at that batch (per device: each device runs the same loop
  over its share)."""
  stacked = StackedEstimand(tuple(settings.estimands), all_targets=settings.targets == "all")
  fill = interventions_of(settings)[intervention or settings.interventions[0]]

  def usage(batch: int) -> int:
    program = jax.jit(lambda x: effects.causal_effect(
        forward, x, source, intervention=fill, estimand=stacked, batch_size=batch,
        activation=activation).effects)
    with precision.policy(settings.precision):
      return throughput.compiled_bytes(program.lower(image).compile())

  return usage


def resolve_batch(forward_of, image, sources, *, settings, activation, num_devices: int,
                  recorded: Mapping[str, Any] | None = None,
                  token_of: Mapping[str, Any] | None = None) -> int | None:
  """``config.sweep.batch_size``, with ``"auto"`` resolved per device: the largest batch
  whose program fits ``memory_budget_gb`` for every family (``batch_usage``), at most
  ``ceil(masks / devices)`` (a larger batch only runs padding), every intervention's
  forward (``token_of``: the token interventions') checked. An output directory that
  already holds chunks keeps the batch it resolved (``recorded``: its settings), since
  the maps' summation order depends on it."""
  if settings.batch_size != "auto":
    return int(settings.batch_size)
  if not sources:  # optimised masks only: no masked forward pass to size
    return None
  if recorded and recorded.get("job", {}).get("batch_size") == "auto":
    return int(recorded["compute"]["batch_size"])
  limit = math.ceil(max(src.num for src in sources.values()) / num_devices)
  token_of = token_of or {}
  # The pixel forward once (the first pixel intervention's), each token forward once.
  pixel = [n for n in settings.interventions if n not in token_of][:1]
  return min(throughput.auto_batch_size(
      batch_usage(forward_for(forward_of, token_of, f, name), image, src,
                  settings=settings, activation=activation, intervention=name),
      budget_bytes=settings.memory_budget_gb * 2**30, limit=limit)
      for f, src in sources.items() for name in [*pixel, *token_of])


def flops_per_mask(logits_fn, model, image, sources, paths) -> dict[str, dict[str, Any]]:
  """Per family, the FLOPs of one masked forward pass on the path that runs:
  ``2 x`` the incremental plan's multiply-accumulates (convolutions and 1x1 products)
  on the incremental path, XLA's cost analysis of the full forward pass otherwise."""
  full = None
  out = {}
  for family, source in sources.items():
    if paths[family]["path"] == "incremental":
      decision = incremental.plan(model, image.shape, source)
      out[family] = {"flops": 2.0 * decision.macs_incremental,
                     "counted_by": "2 x the incremental plan's multiply-accumulates"}
    else:
      if full is None:
        full = throughput.forward_flops(logits_fn, image)
      out[family] = {"flops": full, "counted_by": "XLA cost analysis of the full forward"}
  return out


__all__ = ["AUTO_PATH", "FAMILIES", "PATHS", "PIXEL_INTERVENTIONS", "StackedEstimand",
           "SWEEP_INTERVENTIONS", "TOKEN_INTERVENTIONS", "batch_usage", "flops_per_mask",
           "forward_for", "forwards", "image_results", "interventions_of", "mask_sources",
           "resolve_batch", "token_forwards"]
