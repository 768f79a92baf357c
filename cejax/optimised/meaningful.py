"""Meaningful perturbations (Fong and Vedaldi, ICCV 2017): the deletion game with an
L1 sparsity and a total-variation smoothness term, the older baseline of extremal
perturbations.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from cejax import estimands, sharding
from cejax._compile import jit
from cejax.optimised.extremal import DELETE, check_inputs
from cejax.optimised.smooth_masks import blur_pyramid
from cejax.types import Images, LogitsFn, Maps, PRNGKey, Targets


def total_variation(masks, *, beta: float = 3.0):
  """``sum_u ((m(u+e_y) - m(u))^2 + (m(u+e_x) - m(u))^2)^(beta/2)`` over each
  ``(..., h, w)`` mask (Fong and Vedaldi's ``TV_beta``, forward differences, the last
  row and column taking the one difference they have)."""
  dy = jnp.diff(masks, axis=-2)[..., :, :-1]
  dx = jnp.diff(masks, axis=-1)[..., :-1, :]
  inner = jnp.sum((dy * dy + dx * dx) ** (beta / 2), axis=(-2, -1))
  last_col = jnp.sum(jnp.abs(jnp.diff(masks, axis=-2)[..., -1]) ** beta, axis=-1)
  last_row = jnp.sum(jnp.abs(jnp.diff(masks, axis=-1)[..., -1, :]) ** beta, axis=-1)
  return inner + last_col + last_row


def _check_meaningful(a):
  images, targets = check_inputs(dict(a, variant=DELETE))
  if int(a["mask_size"]) < 2:
    raise ValueError(f"mask_size must be at least 2, got {a['mask_size']}.")
  return dict(a, images=images, targets=targets.astype(jnp.int32))


@jit(prepare=_check_meaningful)
def meaningful_perturbation(logits_fn: LogitsFn, images: Images, targets: Targets, *,
                            key: PRNGKey, iterations: int = 500,
                            learning_rate: float = 0.1, l1: float = 1e-4,
                            tv: float = 1e-2, tv_beta: float = 3.0, mask_size: int = 28,
                            max_blur: float = 10.0, max_shift: int = 4,
                            activation: str = "softmax", batch_size: int = 1,
                            mesh: jax.sharding.Mesh | None = None) -> Maps:
  """Meaningful perturbations (Fong and Vedaldi, ICCV 2017), the deletion game.

  Minimises ``l1 |1 - m|_1 + tv TV_beta(m) + p_t(phi(x; m))`` over a ``mask_size``
  square mask ``m`` in [0, 1] (1 keeps), upsampled bilinearly to the image; ``phi(x; m) =
  m x + (1 - m) blur(x)``, the image blended with its blur at ``max_blur`` (TorchRay's
  kernel, zero padding; the paper's ``phi`` varies the blur's sigma with ``m``, which
  would give no gradient at the starting mask of ones); ``p_t`` is the target's
  probability. Adam (``learning_rate``), mask initialised to ones and clipped to [0, 1]
  after each step; each iteration shifts the image and mask together by a random
  offset of up to ``max_shift`` pixels (their jitter; from ``key``).

  Returns:
    Maps ``(n, h, w)``, ``1 - m``: larger means deleting it lowers the target more.
  """
  n, h, w, _ = images.shape
  optimiser = optax.adam(learning_rate)

  def one_batch(indices):
    pick = lambda x: jnp.take(x, indices, axis=0, mode="clip")  # noqa: E731
    x0, t0 = pick(images), pick(targets)
    blurred = jax.vmap(lambda im: blur_pyramid(im, num_levels=2, max_blur=max_blur)[0])(x0)
    keys = jax.random.split(jax.random.fold_in(key, indices[0]), iterations)

    def loss(m, shift):
      up = jax.image.resize(m, (m.shape[0], h, w), "linear")
      x = up[..., None] * x0 + (1 - up[..., None]) * blurred
      x = jax.vmap(lambda im: jnp.roll(im, shift, axis=(0, 1)))(x)
      probs = estimands.activate(logits_fn(x), activation)
      p = probs[jnp.arange(x.shape[0]), t0]
      return jnp.sum(l1 * jnp.sum(jnp.abs(1 - m), (-2, -1))
                     + tv * total_variation(m, beta=tv_beta) + p)

    def step(carry, k):
      m, state = carry
      shift = jax.random.randint(k, (2,), -max_shift, max_shift + 1)
      grads = jax.grad(loss)(m, shift)
      updates, state = optimiser.update(grads, state, m)
      return (jnp.clip(optax.apply_updates(m, updates), 0, 1), state), None

    m = jnp.ones((x0.shape[0], mask_size, mask_size), jnp.float32)
    (m, _), _ = jax.lax.scan(step, (m, optimiser.init(m)), keys)
    return 1 - jax.image.resize(m, (m.shape[0], h, w), "linear")

  return sharding.map_chunks(one_batch, n, batch_size=batch_size, mesh=mesh)


__all__ = ["meaningful_perturbation", "total_variation"]
