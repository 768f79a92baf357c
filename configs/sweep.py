"""A dataset-scale CE sweep of the default demo's model: grid and sliding-window CE maps
of every test image (1,000), expected CE and the target probability. Run, after
training the demo::

    python train.py --config=configs/synthetic.py --workdir=runs/synthetic
    python -m cejax.jobs.sweep --config=configs/sweep.py --workdir=runs/synthetic

On a cluster, start the same command in every process with ``--distributed``.
"""

from configs import synthetic


def get_config():
  config = synthetic.get_config()
  config.sweep.families = ("grid", "sliding")
  config.sweep.estimands = ("expected", "probability")
  return config
