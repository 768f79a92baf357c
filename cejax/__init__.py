"""cejax: causal effects of interventions on images and features, in JAX.

The public face, one name per line (Optax's style); the code lives in rooms by role:

- ``cejax.effects``: the engine (``causal_effect`` for every forward path, ``ce_map``);
- ``cejax.masks``, ``cejax.interventions``, ``cejax.estimands``: what is intervened on,
  with what, and how the effect is measured;
- ``cejax.forwards``: the forward paths (full, incremental, latent);
- ``cejax.optimised``: masks found by ``jax.grad`` (extremal perturbations, CE-optimal
  masks, minimal counterfactual regions, meaningful perturbations);
- ``cejax.attacks``: gradient attacks and (``cejax.attacks.defenses``) input defenses;
- ``cejax.saliency``: the attribution baselines; ``cejax.metrics``: localization,
  faithfulness, chance levels and statistics;
- ``cejax.precision``, ``cejax.sharding``, ``cejax.filters``, ``cejax.adapters``,
  ``cejax.types``, ``cejax.models``, ``cejax.data``.

The jobs (training, checkpoints, analysis, sweep, weight import) live in ``cejax.jobs``
and are imported on their own: ``import cejax`` imports no Orbax, TFDS or matplotlib.
``cejax.load_logits_fn`` loads ``cejax.jobs.checkpoint`` when first used. Modules whose
names start with ``_`` are private.
"""

from cejax import adapters as adapters
from cejax import attacks as attacks
from cejax import effects as effects
from cejax import estimands as estimands
from cejax import filters as filters
from cejax import interventions as interventions
from cejax import masks as masks
from cejax import metrics as metrics
from cejax import optimised as optimised
from cejax import precision as precision
from cejax import saliency as saliency
from cejax import sharding as sharding
from cejax import types as types
from cejax.attacks import AttackResult as AttackResult
from cejax.attacks import PixelSpace as PixelSpace
from cejax.attacks import defenses as defenses
from cejax.effects import CEResult as CEResult
from cejax.effects import Forward as Forward
from cejax.effects import causal_effect as causal_effect
from cejax.effects import ce_map as ce_map
from cejax.estimands import ACTIVATIONS as ACTIVATIONS
from cejax.estimands import ESTIMANDS as ESTIMANDS
from cejax.estimands import Estimand as Estimand
from cejax.estimands import activate as activate
from cejax.forwards import incremental as incremental
from cejax.forwards import latent as latent
from cejax.forwards.full import FullForward as FullForward
from cejax.forwards.latent import LatentInterventions as LatentInterventions
from cejax.forwards.latent import latent_interventions as latent_interventions
from cejax.interventions import INTERVENTIONS as INTERVENTIONS
from cejax.interventions import Blur as Blur
from cejax.interventions import Constant as Constant
from cejax.interventions import GaussianNoise as GaussianNoise
from cejax.interventions import ImageMean as ImageMean
from cejax.interventions import ImageSet as ImageSet
from cejax.interventions import Intervention as Intervention
from cejax.interventions import Reference as Reference
from cejax.interventions import intervene as intervene
from cejax.masks import ArrayMasks as ArrayMasks
from cejax.masks import Boxes as Boxes
from cejax.masks import Grid as Grid
from cejax.masks import MaskSource as MaskSource
from cejax.masks import PatchSubsets as PatchSubsets
from cejax.masks import RiseMasks as RiseMasks
from cejax.masks import SlidingWindows as SlidingWindows
from cejax.masks import boxes as boxes
from cejax.masks import grid as grid
from cejax.masks import patch_subsets as patch_subsets
from cejax.masks import rise as rise
from cejax.masks import sliding_windows as sliding_windows
from cejax.masks import to_array as to_array
from cejax.sharding import mask_mesh as mask_mesh


def load_logits_fn(*args, **kwargs):
  """``cejax.jobs.checkpoint.load_logits_fn``: the trained model of a workdir as a pure
  ``images -> logits`` function, and its run description (imports the jobs on first
  use)."""
  from cejax.jobs.checkpoint import load_logits_fn as load

  return load(*args, **kwargs)


__all__ = (
    "ACTIVATIONS",
    "ArrayMasks",
    "AttackResult",
    "Blur",
    "Boxes",
    "CEResult",
    "Constant",
    "ESTIMANDS",
    "Estimand",
    "Forward",
    "FullForward",
    "GaussianNoise",
    "Grid",
    "INTERVENTIONS",
    "ImageMean",
    "ImageSet",
    "Intervention",
    "LatentInterventions",
    "MaskSource",
    "PatchSubsets",
    "PixelSpace",
    "Reference",
    "RiseMasks",
    "SlidingWindows",
    "activate",
    "adapters",
    "attacks",
    "boxes",
    "causal_effect",
    "ce_map",
    "defenses",
    "effects",
    "estimands",
    "filters",
    "grid",
    "incremental",
    "intervene",
    "interventions",
    "latent",
    "latent_interventions",
    "load_logits_fn",
    "mask_mesh",
    "masks",
    "metrics",
    "optimised",
    "patch_subsets",
    "precision",
    "rise",
    "saliency",
    "sharding",
    "sliding_windows",
    "to_array",
    "types",
)
