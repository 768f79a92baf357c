"""Dataset-scale CE sweeps: CE maps for every image of a split, on every device of
every host.

    python -m cejax.jobs.sweep --config=configs/sweep.py --workdir=runs/synthetic

For each image: the CE map of every configured mask family (``grid``, ``sliding``,
``rise``; their sizes from ``config.masks``) x intervention x estimand, for the
predicted class or for every class / finding (``targets="all"``), all estimands and
targets from the same forward passes (one stacked estimand), and optionally the raw
per-mask effects.

Work distribution. Images are cut into chunks of ``sweep.chunk_size``; process ``p`` of
``P`` (``jax.process_index()`` / ``jax.process_count()``: call
``jax.distributed.initialize`` first, or pass ``--distributed``) computes the chunks
``c`` with ``c % P == p`` and reads only their images. Within a process, each image's
masks are sharded over its local devices (``sharding.mask_mesh(jax.local_devices())``,
``jax.shard_map``). A mask's effect does not depend on which device or process
computes it, so the maps are bit-identical whatever the device and process count.

Output (``<out>``, default ``<workdir>/sweep``): ``settings.json`` and one
``chunks/NNNNN.npz`` per chunk, written atomically (``jobs.common.save_tree``: the arrays
plus a JSON structure, readable with numpy alone): ``ids`` (``"split/index"``) and
``maps[family][intervention][estimand]`` of shape ``(n, h, w)`` (``(n, h, w, k)`` for
``targets="all"``), and ``effects`` likewise ``(n, m[, k])`` with ``save_effects``.
Chunks are named by chunk, not by process, so a killed run resumes where it stopped
with any number of processes; settings that differ from the recorded ones are refused
unless ``--fresh``. ``load(out)`` reads the results back by image id.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from cejax import effects, incremental, interventions, precision, sharding
from cejax.estimands import ESTIMANDS, activate
from cejax.jobs import checkpoint, common, throughput
from cejax.jobs import config as config_lib

FAMILIES = common.MASK_FAMILIES
SWEEP_INTERVENTIONS = ("zero", "mean", "blur")
TARGETS = ("predicted", "all")
PATHS = ("auto", "incremental", "full")
# The forward a family takes under path="auto", per platform, and why. CPUs: measured
# (benchmarks/RESULTS.md, DenseNet-121, 10 x 10 grid, 2 cores: 1.56x the full forward at
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


def check_settings(s) -> None:
  """Raises ``ValueError`` naming the bad ``sweep`` key and the valid values."""
  for key, got, valid in (("families", s.families, FAMILIES),
                          ("interventions", s.interventions, SWEEP_INTERVENTIONS),
                          ("estimands", s.estimands, ESTIMANDS)):
    bad = [g for g in got if g not in valid]
    if bad or not got:
      raise ValueError(f"config.sweep.{key} has {bad or 'nothing'}; valid are {valid}.")
  if s.targets not in TARGETS:
    raise ValueError(f"config.sweep.targets is {s.targets!r}; valid are {TARGETS}.")
  if s.batch_size != "auto" and (not isinstance(s.batch_size, int) or s.batch_size < 1):
    raise ValueError(f"config.sweep.batch_size must be a positive int or 'auto', got "
                     f"{s.batch_size!r}.")
  try:
    precision.check(s.precision)
  except ValueError as e:
    raise ValueError(f"config.sweep.precision: {e}") from None
  if s.path not in PATHS:
    raise ValueError(f"config.sweep.path is {s.path!r}; valid are {PATHS}.")
  if s.chunk_size < 1:
    raise ValueError(f"config.sweep.chunk_size must be >= 1, got {s.chunk_size}.")


def mask_sources(config, shape) -> dict[str, Any]:
  """The mask sources of ``config.sweep.families`` for images of ``shape`` (sizes from
  ``config.masks``; ``config.sweep.seed`` draws the RISE masks)."""
  return common.mask_sources(config.masks, shape, key=jax.random.key(config.sweep.seed),
                             families=config.sweep.families)


def _interventions(s):
  return {"zero": "zero", "mean": "mean", "blur": interventions.Blur(sigma=s.blur_sigma)}


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
                  mesh=None) -> dict[str, Any]:
  """One image's maps (and effects): ``{"maps": {family: {intervention: {estimand:
  array}}}, "effects": ...}``; family ``f`` is computed with the forward
  ``forward_of[f]`` (``forwards``)."""
  s = settings
  stacked = StackedEstimand(tuple(s.estimands), all_targets=s.targets == "all")
  widths = stacked.widths(num_classes)
  fills = _interventions(s)

  def by_estimand(values):  # (..., V) -> {estimand: (...) or (..., k)}
    parts = np.split(np.asarray(values), np.cumsum(widths)[:-1], axis=-1)
    return {e: p[..., 0] if w == 1 else p
            for e, p, w in zip(stacked.names, parts, widths, strict=True)}

  maps, raw = {}, {}
  for family, source in sources.items():
    maps[family], raw[family] = {}, {}
    for name in s.interventions:
      res = effects.causal_effect(forward_of[family], image, source,
                                  intervention=fills[name], estimand=stacked,
                                  batch_size=s.batch_size, activation=activation, mesh=mesh)
      # On the host first: the map is then one program on one device whatever the mesh
      # (a replicated input would make it an SPMD program with another reduction order).
      per_mask = np.asarray(res.effects)
      maps[family][name] = by_estimand(
          effects.ce_map(per_mask, source, batch_size=s.batch_size))  # from (h, w, V)
      if s.save_effects:
        raw[family][name] = by_estimand(per_mask)
  return {"maps": maps, "effects": raw} if s.save_effects else {"maps": maps}


def model_fingerprint(params, stats) -> str:
  """A short hash of the weights (a workdir's results are tied to one model)."""
  digest = hashlib.sha256()
  for leaf in jax.tree.leaves((params, stats)):
    digest.update(np.ascontiguousarray(np.asarray(leaf)).tobytes())
  return digest.hexdigest()[:16]


def run(config, workdir: Path, *, out: Path | None = None, fresh: bool = False,
        devices=None, progress: bool = True) -> dict[str, Any]:
  """Runs the sweep of ``config.sweep`` on the model in ``workdir`` (this process's
  share of the chunks). Returns this process's throughput summary (also written to
  ``<out>/throughput-pN.json``)."""
  from tqdm import tqdm

  from cejax.data import pipeline

  config_lib.check_keys(config, config_lib.base_config())
  s = config.sweep
  check_settings(s)
  common.check_mask_spec(config.masks)
  out = Path(out or Path(workdir) / "sweep")
  graphdef, params, stats, run_info = checkpoint.load_model(
      workdir, compute_dtype=precision.compute_dtype(s.precision))
  logits_fn = checkpoint.make_logits_fn(graphdef, params, stats)
  model = nnx.merge(graphdef, params, stats)
  dataset = pipeline.load_dataset(config.data)
  if dataset.num_classes != run_info["num_classes"]:
    raise ValueError(f"The data set has {dataset.num_classes} classes but the model in "
                     f"{workdir} has {run_info['num_classes']}.")
  recorded = dict(s.to_dict(), masks=config.masks.to_dict(), data=config.data.name,
                  image_size=config.data.image_size,
                  model=model_fingerprint(params, stats), step=run_info["step"])
  process, processes = jax.process_index(), jax.process_count()
  common.record_settings(out, recorded, fresh=fresh, num_workers=processes)
  devices = list(jax.local_devices() if devices is None else devices)
  mesh = sharding.mask_mesh(devices) if len(devices) > 1 else None
  count = dataset.num_examples(s.split)
  num = count if s.num_images <= 0 else min(s.num_images, count)
  chunk_dir = out / "chunks"
  chunk_dir.mkdir(parents=True, exist_ok=True)
  mine = common.chunks(num, s.chunk_size, worker=process, num_workers=processes)
  activation = checkpoint.activation_of(run_info)
  sources = paths = forward_of = None
  done_masks, t_start, t_steady, steady_masks = 0, time.perf_counter(), None, 0
  bar = tqdm(total=sum(map(len, mine.values())), unit="image",
             desc=f"sweep (process {process})", position=process, disable=not progress)
  flops = None
  for c, positions in mine.items():
    path = chunk_dir / f"{c:05d}.npz"
    idx = list(positions)
    if path.exists():
      bar.update(len(idx))
      continue
    try:
      images = dataset.batch(s.split, idx)["image"]
    except Exception as e:  # a corrupt record: name it, lose nothing already written
      raise ValueError(f"Could not read images {idx[0]}..{idx[-1]} of split {s.split!r} "
                       f"({type(e).__name__}: {e}).") from e
    if sources is None:
      sources = mask_sources(config, images.shape[1:3])
      forward_of, paths = forwards(logits_fn, model, images.shape[1:], s, sources,
                                   platform=devices[0].platform)
      flops = throughput.forward_flops(logits_fn, jnp.asarray(images[0]))
      if s.batch_size == "auto":
        batch = throughput.auto_batch_size(logits_fn, images.shape[1:],
                                budget_bytes=s.memory_budget_gb * 2**30,
                                limit=max(m.num for m in sources.values()))
        s = ml_collections.ConfigDict(dict(s.to_dict(), batch_size=batch))
    with precision.policy(s.precision):
      per_image = [image_results(forward_of, jnp.asarray(x), settings=s, sources=sources,
                                 activation=activation, num_classes=dataset.num_classes,
                                 mesh=mesh) for x in images]
    tree = jax.tree.map(lambda *a: np.stack(a), *per_image)
    tree["ids"] = np.asarray([f"{s.split}/{i}" for i in idx])
    common.save_tree(path, tree)
    n_masks = len(idx) * len(s.interventions) * sum(src.num for src in sources.values())
    done_masks += n_masks
    if t_steady is None:  # the first chunk pays for compilation
      t_steady = time.perf_counter()
    else:
      steady_masks += n_masks
    bar.update(len(idx))
    bar.set_postfix(masks_per_s=f"{done_masks / (time.perf_counter() - t_start):.1f}")
  bar.close()
  elapsed = time.perf_counter() - t_start
  steady = time.perf_counter() - t_steady if t_steady is not None else 0.0
  rate = steady_masks / steady if steady_masks else (done_masks / elapsed if elapsed else 0.)
  summary = {"process": process, "processes": processes, "devices": len(devices),
             "batch_size": s.batch_size, "precision": s.precision,
             "device_kind": devices[0].device_kind, "images": num, "chunks": len(mine),
             "masks_computed": done_masks, "seconds": elapsed,
             "masks_per_s": rate, "forward_flops": flops,
             "paths": paths if sources is not None else None}
  if flops and done_masks:
    peak = throughput.matmul_peak(devices)
    summary.update(gflops_per_s=rate * flops / 1e9, peak_gflops_per_s=peak / 1e9,
                   fraction_of_peak=rate * flops / peak)
  common.write_json_atomic(out / f"throughput-p{process}.json", summary)
  return summary


@dataclasses.dataclass(frozen=True)
class SweepResults:
  """A sweep read back: ``ids`` in image order and the nested ``maps`` (and
  ``effects``), each array with a leading image axis."""

  ids: list[str]
  maps: dict[str, Any]
  effects: dict[str, Any] | None
  settings: dict[str, Any]

  def by_id(self, image_id: str) -> dict[str, Any]:
    """``maps[family][intervention][estimand]`` of one image."""
    try:
      i = self.ids.index(image_id)
    except ValueError:
      raise KeyError(f"No image {image_id!r} in this sweep ({len(self.ids)} images, e.g. "
                     f"{self.ids[:3]}).") from None
    return jax.tree.map(lambda a: a[i], self.maps)


def load(out: Path) -> SweepResults:
  """The results of a sweep directory (all chunks written so far, in image order).

  Raises:
    ValueError: no sweep there, or a corrupt chunk (naming the file).
  """
  out = Path(out)
  if not (out / "settings.json").exists():
    raise ValueError(f"{out} holds no sweep (no settings.json).")
  paths = sorted((out / "chunks").glob("*.npz"))
  if not paths:
    raise ValueError(f"{out} holds no finished chunks yet.")
  parts = [common.load_tree(p) for p in paths]
  tree = jax.tree.map(lambda *a: np.concatenate(a), *parts)
  return SweepResults(ids=[str(i) for i in tree["ids"]], maps=tree["maps"],
                      effects=tree.get("effects"),
                      settings=json.loads((out / "settings.json").read_text()))


def main(argv=None) -> None:
  from absl import app, flags, logging
  from ml_collections import config_flags

  flags_ = flags.FLAGS
  config_flags.DEFINE_config_file("config", None, "Run config file.", lock_config=True)
  flags.DEFINE_string("workdir", None, "A training workdir (or one from cejax.jobs.convert).")
  flags.DEFINE_string("out", "", "Output directory; default WORKDIR/sweep.")
  flags.DEFINE_bool("fresh", False, "Discard the chunks of an earlier sweep.")
  flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() first (TPU "
                    "pods, SLURM, Open MPI detect the cluster themselves).")
  flags.DEFINE_string("coordinator_address", "", "host:port of process 0, for a cluster "
                      "JAX does not detect (with --num_processes and --process_id).")
  flags.DEFINE_integer("num_processes", 0, "Processes in all (explicit coordinator).")
  flags.DEFINE_integer("process_id", -1, "This process's index (explicit coordinator).")
  flags.mark_flags_as_required(["config", "workdir"])

  def _main(args):
    if len(args) > 1:
      raise app.UsageError(f"Unexpected arguments: {args[1:]}")
    logging.set_verbosity(logging.WARNING)  # Orbax logs every restore at INFO
    if flags_.coordinator_address:
      if flags_.num_processes < 1 or not 0 <= flags_.process_id < flags_.num_processes:
        raise app.UsageError("--coordinator_address needs --num_processes >= 1 and "
                             "0 <= --process_id < --num_processes.")
      # CPU processes talk over gloo (GPU/TPU backends ignore this setting).
      jax.config.update("jax_cpu_collectives_implementation", "gloo")
      jax.distributed.initialize(coordinator_address=flags_.coordinator_address,
                                 num_processes=flags_.num_processes,
                                 process_id=flags_.process_id)
    elif flags_.distributed:
      jax.distributed.initialize()
    summary = run(flags_.config, Path(flags_.workdir), out=flags_.out or None,
                  fresh=flags_.fresh)
    print(json.dumps(summary, indent=2))

  app.run(_main, argv=argv)


if __name__ == "__main__":
  main()


__all__ = ["AUTO_PATH", "FAMILIES", "PATHS", "StackedEstimand", "SweepResults",
           "check_settings", "forwards", "image_results", "load", "main", "mask_sources",
           "model_fingerprint", "run"]
