"""Dataset-scale CE sweeps: CE maps for every image of a split, on every device of
every host.

    python -m cejax.jobs.sweep --config=configs/sweep.py --workdir=runs/synthetic

For each image: the CE map of every configured mask family (``grid``, ``sliding``,
``rise``; their sizes from ``config.masks``) x intervention (pixel fills; on a ViT run
also the token interventions ``token_drop`` and ``attention_mask``, on masks of whole
patches: ``plan.token_forwards``) x estimand, for the
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

Output (``<out>``, default ``<workdir>/sweep``): ``settings.json``, the run's record
(``jobs.run_identity.run_record``: the sweep's settings, the masks, every data setting
that decides the images, the weights' fingerprint, the resolved batch, precision and
paths, the code version), and one ``chunks/NNNNN.npz`` per chunk, written atomically
(``jobs.store.save_chunk``: the arrays plus a JSON structure, readable with numpy
alone, and a record of the chunk's number, image ids, run and checksum): ``ids``
(``"split/index"``) and ``maps[family][intervention][estimand]`` of shape ``(n, h, w)``
(``(n, h, w, k)`` for ``targets="all"``), and ``effects`` likewise ``(n, m[, k])`` with
``save_effects``, and with ``config.sweep.optimised`` the optimised masks of the chunk's
images (``optimised``: extremal perturbations, CE-optimal masks, minimal counterfactual
regions; ``jobs.sweep.optimised``). Chunks are named by chunk, not by process, so a
killed run resumes where it stopped with any number of processes; a resume verifies
every chunk on disk and recomputes a damaged or foreign one (with a warning naming it);
settings that differ from the recorded ones are refused, naming each, unless
``--fresh``. Data settings come from the trained run's ``run.json``
(``jobs.run_identity.resolve_data``). Each process that computed anything appends its
throughput to ``throughput-pN.jsonl``. ``load(out)`` reads the results back by image id,
verifying every chunk."""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Collection
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from cejax import precision, sharding
from cejax.jobs import checkpoint, cli, mask_spec, run_identity, store, throughput
from cejax.jobs import config as config_lib
from cejax.jobs.sweep import optimised as sweep_optimised
from cejax.jobs.sweep import plan as sweep_plan

_log = logging.getLogger(__name__)

@dataclasses.dataclass(frozen=True)
class _Job:
  """A sweep resolved and validated before anything is written."""

  out: Path
  record: dict[str, Any]
  settings: Any  # config.sweep with batch_size resolved
  dataset: Any
  num_images: int
  sources: dict[str, Any]
  forward_of: dict[str, Any]
  token_of: dict[str, Any]  # a ViT's token interventions: their forwards
  paths: dict[str, dict[str, str]]
  flops: dict[str, dict[str, Any]]
  activation: str
  logits_fn: Any  # the full forward (the optimised masks' network)
  optimised: Any  # config.optimised


def _read_record(out: Path) -> dict[str, Any] | None:
  path = out / "settings.json"
  return json.loads(path.read_text()) if path.exists() else None


def _prepare(config, workdir: Path, out: Path, devices, explicit_data) -> _Job:
  """Validates every setting, loads the model and data, builds the masks, picks the
  paths and resolves ``batch_size="auto"``: a start that fails here writes nothing."""
  from cejax.data import pipeline

  config_lib.validate(config, "sweep")  # the whole config, once, before anything else
  # The settings the job hands down: the sweep's section with the one precision.
  s = ml_collections.ConfigDict(dict(config.sweep.to_dict(), precision=config.precision))
  graphdef, params, stats, run_info = checkpoint.load_model(
      workdir, compute_dtype=precision.compute_dtype(s.precision))
  data = run_identity.resolve_data(config.data, run_info.get("data"),
                             base=config_lib.base_config().data,
                             allow_other=config.data.other_than_trained,
                             explicit=explicit_data)
  dataset = pipeline.load_dataset(data)
  if dataset.num_classes != run_info["num_classes"]:
    raise ValueError(f"The data set has {dataset.num_classes} classes but the model in "
                     f"{workdir} has {run_info['num_classes']}.")
  count = dataset.num_examples(s.split)
  if count == 0:
    raise ValueError(f"Split {s.split!r} of {data.name} has no images.")
  num = count if s.num_images == 0 else min(s.num_images, count)
  image = jnp.asarray(dataset.batch(s.split, [0])["image"][0])
  # A fact of the data, not the config.
  mask_spec.check_fits(config.masks, image.shape[:2], families=s.families)
  sources = sweep_plan.mask_sources(config, image.shape[:2])
  model = nnx.merge(graphdef, params, stats)
  logits_fn = checkpoint.make_logits_fn(graphdef, params, stats)
  forward_of, paths = sweep_plan.forwards(logits_fn, model, image.shape, s, sources,
                                          platform=devices[0].platform)
  token_of = sweep_plan.token_forwards(model, s.interventions, sources)
  activation = checkpoint.activation_of(run_info)
  batch = sweep_plan.resolve_batch(forward_of, image, sources, settings=s, token_of=token_of,
                                   activation=activation, num_devices=len(devices),
                                   recorded=_read_record(out))
  job = dict(config.sweep.to_dict(), **(
      {"optimised_settings": config.optimised.to_dict()} if s.optimised else {}))
  record = run_identity.run_record(
      job=job, masks=config.masks.to_dict(), data=data, dataset=dataset,
      weights=run_identity.weights_fingerprint(params, stats), step=run_info["step"],
      compute={"precision": s.precision, "compute_dtype": precision.compute_dtype(
          s.precision), "batch_size": batch, "paths": paths,
          # Token interventions take the token forward whatever the family's path.
          **({"token_forwards": {n: sweep_plan.TOKEN_INTERVENTIONS[n] for n in token_of}}
             if token_of else {})})
  return _Job(out=out, record=record, optimised=config.optimised,
              settings=ml_collections.ConfigDict(dict(s.to_dict(), batch_size=batch)),
              dataset=dataset, num_images=num, sources=sources, forward_of=forward_of,
              token_of=token_of,
              paths=paths, activation=activation, logits_fn=logits_fn,
              flops=sweep_plan.flops_per_mask(logits_fn, model, image, sources, paths))


def _chunk_ids(split: str, positions) -> list[str]:
  return [f"{split}/{i}" for i in positions]


def run(config, workdir: Path, *, out: Path | None = None, fresh: bool = False,
        devices=None, progress: bool = True,
        explicit_data: Collection[str] | None = None) -> dict[str, Any]:
  """Runs the sweep of ``config.sweep`` on the model in ``workdir`` (this process's
  share of the chunks).

  Everything is validated and resolved before anything is written (``_prepare``);
  chunks already on disk are verified (``store.check_chunk``) and kept, and a damaged
  or foreign one is recomputed with a warning naming it. The data settings are the
  trained run's, except those in ``explicit_data`` (the command line's ``config.data``
  keys; None: those that differ from the defaults), see ``run_identity.resolve_data``.

  Returns:
    This process's throughput summary, also appended to ``<out>/throughput-pN.jsonl``
    when the run computed anything (a resume that finds every chunk done leaves the
    records of the runs that did alone).
  """
  from tqdm import tqdm

  devices = list(jax.local_devices() if devices is None else devices)
  out = Path(out or Path(workdir) / "sweep")
  job = _prepare(config, Path(workdir), out, devices, explicit_data)
  s = job.settings
  process, processes = jax.process_index(), jax.process_count()
  store.record_settings(out, job.record, fresh=fresh, num_workers=processes)
  identity = run_identity.identity_of(job.record)
  mesh = sharding.mask_mesh(devices) if len(devices) > 1 else None
  chunk_dir = out / "chunks"
  chunk_dir.mkdir(parents=True, exist_ok=True)
  mine = store.chunks(job.num_images, s.chunk_size, worker=process, num_workers=processes)
  masks_per_image = len(s.interventions) * sum(src.num for src in job.sources.values())
  flops_per_image = len(s.interventions) * sum(
      src.num * job.flops[f]["flops"] for f, src in job.sources.items())
  done_masks = done_flops = 0
  optimised_s = 0.0  # time in the optimised masks, apart from the families' rate
  computed, recomputed, first_chunk_s, first_masks = 0, [], None, 0
  computed_images, first_optimised_s = 0, 0.0
  bar = tqdm(total=sum(map(len, mine.values())), unit="image",
             desc=f"sweep (process {process})", position=process, disable=not progress)
  t_start = time.perf_counter()
  for c, positions in mine.items():
    path, idx = chunk_dir / f"{c:05d}.npz", list(positions)
    ids = _chunk_ids(s.split, idx)
    if path.exists():
      why = store.check_chunk(path, chunk=c, ids=ids, identity=identity)
      if why is None:
        bar.update(len(idx))
        continue
      _log.warning("Recomputing chunk %d: %s.", c, why)
      recomputed.append(path.name)
    try:
      images = job.dataset.batch(s.split, idx)["image"]
    except Exception as e:  # a corrupt record: name it, lose nothing already written
      raise ValueError(f"Could not read images {idx[0]}..{idx[-1]} of split {s.split!r} "
                       f"({type(e).__name__}: {e}).") from e
    with precision.policy(s.precision):
      per_image = [sweep_plan.image_results(job.forward_of, jnp.asarray(x), settings=s,
                                 sources=job.sources, activation=job.activation,
                                 num_classes=job.dataset.num_classes, mesh=mesh,
                                 token_of=job.token_of)
                   for x in images]
    tree = jax.tree.map(lambda *a: np.stack(a), *per_image)
    if s.optimised:
      t_optimised = time.perf_counter()
      with precision.policy(s.precision):
        tree["optimised"] = sweep_optimised.chunk_results(
            job.logits_fn, images, settings=s, optimised=job.optimised,
            fills=sweep_plan.interventions_of(s),
            activation=job.activation, mesh=mesh)
      optimised_s += time.perf_counter() - t_optimised
    tree["ids"] = np.asarray(ids)
    store.save_chunk(path, tree, chunk=c, ids=ids, identity=identity)
    computed += 1
    done_masks += len(idx) * masks_per_image
    done_flops += len(idx) * flops_per_image
    computed_images += len(idx)
    if first_chunk_s is None:  # the first chunk also pays for compilation
      first_chunk_s, first_masks = time.perf_counter() - t_start, done_masks
      first_optimised_s = optimised_s
    bar.update(len(idx))
    # The rate the summary reports: every mask this process computed, over its time
    # (less the optimised masks').
    family_s = time.perf_counter() - t_start - optimised_s
    bar.set_postfix(masks_per_s=f"{done_masks / family_s:.1f}")
  bar.close()
  elapsed = time.perf_counter() - t_start
  summary = {
      "identity": identity, "process": process, "processes": processes,
      "devices": len(devices), "device_kind": devices[0].device_kind,
      "batch_size": s.batch_size, "precision": s.precision, "paths": job.paths,
      "images": job.num_images, "chunks": len(mine), "chunks_computed": computed,
      "chunks_recomputed": recomputed, "masks_computed": done_masks, "seconds": elapsed,
      # The families' rate leaves out the optimised masks' time (reported apart).
      "masks_per_s": done_masks / (elapsed - optimised_s) if done_masks else 0.0,
      "optimised": list(s.optimised), "optimised_seconds": optimised_s,
      "optimised_images_per_s": (computed_images / optimised_s if optimised_s else None),
      # Without the first chunk (compilation): the steady rate, with two chunks or more.
      "steady_masks_per_s": ((done_masks - first_masks)
                             / (elapsed - first_chunk_s - (optimised_s - first_optimised_s))
                             if computed > 1 and done_masks else None),
      "flops_per_mask": job.flops,
      "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
  if job.token_of:
    # A token intervention's masked pass costs what its kept tokens cost: the full
    # forward's FLOPs would overstate it.
    summary["flops_note"] = ("not counted: token interventions compute fewer FLOPs per "
                             "mask than the full forward pass")
  elif done_masks:
    family_s = elapsed - optimised_s
    peak = throughput.matmul_peak(devices)
    summary.update(gflops_per_s=done_flops / family_s / 1e9, peak_gflops_per_s=peak / 1e9,
                   fraction_of_peak=done_flops / family_s / peak)
  if computed:
    store.append_json_line(out / f"throughput-p{process}.jsonl", summary)
  return summary


@dataclasses.dataclass(frozen=True)
class SweepResults:
  """A sweep read back: ``ids`` in image order and the nested ``maps`` (and
  ``effects``), each array with a leading image axis."""

  ids: list[str]
  maps: dict[str, Any]
  effects: dict[str, Any] | None
  settings: dict[str, Any]
  optimised: dict[str, Any] | None = None  # cejax.jobs.sweep.optimised.chunk_results

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

  Every chunk is verified against the directory's ``settings.json``: its checksum, its
  chunk number (the file name's), the image ids the chunk plan assigns it, and the run
  it belongs to.

  Raises:
    ValueError: no sweep there, or a chunk that is damaged or not this run's (naming
      the file and what is wrong).
  """
  out = Path(out)
  record = _read_record(out)
  if record is None:
    raise ValueError(f"{out} holds no sweep (no settings.json).")
  if "job" not in record:
    raise ValueError(f"{out}/settings.json was written by an older cejax; rerun the sweep "
                     "with --fresh.")
  job = record["job"]
  count = record["data"]["split_sizes"][job["split"]]
  num = count if job["num_images"] == 0 else min(job["num_images"], count)
  plan = store.chunks(num, job["chunk_size"])
  identity = run_identity.identity_of(record)
  paths = sorted((out / "chunks").glob("*.npz"))
  if not paths:
    raise ValueError(f"{out} holds no finished chunks yet.")
  parts = []
  for path in paths:
    c = int(path.stem) if path.stem.isdigit() else -1
    if c not in plan:
      raise ValueError(f"{path} is not a chunk of this sweep (its chunks are "
                       f"00000..{len(plan) - 1:05d}.npz).")
    why = store.check_chunk(path, chunk=c, ids=_chunk_ids(job["split"], plan[c]),
                             identity=identity)
    if why is not None:
      raise ValueError(f"{why}; delete it (or rerun the sweep, which recomputes it).")
    parts.append(store.load_tree(path))
  tree = jax.tree.map(lambda *a: np.concatenate(a), *parts)
  return SweepResults(ids=[str(i) for i in tree["ids"]], maps=tree["maps"],
                      effects=tree.get("effects"), settings=record,
                      optimised=tree.get("optimised"))


def main(argv=None) -> None:
  import os
  import sys

  from absl import app, flags, logging
  from ml_collections import config_flags

  argv_ = sys.argv if argv is None else argv
  config_lib.check_argv(argv_)
  flags_ = flags.FLAGS
  keys = ", ".join(f"{k} ({v!r})" for k, v in config_lib.base_config().sweep.items())
  config_flags.DEFINE_config_file(
      "config", None, "Run config file; any field can be set as --config.section.key=VALUE. "
      f"The sweep's keys (config.sweep) and defaults: {keys}. Mask sizes: config.masks; "
      "every key: cejax/jobs/config.py.", lock_config=True)
  flags.DEFINE_string("workdir", None, "A training workdir (or one from cejax.jobs.convert).")
  flags.DEFINE_string("out", "", "Output directory; default WORKDIR/sweep.")
  flags.DEFINE_bool("fresh", False, "Discard the chunks of an earlier sweep.")
  flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() first (TPU "
                    "pods, SLURM, Open MPI detect the cluster themselves).")
  flags.DEFINE_string("coordinator_address", "", "host:port of process 0, for a cluster "
                      "JAX does not detect (with --num_processes and --process_id).")
  flags.DEFINE_integer("num_processes", 0, "Processes in all (explicit coordinator).")
  flags.DEFINE_integer("process_id", -1, "This process's index (explicit coordinator).")
  flags.DEFINE_integer("cpu_devices", 0, "CPU devices of this process (XLA:CPU runs each "
                       "convolution on one thread); 0: one per core it may run on, unless "
                       "XLA_FLAGS sets a device count. Ignored by GPU and TPU runs.")
  flags.mark_flags_as_required(["config", "workdir"])

  @cli.user_errors_exit
  def _main(args):
    if len(args) > 1:
      raise app.UsageError(f"Unexpected arguments: {args[1:]}")
    logging.set_verbosity(logging.WARNING)  # Orbax logs every restore at INFO
    if "device_count" not in os.environ.get("XLA_FLAGS", ""):  # before JAX starts
      jax.config.update("jax_num_cpu_devices",
                        flags_.cpu_devices or len(os.sched_getaffinity(0)))
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
      try:
        jax.distributed.initialize()
      except (ValueError, RuntimeError) as e:
        raise app.UsageError(
            f"--distributed found no cluster to join ({e}). JAX detects TPU pods, SLURM "
            "and Open MPI by themselves; elsewhere pass --coordinator_address=HOST:PORT "
            "--num_processes=N --process_id=I instead.") from None
    summary = run(flags_.config, Path(flags_.workdir), out=flags_.out or None,
                  fresh=flags_.fresh, explicit_data=config_lib.explicit_keys(argv_, "data"))
    print(json.dumps(summary, indent=2))

  cli.run_app(_main, argv)





__all__ = ["SweepResults", "load", "main", "run"]
