"""Analyzes a trained run and writes a report.

    python analyze.py --config=configs/synthetic.py --workdir=runs/synthetic

For ``--config.analysis.num_images`` test images: CE maps (grid, sliding-window and
RISE masks; expected and per-class estimands; latent CE) and the saliency baselines,
localization and faithfulness metrics, attacks with CE under attack and a detector,
and input-transform defenses. Writes ``report.html``, ``metrics.json`` and CSV tables
to ``--out`` (default ``WORKDIR/analysis``). Per-image results are saved chunk by
chunk, so a killed run resumes where it stopped.
"""

import json
import shutil
from pathlib import Path

from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Run config file.", lock_config=True)
flags.DEFINE_string("workdir", None, "A training workdir (or one written by cejax.convert).")
flags.DEFINE_string("out", "", "Output directory; default WORKDIR/analysis.")
flags.DEFINE_bool("fresh", False, "Discard per-image results of an earlier analysis.")
flags.DEFINE_integer("num_workers", 1, "Processes sharing this analysis (e.g. one per CPU "
                     "core, as XLA:CPU runs each convolution on one thread).")
flags.DEFINE_integer("worker", 0, "This process's index in [0, num_workers): it computes "
                     "chunks c with c % num_workers == worker; whichever worker finds every "
                     "chunk done writes the report.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)
  import jax
  from tqdm import tqdm

  from cejax import analysis, checkpoint, report
  from cejax import config as config_lib
  from cejax.data import pipeline

  config = FLAGS.config
  if "analysis" not in config:
    raise ValueError("The config has no 'analysis' section; see cejax/config.py.")
  config_lib.check_keys(config, config_lib.base_config())
  settings = config.analysis
  out = Path(FLAGS.out or Path(FLAGS.workdir) / "analysis")
  graphdef, params, stats, run = checkpoint.load_model(FLAGS.workdir)
  dataset = pipeline.load_dataset(config.data)
  if dataset.num_classes != run["num_classes"] or dataset.channels != run["in_channels"]:
    raise ValueError(
        f"The data set ({dataset.num_classes} classes, {dataset.channels} channels) does not "
        f"match the model in {FLAGS.workdir} ({run['num_classes']} classes, "
        f"{run['in_channels']} channels).")
  model = analysis.make_model(graphdef, params, stats, run, latent_stage=settings.latent_stage)
  rand = analysis.random_model(run, latent_stage=settings.latent_stage)

  recorded = dict(settings.to_dict(), data=config.data.name, step=run["step"],
                  workdir=str(Path(FLAGS.workdir).resolve()))
  if FLAGS.fresh and FLAGS.num_workers > 1:
    raise ValueError("--fresh with several workers would let one delete another's "
                     "results: clear the output directory once, then start the workers.")
  if FLAGS.fresh and out.exists():
    shutil.rmtree(out / "chunks", ignore_errors=True)
  settings_file = out / "settings.json"
  if settings_file.exists() and (out / "chunks").exists():
    old = json.loads(settings_file.read_text())
    if old != json.loads(json.dumps(recorded)):
      diff = sorted(k for k in set(old) | set(recorded)
                    if old.get(k) != json.loads(json.dumps(recorded)).get(k))
      raise ValueError(f"{out} holds results of different settings ({diff}); pass --fresh "
                       "to discard them or --out for a new directory.")
  checkpoint.write_json_atomic(settings_file, recorded)

  indices = analysis.image_list(dataset, settings.split, settings.num_images)
  size = settings.chunk_size
  mine = sum(len(indices[start:start + size]) for c, start in
             enumerate(range(0, len(indices), size)) if c % FLAGS.num_workers == FLAGS.worker)
  with tqdm(total=mine, unit="image", desc=f"analyze (worker {FLAGS.worker})") as bar:
    paths = analysis.run_chunks(model, rand, dataset, out_dir=out, settings=settings,
                                indices=indices, key=jax.random.key(settings.seed),
                                progress=bar, worker=FLAGS.worker,
                                num_workers=FLAGS.num_workers)
  missing = [p.name for p in paths if not p.exists()]
  if missing:
    print(f"Worker {FLAGS.worker} done; {len(missing)} chunks are other workers' "
          "(the last worker to finish writes the report).")
    return
  results = analysis.load_chunks(paths)
  summary = analysis.summarize(results, settings=settings)
  path = report.write_report(out, results, summary, settings=recorded,
                             class_names=dataset.class_names, run=run)
  ce = summary["methods"].get("ce_sliding", {})
  if ce:
    print(f"CE (sliding) pointing game {ce['pointing'][0]:.3f}, "
          f"Grad-CAM {summary['methods']['grad_cam']['pointing'][0]:.3f} "
          f"over {summary['num_with_box']} boxed images.")
  print(f"Report: {path.resolve()}")


if __name__ == "__main__":
  app.run(main)
