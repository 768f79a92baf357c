"""Models: a DenseNet-BC family in Flax NNX."""
from cejax.models.densenet import (
    PRESETS,
    DenseNet,
    DenseNet121,
    DenseNet169,
    DenseNet201,
    DenseNetTiny,
    count_params,
    create_densenet,
)

__all__ = [
    "PRESETS", "DenseNet", "DenseNet121", "DenseNet169", "DenseNet201", "DenseNetTiny",
    "count_params", "create_densenet",
]
