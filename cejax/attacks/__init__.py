"""Gradient-based adversarial attacks, written with ``jax.grad``.

Every attack is a pure function ``attack(logits_fn, images, labels, *, key, ...)``
with keyword-only hyperparameters, returning an ``AttackResult``. Images and the
budget live in **pixel space** (``space.low``..``space.high``); the model sees
``space.normalize(x)``. ``space`` is required: a model trained on normalised inputs
attacked without its normalisation would be attacked on the wrong input distribution
without any error, so even a model that takes [0, 1] pixels says so with
``space=PixelSpace()``. Iterates are clipped to valid pixels.

Labels: int ``(n,)`` classes (``activation="softmax"``) or multi-hot ``(n, k)`` findings
(``activation="sigmoid"``, multi-label models; targeted attacks then ask for a whole target
vector, e.g. the true labels with one finding switched on or off).

Steps run in ``lax.fori_loop``; examples are independent, so ``jax.vmap`` over an
epsilon array gives an epsilon sweep in one call (``epsilon_sweep``) and the batch
axis shards over devices with ``shard_batch``.
"""

from cejax.attacks import defenses as defenses
from cejax.attacks._core import AttackResult as AttackResult
from cejax.attacks._core import PixelSpace as PixelSpace
from cejax.attacks._core import attack_loss as attack_loss
from cejax.attacks._core import success as success
from cejax.attacks._gradient import bim as bim
from cejax.attacks._gradient import bpda_pgd as bpda_pgd
from cejax.attacks._gradient import epsilon_sweep as epsilon_sweep
from cejax.attacks._gradient import fgsm as fgsm
from cejax.attacks._gradient import mifgsm as mifgsm
from cejax.attacks._gradient import pgd as pgd
from cejax.attacks._gradient import uniform_in_ball as uniform_in_ball
from cejax.attacks._minimal import carlini_wagner_l2 as carlini_wagner_l2
from cejax.attacks._minimal import deepfool as deepfool

__all__ = ["AttackResult", "PixelSpace", "attack_loss", "bim", "bpda_pgd",
           "carlini_wagner_l2", "deepfool", "defenses", "epsilon_sweep", "fgsm", "mifgsm",
           "pgd", "success", "uniform_in_ball"]
