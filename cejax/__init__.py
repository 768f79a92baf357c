"""cejax: causal effects of interventions on images and features, in JAX.

The public API, one name per line (Optax's style). Submodules hold the details:
``cejax.effects`` (interventions, estimands, the sweep), ``cejax.masks``,
``cejax.saliency``, ``cejax.metrics``, ``cejax.attacks``, ``cejax.defenses``,
``cejax.checkpoint``, ``cejax.sharding``, ``cejax.types``; the training, analysis,
report and weight-import modules are imported on their own (``cejax.training``,
``cejax.evaluators``,
``cejax.analysis``, ``cejax.report``, ``cejax.convert``).
"""

from cejax import adapters as adapters
from cejax import attacks as attacks
from cejax import checkpoint as checkpoint
from cejax import defenses as defenses
from cejax import effects as effects
from cejax import filters as filters
from cejax import masks as masks
from cejax import metrics as metrics
from cejax import saliency as saliency
from cejax import sharding as sharding
from cejax import types as types
from cejax.attacks import AttackResult as AttackResult
from cejax.attacks import PixelSpace as PixelSpace
from cejax.checkpoint import load_logits_fn as load_logits_fn
from cejax.compile import compile_once as compile_once
from cejax.effects import ACTIVATIONS as ACTIVATIONS
from cejax.effects import ESTIMANDS as ESTIMANDS
from cejax.effects import INTERVENTIONS as INTERVENTIONS
from cejax.effects import Blur as Blur
from cejax.effects import CEResult as CEResult
from cejax.effects import Constant as Constant
from cejax.effects import Estimand as Estimand
from cejax.effects import GaussianNoise as GaussianNoise
from cejax.effects import ImageMean as ImageMean
from cejax.effects import ImageSet as ImageSet
from cejax.effects import Intervention as Intervention
from cejax.effects import LatentInterventions as LatentInterventions
from cejax.effects import Reference as Reference
from cejax.effects import activate as activate
from cejax.effects import causal_effect as causal_effect
from cejax.effects import ce_map as ce_map
from cejax.effects import intervene as intervene
from cejax.effects import latent_causal_effect as latent_causal_effect
from cejax.effects import latent_interventions as latent_interventions
from cejax.masks import Boxes as Boxes
from cejax.masks import Grid as Grid
from cejax.masks import MaskSource as MaskSource
from cejax.masks import RiseMasks as RiseMasks
from cejax.masks import SlidingWindows as SlidingWindows
from cejax.masks import box_masks as box_masks
from cejax.masks import boxes as boxes
from cejax.masks import grid as grid
from cejax.masks import grid_masks as grid_masks
from cejax.masks import rise_masks as rise_masks
from cejax.masks import sliding_window_masks as sliding_window_masks
from cejax.masks import sliding_windows as sliding_windows
from cejax.sharding import mask_mesh as mask_mesh

__all__ = (
    "ACTIVATIONS",
    "AttackResult",
    "Blur",
    "Boxes",
    "CEResult",
    "Constant",
    "ESTIMANDS",
    "Estimand",
    "GaussianNoise",
    "Grid",
    "INTERVENTIONS",
    "ImageMean",
    "ImageSet",
    "Intervention",
    "LatentInterventions",
    "MaskSource",
    "PixelSpace",
    "Reference",
    "RiseMasks",
    "SlidingWindows",
    "activate",
    "adapters",
    "attacks",
    "box_masks",
    "boxes",
    "causal_effect",
    "ce_map",
    "checkpoint",
    "compile_once",
    "defenses",
    "effects",
    "filters",
    "grid",
    "grid_masks",
    "intervene",
    "latent_causal_effect",
    "latent_interventions",
    "load_logits_fn",
    "mask_mesh",
    "masks",
    "metrics",
    "rise_masks",
    "saliency",
    "sharding",
    "sliding_window_masks",
    "sliding_windows",
    "types",
)
