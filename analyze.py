"""Analyzes a trained run: ``python analyze.py --config=configs/synthetic.py --workdir=DIR``.

Short on purpose. Until the analysis report lands, it loads the model through
``cejax.checkpoint.load_logits_fn`` and reports its test metrics.
"""

import json
from pathlib import Path

from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Run config file.", lock_config=True)
flags.DEFINE_string("workdir", None, "A training workdir.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)
  from cejax import checkpoint

  _, run = checkpoint.load_logits_fn(FLAGS.workdir)
  test = Path(FLAGS.workdir) / "test_metrics.json"
  print(f"Loaded step {run['step']} of {run['preset']} ({run['num_classes']} classes).")
  if test.exists():
    print(json.dumps(json.loads(test.read_text()), indent=2))


if __name__ == "__main__":
  app.run(main)
