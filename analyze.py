"""Analyzes a trained run and writes a report.

    python analyze.py --config=configs/synthetic.py --workdir=runs/synthetic

Runs the evaluators of ``config.analysis.evaluators`` (``cejax.jobs.evaluators``: CE maps
and saliency baselines, localization and faithfulness, the sanity check, attacks, the
adversarial-image detector, input-transform defenses) on ``--config.analysis.
num_images`` images and writes ``report.html``, ``metrics.json`` and CSV tables to
``--out`` (default ``WORKDIR/analysis``). Per-image results are saved chunk by chunk,
so a killed run resumes where it stopped. This file only parses flags; the logic is
``cejax.analysis.analyze``.
"""

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from cejax.jobs import cli
from cejax.jobs import config as config_lib

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Run config file.", lock_config=True)
flags.DEFINE_string("workdir", None,
                    "A training workdir (or one written by cejax.jobs.convert).")
flags.DEFINE_string("out", "", "Output directory; default WORKDIR/analysis.")
flags.DEFINE_bool("fresh", False, "Discard per-image results of an earlier analysis.")
flags.DEFINE_integer("num_workers", 1, "Processes sharing this analysis (e.g. one per CPU "
                     "core, as XLA:CPU runs each convolution on one thread).")
flags.DEFINE_integer("worker", 0, "This process's index in [0, num_workers): it computes "
                     "chunks c with c % num_workers == worker; whichever worker finds every "
                     "chunk done writes the report.")
flags.mark_flags_as_required(["config", "workdir"])


@cli.user_errors_exit
def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)
  from cejax.jobs import analysis

  path = analysis.analyze(FLAGS.config, FLAGS.workdir, out=FLAGS.out or None,
                          fresh=FLAGS.fresh, worker=FLAGS.worker,
                          num_workers=FLAGS.num_workers,
                          explicit_data=config_lib.explicit_keys(sys.argv, "data"))
  if path is None:
    print(f"Worker {FLAGS.worker} done; other workers' chunks are still missing (the "
          "last worker to finish writes the report).")
  else:
    print(f"Report: {path.resolve()}")


if __name__ == "__main__":
  cli.run_app(main)  # names a mistyped --config.x.y; --help exits with 0
