"""Test networks with random weights, built without compiling anything.

A plain module (not conftest): subprocesses started by tests import test modules, and
conftest configures JAX (eight devices) at import.
"""

import jax.numpy as jnp
import numpy as np
from flax import nnx


def random_densenet(make, *, seed: int = 0):
  """The network ``make()`` builds, with weights drawn in numpy, in eval mode.

  Eager Flax initialisation compiles one random-number program per parameter shape
  (about 5 s for the tiny preset); building the network abstractly
  (``nnx.eval_shape``) and drawing in numpy compiles nothing. Kernels are scaled by
  their fan-in, as He initialisation is; BatchNorm's running statistics are away from
  (0, 1), so eval mode is not the identity.
  """
  model = nnx.eval_shape(make)
  rng = np.random.default_rng(seed)
  for path, var in nnx.iter_graph(model):
    if not isinstance(var, nnx.Variable):
      continue
    shape, name = var.get_value().shape, path[-1]
    if name == "kernel":
      value = rng.normal(0.0, np.sqrt(2.0 / np.prod(shape[:-1])), shape)
    elif name == "scale":
      value = rng.uniform(0.5, 1.5, shape)
    elif name == "var":
      value = rng.uniform(0.5, 1.5, shape)
    else:  # biases and running means
      value = rng.normal(0.0, 0.1, shape)
    var.set_value(jnp.asarray(value, jnp.float32))
  model.eval()
  return model
