"""DenseNet architecture, stage splits and the pure logits_fn contract."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import abstract_densenet
from flax import nnx
from jax import test_util as jtu
from random_networks import random_densenet

from cejax.jobs import checkpoint
from cejax.models import densenet


@pytest.mark.parametrize("preset,num_classes,expected", [
    ("densenet121", 1000, 7_978_856),   # torchvision.models.densenet121()
    ("densenet121", 14, 6_968_206),     # CheXNet head
    ("densenet169", 1000, 14_149_480),
    ("densenet201", 1000, 20_013_928),
])
@pytest.mark.xdist_group("large_presets")
def test_parameter_counts_match_torchvision(preset, num_classes, expected):
  model = abstract_densenet(preset, num_classes)
  assert densenet.count_params(model) == expected


@pytest.fixture(scope="module")
def tiny():
  return random_densenet(lambda: densenet.DenseNetTiny(num_classes=5, in_channels=1,
                                                     rngs=nnx.Rngs(0)))


# The three tests below run the tiny network eagerly, op by op, on one input shape, in
# one worker: each operation compiles once for all three.
EAGER_SHAPE = (4, 32, 32, 1)


@pytest.mark.xdist_group("densenet_tiny_eager")
def test_suffix_of_prefix_equals_forward_at_every_stage(tiny):
  x = jax.random.normal(jax.random.key(0), EAGER_SHAPE)
  full = tiny(x)
  assert tiny.stage_names == ("stem", "block1", "transition1", "block2", "transition2",
                              "block3")
  for stage in tiny.stage_names:
    h = tiny.forward_to(x, stage)
    np.testing.assert_array_equal(np.asarray(tiny.forward_from(h, stage)), np.asarray(full))


@pytest.mark.xdist_group("large_presets")
def test_densenet121_stages_and_feature_map_shapes():
  """DenseNet-121's stages and their shapes, traced abstractly (no weights, no compute;
  the split's exactness is checked on the tiny preset above, same code)."""
  abstract = abstract_densenet("densenet121", 14)
  graphdef, state = nnx.split(abstract)
  assert abstract.stage_names == ("stem", "block1", "transition1", "block2", "transition2",
                                  "block3", "transition3", "block4")
  widths = (64, 256, 128, 512, 256, 1024, 512, 1024)
  sizes = (16, 16, 8, 8, 4, 4, 2, 2)  # a 64-px input

  def split(state, x, stage):
    model = nnx.merge(graphdef, state)
    model.eval()
    h = model.forward_to(x, stage)
    return h, model.forward_from(h, stage)

  x = jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32)
  for stage, width, size in zip(abstract.stage_names, widths, sizes, strict=True):
    h, logits = jax.eval_shape(lambda s, x, st=stage: split(s, x, st), state, x)
    assert h.shape == (1, size, size, width) and logits.shape == (1, 14), stage
  features = jax.eval_shape(lambda s, x: nnx.merge(graphdef, s).features(x), state, x)
  assert features.shape == (1, 2, 2, 1024)


def test_unknown_stage_lists_valid_ones(tiny):
  with pytest.raises(ValueError, match="valid stages are.*block1"):
    tiny.forward_to(jnp.zeros((1, 32, 32, 1)), "block9")


def test_unknown_preset_lists_valid_ones():
  with pytest.raises(ValueError, match="valid presets are.*densenet121"):
    densenet.create_densenet("resnet50", rngs=nnx.Rngs(0))


def _logits_fn(model):
  graphdef, params, stats = nnx.split(model, nnx.Param, nnx.BatchStat)
  return checkpoint.make_logits_fn(graphdef, nnx.to_pure_dict(params),
                                   nnx.to_pure_dict(stats))


@pytest.mark.xdist_group("densenet_tiny_eager")
def test_logits_fn_is_jit_vmap_grad_safe(tiny):
  logits_fn = _logits_fn(tiny)
  x = jax.random.normal(jax.random.key(2), EAGER_SHAPE)
  eager = logits_fn(x)
  np.testing.assert_allclose(jax.jit(logits_fn)(x), eager, rtol=1e-5, atol=1e-6)
  # Eval mode: each example is independent of the others in its batch.
  per_example = jax.jit(jax.vmap(lambda im: logits_fn(im[None])[0]))(x)
  np.testing.assert_allclose(per_example, eager, rtol=1e-5, atol=1e-6)
  # Gradients agree with finite differences (in float64-free central differences).
  f = lambda im: jnp.sum(jax.nn.log_softmax(logits_fn(im))[:, 1])
  jtu.check_grads(jax.jit(f), (x,), order=1, modes=["rev"], atol=2e-2, rtol=2e-2)


@pytest.mark.xdist_group("densenet_tiny_eager")
def test_non_finite_input_stays_in_its_example(tiny):
  logits_fn = _logits_fn(tiny)
  x = jax.random.normal(jax.random.key(3), EAGER_SHAPE)
  x = x.at[1, 5, 5, 0].set(jnp.nan)
  out = np.asarray(logits_fn(x))
  assert np.isnan(out[1]).all()
  assert np.isfinite(out[[0, 2, 3]]).all()


def test_tracing_construction_and_a_training_step_never_walks_the_trace(monkeypatch):
  """Flax's Variable.set_value probes getattr(value, "sharding", None); on a tracer JAX
  0.10's AttributeError message walks every equation traced so far (quadratic tracing,
  jax-ml/jax#40041). Building the model under nnx.eval_shape and tracing a training
  step (BatchNorm statistics assigned) must not walk it (cejax.models._tracing); the
  probe still answers None, and JAX's own message is back afterwards."""
  from jax._src.interpreters import partial_eval as pe

  walks = []
  original = pe.JaxprStackFrame.find_progenitors
  monkeypatch.setattr(pe.JaxprStackFrame, "find_progenitors",
                      lambda self, t: walks.append(1) or original(self, t))
  model = nnx.eval_shape(lambda: densenet.DenseNetTiny(num_classes=3, rngs=nnx.Rngs(0)))
  assert densenet.count_params(model) > 0

  def train_mode_stats(x):
    m = densenet.DenseNetTiny(num_classes=3, in_channels=1, rngs=nnx.Rngs(0))
    m(x)
    return nnx.to_pure_dict(nnx.state(m, nnx.BatchStat))

  jax.jit(train_mode_stats).trace(jnp.zeros((2, 32, 32, 1)))
  assert walks == []

  def probe(x):
    probe.got = getattr(x + 1, "sharding", "absent")
    with pytest.raises(AttributeError, match="jax.typeof"):  # JAX's own message
      (x + 1).sharding  # noqa: B018
    return x

  jax.jit(probe).trace(jnp.zeros(2))
  assert probe.got == "absent" and walks


def test_input_gradients_in_a_loop_are_canonical_convolutions_with_jaxs_values(monkeypatch):
  # JAX's transpose of a convolution reads the kernel as HWOI; XLA:CPU makes that its
  # fast HWIO form only outside loops (ConvCanonicalization visits the entry
  # computation alone), so inside a scan it ran as a generic loop. DenseNet's spatial
  # convolutions take their input gradient through an HWIO kernel (models/_conv.py).
  model = random_densenet(lambda: densenet.DenseNet(
      growth_rate=4, block_config=(2,), num_init_features=8, bn_size=2, num_classes=3,
      rngs=nnx.Rngs(0)), seed=2)
  graphdef, state = nnx.split(model)
  x = jax.random.normal(jax.random.key(0), (2, 24, 24, 3))

  def grads(state, x):  # every weight's and the input's gradient
    return jax.grad(lambda s, x: nnx.merge(graphdef, s)(x)[:, 1].sum(), (0, 1))(state, x)

  def descent(x):
    return jax.lax.fori_loop(0, 2, lambda i, x: x - 0.1 * grads(state, x)[1], x)

  hlo = jax.jit(descent).lower(x).compile().as_text()
  assert "convolution(" in hlo and "01oi" not in hlo  # HWOI kernels: none left
  ours = jax.jit(grads)(state, x), jax.jit(descent)(x)
  # JAX's own gradients of the same network through nnx.Conv's calls: the same bits
  # (outside loops the same operations; inside, XLA:CPU's generic loop rounds apart).
  monkeypatch.setattr(densenet, "spatial_conv", lambda layer, x: layer(x))
  # (new lambdas: jit caches traces by function, and these must be traced again)
  jaxs = jax.jit(lambda s, x: grads(s, x))(state, x)
  jax.tree.map(np.testing.assert_array_equal, ours[0], jaxs)
  np.testing.assert_allclose(ours[1], jax.jit(lambda x: descent(x))(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kernel,strides,padding,size", [
    (3, (1, 1), ((1, 1), (1, 1)), (9, 10)), (7, (2, 2), ((3, 3), (3, 3)), (11, 16)),
    (5, (3, 2), ((1, 2), (2, 0)), (10, 9)), (1, (2, 2), ((0, 0), (0, 0)), (9, 12))])
def test_conv_gradients_equal_jaxs_for_strides_and_asymmetric_padding(kernel, strides,
                                                                      padding, size):
  # densenet.spatial_conv (models/_conv.py) against nnx.Conv's own call: the input's and
  # the kernel's gradients, bit for bit.
  layer = nnx.Conv(3, 4, (kernel, kernel), strides=strides, padding=padding,
                   use_bias=False, rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(layer)
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, *size, 3)), jnp.float32)
  cot = jnp.asarray(np.random.default_rng(1).normal(size=layer(x).shape), jnp.float32)

  def grads(call):
    return jax.jit(jax.grad(lambda s, x: jnp.vdot(call(nnx.merge(graphdef, s), x), cot),
                            (0, 1)))(state, x)

  ours = grads(densenet.spatial_conv)
  jaxs = grads(lambda layer, x: layer(x))
  jax.tree.map(np.testing.assert_array_equal, ours, jaxs)


def test_spatial_refuses_convolutions_it_would_compute_differently():
  x = jnp.ones((2, 9, 9, 3))
  pad = ((1, 1), (1, 1))
  for kwargs, named in ((dict(padding="SAME", use_bias=False), "padding"),
                        (dict(padding=pad, kernel_dilation=2, use_bias=False),
                         "kernel_dilation"),
                        (dict(padding=pad), "use_bias")):
    with pytest.raises(ValueError, match=f"unsupported .*'{named}'"):
      densenet.spatial_conv(nnx.Conv(3, 4, (3, 3), rngs=nnx.Rngs(0), **kwargs), x)
