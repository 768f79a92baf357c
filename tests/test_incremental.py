"""Incremental recompute (``cejax.forwards.incremental``): the region arithmetic against
brute-force activation differences and exhaustive positions, and the effects against
the full-forward sweep (``effects.causal_effect``) for every estimand, batch size,
border masks and odd image sizes. On several devices and processes the sweep tests
(``test_sweep``, whose grid masks take this path) check it bit for bit."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import abstract_densenet
from flax import nnx
from random_networks import random_densenet

from cejax import effects, interventions, masks
from cejax.estimands import ESTIMANDS
from cejax.forwards import incremental
from cejax.forwards.incremental import AxisOp, Plan
from cejax.jobs.sweep import plan as sweep_plan
from cejax.models import densenet


def _model(**kw):
  """Small DenseNets: the tiny preset, or two short blocks (the patch reaches the head)."""
  kw = dict(growth_rate=4, block_config=(2, 1), num_init_features=8, bn_size=2,
            in_channels=2, num_classes=4) | kw
  return random_densenet(lambda: densenet.DenseNet(rngs=nnx.Rngs(0), **kw))


def test_patches_contain_every_changed_output_and_windows_stay_in_bounds():
  # Exhaustive over input patch positions, for each kind of layer and odd sizes.
  for (k, s, p), n, r in itertools.product([(7, 2, 3), (3, 2, 1), (3, 1, 1), (2, 2, 0)],
                                           [7, 8, 13, 31], [1, 2, 5, 9]):
    op = AxisOp(k, s, p, n)
    if r > n:
      continue
    plan = Plan.make(op, r)
    for a in range(n - r + 1):
      lo, hi = op.changed(a, a + r - 1)
      c = int(plan.start_out(a))
      assert 0 <= c and c + plan.size_out <= op.size_out
      assert c <= lo and hi < c + plan.size_out, (op, r, a)
      ws = c * s  # window start in padded coordinates
      assert ws <= a + p and a + p + r <= ws + plan.window  # holds the input patch
      assert ws + plan.window <= p + n + plan.pad_after  # inside the padded map
      assert (plan.window - k) // s + 1 >= plan.size_out  # yields the output patch


def _activations(model, x):
  """Each windowed layer's output (a dense layer's: its new channels), brute force."""
  out = {}
  h = model.stem.conv(x)
  out["stem.conv"] = h
  h = nnx.relu(model.stem.norm(h))
  if model.stem.pool:
    h = nnx.max_pool(h, (3, 3), (2, 2), ((1, 1), (1, 1)))
    out["stem.pool"] = h
  for b, block in enumerate(model.blocks):
    for i, layer in enumerate(block.layers):
      new = layer(h)
      out[f"block{b + 1}.layer{i + 1}"] = new[..., h.shape[-1]:]
      h = new
    if b < len(model.transitions):
      h = model.transitions[b](h)
      out[f"transition{b + 1}"] = h
  return out


@pytest.mark.parametrize("box", [(0, 0, 4, 3), (11, 17, 6, 5), (33, 36, 4, 5)])
def test_region_arithmetic_equals_brute_force_activation_differences(box):
  model = random_densenet(lambda: densenet.DenseNetTiny(num_classes=3, in_channels=1,
                                                      rngs=nnx.Rngs(1)), seed=1)
  image = jax.random.normal(jax.random.key(0), (1, 37, 41, 1))
  y0, x0, bh, bw = box
  changed = image.at[0, y0:y0 + bh, x0:x0 + bw].add(
      jax.random.normal(jax.random.key(2), (bh, bw, 1)) * 5)
  graphdef, state = nnx.split(model)
  run = jax.jit(lambda x: _activations(nnx.merge(graphdef, state), x))
  clean, masked = run(image), run(changed)
  lo, hi = np.array([y0, x0]), np.array([y0 + bh - 1, x0 + bw - 1])
  for layer, oy, ox in incremental.layer_ops(model, image.shape[1:]):
    name = layer.name
    (ly, hy), (lx, hx) = oy.changed(lo[0], hi[0]), ox.changed(lo[1], hi[1])
    lo, hi = np.array([ly, lx]), np.array([hy, hx])
    diff = np.abs(np.asarray(masked[name] - clean[name]))[0].max(-1) > 0
    rows, cols = np.flatnonzero(diff.any(1)), np.flatnonzero(diff.any(0))
    # The rule's region is exactly the box of the changed activations.
    assert (rows[0], rows[-1], cols[0], cols[-1]) == (ly, hy, lx, hx), name


def _all_estimands(activation):
  names = tuple(ESTIMANDS)
  return sweep_plan.StackedEstimand(names, all_targets=True), names


@pytest.mark.heavy(15)
def test_effects_equal_the_full_forward_sweep():
  # Two blocks (61 x 67): patches all the way to the head, which adds the patch's change
  # to the clean mean. Three blocks: the walk switches to whole maps part-way through a block
  # (45 x 38), at a block's first layer (61 x 67) or at a transition (64 x 64).
  # Grid cells of uneven sizes, windows cut at the far edges, boxes on the borders; each
  # case with another estimand activation, fill and batch size (1: plain slices; 4: a
  # vmap of gathers, with padding masks on the last chunk; None: every mask at once).
  two = _model()
  # The tiny preset's widths with two layers per block (fewer layers to compile).
  tiny = _model(growth_rate=12, block_config=(2, 2, 2), num_init_features=24, bn_size=4)
  cases = [
      (two, (61, 67), 1.0, lambda h, w: masks.grid(shape=(h, w), n=7), "softmax", "zero", 1),
      (two, (61, 67), 1.0, lambda h, w: masks.to_array(masks.boxes(jnp.array(
          [[0, 0, 3, 4], [w - 5, h - 2, w - 1, h - 1], [10.2, 20.5, 14.9, 25.7]]),
          shape=(h, w))), "softmax", interventions.Blur(sigma=2.0), None),
      (tiny, (45, 38), 0.6, lambda h, w: masks.sliding_windows(
          shape=(h, w), window=(6, 9), stride=(5, 7)), "sigmoid", "mean", 4),
      (tiny, (61, 67), 0.6, lambda h, w: masks.grid(shape=(h, w), n=7), "softmax",
       "zero", 1),
      (tiny, (64, 64), 0.3, lambda h, w: masks.sliding_windows(
          shape=(h, w), window=(6, 9), stride=(6, 9)), "softmax", "zero", None),
  ]
  switches = []
  for model, (h, w), fraction, make, activation, fill, batch in cases:
    image = jax.random.normal(jax.random.key(3), (h, w, 2))
    source = make(h, w)
    graphdef, state = nnx.split(model)
    logits_fn = lambda x, g=graphdef, s=state: nnx.merge(g, s)(x)  # noqa: E731
    estimand, _ = _all_estimands(activation)
    decision = incremental.plan(model, image.shape, source, full_fraction=fraction)
    assert decision.applies and decision.macs_incremental < decision.macs_full
    patched = [s.plans is not None for s in decision.steps]
    if model is two:
      assert all(patched)
    else:
      assert patched[:3] == [True] * 3 and not all(patched)
      switches.append(decision.steps[patched.index(False)].name)
    want = effects.causal_effect(logits_fn, image, source, intervention=fill,
                                 estimand=estimand, activation=activation, batch_size=4)
    got = effects.causal_effect(incremental.forward(model, full_fraction=fraction), image,
                                source, intervention=fill, estimand=estimand,
                                activation=activation, batch_size=batch)
    np.testing.assert_allclose(got.clean_logits, want.clean_logits, rtol=0, atol=1e-5)
    err = np.abs(np.asarray(got.effects) - np.asarray(want.effects)).max()
    assert err <= 1e-5 and np.abs(np.asarray(want.effects)).max() > 1e-3, (fill, err)
    if model is two and fill == "zero":
      # And against plain forward passes of the masked images, the estimands in numpy
      # (the paper's expected effect, probability, logit and per-class differences).
      stack = np.asarray(source(jnp.arange(source.num)))
      x = np.asarray(image)
      batch = np.concatenate([x[None], x[None] * (1 - stack[..., None])])
      logits = np.asarray(jax.jit(logits_fn)(jnp.asarray(batch)), np.float64)
      p = np.exp(logits - logits.max(-1, keepdims=True))
      p /= p.sum(-1, keepdims=True)
      k = logits.shape[-1]
      cols = np.split(np.asarray(got.effects), np.cumsum(estimand.widths(k))[:-1], -1)
      got_by_name = dict(zip(estimand.names, cols, strict=True))
      for name, ref in [("expected", (p[0] * (p[1:] - p[0])).sum(-1, keepdims=True)),
                        ("probability", p[1:] - p[0]), ("logit", logits[1:] - logits[0]),
                        ("per_class", p[1:] - p[0])]:
        np.testing.assert_allclose(got_by_name[name], ref, rtol=0, atol=1e-5, err_msg=name)
  assert switches == ["block1.layer2", "block2.layer1", "transition1"]


def test_masks_it_cannot_speed_up_are_named_with_the_reason():
  model = _model()
  image = jnp.zeros((61, 67, 2))
  rise = masks.rise(jax.random.key(0), num=4, shape=(61, 67))
  assert "not local" in incremental.plan(model, image.shape, rise).reason
  noise = interventions.GaussianNoise(std=0.1)
  grid = masks.grid(shape=(61, 67), n=5)
  assert "random" in incremental.plan(model, image.shape, grid, intervention=noise).reason
  whole = jnp.ones((2, 61, 67)).at[0, 0, 0].set(0)
  assert "whole image" in incremental.plan(model, image.shape, whole).reason
  with pytest.raises(ValueError, match="does not apply: RISE masks are not local"):
    effects.causal_effect(incremental.forward(model), image, rise)


@pytest.mark.xdist_group("large_presets")
@pytest.mark.parametrize("preset,num_classes", [("densenet121", 14), ("densenet201", 1000)])
def test_plans_for_the_large_presets(preset, num_classes):
  # Built abstractly (shapes only): the plan needs the architecture, not the weights
  # (the models test_densenet counts the parameters of; 169 lies between them).
  model = abstract_densenet(preset, num_classes)
  decisions = {n: incremental.plan(model, (n, n, 3), masks.grid(shape=(n, n), n=10))
               for n in (224, 448)}
  assert all(d.applies for d in decisions.values())
  if preset == "densenet121":
    # Multiply-accumulates of a full forward pass, as counted in issue 13's table
    # (2.83 G at 224, 11.3 G at 448); the patches save at least 1.8x and 2.7x of them.
    assert round(decisions[224].macs_full / 1e9, 2) == 2.83
    assert round(decisions[448].macs_full / 1e9, 1) == 11.3
    assert decisions[224].macs_full / decisions[224].macs_incremental > 1.8
    assert decisions[448].macs_full / decisions[448].macs_incremental > 2.7
  steps = decisions[224].steps
  assert steps[0].plans is not None and steps[-1].plans is None  # block 4 (7 x 7) in full
