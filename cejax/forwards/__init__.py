"""Forward paths: how a model's logits under interventions are computed, each a
``cejax.effects.Forward`` of the one engine (``cejax.causal_effect``).

- ``cejax.forwards.full``: full forward passes of the intervened images (what a plain
  ``logits_fn`` is wrapped in);
- ``cejax.forwards.incremental``: a DenseNet recomputed only where each local mask
  reaches (exact to float32 round-off; its plan in ``_incremental_plan``);
- ``cejax.forwards.latent``: interventions on hidden features ``do(h_k = v)``;
- ``cejax.forwards.autoencoder``: the paper's autoencoder inserted at a stage, for
  latent interventions on its code;
- ``cejax.forwards.tokens``: a Vision Transformer's masked patches removed from its
  token sequence (or hidden from attention) instead of painted over.

The modules are imported on their own (``from cejax.forwards import incremental``);
``import cejax`` gives ``cejax.incremental`` and ``cejax.latent`` too.
"""
