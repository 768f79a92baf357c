"""Data sets (through tensorflow-datasets) and the input pipeline."""
from cejax.data.pipeline import (
    Dataset,
    Normalization,
    eval_batches,
    load_dataset,
    train_batches,
    train_indices,
)

__all__ = ["Dataset", "Normalization", "eval_batches", "load_dataset", "train_batches",
           "train_indices"]
