"""The suite compiles with XLA:CPU's fast-compile flags and a global "highest" matmul
precision (conftest.py). Exactness and bit-identity must hold without them too: one of
each, in a fresh interpreter with XLA's and JAX's defaults."""

import os
import subprocess
import sys

import pytest
from conftest import ROOT

SCRIPT = """
import jax
jax.config.update("jax_num_cpu_devices", 8)
import numpy as np
from flax import nnx
from cejax import effects, interventions, masks, sharding
from cejax.forwards import incremental
from cejax.models import densenet

assert jax.config.jax_default_matmul_precision is None  # JAX's default, not the suite's
import sys
sys.path.insert(0, "tests")
from random_networks import random_densenet  # compiles nothing (eager init would)

model = random_densenet(lambda: densenet.DenseNet(
    growth_rate=8, block_config=(1, 1), num_init_features=8, bn_size=2, in_channels=1,
    num_classes=4, rngs=nnx.Rngs(0)))
graphdef, state = nnx.split(model)
logits_fn = lambda x: nnx.merge(graphdef, state)(x)
image = jax.random.normal(jax.random.key(0), (40, 44, 1))
grid = masks.grid(shape=(40, 44), n=5)
full = effects.causal_effect(logits_fn, image, grid, estimand="per_class", batch_size=5)
fast = effects.causal_effect(incremental.forward(model), image, grid, estimand="per_class",
                             batch_size=5)
err = float(np.abs(np.asarray(fast.effects) - np.asarray(full.effects)).max())
assert err <= 1e-5 < float(np.abs(np.asarray(full.effects)).max()), err
rise = masks.rise(jax.random.key(1), num=22, shape=(40, 44), cells=4)
blur = interventions.Blur(sigma=2.0)
one = effects.causal_effect(logits_fn, image, rise, intervention=blur, batch_size=3)
eight = effects.causal_effect(logits_fn, image, rise, intervention=blur, batch_size=3,
                             mesh=sharding.mask_mesh())
np.testing.assert_array_equal(np.asarray(eight.effects), np.asarray(one.effects))
print("ok", err)
"""


@pytest.mark.heavy
def test_exact_and_bit_identical_at_default_flags():
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  proc = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stdout.startswith("ok")
