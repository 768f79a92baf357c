"""The detection evaluator: telling adversarial from clean images, per attack.

Uses the attacks evaluator's per-image features; it has nothing to compute per chunk.
For each attack, images whose clean prediction is right and whose attack succeeded
are split by index into train and test halves; a logistic regression (Optax) is fitted
per detector on the train half and scored on the test half. Detectors: the CE
features, the maximum confidence, and feature squeezing (Xu et al., 2018).
"""

from __future__ import annotations

from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
import optax

from cejax import metrics
from cejax.jobs.evaluators.adversarial import UnderAttack
from cejax.jobs.evaluators.common import Context, Inputs


def fit_logistic(x, y, *, steps: int = 500, learning_rate: float = 0.05, l2: float = 1e-2):
  """Logistic regression with Optax (Adam) on standardised features.

  Returns:
    ``predict(x) -> scores``.
  """
  x = np.asarray(x, np.float32)
  mu, sd = x.mean(0), x.std(0) + 1e-6
  z = jnp.asarray((x - mu) / sd)
  yj = jnp.asarray(y, jnp.float32)
  params = {"w": jnp.zeros(z.shape[1]), "b": jnp.zeros(())}
  opt = optax.adam(learning_rate)

  def loss(p):
    logits = z @ p["w"] + p["b"]
    return optax.sigmoid_binary_cross_entropy(logits, yj).mean() + l2 * (p["w"] ** 2).sum()

  @jax.jit
  def train(p):
    def step(carry, _):
      p, s = carry
      g = jax.grad(loss)(p)
      u, s = opt.update(g, s)
      return (optax.apply_updates(p, u), s), None
    (p, _), _ = jax.lax.scan(step, (p, opt.init(p)), None, length=steps)
    return p

  params = train(params)
  return lambda xs: np.asarray(((np.asarray(xs, np.float32) - mu) / sd) @ params["w"]
                               + params["b"])


def paired_auroc_interval(scores, *, num: int = 1000, level: float = 0.95, seed: int = 0):
  """Percentile-bootstrap interval of the AUROC of ``scores`` = clean scores of ``n``
  images followed by the adversarial scores of the same ``n`` images (label 0 then 1);
  images are resampled with their clean/adversarial pair kept together."""
  scores = np.asarray(scores, np.float64)
  n = len(scores) // 2
  rng = np.random.default_rng(seed)
  labels = np.r_[np.zeros(n), np.ones(n)]
  aucs = []
  for _ in range(num):
    i = rng.integers(0, n, n)
    aucs.append(metrics.auroc(np.r_[scores[:n][i], scores[n:][i]], labels))
  lo, hi = np.quantile(aucs, [(1 - level) / 2, (1 + level) / 2])
  return float(lo), float(hi)


def detector_features(under_attack: UnderAttack) -> dict[str, dict[str, np.ndarray]]:
  """``{detector: {"clean" or attack name: (n, features)}}``."""
  column = lambda d: {k: np.asarray(v)[:, None] for k, v in d.items()}
  return {"CE features": under_attack.features,
          "max confidence": column(under_attack.confidence),
          "squeezing": column(under_attack.squeeze)}


def detection(under_attack: UnderAttack, correct, *, attack: str,
              train_fraction: float = 0.5) -> dict[str, dict[str, Any]]:
  """Clean vs adversarial detection for one attack.

  Returns:
    ``{detector: {"auroc", "auroc_ci", "tpr_at_5fpr", "fpr", "tpr", "n_train",
    "n_test"}}`` (NaN AUROC when fewer than two images per half qualify).
  """
  ok = (np.asarray(correct) > 0.5) & np.asarray(under_attack.success[attack]).astype(bool)
  idx = np.nonzero(ok)[0]
  cut = int(len(idx) * train_fraction)
  parts = {"train": idx[:cut], "test": idx[cut:]}
  sizes = {"n_train": int(len(parts["train"])), "n_test": int(len(parts["test"]))}
  out = {}
  for det, feats in detector_features(under_attack).items():
    if len(parts["train"]) < 2 or len(parts["test"]) < 2:
      out[det] = {"auroc": float("nan"), "tpr_at_5fpr": float("nan"), "fpr": [], "tpr": [],
                  **sizes}
      continue
    xy = {part: (np.concatenate([feats["clean"][i], feats[attack][i]]),
                 np.r_[np.zeros(len(i)), np.ones(len(i))]) for part, i in parts.items()}
    scores = fit_logistic(*xy["train"])(xy["test"][0])
    fpr, tpr = metrics.roc_curve(scores, xy["test"][1])
    out[det] = {"auroc": metrics.auroc(scores, xy["test"][1]),
                "auroc_ci": list(paired_auroc_interval(scores)),
                "tpr_at_5fpr": metrics.tpr_at_fpr(scores, xy["test"][1], fpr=0.05),
                "fpr": fpr.tolist(), "tpr": tpr.tolist(), **sizes}
  return out


class DetectionEvaluator:
  """Per attack of the attacks evaluator: CE features vs confidence vs squeezing."""

  name: ClassVar[str] = "detection"
  requires: ClassVar[tuple[str, ...]] = ("attacks",)
  result_type: ClassVar[type | None] = None  # nothing per image

  def __init__(self, context: Context):
    del context

  def evaluate(self, inputs: Inputs, earlier, *, key) -> None:
    del inputs, earlier, key

  def summarize(self, results, inputs: Inputs) -> dict[str, Any]:
    under_attack = results["attacks"]
    return {"detection": {a: detection(under_attack, inputs.correct, attack=a)
                          for a in sorted(under_attack.success)}}
