"""The attacks evaluator: adversarial images, and what CE, confidence and feature
squeezing see on them (the detector's features).

For every configured ``(attack, eps)`` (named ``"fgsm@8"``: eps in /255) it keeps the
attack's success and, for the clean and each adversarial version of every image, the
CE features of ``CE_FEATURES`` (from the grid CE map and the latent CE), the per-mask
grid effects, the maximum confidence and the feature-squeezing score.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from cejax import attacks, masks
from cejax.attacks import defenses
from cejax.jobs.evaluators.common import Context, Inputs, Model, confidence, field
from cejax.jobs.evaluators.maps import expected_ce, latent_effects

ATTACKS = ("fgsm", "bim", "mifgsm", "pgd")


def _normalized_entropy(p):
  return -(p * jnp.log(jnp.maximum(p, 1e-12))).sum() / jnp.log(p.size)


# Each feature maps (grid effects e, their normalised magnitudes p, the grid cells'
# centres (cy, cx) in pixels, the image height h, latent effects lat) to a scalar.
CE_FEATURES: dict[str, Callable[..., jax.Array]] = {
    "mean": lambda e, p, c, h, lat: e.mean(),
    "std": lambda e, p, c, h, lat: e.std(),
    "min": lambda e, p, c, h, lat: e.min(),
    "max_abs": lambda e, p, c, h, lat: jnp.abs(e).max(),
    "entropy": lambda e, p, c, h, lat: _normalized_entropy(p),
    # Spread of the effect's mass around its centre, in image heights.
    "dispersion": lambda e, p, c, h, lat: jnp.sqrt(
        (p * ((c[0] - (p * c[0]).sum()) ** 2 + (c[1] - (p * c[1]).sum()) ** 2)).sum()) / h,
    "active": lambda e, p, c, h, lat: (jnp.abs(e) > 0.01).mean(),
    "latent_mean": lambda e, p, c, h, lat: lat.mean(),
    "latent_std": lambda e, p, c, h, lat: lat.std(),
    "latent_min": lambda e, p, c, h, lat: lat.min(),
}


def ce_features(model: Model, images, targets, *, settings, grid_cells: int):
  """Per-image CE features ``(n, len(CE_FEATURES))`` (columns in ``CE_FEATURES``'
  order) and the effects ``(n, grid_cells**2)`` of the grid's cells."""
  grid = masks.to_array(masks.grid(shape=images.shape[1:3], n=grid_cells))
  h, w = images.shape[1:3]
  yy, xx = jnp.mgrid[0:h, 0:w]
  cover = grid.sum((1, 2))
  centres = ((grid * yy).sum((1, 2)) / cover, (grid * xx).sum((1, 2)) / cover)

  def one(x, t):
    e = expected_ce(model, x, grid, t, settings=settings)
    a = jnp.abs(e)
    p = a / jnp.maximum(a.sum(), 1e-12)
    lat = latent_effects(model, x, t, settings=settings)
    return jnp.stack([f(e, p, centres, h, lat) for f in CE_FEATURES.values()]), e

  return jax.lax.map(lambda a: one(*a), (images, targets))


def attack_name(attack: str, eps: float) -> str:
  """The display name of an attack at a budget: ``"fgsm@8"`` (eps in /255)."""
  return f"{attack}@{round(eps * 255)}"


def run_attacks(model: Model, pixels, labels, *, space, key, names: Sequence[str],
                epsilons: Sequence[float], steps: int) -> dict[str, attacks.AttackResult]:
  """Adversarial pixels for every attack in ``names`` at every eps, keyed by
  ``attack_name``. PGD draws its random start from ``fold_in(key, 7)``."""
  unknown = [a for a in names if a not in ATTACKS]
  if unknown:
    raise ValueError(f"Unknown attacks {unknown} in analysis.attacks; valid are {ATTACKS}.")
  out = {}
  for attack in names:
    for eps in epsilons:
      kw = dict(eps=eps, space=space, activation=model.activation)
      if attack != "fgsm":
        kw["steps"] = steps
      if attack == "pgd":
        kw["key"] = jax.random.fold_in(key, 7)
      out[attack_name(attack, eps)] = getattr(attacks, attack)(model.logits_fn, pixels,
                                                                labels, **kw)
  return out


def attack_labels(model: Model, labels):
  """Labels as the attacks take them: float multi-hot (sigmoid) or int classes."""
  return jnp.asarray(labels, jnp.float32 if model.activation == "sigmoid" else jnp.int32)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class UnderAttack:
  """Per image, keyed by attack name (``"clean"`` too, except in ``success``).

  Attributes:
    success: ``(n,)`` the attack succeeded.
    features: ``(n, len(CE_FEATURES))`` CE features.
    effects: ``(n, cells**2)`` per-mask expected CE of the grid (stored as float16).
    confidence: ``(n,)`` maximum probability.
    squeeze: ``(n,)`` feature squeezing's score (the largest L1 change of the
      probabilities over its squeezers).
    adversarial: ``(n, h, w, c)`` adversarial pixels (memory only).
  """

  success: dict[str, Any] = field()
  features: dict[str, Any] = field()
  effects: dict[str, Any] = field(dtype=np.float16)
  confidence: dict[str, Any] = field()
  squeeze: dict[str, Any] = field()
  adversarial: dict[str, Any] = field(store=False)


class AttacksEvaluator:
  """The configured attacks at the configured budgets, and the detector's features."""

  name: ClassVar[str] = "attacks"
  requires: ClassVar[tuple[str, ...]] = ()
  result_type: ClassVar[type] = UnderAttack

  def __init__(self, context: Context):
    model, s, space = context.model, context.settings, context.space
    self._model, self._space, self._settings = model, space, s
    self._attacks = jax.jit(lambda p, y, k: run_attacks(
        model, p, y, space=space, key=k, names=s.attacks, epsilons=s.epsilons,
        steps=s.attack_steps))
    self._features = jax.jit(lambda x, t: ce_features(model, x, t, settings=s,
                                                      grid_cells=context.masks.grid_cells))

  def _squeeze(self, logits, pixels):
    """Feature squeezing's score (Xu et al., 2018; ``defenses.squeeze_score``)."""
    del logits
    s = self._settings
    return defenses.squeeze_score(self._model.logits_fn, pixels, space=self._space,
                                  activation=self._model.activation, bits=s.squeeze_bits,
                                  median=s.squeeze_median)

  def evaluate(self, inputs: Inputs, earlier, *, key) -> UnderAttack:
    del earlier
    model = self._model
    adv = self._attacks(inputs.pixels, attack_labels(model, inputs.label), key)
    features, effects = {}, {}
    features["clean"], effects["clean"] = self._features(inputs.images, inputs.target)
    for name, res in adv.items():
      features[name], effects[name] = self._features(self._space.normalize(res.images),
                                                     inputs.target)
    return UnderAttack(
        success={n: r.success for n, r in adv.items()}, features=features, effects=effects,
        confidence={"clean": confidence(model, inputs.logits),
                    **{n: confidence(model, r.logits) for n, r in adv.items()}},
        squeeze={"clean": self._squeeze(inputs.logits, inputs.pixels),
                 **{n: self._squeeze(r.logits, r.images) for n, r in adv.items()}},
        adversarial={n: r.images for n, r in adv.items()})

  def summarize(self, results, inputs: Inputs) -> dict[str, Any]:
    """Success rate of each attack over the correctly classified images."""
    ok = inputs.correct > 0.5
    return {"attack_success": {
        n: float(s[ok].mean()) if ok.any() else float("nan")
        for n, s in results[self.name].success.items()}}
