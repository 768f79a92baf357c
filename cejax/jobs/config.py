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
    "config.sweep.compute_dtype": "config.sweep.precision ('bf16' runs the network in "
                                  "bfloat16, 'exact' in float32)",
    "config.sweep.incremental": "config.sweep.path ('auto', 'incremental' or 'full')",
    "config.analysis.deletion_steps": "config.analysis.deletion_step (pixels per step; 0: "
                                      "one image row, Petsiuk et al.'s rule)",
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
  # cejax.precision of the training programs ("exact", "tf32", "bf16"); the network's
  # own dtype is config.model.dtype.
  config.train.precision = "exact"

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
  config.analysis.precision = "exact"  # cejax.precision: "exact", "tf32" or "bf16"
  config.analysis.latent_stage = "block2"
  config.analysis.noise_samples = 50  # SmoothGrad and Smooth Grad-CAM++ (Smilkov: ~50)
  config.analysis.noise_level = 0.15  # noise std / image range (Smilkov: 10-20 %)
  config.analysis.ig_steps = 50  # Gauss-Legendre nodes (Captum's default)
  # Optimised masks (methods "extremal_perturbation", "ce_optimal"; cejax.extremal):
  # TorchRay's benchmark areas and iterations, its mask step and smoothing at 224 px
  # (scale them with the image: 2 and 6.0 at 64 px).
  config.analysis.extremal_areas = (0.025, 0.05, 0.1, 0.2)
  config.analysis.extremal_iterations = 800
  config.analysis.extremal_step = 7
  config.analysis.extremal_sigma = 21.0
  config.analysis.meaningful_iterations = 500  # Fong and Vedaldi's deletion game
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
  config.sweep.families = ("grid",)  # of grid, sliding, rise (their sizes: config.masks)
  config.sweep.interventions = ("zero",)  # of zero, mean, blur
  config.sweep.blur_sigma = 5.0
  config.sweep.estimands = ("expected",)  # any of cejax.estimands.ESTIMANDS
  config.sweep.targets = "predicted"  # or "all": every class / finding
  config.sweep.save_effects = False  # also keep the per-mask effects
  # cejax.precision: "exact" (float32 products on every backend), "tf32", or "bf16" (the
  # network in bfloat16, weights float32); errors of each in benchmarks/RESULTS.md.
  config.sweep.precision = "exact"
  # Which forward each mask family takes: "auto" (the rule per platform in
  # cejax.jobs.sweep_plan.AUTO_PATH: incremental recompute where it applies on CPUs, full
  # forward passes on GPUs and TPUs), or "incremental" / "full" for every family.
  config.sweep.path = "auto"
  # Optimised masks per image beside the families (cejax.jobs.sweep_optimised): any of
  # "extremal", "ce_optimal", "counterfactual"; TorchRay's areas, iterations and mask
  # step and smoothing at 224 px (scale the last two with the image: 2 and 6.0 at 64 px).
  config.sweep.optimised = ()
  config.sweep.extremal_areas = (0.025, 0.05, 0.1, 0.2)
  config.sweep.extremal_iterations = 800
  config.sweep.extremal_step = 7
  config.sweep.extremal_sigma = 21.0
  config.sweep.counterfactual_bisection = 3  # bisection steps after the area grid
  # Images optimised at a time per device (each with its areas). The masks are the same
  # bits on any mesh at one value; the network's rounding may depend on its batch, so
  # they differ between values at float round-off. Larger is faster on CPUs.
  config.sweep.optimised_batch_size = 1
  return config
