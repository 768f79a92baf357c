"""The analysis behind ``analyze.py``: CE maps vs baselines, attacks, detector, defenses.

Images are processed in chunks; each chunk's per-image results (maps, metrics, CE
features, attack and defense outcomes) are written atomically to
``<out>/chunks/NNNN.npz``, so a killed run resumes where it stopped. ``summarize``
turns the chunks into ``metrics.json`` and CSV tables; ``cejax.report`` draws them.

Map convention: larger = more important for the target class. CE maps are therefore
``-ce_map(effects)``: removing evidence for the prediction lowers it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from cejax import attacks, checkpoint, defenses, effects, masks, metrics, saliency

# "occlusion" is the CE map of the target-probability estimand with sliding windows
# (Captum's Occlusion); the "ce_*" maps use the expected estimand, which sums over
# classes and so does not depend on the target.
MAP_METHODS = ("ce_sliding", "ce_grid", "ce_rise", "ce_latent", "gradient",
               "gradient_x_input", "smoothgrad", "integrated_gradients", "cam", "grad_cam",
               "grad_cam_pp", "smooth_grad_cam_pp", "rise", "occlusion")
SANITY_METHODS = ("ce_grid", "gradient", "gradient_x_input", "grad_cam")
CE_FEATURES = ("mean", "std", "min", "max_abs", "entropy", "dispersion", "active",
               "latent_mean", "latent_std", "latent_min")


@dataclasses.dataclass(frozen=True)
class Model:
  """A trained model as the pure functions the analysis needs."""

  logits_fn: Callable
  features_fn: Callable
  classify_fn: Callable
  prefix_fn: Callable
  suffix_fn: Callable
  activation: str
  num_classes: int


def make_model(graphdef, params, stats, run, *, latent_stage: str) -> Model:
  features_fn, classify_fn = checkpoint.make_cam_fns(graphdef, params, stats)
  prefix_fn, suffix_fn = checkpoint.make_stage_fns(graphdef, params, stats, latent_stage)
  return Model(checkpoint.make_logits_fn(graphdef, params, stats), features_fn, classify_fn,
               prefix_fn, suffix_fn, checkpoint.activation_of(run),
               run["num_classes"])


def random_model(run, *, latent_stage: str, seed: int = 1) -> Model:
  """The same architecture re-initialised (the model-randomisation sanity check)."""
  model = checkpoint.build_model(run, seed=seed)
  model.eval()
  g, p, s = nnx.split(model, nnx.Param, nnx.BatchStat)
  return make_model(g, nnx.to_pure_dict(p), nnx.to_pure_dict(s), run,
                    latent_stage=latent_stage)


# --- per-chunk computations ------------------------------------------------------------

def _ce(model, image, mask_set, target, estimand, settings):
  return effects.causal_effect(model.logits_fn, image, mask_set, estimand=estimand,
                               target=target, batch_size=settings.batch_size,
                               activation=model.activation)


def _mask_sets(shape, settings, key):
  h, _ = shape
  return {
      "grid": masks.grid_masks(shape=shape, n=settings.grid_cells),
      "sliding": masks.sliding_window_masks(shape=shape,
                                            window=max(1, h // settings.window_div),
                                            stride=max(1, h // settings.stride_div)),
      "rise": masks.rise_masks(key, num=settings.rise_masks, shape=shape,
                               cells=settings.rise_cells),
  }


def latent_effects(model, image, target, settings):
  width = model.prefix_fn(image[None]).shape[-1]
  inter = effects.latent_interventions(channels=np.arange(width), values=[0.0])
  return effects.latent_causal_effect(model.prefix_fn, model.suffix_fn, image, inter,
                                      target=target, batch_size=settings.batch_size,
                                      activation=model.activation)


def compute_maps(model: Model, images, targets, *, key, settings,
                 methods=MAP_METHODS) -> dict[str, jax.Array]:
  """Every attribution map in ``methods`` for a batch, ``{name: (n, h, w)}``."""
  shape = images.shape[1:3]
  sets = _mask_sets(shape, settings, jax.random.fold_in(key, 0))
  out = {}

  def per_image(fn):
    return jax.lax.map(lambda a: fn(*a), (images, targets))

  if "ce_sliding" in methods:
    out["ce_sliding"] = per_image(lambda x, t: -effects.ce_map(
        _ce(model, x, sets["sliding"], t, "expected", settings).effects, sets["sliding"]))
  if "ce_grid" in methods:
    out["ce_grid"] = per_image(lambda x, t: -effects.ce_map(
        _ce(model, x, sets["grid"], t, "expected", settings).effects, sets["grid"]))
  if "ce_rise" in methods:
    out["ce_rise"] = per_image(lambda x, t: -effects.ce_map(
        _ce(model, x, sets["rise"], t, "expected", settings).effects, sets["rise"],
        batch_size=settings.batch_size))
  if "ce_latent" in methods:
    def latent_map(x, t):
      e = latent_effects(model, x, t, settings).effects
      h = model.prefix_fn(x[None])[0]
      m = (h * -e).sum(-1)  # causal weights on the stage's channels, like CAM's
      return jax.image.resize(m, shape, "bilinear")
    out["ce_latent"] = per_image(latent_map)
  f, fc = model.features_fn, model.classify_fn
  k1, k2, k3 = jax.random.split(jax.random.fold_in(key, 1), 3)
  simple = {
      "gradient": lambda: saliency.vanilla_gradient(model.logits_fn, images, targets),
      "gradient_x_input": lambda: saliency.gradient_x_input(model.logits_fn, images, targets),
      "smoothgrad": lambda: saliency.smoothgrad(model.logits_fn, images, targets, key=k1,
                                                num_samples=settings.noise_samples,
                                                sigma=settings.noise_level),
      "integrated_gradients": lambda: saliency.integrated_gradients(
          model.logits_fn, images, targets, steps=settings.ig_steps),
      "cam": lambda: saliency.cam(f, fc, images, targets),
      "grad_cam": lambda: saliency.grad_cam(f, fc, images, targets),
      "grad_cam_pp": lambda: saliency.grad_cam_pp(f, fc, images, targets),
      "smooth_grad_cam_pp": lambda: saliency.smooth_grad_cam_pp(
          f, fc, images, targets, key=k2, num_samples=settings.noise_samples,
          sigma=settings.noise_level),
      "rise": lambda: saliency.rise(model.logits_fn, images, targets, key=k3,
                                    num_masks=settings.rise_masks, cells=settings.rise_cells,
                                    batch_size=settings.batch_size,
                                    activation=model.activation),
      "occlusion": lambda: saliency.occlusion(
          model.logits_fn, images, targets, window=max(1, shape[0] // settings.window_div),
          stride=max(1, shape[0] // settings.stride_div), batch_size=settings.batch_size,
          activation=model.activation),
  }
  for name, fn in simple.items():
    if name in methods:
      out[name] = fn()
  return out


def ce_features(model: Model, images, targets, *, settings):
  """Per-image CE statistics ``(n, len(CE_FEATURES))`` and grid effects ``(n, m)``."""
  grid = masks.grid_masks(shape=images.shape[1:3], n=settings.grid_cells)
  h, w = images.shape[1:3]
  yy, xx = jnp.mgrid[0:h, 0:w]
  cover = grid.sum((1, 2))
  cy, cx = (grid * yy).sum((1, 2)) / cover, (grid * xx).sum((1, 2)) / cover

  def one(x, t):
    e = _ce(model, x, grid, t, "expected", settings).effects
    a = jnp.abs(e)
    p = a / jnp.maximum(a.sum(), 1e-12)
    entropy = -(p * jnp.log(jnp.maximum(p, 1e-12))).sum() / jnp.log(len(e))
    my, mx = (p * cy).sum(), (p * cx).sum()
    dispersion = jnp.sqrt((p * ((cy - my) ** 2 + (cx - mx) ** 2)).sum()) / h
    lat = latent_effects(model, x, t, settings).effects
    feats = jnp.stack([e.mean(), e.std(), e.min(), a.max(), entropy, dispersion,
                       (a > 0.01).mean(), lat.mean(), lat.std(), lat.min()])
    return feats, e

  return jax.lax.map(lambda a: one(*a), (images, targets))


def _probs(model, logits):
  return effects.activate(logits, model.activation)


def confidence(model, logits):
  """Maximum softmax probability (or the largest sigmoid's distance from 0.5, x2)."""
  p = _probs(model, logits)
  return p.max(-1) if model.activation == "softmax" else (2 * jnp.abs(p - 0.5)).mean(-1)


def correct(model, logits, labels):
  """Per image: argmax == label, or the fraction of findings right (multi-label)."""
  if model.activation == "sigmoid":
    return ((logits > 0) == (labels > 0.5)).mean(-1)
  return (jnp.argmax(logits, -1) == labels).astype(jnp.float32)


def run_attacks(model, pixels, labels, *, space, key, settings):
  """Adversarial pixels for every (attack, eps) in the settings, ``{name: result}``."""
  out = {}
  for attack in settings.attacks:
    for eps in settings.epsilons:
      name = f"{attack}@{round(eps * 255)}"
      kw = dict(eps=eps, space=space, activation=model.activation)
      if attack == "fgsm":
        res = attacks.fgsm(model.logits_fn, pixels, labels, **kw)
      elif attack == "bim":
        res = attacks.bim(model.logits_fn, pixels, labels, steps=settings.attack_steps, **kw)
      elif attack == "mifgsm":
        res = attacks.mifgsm(model.logits_fn, pixels, labels, steps=settings.attack_steps,
                             **kw)
      elif attack == "pgd":
        res = attacks.pgd(model.logits_fn, pixels, labels, key=jax.random.fold_in(key, 7),
                          steps=settings.attack_steps, **kw)
      else:
        raise ValueError(f"Unknown attack {attack!r} in analysis.attacks; valid are "
                         "fgsm, bim, mifgsm, pgd.")
      out[name] = res
  return out


def defense_accuracy(model, pixels, labels, *, space, key, settings):
  """Accuracy per image with each defense, clean and under attack, incl. BPDA-PGD."""
  eps = settings.defense_eps
  kw = dict(eps=eps, space=space, activation=model.activation)
  adv = {
      "fgsm": attacks.fgsm(model.logits_fn, pixels, labels, **kw).images,
      "bim": attacks.bim(model.logits_fn, pixels, labels, steps=settings.attack_steps,
                         **kw).images,
      "pgd": attacks.pgd(model.logits_fn, pixels, labels, key=key,
                         steps=settings.attack_steps, **kw).images,
  }
  out = {}
  for name in ("none",) + tuple(settings.defenses):
    d = (lambda x: x) if name == "none" else defenses.DEFENSES[name]
    logits = lambda x: model.logits_fn(space.normalize(d(x)))
    out[f"{name}/clean"] = correct(model, logits(pixels), labels)
    for attack, x in adv.items():
      out[f"{name}/{attack}"] = correct(model, logits(x), labels)
    if name != "none":
      bpda = attacks.bpda_pgd(model.logits_fn, pixels, labels, key=key, defense=d,
                              steps=settings.attack_steps, **kw)
      out[f"{name}/bpda_pgd"] = correct(model, logits(bpda.images), labels)
  return out


def defended_maps(model, pixels, targets, *, space, settings):
  """Grid CE maps (importance = -expected CE) of each defended input, ``{name: maps}``."""
  grid = masks.grid_masks(shape=pixels.shape[1:3], n=settings.grid_cells)
  out = {}
  for name in settings.defenses:
    x = space.normalize(defenses.DEFENSES[name](pixels))
    out[name] = jax.lax.map(lambda a: -effects.ce_map(
        _ce(model, a[0], grid, a[1], "expected", settings).effects, grid), (x, targets))
  return out


LOCALIZATION_METRICS = ("pointing", "mass", "iou")
FAITHFULNESS_METRICS = metrics.CURVES  # deletion_zero, deletion_blur, insertion_blur


def localization(model, images, maps, boxes, targets, *, settings):
  """Per-image metrics for each map: the standard pointing game (Zhang et al.'s
  tolerance scaled to the image, first maximum), mass in box, IoU@0.5, and the
  deletion/insertion AUCs of ``metrics.CURVES``."""
  out = {}
  for name, m in maps.items():
    out[f"pointing/{name}"] = metrics.pointing_game(m, boxes).astype(jnp.float32)
    out[f"mass/{name}"] = metrics.mass_in_box(m, boxes)
    out[f"iou/{name}"] = metrics.iou(m, boxes)
    aucs = metrics.deletion_insertion(model.logits_fn, images, m, targets,
                                      steps=settings.deletion_steps,
                                      activation=model.activation,
                                      batch_size=settings.batch_size)
    out.update({f"{curve}/{name}": v for curve, v in aucs.items()})
  return out


# --- the chunked driver ----------------------------------------------------------------

def _save_npz_atomic(path: Path, arrays: dict[str, np.ndarray]) -> None:
  buf = io.BytesIO()
  np.savez_compressed(buf, **arrays)
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
  with os.fdopen(fd, "wb") as f:
    f.write(buf.getvalue())
  os.replace(tmp, path)


def settings_fingerprint(settings: dict[str, Any]) -> str:
  return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def pixel_space(normalization) -> attacks.PixelSpace:
  return attacks.PixelSpace(mean=jnp.asarray(normalization.mean, jnp.float32),
                            std=jnp.asarray(normalization.std, jnp.float32))


def make_stage_fns(model, rand_model, *, space, settings) -> dict[str, Callable]:
  """The jitted stages, built once per run so that every chunk reuses the compilation."""
  return {
      "maps": jax.jit(lambda x, t, k: compute_maps(model, x, t, key=k, settings=settings)),
      "localization": jax.jit(lambda x, m, b, t: localization(model, x, m, b, t,
                                                              settings=settings)),
      "sanity": jax.jit(lambda x, t, k: compute_maps(rand_model, x, t, key=k,
                                                     settings=settings,
                                                     methods=SANITY_METHODS)),
      "attacks": jax.jit(lambda p, y, k: run_attacks(model, p, y, space=space, key=k,
                                                     settings=settings)),
      "features": jax.jit(lambda x, t: ce_features(model, x, t, settings=settings)),
      "defenses": jax.jit(lambda p, y, k: defense_accuracy(model, p, y, space=space, key=k,
                                                           settings=settings)),
      "defended_maps": jax.jit(lambda p, t: defended_maps(model, p, t, space=space,
                                                          settings=settings)),
  }


def analyze_chunk(model, fns, batch, *, space, key, settings):
  """Yields stage names, then all per-image results of one chunk as numpy arrays."""
  images = jnp.asarray(batch["image"], jnp.float32)
  n, h, w, _ = images.shape
  multi = model.activation == "sigmoid"
  labels = jnp.asarray(batch["label"])
  logits = model.logits_fn(images)
  has_box = np.asarray(batch["box_mask"]).any(1)
  first_box_label = np.asarray(batch["box_labels"])[:, 0]
  predicted = np.asarray(jnp.argmax(logits, -1))
  # Localization is scored for the boxed finding; images without a box use the prediction.
  targets = jnp.asarray(np.where(has_box, first_box_label, predicted), jnp.int32)
  box_soft = jax.vmap(lambda b: masks.box_masks(b, shape=(h, w)))(jnp.asarray(batch["boxes"]))
  boxes = ((box_soft > 0.5) & jnp.asarray(batch["box_mask"])[:, :, None, None]).any(1)
  pixels = jnp.clip(space.to_pixels(images), 0.0, 1.0)
  out = {"label": np.asarray(labels), "target": np.asarray(targets), "has_box": has_box,
         "box": np.asarray(boxes), "pixels": np.asarray(pixels, np.float16),
         "correct": np.asarray(correct(model, logits, labels))}
  yield "maps"
  maps = fns["maps"](images, targets, key)
  out.update({f"map/{k}": np.asarray(v, np.float16) for k, v in maps.items()})
  yield "metrics"
  loc = fns["localization"](images, maps, boxes, targets)
  out.update({k: np.asarray(v) for k, v in loc.items()})
  if settings.sanity:
    yield "sanity"
    rmaps = fns["sanity"](images, targets, key)
    for name in SANITY_METHODS:
      out[f"sanity/{name}"] = np.asarray(metrics.spearman(maps[name], rmaps[name]))
  yield "attacks"
  attack_labels = labels.astype(jnp.float32) if multi else labels
  adv = fns["attacks"](pixels, attack_labels, key)
  clean_feats, clean_effects = fns["features"](images, targets)
  out["ce/clean"] = np.asarray(clean_feats)
  out["effects/clean"] = np.asarray(clean_effects, np.float16)
  out["confidence/clean"] = np.asarray(confidence(model, logits))
  # Feature squeezing (Xu et al., 2018): how much the prediction moves when squeezed.
  squeeze = lambda p: defenses.median_smoothing(defenses.bit_depth(p, bits=4))
  squeeze_score = lambda lg, p: np.asarray(jnp.abs(
      _probs(model, lg) - _probs(model, model.logits_fn(space.normalize(squeeze(p))))).sum(-1))
  out["squeeze/clean"] = squeeze_score(logits, pixels)
  for name, res in adv.items():
    f, e = fns["features"](space.normalize(res.images), targets)
    out[f"ce/{name}"], out[f"effects/{name}"] = np.asarray(f), np.asarray(e, np.float16)
    out[f"success/{name}"] = np.asarray(res.success)
    out[f"confidence/{name}"] = np.asarray(confidence(model, res.logits))
    out[f"squeeze/{name}"] = squeeze_score(res.logits, res.images)
  if settings.defenses:
    yield "defenses"
    acc = fns["defenses"](pixels, attack_labels, key)
    out.update({f"defense/{k}": np.asarray(v) for k, v in acc.items()})
    for name, m in fns["defended_maps"](pixels, targets).items():
      out[f"defmap/{name}"] = np.asarray(m, np.float16)
      out[f"defpix/{name}"] = np.asarray(defenses.DEFENSES[name](pixels), np.float16)
  yield out


def image_list(dataset, split: str, num: int) -> list[tuple[str, int]]:
  """The first ``num`` images of ``split`` (``"all"``: every split in turn)."""
  splits = list(dataset.sources) if split == "all" else [split]
  items = [(s, i) for s in splits for i in range(dataset.num_examples(s))]
  return items[:num]


def _batch(dataset, items):
  parts = []
  for split in dict.fromkeys(s for s, _ in items):
    rows = [k for k, (s, _) in enumerate(items) if s == split]
    parts.append((rows, dataset.batch(split, [items[k][1] for k in rows])))
  order = np.argsort(np.concatenate([rows for rows, _ in parts]), kind="stable")
  return {key: np.concatenate([b[key] for _, b in parts])[order] for key in parts[0][1]}


def run_chunks(model, rand_model, dataset, *, out_dir: Path, settings, indices, key,
               progress=None, worker: int = 0, num_workers: int = 1) -> list[Path]:
  """Analyzes ``indices`` (``(split, index)`` pairs, see ``image_list``) chunk by chunk,
  skipping chunks already on disk. Results are numbered by position in ``indices``.

  With ``num_workers > 1`` this process computes only chunks ``c`` with ``c %
  num_workers == worker`` (several processes share one output directory, e.g. one per
  CPU core); the paths of all chunks are returned either way.
  """
  if not 0 <= worker < num_workers:
    raise ValueError(f"worker must be in [0, {num_workers}), got {worker}.")
  chunk_dir = Path(out_dir) / "chunks"
  chunk_dir.mkdir(parents=True, exist_ok=True)
  size = settings.chunk_size
  space = pixel_space(dataset.normalization)
  fns = make_stage_fns(model, rand_model, space=space, settings=settings)
  paths = []
  for c, start in enumerate(range(0, len(indices), size)):
    path = chunk_dir / f"{c:04d}.npz"
    paths.append(path)
    if c % num_workers != worker:
      continue
    if path.exists():
      if progress:
        progress.update(len(indices[start:start + size]))
      continue
    idx = np.arange(start, min(start + size, len(indices)))
    # Pad the last chunk by repeating images, so every chunk has one compiled shape.
    batch = _batch(dataset, [indices[i] for i in np.resize(idx, size)])
    steps = analyze_chunk(model, fns, batch, space=space, key=jax.random.fold_in(key, c),
                          settings=settings)
    for stage in steps:
      if isinstance(stage, dict):
        result = {k: v[: len(idx)] for k, v in stage.items()}
      elif progress:
        progress.set_postfix(chunk=c, stage=stage)
    result["index"] = idx
    _save_npz_atomic(path, result)
    if progress:
      progress.update(len(idx))
  return paths


def load_chunks(paths) -> dict[str, np.ndarray]:
  parts = [dict(np.load(p)) for p in paths]
  return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


# --- the detector ----------------------------------------------------------------------

def fit_logistic(x, y, *, steps: int = 500, learning_rate: float = 0.05, l2: float = 1e-2):
  """Logistic regression with Optax (Adam) on standardised features.

  Returns:
    ``predict(x) -> scores``.
  """
  x = np.asarray(x, np.float32)
  mu, sd = x.mean(0), x.std(0) + 1e-6
  z = jnp.asarray((x - mu) / sd)
  yj = jnp.asarray(y, jnp.float32)
  params = {"w": jnp.zeros(z.shape[1]), "b": jnp.zeros(())}
  opt = optax.adam(learning_rate)

  def loss(p):
    logits = z @ p["w"] + p["b"]
    return optax.sigmoid_binary_cross_entropy(logits, yj).mean() + l2 * (p["w"] ** 2).sum()

  @jax.jit
  def train(p):
    def step(carry, _):
      p, s = carry
      g = jax.grad(loss)(p)
      u, s = opt.update(g, s)
      return (optax.apply_updates(p, u), s), None
    (p, _), _ = jax.lax.scan(step, (p, opt.init(p)), None, length=steps)
    return p

  params = train(params)
  return lambda xs: np.asarray(((np.asarray(xs, np.float32) - mu) / sd) @ params["w"]
                               + params["b"])


def detection(results, *, attack: str, train_fraction: float = 0.5):
  """Clean vs adversarial detection for one attack; images split by index.

  Uses images whose clean prediction is right and whose attack succeeded. Each
  detector is a logistic regression fitted on the first images and scored on the rest.

  Returns:
    ``{detector: {"auroc", "tpr_at_5fpr", "fpr", "tpr", "n_train", "n_test"}}``.
  """
  ok = (results["correct"] > 0.5) & results[f"success/{attack}"].astype(bool)
  idx = np.nonzero(ok)[0]
  cut = int(len(idx) * train_fraction)
  parts = {"train": idx[:cut], "test": idx[cut:]}
  sources = {
      "CE features": lambda k, i: results[k.replace("*", "ce")][i],
      "max confidence": lambda k, i: results[k.replace("*", "confidence")][i][:, None],
      "squeezing": lambda k, i: results[k.replace("*", "squeeze")][i][:, None],
  }
  out = {}
  for det, get in sources.items():
    xy = {}
    for part, i in parts.items():
      xy[part] = (np.concatenate([get("*/clean", i), get(f"*/{attack}", i)]),
                  np.r_[np.zeros(len(i)), np.ones(len(i))])
    if len(parts["train"]) < 2 or len(parts["test"]) < 2:
      out[det] = {"auroc": float("nan"), "tpr_at_5fpr": float("nan"), "fpr": [], "tpr": [],
                  "n_train": int(len(parts["train"])), "n_test": int(len(parts["test"]))}
      continue
    predict = fit_logistic(*xy["train"])
    scores = predict(xy["test"][0])
    fpr, tpr = metrics.roc_curve(scores, xy["test"][1])
    out[det] = {"auroc": metrics.auroc(scores, xy["test"][1]),
                "auroc_ci": list(paired_auroc_interval(scores)),
                "tpr_at_5fpr": metrics.tpr_at_fpr(scores, xy["test"][1], fpr=0.05),
                "fpr": fpr.tolist(), "tpr": tpr.tolist(),
                "n_train": int(len(parts["train"])), "n_test": int(len(parts["test"]))}
  return out


def paired_auroc_interval(scores, *, num: int = 1000, level: float = 0.95, seed: int = 0):
  """Percentile-bootstrap interval of the AUROC of ``scores`` = clean scores of ``n``
  images followed by the adversarial scores of the same ``n`` images (label 0 then 1);
  images are resampled with their clean/adversarial pair kept together."""
  scores = np.asarray(scores, np.float64)
  n = len(scores) // 2
  rng = np.random.default_rng(seed)
  labels = np.r_[np.zeros(n), np.ones(n)]
  aucs = []
  for _ in range(num):
    i = rng.integers(0, n, n)
    aucs.append(metrics.auroc(np.r_[scores[:n][i], scores[n:][i]], labels))
  lo, hi = np.quantile(aucs, [(1 - level) / 2, (1 + level) / 2])
  return float(lo), float(hi)


def summarize(results, *, settings) -> dict[str, Any]:
  """Means with 95% bootstrap intervals per method and metric, detection, defenses."""
  boxed = results["has_box"].astype(bool)
  methods = [k.split("/", 1)[1] for k in results if k.startswith("map/")]
  table = {}
  for m in methods:
    row = {}
    for metric in LOCALIZATION_METRICS:
      row[metric] = metrics.bootstrap_interval(results[f"{metric}/{m}"][boxed])
    for metric in FAITHFULNESS_METRICS:
      row[metric] = metrics.bootstrap_interval(results[f"{metric}/{m}"])
    ious = results[f"iou/{m}"][boxed]
    row["t_iou"] = np.asarray(metrics.localization_accuracy(ious)).tolist() if len(ious) \
        else []
    if f"sanity/{m}" in results:
      row["sanity_spearman"] = metrics.bootstrap_interval(results[f"sanity/{m}"])
    table[m] = row
  attack_names = sorted(k.split("/", 1)[1] for k in results if k.startswith("success/"))
  detect = {a: detection(results, attack=a) for a in attack_names}
  success = {a: float(results[f"success/{a}"][results["correct"] > 0.5].mean())
             if (results["correct"] > 0.5).any() else float("nan") for a in attack_names}
  defense = {k.split("/", 1)[1]: float(v.mean()) for k, v in results.items()
             if k.startswith("defense/")}
  h, w = results["box"].shape[1:3]
  return {"num_images": int(len(results["index"])), "num_with_box": int(boxed.sum()),
          "pointing_tolerance_px": metrics.pointing_tolerance((h, w)),
          "clean_accuracy": float(results["correct"].mean()), "methods": table,
          "iou_thresholds": list(metrics.IOU_THRESHOLDS), "attack_success": success,
          "detection": detect, "defenses": defense}
