"""Evaluation metrics, one name per line (the code lives in private modules by kind).

- localization against ground-truth boxes: ``pointing_game``, ``mass_in_box``, ``iou``,
  ``localization_accuracy`` (T(IoU)); the chest X-ray field's own in
  ``cejax.metrics.chestxray`` (T(IoBB), Otsu IoU, hit rate);
- faithfulness: ``deletion_insertion`` (Petsiuk et al.);
- chance levels: ``chance_maps`` and the columns they make ``uninformative``;
- statistics: ``auroc``, ``roc_curve``, ``tpr_at_fpr``, ``bootstrap_interval``,
  ``spearman``.

Maps are ``(n, h, w)``, "larger = more important"; boxes boolean ``(n, h, w)``. The map
metrics are pure JAX, batched over images, for use under ``jit``; the ROC helpers run
on the host (numpy).
"""

from cejax.metrics import chestxray as chestxray
from cejax.metrics._chance import CHANCE_MAPS as CHANCE_MAPS
from cejax.metrics._chance import LOWER_IS_BETTER as LOWER_IS_BETTER
from cejax.metrics._chance import chance_maps as chance_maps
from cejax.metrics._chance import uninformative as uninformative
from cejax.metrics._faithfulness import CURVES as CURVES
from cejax.metrics._faithfulness import SUBSTRATES as SUBSTRATES
from cejax.metrics._faithfulness import deletion_insertion as deletion_insertion
from cejax.metrics._faithfulness import substrate as substrate
from cejax.metrics._localization import IOU_THRESHOLDS as IOU_THRESHOLDS
from cejax.metrics._localization import POINTING_TIES as POINTING_TIES
from cejax.metrics._localization import POINTING_TOLERANCE_224 as POINTING_TOLERANCE_224
from cejax.metrics._localization import iou as iou
from cejax.metrics._localization import localization_accuracy as localization_accuracy
from cejax.metrics._localization import mass_in_box as mass_in_box
from cejax.metrics._localization import normalize_maps as normalize_maps
from cejax.metrics._localization import pointing_game as pointing_game
from cejax.metrics._localization import pointing_tolerance as pointing_tolerance
from cejax.metrics._stats import auroc as auroc
from cejax.metrics._stats import average_ranks as average_ranks
from cejax.metrics._stats import bootstrap_interval as bootstrap_interval
from cejax.metrics._stats import roc_curve as roc_curve
from cejax.metrics._stats import spearman as spearman
from cejax.metrics._stats import tpr_at_fpr as tpr_at_fpr

__all__ = [
    "CHANCE_MAPS", "CURVES", "IOU_THRESHOLDS", "LOWER_IS_BETTER", "POINTING_TIES",
    "POINTING_TOLERANCE_224", "SUBSTRATES", "auroc", "average_ranks", "bootstrap_interval",
    "chance_maps", "chestxray", "deletion_insertion", "iou", "localization_accuracy",
    "mass_in_box", "normalize_maps", "pointing_game", "pointing_tolerance", "roc_curve",
    "spearman", "substrate", "tpr_at_fpr", "uninformative",
]
