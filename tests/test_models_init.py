"""The models' initialisers (``cejax.models._init``) against JAX's own: the same bits."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cejax.models import _init

SHAPES = [(3, 3, 3, 8), (7, 7, 1, 64), (1, 1, 96, 48), (300, 5), (16, 14), (2, 2, 2, 2),
          (1, 65, 192), (1, 1, 8), (4, 4, 3, 192)]


@pytest.mark.parametrize("ours,jaxs", [
    (_init.variance_scaling(2.0, "fan_in", "normal"),
     jax.nn.initializers.variance_scaling(2.0, "fan_in", "normal")),
    (_init.variance_scaling(0.5, "fan_out", "truncated_normal"),
     jax.nn.initializers.variance_scaling(0.5, "fan_out", "truncated_normal")),
    (_init.variance_scaling(1.0, "fan_avg", "normal"),
     jax.nn.initializers.variance_scaling(1.0, "fan_avg", "normal")),
    (_init.lecun_normal(), jax.nn.initializers.lecun_normal()),
    (_init.truncated_normal(0.02), jax.nn.initializers.truncated_normal(0.02)),
], ids=["kaiming-normal", "fan-out-truncated", "fan-avg", "lecun", "truncated-0.02"])
def test_initialisers_equal_jaxs_bit_for_bit(ours, jaxs):
  for i, shape in enumerate(SHAPES):
    if len(shape) < 2 and ours is not None:
      continue
    key = jax.random.key(i)
    for dtype in (jnp.float32, jnp.bfloat16):
      np.testing.assert_array_equal(np.asarray(ours(key, shape, dtype), np.float32),
                                    np.asarray(jaxs(key, shape, dtype), np.float32),
                                    err_msg=f"{shape} {dtype}")


def test_a_model_is_built_with_few_compilations():
  """Two DenseNets of different widths compile only the draws of a few vector lengths:
  no random program per weight shape (on the old code every kernel shape compiled its
  own, about 2 s each for a 4-D kernel on XLA:CPU)."""
  from flax import nnx

  from cejax.models import densenet

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
