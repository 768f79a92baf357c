"""The models' initialisers (``cejax.models.initializers``) against JAX's own: the same bits."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cejax.models import initializers

# A 4-D kernel (not a power of two), one of exactly 256 values, a dense kernel and a
# ViT position embedding; bf16 (drawn as JAX draws it) on the first.
SHAPES = [(3, 3, 3, 8), (2, 2, 8, 8), (300, 5), (1, 65, 12)]


@pytest.mark.parametrize("ours,jaxs", [
    (initializers.variance_scaling(2.0, "fan_in", "normal"),
     jax.nn.initializers.variance_scaling(2.0, "fan_in", "normal")),
    (initializers.variance_scaling(0.5, "fan_out", "truncated_normal"),
     jax.nn.initializers.variance_scaling(0.5, "fan_out", "truncated_normal")),
    (initializers.variance_scaling(1.0, "fan_avg", "normal"),
     jax.nn.initializers.variance_scaling(1.0, "fan_avg", "normal")),
    (initializers.lecun_normal(), jax.nn.initializers.lecun_normal()),
    (initializers.truncated_normal(0.02), jax.nn.initializers.truncated_normal(0.02)),
], ids=["kaiming-normal", "fan-out-truncated", "fan-avg", "lecun", "truncated-0.02"])
def test_initialisers_equal_jaxs_bit_for_bit(ours, jaxs):
  for i, shape in enumerate(SHAPES):
    key = jax.random.key(i)
    for dtype in (jnp.float32, jnp.bfloat16) if i == 0 else (jnp.float32,):
      np.testing.assert_array_equal(np.asarray(ours(key, shape, dtype), np.float32),
                                    np.asarray(jaxs(key, shape, dtype), np.float32),
                                    err_msg=f"{shape} {dtype}")


def test_a_model_is_built_with_few_compilations():
  """Two DenseNets of different widths compile only the draws of a few vector lengths:
  no random program per weight shape (on the old code every kernel shape compiled its
  own, about 2 s each for a 4-D kernel on XLA:CPU)."""
  from flax import nnx

  from cejax.models import densenet

  # Whatever this worker compiled before: the count must not depend on the tests' order
  # (it was 0 when another test had built a DenseNet first).
  jax.clear_caches()
  compiled = []
  with jax.log_compiles(True):
    import logging

    class Catch(logging.Handler):
      def emit(self, record):
        message = record.getMessage()
        if "Compiling" in message and ("_normal" in message or "truncated" in message):
          compiled.append(message)

    handler = Catch()
    logger = logging.getLogger("jax")
    logger.addHandler(handler)
    try:
      for growth in (3, 5):
        densenet.DenseNet(growth_rate=growth, block_config=(2, 2), num_init_features=6,
                          bn_size=2, in_channels=1, num_classes=3, rngs=nnx.Rngs(0))
    finally:
      logger.removeHandler(handler)
  assert 0 < len(compiled) <= 8, compiled
