"""Trains a DenseNet: ``python train.py --config=configs/synthetic.py --workdir=DIR``.

Short on purpose: the logic is in ``cejax.training`` so it can be imported and tested.
Any config field can be overridden, e.g. ``--config.train.num_epochs=2``.
"""


from absl import app, flags, logging
from ml_collections import config_flags

from cejax.jobs import cli, training

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Run config file.", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints and metrics.")
flags.DEFINE_bool("fresh", False, "Start the workdir over (delete its checkpoints and "
                  "metrics) instead of resuming it.")
flags.mark_flags_as_required(["config", "workdir"])


@cli.user_errors_exit
def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO
  training.train_and_evaluate(FLAGS.config, FLAGS.workdir, fresh=FLAGS.fresh)


if __name__ == "__main__":
  cli.run_app(main)  # names a mistyped --config.x.y; --help exits with 0
