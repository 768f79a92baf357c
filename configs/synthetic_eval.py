"""The evaluation behind the README's science tables: the demo model, enough images.

The default demo (``configs/synthetic.py``) scores 64 test images, too few to separate
methods. This config scores 680 test images of the same trained run (about 540 with a
box, for localization; about 650 correctly classified, for the attacks and the
detector) with the same methods and settings. Defenses are left out (they are not part
of the tables). Run, after training the demo::

    python train.py --config=configs/synthetic.py --workdir=runs/synthetic
    python analyze.py --config=configs/synthetic_eval.py --workdir=runs/synthetic \
        --out=runs/synthetic/eval --num_workers=2 --worker=0 &
    python analyze.py --config=configs/synthetic_eval.py --workdir=runs/synthetic \
        --out=runs/synthetic/eval --num_workers=2 --worker=1

(one worker per core: XLA:CPU runs each convolution on one thread). The last worker to
finish writes ``runs/synthetic/eval/report.html`` and ``metrics.json``.
"""

from configs import synthetic


def get_config():
  config = synthetic.get_config()
  config.analysis.num_images = 680
  config.analysis.chunk_size = 20
  config.analysis.evaluators = ("maps", "localization", "sanity", "attacks", "detection")
  return config
