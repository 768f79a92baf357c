"""The analysis behind ``analyze.py``: the configured evaluators over chunks of images,
resumable, then a summary and a report.

Images are processed in chunks of ``analysis.chunk_size``; the evaluators' per-image
results of a chunk (``cejax.jobs.evaluators``) are written atomically to
``<out>/chunks/NNNN.npz`` (``store.save_chunk``: with the chunk's number, image ids,
run and checksum), so a killed run resumes where it stopped, and several processes can
share the chunks (``worker``/``num_workers``). ``<out>/settings.json`` records the run
(``run_identity.run_record``: settings, masks, data, weights, compute, code); a run with
anything else is refused instead of mixing results, and a damaged or foreign chunk is
recomputed. ``summarize`` turns the chunks into
``metrics.json``; ``cejax.report`` draws them.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

from cejax import precision
from cejax.jobs import checkpoint, evaluators, mask_spec, report, run_identity, store
from cejax.jobs import config as config_lib
from cejax.jobs.evaluators import common as ev_common

_log = logging.getLogger(__name__)


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


def build(evaluator_classes, context: ev_common.Context) -> list[Any]:
  """The evaluators, each built once per run (their compiled programs are reused by
  every chunk)."""
  return [cls(context) for cls in evaluator_classes]


def evaluate_chunk(chosen, inputs: ev_common.Inputs, *, key,
                   progress=None) -> dict[str, Any]:
  """Runs ``chosen`` evaluators in order on one chunk; ``{name: result}`` (``"inputs"``
  too)."""
  results: dict[str, Any] = {"inputs": inputs}
  for ev in chosen:
    if progress is not None:
      progress.set_postfix(stage=ev.name)
    results[ev.name] = ev.evaluate(inputs, results, key=key)
    if progress is not None:
      # Dispatch is asynchronous: without waiting, an evaluator's work would run, and be
      # shown, under the next one's name (the optimised masks' minutes as "localization").
      jax.block_until_ready(results[ev.name])
  return results


def chunk_ids(indices: Sequence[tuple[str, int]], positions) -> list[str]:
  """The image ids (``"split/index"``) of the images at ``positions`` of ``indices``."""
  return [f"{indices[i][0]}/{indices[i][1]}" for i in positions]


def run_chunks(chosen, dataset, *, model: ev_common.Model, space, out_dir: Path, settings,
               indices: Sequence[tuple[str, int]], key, identity: str, progress=None,
               worker: int = 0, num_workers: int = 1) -> tuple[list[Path], int]:
  """Analyzes ``indices`` (``(split, index)`` pairs, see ``image_list``) chunk by chunk,
  keeping chunks already on disk that prove to be this run's (``store.check_chunk``:
  readable, checksum, chunk number, image ids, ``identity``) and recomputing, with a
  warning naming the file, any other. Results are numbered by position in
  ``indices``; chunk ``c`` uses the key ``fold_in(key, c)``.

  With ``num_workers > 1`` this process computes only chunks ``c`` with ``c %
  num_workers == worker``.

  Returns:
    The paths of all chunks (every worker's), and how many this call computed.
  """
  if not 0 <= worker < num_workers:
    raise ValueError(f"worker must be in [0, {num_workers}), got {worker}.")
  chunk_dir = Path(out_dir) / "chunks"
  chunk_dir.mkdir(parents=True, exist_ok=True)
  size = settings.chunk_size
  paths = [chunk_dir / f"{c:04d}.npz" for c in store.chunks(len(indices), size)]
  computed = 0
  for c, positions in store.chunks(len(indices), size, worker=worker,
                                    num_workers=num_workers).items():
    path, idx = paths[c], np.asarray(positions)
    ids = chunk_ids(indices, positions)
    why = (store.check_chunk(path, chunk=c, ids=ids, identity=identity)
           if path.exists() else "missing")
    if why is not None:
      if why != "missing":
        _log.warning("Recomputing chunk %d: %s.", c, why)
      # Pad the last chunk by repeating images, so every chunk has one compiled shape.
      batch = _batch(dataset, [indices[i] for i in np.resize(idx, size)])
      inputs = ev_common.prepare_inputs(model, batch, space=space,
                                        index=np.resize(idx, size))
      results = evaluate_chunk(chosen, inputs, key=jax.random.fold_in(key, c),
                               progress=progress)
      store.save_chunk(path, {name: ev_common.to_stored(ev_common.take(r, len(idx)))
                               for name, r in results.items() if r is not None},
                        chunk=c, ids=ids, identity=identity)
      computed += 1
    if progress is not None:
      progress.update(len(idx))
  return paths, computed


def load_results(paths, evaluator_classes, *, indices=None, chunk_size=None,
                 identity=None) -> tuple[ev_common.Inputs, dict[str, Any]]:
  """All chunks' results, concatenated: ``(inputs, {evaluator name: result})``.

  With ``indices``, ``chunk_size`` and ``identity`` (what ``run_chunks`` was given),
  every chunk is verified first (``store.check_chunk``).

  Raises:
    ValueError: a chunk that is damaged or not this run's, naming the file.
  """
  if identity is not None:
    plan = store.chunks(len(indices), chunk_size)
    for path in paths:
      c = int(Path(path).stem)
      why = store.check_chunk(path, chunk=c, ids=chunk_ids(indices, plan[c]),
                               identity=identity)
      if why is not None:
        raise ValueError(f"{why}; rerun the analysis to recompute it.")
  parts = [store.load_tree(p) for p in paths]
  tree = jax.tree.map(lambda *xs: np.concatenate(xs), *parts)
  inputs = ev_common.from_stored(ev_common.Inputs, tree["inputs"])
  results = {cls.name: ev_common.from_stored(cls.result_type, tree[cls.name])
             for cls in evaluator_classes if cls.result_type is not None}
  return inputs, results


def _merge(into: dict, section: Mapping) -> dict:
  for k, v in section.items():
    if isinstance(v, Mapping) and isinstance(into.get(k), dict):
      _merge(into[k], v)
    else:
      into[k] = v
  return into


def summarize(chosen, inputs: ev_common.Inputs,
              results: Mapping[str, Any]) -> dict[str, Any]:
  """``metrics.json``: image counts and accuracy, then each evaluator's section."""
  summary = {"num_images": int(len(inputs.index)),
             "num_with_box": int(inputs.has_box.astype(bool).sum()),
             "clean_accuracy": float(inputs.correct.mean()),
             "methods": {}, "attack_success": {}, "detection": {}, "defenses": {}}
  for ev in chosen:
    _merge(summary, ev.summarize(results, inputs))
  return summary


def analyze(config, workdir: Path, *, out: Path | None = None, fresh: bool = False,
            worker: int = 0, num_workers: int = 1, progress: bool = True,
            explicit_data: Collection[str] | None = None) -> Path | None:
  """Runs the analysis of ``config.analysis`` on the model in ``workdir``.

  Every setting is validated, the data settings are taken from the trained run
  (``run_identity.resolve_data``) and the evaluators are built before anything is written;
  ``<out>/settings.json`` then records the run (``run_identity.run_record``) and a resume
  with anything else is refused, naming each difference.

  Args:
    config: a full cejax config (checked against ``config.base_config()``).
    workdir: a training workdir, or one written by ``cejax.jobs.convert``.
    out: the output directory (default ``workdir/analysis``).
    fresh: discard per-image results of an earlier analysis first.
    worker, num_workers: this process computes chunks ``c % num_workers == worker``.
    progress: show a progress bar.
    explicit_data: the ``config.data`` keys the user set (the command line's); the
      others are taken from the trained run (``run_identity.resolve_data``).

  Returns:
    The report's path, or ``None`` if chunks of other workers are still missing (the
    worker that finds every chunk done writes the report). A run that computed nothing
    leaves an existing report as it is.
  """
  from tqdm import tqdm

  from cejax.data import pipeline

  config_lib.validate(config, "analysis")  # the whole config, once, before anything else
  settings = config.analysis
  chosen_classes = evaluators.select(settings.evaluators)
  out = Path(out or Path(workdir) / "analysis")
  dtype = precision.compute_dtype(config.precision)
  graphdef, params, stats, run = checkpoint.load_model(workdir, compute_dtype=dtype)
  data = run_identity.resolve_data(config.data, run.get("data"),
                             base=config_lib.base_config().data,
                             allow_other=config.data.other_than_trained,
                             explicit=explicit_data)
  dataset = pipeline.load_dataset(data)
  if dataset.num_classes != run["num_classes"] or dataset.channels != run["in_channels"]:
    raise ValueError(
        f"The data set ({dataset.num_classes} classes, {dataset.channels} channels) does not "
        f"match the model in {workdir} ({run['num_classes']} classes, "
        f"{run['in_channels']} channels).")
  indices = image_list(dataset, settings.split, settings.num_images)
  if not indices:
    raise ValueError(f"Split {settings.split!r} of {data.name} has no images.")
  shape = dataset.batch(indices[0][0], [indices[0][1]])["image"].shape[1:3]
  # A fact of the data, not the config; the patch subsets only where a method uses them.
  patches = ("patches",) if "patches" in evaluators.families_of(settings.methods) else ()
  mask_spec.check_fits(config.masks, shape, families=("grid", "sliding", "rise", *patches))
  box_shape = ev_common.mean_box_shape(
      (_batch(dataset, indices[i:i + 256]) for i in range(0, len(indices), 256)), shape)

  model = ev_common.make_model(graphdef, params, stats, run,
                               latent_stage=settings.latent_stage)
  evaluators.check_for_model(chosen_classes, model, methods=settings.methods,
                             mask_spec=config.masks, shape=shape)  # facts of the run
  rand = (ev_common.random_model(dict(run, dtype=dtype), latent_stage=settings.latent_stage)
          if evaluators.SanityEvaluator in chosen_classes else None)
  space = ev_common.pixel_space(dataset.normalization)
  chosen = build(chosen_classes, ev_common.Context(
      model=model, settings=settings, space=space, masks=config.masks, random_model=rand,
      box_shape=box_shape, optimised=config.optimised))
  optimised = set(settings.methods) & set(evaluators.OPTIMISED_METHODS)
  job = dict(settings.to_dict(), **(
      {"optimised_settings": config.optimised.to_dict()} if optimised else {}))
  record = run_identity.run_record(
      job=job, masks=config.masks.to_dict(), data=data, dataset=dataset,
      weights=run_identity.weights_fingerprint(params, stats), step=run["step"],
      compute={"precision": config.precision, "compute_dtype": dtype,
               "batch_size": settings.batch_size})
  store.record_settings(out, record, fresh=fresh, num_workers=num_workers)
  identity = run_identity.identity_of(record)
  mine = store.chunks(len(indices), settings.chunk_size, worker=worker,
                       num_workers=num_workers)
  with tqdm(total=sum(map(len, mine.values())), unit="image", desc=f"analyze (worker {worker})",
            disable=not progress) as bar, precision.policy(config.precision):
    paths, computed = run_chunks(
        chosen, dataset, model=model, space=space, out_dir=out, settings=settings,
        indices=indices, key=jax.random.key(settings.seed), identity=identity, progress=bar,
        worker=worker, num_workers=num_workers)
  if not all(p.exists() for p in paths):
    return None
  if not computed and (out / "metrics.json").exists():
    _log.warning("Every chunk was already done; %s is left as it was.", out / "metrics.json")
    return out / "report.html"
  inputs, results = load_results(paths, chosen_classes, indices=indices,
                                 chunk_size=settings.chunk_size, identity=identity)
  summary = summarize(chosen, inputs, results)
  return report.write_report(out, inputs, results, summary,
                             settings=dict(settings.to_dict(), data=data.name),
                             class_names=dataset.class_names, run=run)
