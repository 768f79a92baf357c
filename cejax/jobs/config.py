"""One config schema: the base config declares every field once; anything else is an
error that names the closest valid key.

The base is ``base_config()`` below (the default demo's settings; ``configs/synthetic.py``
returns it and every shipped config derives from it). ``train_and_evaluate`` and
``analyze.py`` check their config against it before any work starts, so a typo in any
section (``config.analysis.rise_mask``) fails at once instead of being ignored. The
base lives in the library (not in ``configs/``) so that the library can check configs
built by users' own code too.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping

import ml_collections


def _is_section(value) -> bool:
  return isinstance(value, (Mapping, ml_collections.ConfigDict))


# Keys that moved, and where to: the old key gets this message instead of "unknown".
MOVED_KEYS = {
    **{f"config.{section}.{key}": f"config.masks.{key}" for section in ("analysis", "sweep")
       for key in ("grid_cells", "rise_masks", "rise_cells")},
    "config.sweep.window": "config.masks.window",
    "config.sweep.stride": "config.masks.stride",
    "config.analysis.window_div": "config.masks.window (in pixels: image size / window_div)",
    "config.analysis.stride_div": "config.masks.stride (in pixels: image size / stride_div)",
    "config.sweep.compute_dtype": "config.precision ('bf16' runs the network in "
                                  "bfloat16, 'exact' in float32)",
    "config.sweep.incremental": "config.sweep.path ('auto', 'incremental' or 'full')",
    "config.analysis.deletion_steps": "config.analysis.deletion_step (pixels per step; 0: "
                                      "one image row, Petsiuk et al.'s rule)",
    # One precision and one section of optimised-mask settings for every job.
    **{f"config.{job}.precision": "config.precision" for job in ("train", "analysis", "sweep")},
    **{f"config.{job}.extremal_{key}": f"config.optimised.{key}"
       for job in ("analysis", "sweep") for key in ("areas", "iterations", "step", "sigma")},
    "config.analysis.meaningful_iterations": "config.optimised.meaningful_iterations",
    "config.sweep.counterfactual_bisection": "config.optimised.counterfactual_bisection",
    "config.sweep.optimised_batch_size": "config.optimised.batch_size",
}


def model_overrides(config) -> dict:
  """``config.model.overrides`` that are set (None: the preset's own value)."""
  overrides = config.model.get("overrides", {}) or {}
  return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dict(overrides).items()
          if v is not None}


def explicit_keys(argv, section: str) -> set[str]:
  """The keys of ``config.<section>`` a command line sets (``--config.section.KEY=``)."""
  prefix = f"--config.{section}."
  return {arg[len(prefix):].split("=", 1)[0].split(".")[0] for arg in argv[1:]
          if arg.startswith(prefix)}


def check_argv(argv, base=None) -> None:
  """Checks the ``--config.a.b=...`` overrides of a command line against the schema
  before any flag is parsed: an unknown key exits with the same message a config file
  gets ("Did you mean ..."), not a traceback from inside the flag parser."""
  import sys

  base = base_config() if base is None else base
  for arg in argv[1:]:
    if not arg.startswith("--config."):
      continue
    keys = arg[len("--config."):].split("=", 1)[0].split(".")
    node, path = base, "config"
    for key in keys:
      if f"{path}.{key}" in MOVED_KEYS or key not in node:
        try:
          check_keys({key: None}, node, path=path)
        except ValueError as e:
          sys.exit(f"{e} (command line: {arg})")
      node, path = node[key], f"{path}.{key}"
      if not _is_section(node):
        break


def check_keys(config, base, *, path: str = "config") -> None:
  """Raises ``ValueError`` for a key of ``config`` that ``base`` does not declare.

  Sections (nested mappings) are checked recursively; the message names the closest
  valid key and lists the valid ones (or, for a key that moved, its new place).
  """
  for key in config.keys():
    if f"{path}.{key}" in MOVED_KEYS:
      raise ValueError(f"{path}.{key} is now {MOVED_KEYS[f'{path}.{key}']}.")
    if key not in base:
      # The closest key of this section, or of the keys that moved from it.
      moved = {k.rsplit(".", 1)[1]: v for k, v in MOVED_KEYS.items()
               if k.rsplit(".", 1)[0] == path}
      close = difflib.get_close_matches(key, [*base.keys(), *moved], n=1)
      hint = ("" if not close else f" Did you mean {path}.{close[0]}?" if close[0] in base
              else f" Did you mean {path}.{close[0]}? It is now {moved[close[0]]}.")
      raise ValueError(f"Unknown config key {path}.{key}.{hint} Valid keys of {path}: "
                       f"{sorted(base.keys())}.")
    value, declared = config[key], base[key]
    if _is_section(declared) and _is_section(value):
      check_keys(value, declared, path=f"{path}.{key}")


def base_config() -> ml_collections.ConfigDict:
  """Every field a cejax config may set, with the default demo's values: a tiny DenseNet
  on the embedded synthetic X-ray set (CPU-minutes)."""
  config = ml_collections.ConfigDict()

  config.data = ml_collections.ConfigDict()
  config.data.name = "synthetic"
  config.data.data_dir = ""  # TFDS default (~/tensorflow_datasets) when empty
  config.data.image_size = 64
  config.data.num_train = 10_000
  config.data.num_validation = 1_000
  config.data.num_test = 1_000
  config.data.seed = 0
  config.data.channels = 1
  config.data.mean = (0.45,)
  config.data.std = (0.25,)
  config.data.crop_size = 0
  config.data.max_boxes = 1
  config.data.manual_dir = ""
  config.data.image_key = "image"  # feature names, for any prepared TFDS data set
  config.data.label_key = "label"
  # The analysis and the sweep take the data settings a run was trained with from its
  # run.json; True lets them evaluate it on data set up otherwise (a deliberate choice).
  config.data.other_than_trained = False

  config.model = ml_collections.ConfigDict()
  config.model.preset = "tiny"
  config.model.dtype = "float32"
  # DenseNet constructor arguments that replace the preset's (None: the preset's own),
  # each settable on the command line (--config.model.overrides.growth_rate=8).
  config.model.overrides = ml_collections.ConfigDict({
      name: ml_collections.config_dict.placeholder(kind) for name, kind in (
          ("growth_rate", int), ("block_config", tuple), ("num_init_features", int),
          ("bn_size", int), ("compression", float), ("stem_kernel", int),
          ("stem_stride", int), ("stem_pool", bool))})

  config.train = ml_collections.ConfigDict()
  config.train.seed = 0
  config.train.batch_size = 64
  config.train.num_epochs = 8
  config.train.optimizer = "adamw"
  config.train.learning_rate = 3e-3
  config.train.weight_decay = 1e-4
  config.train.warmup_epochs = 0.5
  config.train.schedule = "cosine"
  config.train.momentum = 0.9  # sgd only
  config.train.checkpoint_every_steps = 200
  config.train.keep_checkpoints = 2
  config.train.best_metric = "accuracy"  # validation metric that picks the best checkpoint
  config.train.log_every_steps = 20
  config.train.eval_batch_size = 250

  # cejax.precision of every job's programs: "exact" (float32 products on every
  # backend), "tf32", or "bf16" (the analysis and the sweep then build the network in
  # bfloat16, weights float32; training keeps config.model.dtype); errors of each in
  # results/RESULTS.md.
  config.precision = "exact"

  # The masks of both jobs (analysis and sweep): one specification, in pixels.
  config.masks = ml_collections.ConfigDict()
  config.masks.grid_cells = 10  # grid: n x n blocks (the paper's 10 x 10)
  config.masks.window = 0  # sliding window in pixels; 0: image size / 4
  config.masks.stride = 0  # its stride in pixels; 0: image size / 16
  config.masks.rise_masks = 500  # RISE masks (also the RISE saliency baseline's count)
  config.masks.rise_cells = 8  # RISE's coarse grid s (Petsiuk et al.'s released code: 8)
  # The probability that a RISE cell is kept, for the CE-RISE masks and the RISE
  # baseline alike (0.5 keeps the two comparable; Petsiuk et al.'s released code: 0.1).
  config.masks.rise_p = 0.5
  # Patch subsets (cejax.masks.patch_subsets): each mask hides a fixed count of whole
  # patch_size patches, the kept fraction patch_keep, so that every mask of the family
  # keeps as many tokens (a ViT's token drop runs them without padding).
  config.masks.patch_masks = 500
  config.masks.patch_size = 8
  config.masks.patch_keep = 0.5

  # analyze.py: CE maps vs baselines, attacks, detector and defenses on test images.
  config.analysis = ml_collections.ConfigDict()
  config.analysis.split = "test"
  config.analysis.num_images = 64
  config.analysis.chunk_size = 16  # images per resumable unit of work
  config.analysis.seed = 0
  # Which evaluators run (cejax.jobs.evaluators.EVALUATORS) and which maps they compare.
  config.analysis.evaluators = ("maps", "localization", "sanity", "attacks", "detection",
                                "defenses")
  config.analysis.methods = ("ce_sliding", "ce_grid", "ce_rise", "ce_latent", "gradient",
                             "gradient_x_input", "smoothgrad", "integrated_gradients", "cam",
                             "grad_cam", "grad_cam_pp", "smooth_grad_cam_pp", "rise",
                             "occlusion")
  config.analysis.batch_size = 64  # masks per forward call
  config.analysis.latent_stage = "block2"
  config.analysis.noise_samples = 50  # SmoothGrad and Smooth Grad-CAM++ (Smilkov: ~50)
  config.analysis.noise_level = 0.15  # noise std / image range (Smilkov: 10-20 %)
  config.analysis.ig_steps = 50  # Gauss-Legendre nodes (Captum's default)
  config.analysis.deletion_step = 0  # pixels per deletion step; 0: one image row (Petsiuk)
  config.analysis.attacks = ("fgsm", "bim", "pgd")
  config.analysis.epsilons = (2 / 255, 8 / 255)
  config.analysis.attack_steps = 10
  # Feature squeezing's squeezers (Xu et al.: 5-bit depth and a 2 x 2 median for
  # ImageNet and CIFAR-10), scored one by one, the largest L1 change kept.
  config.analysis.squeeze_bits = 5
  config.analysis.squeeze_median = 2
  config.analysis.defenses = ("ordered_dither", "error_diffusion", "bit_depth", "median")
  config.analysis.defense_eps = 8 / 255  # the defenses evaluator's attack budget

  # python -m cejax.jobs.sweep: CE maps for a whole split on every device of every host.
  config.sweep = ml_collections.ConfigDict()
  config.sweep.split = "test"
  config.sweep.num_images = 0  # 0: the whole split
  config.sweep.chunk_size = 8  # images per output file (the unit of resume)
  config.sweep.seed = 0  # draws the RISE masks
  # Masks per forward call, per device; "auto": the largest that fits memory_budget_gb,
  # from the compiled forward pass's memory analysis (jobs.throughput.auto_batch_size).
  config.sweep.batch_size = ml_collections.FieldReference(64, field_type=object)
  config.sweep.memory_budget_gb = 2.0
  # Of grid, sliding, rise, patches (their sizes: config.masks).
  config.sweep.families = ("grid",)
  # Of zero, mean, blur; a ViT run also token_drop, attention_mask (cejax.forwards.tokens).
  config.sweep.interventions = ("zero",)
  config.sweep.blur_sigma = 5.0
  config.sweep.estimands = ("expected",)  # any of cejax.estimands.ESTIMANDS
  config.sweep.targets = "predicted"  # or "all": every class / finding
  config.sweep.save_effects = False  # also keep the per-mask effects
  # Which forward each mask family takes: "auto" (the rule per platform in
  # cejax.jobs.sweep.plan.AUTO_PATH: incremental recompute where it applies on CPUs, full
  # forward passes on GPUs and TPUs), or "incremental" / "full" for every family.
  config.sweep.path = "auto"
  # Optimised masks per image beside the families (cejax.jobs.sweep.optimised): any of
  # "extremal", "ce_optimal", "counterfactual"; their settings: config.optimised.
  config.sweep.optimised = ()

  # The optimised masks of both jobs (the analysis' methods "extremal_perturbation",
  # "ce_optimal", "meaningful_perturbation"; the sweep's config.sweep.optimised):
  # TorchRay's benchmark areas and iterations, its mask step and smoothing at 224 px
  # (scale the last two with the image: 2 and 6.0 at 64 px).
  config.optimised = ml_collections.ConfigDict()
  config.optimised.areas = (0.025, 0.05, 0.1, 0.2)
  config.optimised.iterations = 800
  config.optimised.step = 7
  config.optimised.sigma = 21.0
  config.optimised.meaningful_iterations = 500  # Fong and Vedaldi's deletion game
  config.optimised.counterfactual_bisection = 3  # bisection steps after the area grid
  # The sweep's images optimised at a time per device (each with its areas; the analysis
  # optimises each chunk's images as one batch). The masks are the same bits on any mesh
  # at one value; the network's rounding may depend on its batch, so they differ between
  # values at float round-off. Larger is faster on CPUs.
  config.optimised.batch_size = 1
  return config


# --- one validation pass per job ---------------------------------------------------------

def _integer(value, *, minimum: int) -> bool:
  return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def _number(value) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool)


def _names(key: str, got, valid, *, allow_empty: bool = False) -> None:
  """Every name in ``got`` is one of ``valid`` (and there is one), or a ``ValueError``
  naming the bad ones, the valid ones and the closest."""
  valid = tuple(valid)
  bad = [g for g in got if g not in valid]
  if bad or not (got or allow_empty):
    close = [m for g in bad for m in difflib.get_close_matches(str(g), valid, n=1)]
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise ValueError(f"{key} has {bad or 'nothing'}; valid are {list(valid)}.{hint}")


def check_precision(config) -> None:
  from cejax import precision

  try:
    precision.check(config.precision)
  except ValueError as e:
    raise ValueError(f"config.precision: {e}") from None


def check_masks(config) -> None:
  """``config.masks``: positive sizes, a probability; whether the families fit an image
  size is ``mask_spec.check_fits`` (it depends on the data)."""
  spec = config.masks
  for key in ("grid_cells", "rise_masks", "rise_cells", "patch_masks", "patch_size"):
    if not _integer(spec[key], minimum=1):
      raise ValueError(f"config.masks.{key} must be a positive integer, got {spec[key]!r}.")
  if not (_number(spec.rise_p) and 0.0 < spec.rise_p < 1.0):
    raise ValueError(f"config.masks.rise_p must be in (0, 1), got {spec.rise_p!r}.")
  if not (_number(spec.patch_keep) and 0.0 < spec.patch_keep < 1.0):
    raise ValueError(f"config.masks.patch_keep must be in (0, 1) (the fraction of "
                     f"patches a mask keeps), got {spec.patch_keep!r}.")
  for key in ("window", "stride"):
    if not _integer(spec[key], minimum=0):
      raise ValueError(f"config.masks.{key} must be an integer >= 0 (0: the default "
                       f"fraction of the image), got {spec[key]!r}.")


def check_optimised(config) -> None:
  """``config.optimised``: the optimised masks' areas, iterations, step and smoothing,
  the meaningful perturbations' iterations, the counterfactual's bisection and the
  sweep's per-device batch."""
  o = config.optimised
  areas = tuple(o.areas)
  if not areas or not all(_number(a) and 0 < a <= 1 for a in areas):
    raise ValueError(f"config.optimised.areas must be fractions in (0, 1], got {areas!r}.")
  for key in ("iterations", "step", "meaningful_iterations", "batch_size"):
    if not _integer(o[key], minimum=1):
      raise ValueError(f"config.optimised.{key} must be an integer >= 1, got {o[key]!r}.")
  if not _integer(o.counterfactual_bisection, minimum=0):
    raise ValueError("config.optimised.counterfactual_bisection must be an integer >= 0, "
                     f"got {o.counterfactual_bisection!r}.")
  if not (_number(o.sigma) and o.sigma > 0):
    raise ValueError(f"config.optimised.sigma must be > 0 (pixels), got {o.sigma!r}.")


def check_model(config) -> None:
  from cejax.models import densenet, vit

  valid = sorted(densenet.PRESETS) + sorted(vit.PRESETS)
  if config.model.preset not in valid:
    raise ValueError(f"Unknown config.model.preset {config.model.preset!r}; valid "
                     f"presets are {valid}.")
  if config.model.preset in vit.PRESETS and model_overrides(config):
    raise ValueError(f"config.model.overrides {sorted(model_overrides(config))} are "
                     f"DenseNet's; the ViT preset {config.model.preset!r} takes none.")


def check_train(config) -> None:
  t = config.train
  _names("config.train.optimizer", [t.optimizer], ("adam", "adamw", "sgd"))
  _names("config.train.schedule", [t.schedule], ("constant", "cosine"))
  for key in ("batch_size", "checkpoint_every_steps", "log_every_steps", "eval_batch_size",
              "keep_checkpoints"):
    if not _integer(t[key], minimum=1):
      raise ValueError(f"config.train.{key} must be an integer >= 1, got {t[key]!r}.")


def check_analysis(config) -> None:
  """``config.analysis``: counts, the evaluators (and those they require) and the map
  methods."""
  from cejax.jobs import evaluators
  from cejax.jobs.evaluators import maps

  a = config.analysis
  for key in ("num_images", "chunk_size"):
    if not _integer(a[key], minimum=1):
      raise ValueError(f"config.analysis.{key} must be an integer >= 1, got {a[key]!r}.")
  evaluators.select(a.evaluators)
  maps.check_methods(a.methods)


def check_sweep(config) -> None:
  """``config.sweep``: families, interventions, estimands, targets, batch, path, sizes,
  and the optimised masks it adds."""
  from cejax.estimands import ESTIMANDS
  from cejax.jobs.sweep import optimised as sweep_optimised
  from cejax.jobs.sweep import plan as sweep_plan

  s = config.sweep
  # No family is fine when the sweep computes optimised masks only.
  _names("config.sweep.families", s.families, sweep_plan.FAMILIES,
         allow_empty=bool(s.optimised))
  _names("config.sweep.interventions", s.interventions, sweep_plan.SWEEP_INTERVENTIONS)
  _names("config.sweep.estimands", s.estimands, ESTIMANDS)
  _names("config.sweep.optimised", s.optimised, sweep_optimised.OPTIMISED, allow_empty=True)
  _names("config.sweep.targets", [s.targets], sweep_plan.TARGETS)
  _names("config.sweep.path", [s.path], sweep_plan.PATHS)
  if s.optimised and s.targets != "predicted":
    raise ValueError("config.sweep.optimised masks are for the predicted class; "
                     f"config.sweep.targets must be 'predicted', got {s.targets!r}.")
  if "ce_optimal" in s.optimised and not sweep_optimised.scalar_estimands(s):
    raise ValueError(f"config.sweep.optimised has 'ce_optimal', which reports one of "
                     f"{sweep_optimised.SCALAR_ESTIMANDS}; config.sweep.estimands has none "
                     f"({tuple(s.estimands)}).")
  wanted = [m for m in s.optimised if m in ("ce_optimal", "counterfactual")]
  if wanted and not sweep_optimised.pixel_interventions(s):
    raise ValueError(f"config.sweep.optimised has {wanted}, which optimise a pixel "
                     f"intervention; config.sweep.interventions has none of "
                     f"{sweep_plan.PIXEL_INTERVENTIONS} ({tuple(s.interventions)}).")
  if s.batch_size != "auto" and not _integer(s.batch_size, minimum=1):
    raise ValueError(f"config.sweep.batch_size must be a positive int or 'auto', got "
                     f"{s.batch_size!r}.")
  if not _integer(s.chunk_size, minimum=1):
    raise ValueError(f"config.sweep.chunk_size must be an integer >= 1, got "
                     f"{s.chunk_size!r}.")
  if not _integer(s.num_images, minimum=0):
    raise ValueError(f"config.sweep.num_images must be an integer >= 0 (0: the whole "
                     f"split), got {s.num_images!r}.")


# What each job reads, and the one check of each section (declared once, run once).
SECTION_CHECKS = {"precision": check_precision, "model": check_model, "train": check_train,
                  "masks": check_masks, "optimised": check_optimised,
                  "analysis": check_analysis, "sweep": check_sweep}
JOB_SECTIONS = {
    "train": ("data", "model", "train", "precision"),
    "analysis": ("data", "masks", "optimised", "analysis", "precision"),
    "sweep": ("data", "masks", "optimised", "sweep", "precision"),
}


def validate(config, job: str) -> None:
  """The whole config of ``job`` (``"train"``, ``"analysis"`` or ``"sweep"``) checked
  once, up front, before anything is read or written: every key against the schema
  (``check_keys``), then each section the job reads (``SECTION_CHECKS``).

  Raises:
    ValueError: a missing section, an unknown key (naming the closest valid one) or a
      bad value (naming the key and what is valid).
  """
  if job not in JOB_SECTIONS:
    raise ValueError(f"Unknown job {job!r}; valid are {list(JOB_SECTIONS)}.")
  for section in JOB_SECTIONS[job]:
    if section not in config:
      raise ValueError(f"The config has no {section!r} (every field is declared in "
                       "cejax.jobs.config.base_config).")
  check_keys(config, base_config())
  for section in JOB_SECTIONS[job]:
    if section in SECTION_CHECKS:
      SECTION_CHECKS[section](config)

