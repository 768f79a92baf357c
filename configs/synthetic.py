"""The default demo: a tiny DenseNet on the embedded synthetic X-ray set (CPU-minutes).

Run::

    python train.py --config=configs/synthetic.py --workdir=runs/synthetic
    python analyze.py --config=configs/synthetic.py --workdir=runs/synthetic

Any field can be overridden, e.g. ``--config.train.num_epochs=2``. Every field, with
its default and meaning, is declared once in ``cejax.config.base_config``; unknown keys
are an error there.
"""

from cejax.jobs.config import base_config


def get_config():
  return base_config()
