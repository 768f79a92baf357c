"""The paper's autoencoder inserted at a stage: TV term, training, fidelity, code CE."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cejax import effects
from cejax.data import pipeline
from cejax.forwards import autoencoder, latent
from cejax.jobs import checkpoint


def test_total_variation_closed_form():
  x = jnp.zeros((1, 3, 4, 1)).at[0, :, 2:, 0].set(1.0)  # one vertical edge
  # |dx| is 1 on 3 of the 9 horizontal neighbour pairs; |dy| is 0 everywhere.
  np.testing.assert_allclose(autoencoder.total_variation(x), 1 / 3, rtol=1e-6)


@pytest.mark.xdist_group("trained_tiny")
def test_autoencoder_learns_the_stage_and_preserves_predictions(trained_tiny):
  config, workdir = trained_tiny
  g, p, s, run = checkpoint.load_model(workdir)
  # Jitted: called eagerly here, the network would compile each of its operations.
  logits_fn = jax.jit(checkpoint.make_logits_fn(g, p, s))
  prefix, suffix = map(jax.jit, checkpoint.make_stage_fns(g, p, s, "block2"))
  data = pipeline.load_dataset(config.data)
  batches = [data.batch("train", np.arange(i, i + 64))["image"] for i in range(0, 1024, 64)]
  features = prefix(batches[0][:1]).shape[-1]
  model, history = autoencoder.train_autoencoder(
      prefix, batches, features=features, code_channels=16, steps=300,
      learning_rate=3e-3, tv_weight=0.01)
  assert history[-1]["l1"] < 0.5 * history[0]["l1"]
  test = data.batch("test", np.arange(64))["image"]
  fid = autoencoder.fidelity(logits_fn, prefix, suffix, model, test)
  print("autoencoder fidelity on 64 test images:", fid)
  assert fid["top1_agreement"] >= 0.8, fid
  # Latent CE on the code channels is the same function of the code as a hand-made
  # intervention pushed through the decoder and the classifier's suffix.
  code_prefix, code_suffix = autoencoder.code_fns(prefix, suffix, model)
  image = jnp.asarray(test[0])
  inter = latent.latent_interventions(channels=np.arange(16), values=[0.0])
  res = effects.causal_effect(latent.forward(code_prefix, code_suffix), image, inter,
                                     estimand="probability", batch_size=5)
  code = model.encode(prefix(image[None]))
  t = jnp.argmax(suffix(model.decode(code))[0])
  p0 = jax.nn.softmax(suffix(model.decode(code))[0])[t]
  for k in (0, 7, 15):
    q = jax.nn.softmax(suffix(model.decode(code.at[..., k].set(0.0)))[0])[t]
    np.testing.assert_allclose(res.effects[k], q - p0, rtol=1e-4, atol=1e-6)
