"""cejax: causal effects of interventions on images and features, in JAX."""
