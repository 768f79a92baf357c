"""The science measurement of the optimised masks (issue "CE-optimal masks"): extremal
perturbations, CE-optimal masks and meaningful perturbations on the evaluation's 680
test images (about 540 with a box), scored like the README's tables. Run, after
training the demo::

    python analyze.py --config=configs/synthetic_eval_optimised.py \\
        --workdir=runs/synthetic --out=runs/synthetic/eval_optimised

then print its table beside the other methods' with ``benchmarks/science_tables.py``
(its ``--make`` records how the run was made).

TorchRay's 800 iterations x 4 areas, with the mask step and smoothing scaled from 224 px
to the demo's 64 px (7 -> 2, 21 -> 6). Cost: on a 2-core CPU one iteration of 20 images
takes about 0.15 s, about 1.2 hours per method for the 680 images
(``benchmarks/optimised_cost.py``, ``results/optimised_cost_2026-11-30.json``);
two workers (``--num_workers=2 --worker=0`` and ``--worker=1``, one per core) took about
11 minutes per chunk of 20 images each, about 3 hours for the three methods.
"""

from configs import synthetic_eval


def get_config():
  config = synthetic_eval.get_config()
  config.analysis.evaluators = ("maps", "localization")
  config.analysis.methods = ("extremal_perturbation", "ce_optimal",
                             "meaningful_perturbation")
  config.optimised.step = 2
  config.optimised.sigma = 6.0
  return config
