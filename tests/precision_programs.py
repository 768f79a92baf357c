"""Every public program of cejax that calls a model, and the precision of each of its dots
and convolutions: run by ``test_precision.py`` in a fresh interpreter, without the
suite's global ``jax_default_matmul_precision`` (which would make every product HIGHEST
whatever cejax does).

    python tests/precision_programs.py

Functions with no decision on the host are lowered (``jax.jit(...).lower``, the
StableHLO's ``precision``/``precision_config``); those that run several programs from
the host (the counterfactual's decisions, the autoencoder's training and fidelity) are
run, and every module they compile is read from JAX's dump of what it hands XLA
(``jax_dump_ir_to``: StableHLO, as lowered; XLA's own dumps add the optimised HLO, LLVM
IR and object code of every module, about 40 % more CPU time for the programs run). The model
computes its products at precision None, as a user's model does. The models and inputs
are built once, and every program is traced under the ``exact`` policy (the default),
then again under ``tf32`` set globally as a user would set it (JAX traces every program
again when the setting changes: it is part of the trace context). Prints
``{mode: {program: sorted precisions}}`` as JSON.
"""

from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax

H, W, C, K = 12, 10, 3, 4


def model():
  """A small CNN: conv 3x3 -> tanh (features), mean -> dense (logits); weights from numpy
  so that nothing is compiled before the programs under test."""
  rng = np.random.default_rng(0)
  kernel = jnp.asarray(rng.normal(size=(3, 3, C, 6)), jnp.float32)
  dense = jnp.asarray(rng.normal(size=(6, K)), jnp.float32)

  def features_fn(x):
    return jnp.tanh(lax.conv_general_dilated(x, kernel, (1, 1), "SAME",
                                             dimension_numbers=("NHWC", "HWIO", "NHWC")))

  def classify_fn(f):
    return f.mean((1, 2)) @ dense

  return (lambda x: classify_fn(features_fn(x))), features_fn, classify_fn


def programs():
  """``{name: (kind, thunk)}``: ``"lower"`` thunks are traced whole, ``"run"`` thunks run."""
  from cejax import attacks, effects, masks, metrics, saliency
  from cejax.attacks import defenses
  from cejax.forwards import autoencoder, incremental, latent
  from cejax.models import densenet, vit
  from cejax.optimised import ce_optimal, counterfactual, extremal, meaningful

  logits_fn, features_fn, classify_fn = model()
  image = jnp.asarray(np.random.default_rng(1).normal(size=(H, W, C)), jnp.float32)
  images = jnp.stack([image, -image])
  pixels = jax.nn.sigmoid(images)
  targets = jnp.array([0, 1], jnp.int32)
  key = jax.random.key(0)
  space = attacks.PixelSpace()
  grid = masks.grid(shape=(H, W), n=3)
  net = densenet.DenseNet(growth_rate=4, block_config=(2, 1), num_init_features=8,
                          bn_size=2, in_channels=C, num_classes=K, rngs=nnx.Rngs(0))
  net.eval()
  attack = dict(eps=0.05, space=space)
  optimised = dict(areas=(0.2,), iterations=2, step=3, sigma=5.0)
  ae = autoencoder.FeatureAutoencoder(6, code_channels=2, rngs=nnx.Rngs(0))
  vit_model = vit.VisionTransformer(img_size=8, patch_size=4, in_channels=C, embed_dim=8,
                                    depth=1, num_heads=2, num_classes=K, rngs=nnx.Rngs(0))
  vit_images = jnp.stack([image[:8, :8], -image[:8, :8]])

  def on_vit(fn):
    # The images and targets are arguments of a jit, as under a user's jit: closed over,
    # they are staged, and the ViT maps' check of concrete targets cannot read them.
    return lambda: jax.jit(lambda x, t: fn(vit_model, x, t))(vit_images, targets)

  return {
      "causal_effect, full forward": ("lower", lambda: effects.causal_effect(
          logits_fn, image, grid, batch_size=4).effects),
      "causal_effect, incremental forward (DenseNet)": ("lower", lambda: effects.causal_effect(
          incremental.forward(net), image, grid, batch_size=4).effects),
      "causal_effect, latent forward": ("lower", lambda: effects.causal_effect(
          latent.forward(features_fn, lambda f: classify_fn(f)), image,
          latent.latent_interventions(channels=[0, 1])).effects),
      "saliency.input_gradient": ("lower", lambda: saliency.input_gradient(
          logits_fn, images, targets)),
      "saliency.vanilla_gradient": ("lower", lambda: saliency.vanilla_gradient(
          logits_fn, images, targets)),
      "saliency.gradient_x_input": ("lower", lambda: saliency.gradient_x_input(
          logits_fn, images, targets)),
      "saliency.smoothgrad": ("lower", lambda: saliency.smoothgrad(
          logits_fn, images, targets, key=key, num_samples=2)),
      "saliency.integrated_gradients": ("lower", lambda: saliency.integrated_gradients(
          logits_fn, images, targets, steps=2)),
      "saliency.cam": ("lower", lambda: saliency.cam(features_fn, classify_fn, images,
                                                     targets)),
      "saliency.grad_cam": ("lower", lambda: saliency.grad_cam(features_fn, classify_fn,
                                                               images, targets)),
      "saliency.grad_cam_pp": ("lower", lambda: saliency.grad_cam_pp(
          features_fn, classify_fn, images, targets)),
      "saliency.smooth_grad_cam_pp": ("lower", lambda: saliency.smooth_grad_cam_pp(
          features_fn, classify_fn, images, targets, key=key, num_samples=2)),
      "saliency.rise": ("lower", lambda: saliency.rise(logits_fn, images, targets, key=key,
                                                       num_masks=4, cells=2, batch_size=2)),
      "saliency.adaptive_rise": ("lower", lambda: saliency.adaptive_rise(
          logits_fn, images, targets, key=key, tolerance=0.1, first=2, max_masks=4,
          cells=2, batch_size=2)),
      "saliency.occlusion": ("lower", lambda: saliency.occlusion(
          logits_fn, images, targets, window=4, stride=4)),
      "attacks.fgsm": ("lower", lambda: attacks.fgsm(logits_fn, pixels, targets,
                                                     **attack).images),
      "attacks.bim": ("lower", lambda: attacks.bim(logits_fn, pixels, targets, steps=2,
                                                   **attack).images),
      "attacks.mifgsm": ("lower", lambda: attacks.mifgsm(logits_fn, pixels, targets,
                                                         steps=2, **attack).images),
      "attacks.pgd": ("lower", lambda: attacks.pgd(logits_fn, pixels, targets, key=key,
                                                   steps=2, **attack).images),
      "attacks.bpda_pgd": ("lower", lambda: attacks.bpda_pgd(
          logits_fn, pixels, targets, key=key, steps=2, defense=defenses.bit_depth,
          **attack).images),
      "attacks.carlini_wagner_l2": ("lower", lambda: attacks.carlini_wagner_l2(
          logits_fn, pixels, targets, steps=2, search_steps=1, space=space).images),
      "attacks.deepfool": ("lower", lambda: attacks.deepfool(
          logits_fn, pixels, targets, steps=2, space=space).images),
      "defenses.squeeze_score": ("lower", lambda: defenses.squeeze_score(
          logits_fn, pixels, space=space)),
      "metrics.deletion_insertion": ("lower", lambda: metrics.deletion_insertion(
          logits_fn, images, images[..., 0], targets, step=40)),
      "extremal.extremal_perturbation": ("lower", lambda: extremal.extremal_perturbation(
          logits_fn, images, targets, **optimised).masks),
      "ce_optimal.ce_optimal_mask": ("lower", lambda: ce_optimal.ce_optimal_mask(
          logits_fn, images, targets, **optimised).effect),
      "meaningful.meaningful_perturbation": ("lower", lambda: (
          meaningful.meaningful_perturbation(logits_fn, images, targets, key=key,
                                             iterations=2, mask_size=4))),
      "counterfactual.minimal_counterfactual": ("run", lambda: (
          counterfactual.minimal_counterfactual(logits_fn, images, bisection_steps=1,
                                                **optimised))),
      "autoencoder.train_autoencoder": ("run", lambda: autoencoder.train_autoencoder(
          features_fn, [images], features=6, code_channels=2, steps=1)),
      "autoencoder.fidelity": ("run", lambda: autoencoder.fidelity(
          logits_fn, features_fn, classify_fn, ae, images)),
      "saliency.attention_relevance (ViT)": ("lower", on_vit(saliency.attention_relevance)),
      "saliency.token_grad_cam (ViT)": ("lower", on_vit(saliency.token_grad_cam)),
      "saliency.legrad (ViT)": ("lower", on_vit(saliency.legrad)),
      "saliency.transformer_attribution (ViT)": ("lower", on_vit(
          saliency.transformer_attribution)),
  }


def lowered_precisions(text: str) -> list[str]:
  """Operand precisions of every dot_general and convolution of a StableHLO module."""
  found = []
  for line in text.splitlines():
    if "stablehlo.dot_general" in line:
      match = re.search(r"precision = \[(\w+), (\w+)\]", line)
      found.append(",".join(match.groups()) if match else "DEFAULT,DEFAULT")
    elif "stablehlo.convolution" in line:
      match = re.search(r"precision_config = \[#stablehlo<precision (\w+)>, "
                        r"#stablehlo<precision (\w+)>\]", line)
      found.append(",".join(match.groups()) if match else "DEFAULT,DEFAULT")
  return found


def dumped_precisions(dump: Path, seen: set[str]) -> list[str]:
  """Operand precisions of every dot and convolution in the modules JAX dumped that are
  not yet ``seen`` (those compiled since the last call)."""
  found = []
  for path in sorted(dump.glob("*.mlir")):
    if path.name not in seen:
      seen.add(path.name)
      found += lowered_precisions(path.read_text())
  return found


def main():
  from cejax import precision

  assert jax.config.jax_default_matmul_precision is None, "a global setting is in force"
  # Built once: a policy applies where a program is traced, not where its inputs were made.
  everything = programs()
  out = {}
  with tempfile.TemporaryDirectory() as tmp:
    dump = Path(tmp)
    jax.config.update("jax_dump_ir_to", str(dump))  # every module compiled from here on
    jax.config.update("jax_include_debug_info_in_dumps", False)  # no source locations
    seen: set[str] = set()
    for mode in ("exact", "tf32"):
      if mode != "exact":
        # precision.policy(mode) for the whole process, as a user's own code would set it.
        jax.config.update("jax_default_matmul_precision", precision.PRECISIONS[mode])
      found = out[mode] = {}
      for name, (kind, thunk) in everything.items():
        if kind == "lower":
          found[name] = sorted(set(lowered_precisions(jax.jit(thunk).lower().as_text())))
        else:
          jax.block_until_ready(thunk())
          found[name] = sorted(set(dumped_precisions(dump, seen)))
  print(json.dumps(out))


if __name__ == "__main__":
  main()
