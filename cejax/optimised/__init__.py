"""Optimised masks, by ``jax.grad``: the regions that an optimisation finds instead of
an enumeration of fixed masks.

- ``cejax.optimised.extremal``: extremal perturbations (Fong et al., 2019; TorchRay's
  definition), the engine of the others, with its objectives and diagnostics;
- ``cejax.optimised.ce_optimal``: CE-optimal masks, the region of each area whose
  intervention has the largest causal effect (objective and reported estimand apart);
- ``cejax.optimised.counterfactual``: the minimal counterfactual region, the smallest
  region whose intervention changes the decision;
- ``cejax.optimised.meaningful``: meaningful perturbations (Fong and Vedaldi, 2017);
- ``cejax.optimised.smooth_masks``: TorchRay's smooth masks, blur pyramid and area
  constraint, the pieces they optimise over.
"""

from cejax.optimised import ce_optimal as ce_optimal
from cejax.optimised import counterfactual as counterfactual
from cejax.optimised import extremal as extremal
from cejax.optimised import meaningful as meaningful
from cejax.optimised import smooth_masks as smooth_masks

__all__ = ["ce_optimal", "counterfactual", "extremal", "meaningful", "smooth_masks"]
