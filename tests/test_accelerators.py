"""Ready for accelerators, checked on a CPU: the programs users run on GPUs and TPUs lower
for ``cuda`` and ``tpu`` (``jax.export``), with every product at HIGHEST precision and
no host callback; the sweep's path rule per platform.

Lowering proves that each program is expressible for those backends (no CPU-only
operation, no callback to the host, shardings that partition). It does not prove that
XLA compiles it there, how fast it runs, or how much memory it takes: that is what
``benchmarks/gpu_run.py`` measures on a GPU.
"""

import functools
import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from random_networks import random_densenet

from cejax import attacks, effects, masks, saliency, sharding
from cejax.forwards import incremental
from cejax.jobs import training
from cejax.jobs.sweep import plan as sweep_plan
from cejax.models import densenet

PLATFORMS = ("cuda", "tpu")
SIZE = 32


@pytest.fixture(scope="module")
def tiny():
  model = random_densenet(lambda: densenet.DenseNetTiny(num_classes=3, in_channels=1,
                                                      rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(model)
  logits_fn = lambda x: nnx.merge(graphdef, state)(x)  # noqa: E731
  return model, logits_fn


def _lower(fn, *args) -> jax.export.Exported:
  """``fn`` exported for every platform of ``PLATFORMS``; checks what the module holds."""
  exported = jax.export.export(jax.jit(fn), platforms=PLATFORMS)(*args)
  text = exported.mlir_module()
  assert "callback" not in text  # a host callback cannot run beside a GPU or TPU program
  products = [line for line in text.splitlines()
              if re.search(r"stablehlo\.(dot_general|convolution)\b", line)]
  assert products
  for line in products:  # the exact precision policy reaches every product
    assert len(re.findall(r"HIGHEST", line)) == 2, line[:300]
  return exported


def _image():
  return jax.ShapeDtypeStruct((SIZE, SIZE, 1), jnp.float32)


def test_causal_effect_over_a_mask_mesh_lowers(tiny):
  _, logits_fn = tiny
  mesh = sharding.mask_mesh(jax.devices()[:4])
  grid = masks.grid(shape=(SIZE, SIZE), n=4)
  exported = _lower(lambda x: effects.causal_effect(logits_fn, x, grid, batch_size=2,
                                                    mesh=mesh).effects, _image())
  assert exported.nr_devices == 4


def test_incremental_path_lowers(tiny):
  model, _ = tiny
  grid = masks.grid(shape=(SIZE, SIZE), n=4)
  _lower(lambda x: effects.causal_effect(incremental.forward(model), x, grid,
                                         batch_size=2).effects, _image())


def test_token_forwards_lower_over_a_mask_mesh():
  """The ViT's token interventions: drop with equal kept counts, drop with padding and a
  key mask, and attention masking, each over a mask mesh of 4 devices."""
  from cejax.forwards import tokens
  from cejax.models import vit

  model = vit.VisionTransformer(img_size=SIZE, patch_size=8, in_channels=1, embed_dim=16,
                                depth=1, num_heads=2, num_classes=3, rngs=nnx.Rngs(0))
  mesh = sharding.mask_mesh(jax.devices()[:4])
  grid = masks.grid(shape=(SIZE, SIZE), n=4)  # each mask drops one patch: no padding
  uneven = masks.to_array(masks.grid(shape=(SIZE, SIZE), n=2))  # 4 patches each
  uneven = jnp.concatenate([masks.to_array(grid), uneven])
  for mode, what in (("drop", grid), ("drop", uneven), ("attention", uneven)):
    forward = tokens.from_vit(model, mode=mode)
    exported = _lower(lambda x, f=forward, m=what: effects.causal_effect(
        f, x, m, batch_size=2, mesh=mesh).effects, _image())
    assert exported.nr_devices == 4


def test_the_sweeps_per_image_program_lowers(tiny):
  model, logits_fn = tiny
  settings = ml_collections.ConfigDict(dict(path="auto", batch_size=4))
  spec = ml_collections.ConfigDict(dict(grid_cells=4, window=0, stride=0, rise_masks=8,
                                        rise_cells=4, rise_p=0.5))
  from cejax.jobs import mask_spec

  sources = mask_spec.mask_sources(spec, (SIZE, SIZE), key=jax.random.key(0),
                                   families=("grid", "sliding", "rise"))
  forward_of, _ = sweep_plan.forwards(logits_fn, model, (SIZE, SIZE, 1), settings, sources,
                                 platform="cpu")
  stacked = sweep_plan.StackedEstimand(("expected", "probability"), all_targets=True)

  def program(x):  # what image_results runs per family and intervention
    return {f: effects.ce_map(effects.causal_effect(
        forward_of[f], x, sources[f], estimand=stacked, batch_size=4).effects, sources[f],
        batch_size=4) for f in sources}

  _lower(program, _image())


def test_saliency_and_pgd_lower(tiny):
  _, logits_fn = tiny
  images = jax.ShapeDtypeStruct((2, SIZE, SIZE, 1), jnp.float32)
  targets = jax.ShapeDtypeStruct((2,), jnp.int32)
  _lower(lambda x, t: saliency.integrated_gradients(logits_fn, x, t, steps=4), images,
         targets)
  _lower(lambda x, t: attacks.pgd(logits_fn, x, t, key=jax.random.key(0), eps=0.03,
                                  steps=3, space=attacks.PixelSpace()).images, images,
         targets)


def test_a_data_parallel_training_step_lowers():
  model = random_densenet(lambda: densenet.DenseNetTiny(num_classes=3, in_channels=1,
                                                      rngs=nnx.Rngs(0)))
  optimizer = optax.adamw(1e-3)
  graphdef, state = training.init_state(model, optimizer)
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:4]), ("data",))
  step = jax.jit(functools.partial(training.train_step, graphdef, optimizer=optimizer,
                                   activation="softmax"),
                 in_shardings=(NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))),
                 out_shardings=NamedSharding(mesh, P()))
  batch = {"image": jax.ShapeDtypeStruct((8, SIZE, SIZE, 1), jnp.float32),
           "label": jax.ShapeDtypeStruct((8,), jnp.int32)}
  abstract_state = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), state)
  from cejax import precision

  with precision.policy("exact"):
    exported = jax.export.export(step, platforms=PLATFORMS)(abstract_state, batch)
  assert exported.nr_devices == 4 and "callback" not in exported.mlir_module()


def test_the_sweep_chooses_a_path_per_platform_and_the_user_can_force_either(tiny):
  model, logits_fn = tiny
  grid = masks.grid(shape=(SIZE, SIZE), n=4)
  rise = masks.rise(jax.random.key(0), num=4, shape=(SIZE, SIZE))
  sources = {"grid": grid, "rise": rise}

  def paths(path, platform):
    settings = ml_collections.ConfigDict(dict(path=path))
    chosen, why = sweep_plan.forwards(logits_fn, model, (SIZE, SIZE, 1), settings, sources,
                                 platform=platform)
    assert (chosen["grid"] is logits_fn) == (why["grid"]["path"] == "full")
    return {f: why[f]["path"] for f in why}, why

  assert paths("auto", "cpu")[0] == {"grid": "incremental", "rise": "full"}
  for platform in ("gpu", "tpu"):
    got, why = paths("auto", platform)
    assert got == {"grid": "full", "rise": "full"}
    assert why["grid"]["why"] == sweep_plan.AUTO_PATH[platform][1]
  assert paths("incremental", "gpu")[0] == {"grid": "incremental", "rise": "full"}
  assert "RISE masks are not local" in paths("incremental", "gpu")[1]["rise"]["why"]
  assert paths("full", "cpu")[0] == {"grid": "full", "rise": "full"}
