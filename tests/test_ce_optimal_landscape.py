"""benchmarks/ce_optimal_landscape.py: the expected causal effect of zero-filling fixed
regions, against scipy's softmax on a linear model written out by hand."""

import sys

import jax.numpy as jnp
import numpy as np
from conftest import ROOT
from scipy.special import softmax


def test_expected_effects_equal_the_papers_formula_on_a_linear_model():
  sys.path.insert(0, str(ROOT / "benchmarks"))
  import ce_optimal_landscape

  rng = np.random.default_rng(0)
  weights = rng.normal(size=(4 * 4 * 2, 3)).astype(np.float32)
  images = rng.normal(size=(5, 4, 4, 2)).astype(np.float32)
  region = np.zeros((5, 4, 4), np.float32)
  region[:, 1:3, 0:2] = 1

  def logits_fn(x):
    return jnp.reshape(x, (x.shape[0], -1)) @ weights

  got = ce_optimal_landscape.expected_effects(logits_fn, jnp.asarray(images),
                                              {"box": region})["box"]
  p = softmax(images.reshape(5, -1).astype(np.float64) @ weights, axis=-1)
  kept = images.copy()
  kept[:, 1:3, 0:2, :] = 0
  q = softmax(kept.reshape(5, -1).astype(np.float64) @ weights, axis=-1)
  np.testing.assert_allclose(got["expected_ce"], (p * (q - p)).sum(-1), atol=1e-5)
  np.testing.assert_array_equal(got["changed"], q.argmax(-1) != p.argmax(-1))
