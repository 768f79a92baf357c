"""The defenses evaluator: accuracy with each input-transform defense, and CE maps of
the defended inputs.

Per defense of ``analysis.defenses`` (and ``"none"``), accuracy on the clean images,
under each configured attack at ``analysis.defense_eps`` crafted on the undefended
model, and under BPDA-PGD, the adaptive attack that differentiates through the
defense as the identity. The adversarial images of the attacks evaluator are reused
when it ran at that budget; otherwise the same attacks are crafted here. No attack
the config did not name is run, except BPDA-PGD, which is what this evaluator is for.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import numpy as np

from cejax import attacks, effects, masks
from cejax.attacks import defenses
from cejax.jobs.evaluators.adversarial import attack_labels, attack_name, run_attacks
from cejax.jobs.evaluators.common import Context, Inputs, correct, field
from cejax.jobs.evaluators.maps import expected_ce


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Defended:
  """Per image.

  Attributes:
    accuracy: ``accuracy[defense][condition]``, ``(n,)``; defenses are ``"none"`` and
      ``analysis.defenses``; conditions ``"clean"``, each attack's name and (for a
      defense) ``"bpda_pgd"``.
    maps: ``maps[defense]``: ``(n, h, w)`` grid CE map of the defended input
      (importance = -expected CE; stored as float16).
    pixels: ``pixels[defense]``: the defended input (stored as float16).
  """

  accuracy: dict[str, dict[str, Any]] = field()
  maps: dict[str, Any] = field(dtype=np.float16)
  pixels: dict[str, Any] = field(dtype=np.float16)


def _identity(x):
  return x


class DefensesEvaluator:
  """Input-transform defenses against the configured attacks and BPDA-PGD."""

  name: ClassVar[str] = "defenses"
  requires: ClassVar[tuple[str, ...]] = ()
  result_type: ClassVar[type] = Defended

  def __init__(self, context: Context):
    model, s, space = context.model, context.settings, context.space
    unknown = [d for d in s.defenses if d not in defenses.DEFENSES]
    if unknown:
      raise ValueError(f"Unknown defenses {unknown} in analysis.defenses; valid are "
                       f"{sorted(defenses.DEFENSES)}.")
    self._model, self._settings = model, s
    eps = s.defense_eps
    self._reuse = {a: attack_name(a, eps) for a in s.attacks}

    def craft(pixels, labels, key):
      crafted = run_attacks(model, pixels, labels, space=space, key=key, names=s.attacks,
                            epsilons=(eps,), steps=s.attack_steps)
      return {a: crafted[n].images for a, n in self._reuse.items()}

    self._attacks = jax.jit(craft)

    def evaluate(pixels, labels, adversarial, targets, key):
      accuracy, maps, defended = {}, {}, {}
      grid = masks.to_array(masks.grid(shape=pixels.shape[1:3], n=context.masks.grid_cells))
      for name in ("none",) + tuple(s.defenses):
        d = _identity if name == "none" else defenses.DEFENSES[name]
        logits = lambda x, d=d: model.logits_fn(space.normalize(d(x)))
        acc = {"clean": correct(model, logits(pixels), labels)}
        acc.update({a: correct(model, logits(x), labels) for a, x in adversarial.items()})
        if name != "none":
          bpda = attacks.bpda_pgd(model.logits_fn, pixels, labels, key=key, defense=d,
                                  eps=eps, steps=s.attack_steps, space=space,
                                  activation=model.activation)
          acc["bpda_pgd"] = correct(model, logits(bpda.images), labels)
          defended[name] = d(pixels)
          maps[name] = jax.lax.map(lambda a: -effects.ce_map(
              expected_ce(model, a[0], grid, a[1], settings=s), grid),
              (space.normalize(defended[name]), targets))
        accuracy[name] = acc
      return Defended(accuracy=accuracy, maps=maps, pixels=defended)

    self._evaluate = jax.jit(evaluate)

  def evaluate(self, inputs: Inputs, earlier, *, key) -> Defended:
    labels = attack_labels(self._model, inputs.label)
    crafted = earlier.get("attacks")
    if crafted is not None and all(n in crafted.adversarial for n in self._reuse.values()):
      adversarial = {a: crafted.adversarial[n] for a, n in self._reuse.items()}
    else:
      adversarial = self._attacks(inputs.pixels, labels, key)
    return self._evaluate(inputs.pixels, labels, adversarial, inputs.target, key)

  def summarize(self, results, inputs: Inputs) -> dict[str, Any]:
    """Mean accuracy, ``{defense: {condition: accuracy}}``."""
    del inputs
    return {"defenses": {d: {c: float(np.mean(v)) for c, v in conds.items()}
                         for d, conds in results[self.name].accuracy.items()}}
