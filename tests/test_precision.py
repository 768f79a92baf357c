"""The precision policy: every dot and convolution of cejax's compiled programs carries
the policy's precision (HIGHEST by default, whatever JAX's global setting), and the
policy is part of the program's identity.

The suite sets ``jax_default_matmul_precision="highest"`` globally (conftest), which by
itself makes every product HIGHEST; ``test_every_public_program_applies_the_policy_itself``
therefore runs every public program in a fresh interpreter without it."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from compile_count import Compilations
from flax import nnx
from jax.lax import Precision
from test_effects import C, H, W, make_logits_fn

from cejax import attacks, effects, masks, precision, saliency
from cejax.forwards import incremental, latent
from cejax.models import densenet

WANT = {"exact": Precision.HIGHEST, "tf32": Precision.HIGH, "bf16": Precision.DEFAULT}


def _products(jaxpr):
  """Every dot_general / conv_general_dilated of a jaxpr and its sub-jaxprs."""
  for eqn in jaxpr.eqns:
    if eqn.primitive.name in ("dot_general", "conv_general_dilated"):
      yield eqn.primitive.name, eqn.params["precision"]
    for value in eqn.params.values():
      for sub in value if isinstance(value, (tuple, list)) else (value,):
        inner = getattr(sub, "jaxpr", sub)
        if isinstance(inner, jax.extend.core.Jaxpr):
          yield from _products(inner)


def _precisions(fn, *args):
  found = list(_products(jax.make_jaxpr(fn)(*args).jaxpr))
  assert found, "no product traced"
  return {tuple(p) if isinstance(p, tuple) else p for _, p in found}


@pytest.fixture(scope="module")
def programs():
  logits_fn = make_logits_fn()
  image = jax.random.normal(jax.random.key(1), (H, W, C))
  grid = masks.grid(shape=(H, W), n=3)
  model = densenet.DenseNet(growth_rate=4, block_config=(2, 1), num_init_features=8,
                            bn_size=2, in_channels=C, num_classes=4, rngs=nnx.Rngs(0))
  model.eval()
  graphdef, state = nnx.split(model)
  prefix = lambda x: nnx.merge(graphdef, state).forward_to(x, "block2")  # noqa: E731
  suffix = lambda h: nnx.merge(graphdef, state).forward_from(h, "block2")  # noqa: E731
  inter = latent.latent_interventions(channels=[0, 1], values=[0.0])
  pixels = jax.nn.sigmoid(image)[None]
  return {
      "full": lambda x: effects.causal_effect(logits_fn, x, grid, batch_size=4).effects,
      "incremental": lambda x: effects.causal_effect(incremental.forward(model), x, grid,
                                                     batch_size=4).effects,
      "latent": lambda x: effects.causal_effect(latent.forward(prefix, suffix), x,
                                                inter).effects,
      "ce_map": lambda x: effects.ce_map(jnp.ones(9) * x.sum(), masks.to_array(grid)),
      "integrated_gradients": lambda x: saliency.integrated_gradients(
          logits_fn, x[None], jnp.zeros(1, jnp.int32), steps=2),
      "pgd": lambda x: attacks.pgd(logits_fn, jax.nn.sigmoid(x)[None], jnp.zeros(
          1, jnp.int32), key=jax.random.key(0), eps=0.1, steps=2,
          space=attacks.PixelSpace()).images,
  }, image, pixels


@pytest.mark.parametrize("name", ["full", "incremental", "latent", "ce_map",
                                  "integrated_gradients", "pgd"])
def test_every_product_carries_the_policy(programs, name):
  fns, image, _ = programs
  fn = fns[name]
  assert _precisions(fn, image) == {(WANT["exact"],) * 2}  # the default
  for mode in ("tf32", "bf16"):
    with precision.policy(mode):
      assert _precisions(fn, image) == {(WANT[mode],) * 2}, mode


def test_the_argument_wins_and_the_policy_is_part_of_the_programs_identity(programs):
  logits_fn = make_logits_fn()
  image = programs[1]
  grid = masks.grid(shape=(H, W), n=3)
  ce = lambda x, **kw: effects.causal_effect(logits_fn, x, grid, batch_size=3, **kw)  # noqa: E731
  with precision.policy("bf16"):
    assert _precisions(lambda x: ce(x, precision="exact").effects, image) == {
        (Precision.HIGHEST,) * 2}
  other = image + 1
  ce(image)
  with Compilations() as compiled:
    ce(other)
  assert compiled.count == 0
  with Compilations() as compiled:
    ce(other, precision="tf32")
  assert compiled.count >= 1
  # An outer jit of the user's is traced again under another policy (JAX keys on it).
  outer = jax.jit(lambda x: ce(x).effects)
  with precision.policy("tf32"):
    assert _precisions(outer, image) == {(Precision.HIGH,) * 2}
  assert _precisions(outer, image) == {(Precision.HIGHEST,) * 2}
  # CPUs compute float32 products whatever the policy: the values agree.
  np.testing.assert_array_equal(ce(image, precision="tf32").effects, ce(image).effects)
  with pytest.raises(ValueError, match=r"Unknown precision 'fp8'; valid are \['exact'"):
    ce(image, precision="fp8")
  with pytest.raises(ValueError, match="Unknown precision"):
    with precision.policy("half"):
      pass


@pytest.mark.heavy(30)
def test_every_public_program_applies_the_policy_itself():
  """Every public function that calls a model, lowered (or run, for those that compile
  several programs from the host) in a fresh interpreter with no global precision:
  under the default policy every dot and convolution is HIGHEST; under ``tf32`` none
  is left at DEFAULT and the model's products are HIGH (cejax's own mask and blur
  products stay HIGHEST by design). On the old code ``metrics.deletion_insertion``,
  ``defenses.squeeze_score``, ``counterfactual.minimal_counterfactual``'s decisions and
  the autoencoder's training and fidelity ran the model at DEFAULT (TF32 on NVIDIA
  GPUs), and the attacks refused images closed over by a jit."""
  script = Path(__file__).with_name("precision_programs.py")
  env = {k: v for k, v in os.environ.items()
         if not k.startswith("JAX_")}  # no global precision, no compilation cache
  done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                        env=env, timeout=600)
  assert done.returncode == 0, done.stderr[-3000:]
  found = json.loads(done.stdout.strip().splitlines()[-1])
  assert len(found["exact"]) == 34 and found["exact"].keys() == found["tf32"].keys()
  for name, precisions in found["exact"].items():
    assert precisions == ["HIGHEST,HIGHEST"], (name, precisions)  # none found fails too
  for name, precisions in found["tf32"].items():
    assert "HIGH,HIGH" in precisions and "DEFAULT,DEFAULT" not in precisions, (name,
                                                                              precisions)
    assert set(precisions) <= {"HIGH,HIGH", "HIGHEST,HIGHEST"}, (name, precisions)
