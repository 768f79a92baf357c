"""Minimal counterfactual regions of the evaluation's images (issue "CE-optimal masks"):
per test image, the smallest region whose zero fill changes the demo model's predicted
class, to set against the true box. Run, after training the demo::

    python -m cejax.jobs.sweep --config=configs/synthetic_counterfactual.py \\
        --workdir=runs/synthetic --out=runs/synthetic/counterfactual

then compare the regions with the boxes::

    python benchmarks/counterfactual_areas.py --sweep runs/synthetic/counterfactual

The same 680 test images as ``configs/synthetic_eval.py`` (about 540 with a box). The
areas tried are TorchRay's, as fractions of the image (2.5 %, 5 %, 10 %, 20 %; the
boxes cover 2-6 %), refined by 3 bisection steps; each optimisation runs 300 iterations
(``counterfactual.minimal_counterfactual``'s default; the sweep's extremal masks take
TorchRay's 800), with the mask step and smoothing scaled from 224 px to the demo's 64 px
(7 -> 2, 21 -> 6), as in ``configs/synthetic_eval_optimised.py``.
"""

from configs import synthetic


def get_config():
  config = synthetic.get_config()
  s = config.sweep
  s.num_images = 680
  s.chunk_size = 20
  s.families = ()
  s.optimised = ("counterfactual",)
  s.interventions = ("zero",)
  o = config.optimised
  o.iterations = 300
  o.step = 2
  o.sigma = 6.0
  o.counterfactual_bisection = 3
  o.batch_size = 10  # per device: the network sees 40 masks a call, not 4
  return config
