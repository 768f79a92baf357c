"""The causal-effect engine: ``causal_effect`` for every forward path, and ``ce_map``.

For each mask ``M`` the intervention ``do(X_M = v)`` gives the input ``x * (1 - M) + v *
M`` (soft masks blend), and an *estimand* (``cejax.estimands``: the paper's expected
effect, a target's probability or logit, KL, per class) compares the prediction under
it with the clean one. A *forward* says how the intervened logits are computed:

- a plain ``logits_fn(images) -> logits``: full forward passes of the masked images
  (``FullForward``, what a function is wrapped in);
- ``incremental.forward(densenet)``: a DenseNet recomputed only where a local mask can
  change its activations (exact to float32 round-off);
- ``latent.forward(prefix_fn, suffix_fn)``: ``do(h_k = v)`` on hidden features, with
  ``LatentInterventions`` in place of masks.

Everything else is written once, here: the checks, the clean logits, the target, the
draws of random interventions, the chunks of ``batch_size`` items, the sharding of the
item axis over a mesh, the estimand and the NaN contract. A new forward path implements
``Forward`` and nothing else.

Bad values and transformations: called eagerly, a non-finite or integer image, a mask
outside [0, 1] or a target outside ``[0, k)`` raise ``ValueError``. Under ``jit``/
``vmap``/``grad`` the values are not known when the function is traced, so the contract
is a visible failure instead: the effects of a non-finite image are all NaN, those of a
mask outside [0, 1] are NaN for that mask, and with a target out of range the target
estimands (``probability``, ``logit``) are NaN (never a silently clamped class).

Random interventions (``GaussianNoise``, ``ImageSet``) average the prediction over
``num_draws`` draws, the Monte Carlo form of ``E[Y | do(X_M = V)]``: probabilities
are averaged for the probability estimands, logits for ``logit``. Draw ``d`` for item
``i`` uses ``fold_in(fold_in(key, i), d)``, so results do not depend on batch size
or device count.

Memory is bounded by ``batch_size``: items are processed ``batch_size`` at a time in a
``lax.map``; with ``mesh=`` the item axis is split over the mesh's devices with
``jax.shard_map`` (parameters replicated). Padding items never change a result.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Protocol, runtime_checkable

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

import cejax._validation as validation
from cejax import estimands, interventions, sharding
from cejax import masks as masks_lib
from cejax._compile import jit, output_shape
from cejax.forwards.full import FullForward
from cejax.types import Effects, Image, LogitsFn, PRNGKey


class CEResult(NamedTuple):
  """Per-item effects and the clean prediction.

  Attributes:
    effects: ``(m,)``, or ``(m, k)`` for ``per_class``.
    clean_logits: ``(k,)`` logits of the unmodified input.
    target: ``()`` int32, the class the target estimands refer to.
  """

  effects: jax.Array
  clean_logits: jax.Array
  target: jax.Array


@runtime_checkable
class Forward(Protocol):
  """A forward path: how a model's logits under interventions are computed.

  Three methods, called in this order by ``causal_effect``:

  - ``prepare(what, *, image, intervention) -> Forward`` runs eagerly, outside the
    compiled program: it checks ``what`` is intervened on (masks, latent
    interventions) for this image, raises ``ValueError`` naming what is wrong, and
    returns the forward ready to trace, holding the items (``num`` of them). Pixel
    forwards take ``intervention=None`` as ``"zero"``; others refuse one.
  - ``setup(image) -> (clean_logits (k,), context)``, traced once per image: what
    every chunk shares (the image, cached activations, the fill).
  - ``logits(context, indices (b,), keys) -> (logits, ok)``, traced once per chunk:
    the logits ``(b, k)`` of items ``indices`` (``(b, d, k)`` when ``keys (b, d)`` is
    given, one per draw of a random intervention), and ``ok (b,)``, False where an
    item or the image is invalid (its effect becomes NaN).

  A prepared forward is passed to ``jax.jit`` as an argument: register it as a pytree
  (arrays as data, functions and sizes as static metadata), as ``FullForward`` is.
  """

  def prepare(self, what, *, image, intervention) -> Forward: ...

  def setup(self, image) -> tuple[jax.Array, Any]: ...

  def logits(self, context, indices, keys) -> tuple[jax.Array, jax.Array]: ...


def draw_keys(key, indices, num_draws):
  """``(b, num_draws)`` keys: draw ``d`` of item ``i`` is ``fold_in(fold_in(key, i), d)``."""
  draws = jnp.arange(num_draws)
  return jax.vmap(lambda i: jax.vmap(
      lambda d: jax.random.fold_in(jax.random.fold_in(key, i), d))(draws))(indices)


def _prepare(a):
  validation.check_image(a["image"])
  image = jnp.asarray(a["image"])
  model = a["model"]
  if not isinstance(model, Forward):
    if not callable(model):
      raise ValueError(f"model must be a logits_fn (images -> logits) or a Forward, got "
                       f"{model!r}.")
    model = FullForward(model)
  intervention = a["intervention"]
  if intervention is not None:
    intervention = interventions.resolve(intervention)
  estimand = estimands.resolve(a["estimand"])
  estimands.check_activation(a["activation"])
  validation.check_target_type(a["target"])
  if intervention is not None and interventions.is_random(intervention) and a["key"] is None:
    raise ValueError(f"{type(intervention).__name__} is random: pass key=.")
  forward = model.prepare(a["masks"], image=image, intervention=intervention)
  if isinstance(model, FullForward) and a["target"] is not None:
    # Before compiling and running the model (abstractly: shapes only, cached).
    num_classes = output_shape(model.logits_fn, (1, *image.shape), image.dtype)[-1]
    validation.check_target(a["target"], num_classes)
  return dict(a, model=forward, image=image, masks=None, intervention=intervention,
              estimand=estimand,
              batch_size=validation.check_batch_size(a["batch_size"], forward.num),
              key=jax.random.key(0) if a["key"] is None else a["key"])


def _check(a, result):
  # Other forwards: after the call, which tells the class count without another trace.
  validation.check_target(a["target"], result.clean_logits.shape[-1])


@jit(data=("model", "image", "masks", "intervention", "target", "key"), prepare=_prepare,
     check=_check)
def causal_effect(model: LogitsFn | Forward, image: Image, masks, *, intervention=None,
                  estimand="expected", target: int | None = None,
                  batch_size: int | None = None, activation: str = "softmax",
                  key: PRNGKey | None = None, mesh: jax.sharding.Mesh | None = None,
                  precision: str | None = None) -> CEResult:
  """Causal effect of each intervention on the prediction.

  Pure: works under ``jit``, under ``vmap`` over images, and under ``grad`` with
  respect to ``image``. Compiled once: eager calls with the same model, settings and
  shapes reuse one compiled program (the image, masks, target, key and the arrays of
  the intervention and the forward are traced; functions and sizes are static).

  Args:
    model: a pure ``logits_fn(images (n, h, w, c)) -> logits (n, k)`` (full forward
      passes), or a ``Forward`` (``incremental.forward(model)``,
      ``latent.forward(prefix_fn, suffix_fn)``, your own).
    image: ``(h, w, c)`` floating point, in the model's input space.
    masks: what is intervened on: ``(m, h, w)`` masks in [0, 1] or a mask source
      (``masks.grid``, ``masks.sliding_windows``, ``masks.boxes``, ``masks.rise``, any
      ``MaskSource``); ``LatentInterventions`` for the latent forward.
    intervention: what replaces masked pixels: ``"zero"`` (the default: normalised
      0, the data mean), ``"mean"``, ``"blur"``, or any ``Intervention``.
    estimand: a name in ``estimands.ESTIMANDS`` or a function (``Estimand``).
    target: class for ``probability``/``logit`` (default: the predicted class).
    batch_size: items per forward call (bounds memory); need not divide ``m``.
    activation: ``"softmax"`` (multi-class) or ``"sigmoid"`` (multi-label).
    key: PRNG key, required by random interventions.
    mesh: shard the item axis over this mesh's devices.
    precision: ``"exact"`` (float32 products on every backend), ``"tf32"`` or ``"bf16"``
      (``cejax.precision``); None: the policy in force, ``"exact"`` by default.

  Returns:
    A ``CEResult``.

  Raises:
    ValueError: a shape that does not match the image, no masks, masks outside [0, 1],
      a non-finite or integer image, a bad batch size, a target that is not an integer
      in range, an unknown estimand, intervention, activation or precision, or a random
      intervention without ``key`` (under ``jit``, bad values give NaN instead).
  """
  forward = model
  clean_logits, context = forward.setup(image)
  clean_logits = clean_logits.astype(jnp.float32)
  t = (jnp.argmax(clean_logits) if target is None else jnp.asarray(target)).astype(jnp.int32)
  random = intervention is not None and interventions.is_random(intervention)

  def chunk_fn(indices, context, key):
    keys = draw_keys(key, indices, intervention.num_draws) if random else None
    logits, ok = forward.logits(context, indices, keys)
    logits = logits.astype(jnp.float32)
    if random:
      probs = estimands.activate(logits, activation).mean(1)
      logits = logits.mean(1)
    else:
      probs = estimands.activate(logits, activation)
    value = estimand(clean_logits, logits, probs, t, activation)
    # Traced inputs cannot raise: make bad values visible as NaN (see the module doc).
    return jnp.where(ok.reshape(ok.shape + (1,) * (value.ndim - 1)), value, jnp.nan)

  effects = sharding.map_chunks(chunk_fn, forward.num, batch_size=batch_size, mesh=mesh,
                                args=(context, key))
  return CEResult(effects, clean_logits, t)


def _prepare_map(a):
  effects = jnp.asarray(a["effects"], jnp.float32)
  source = masks_lib.as_source(a["masks"])
  if effects.shape[0] != source.num:
    raise ValueError(f"effects has {effects.shape[0]} rows but there are {source.num} "
                     "masks.")
  if a["weighting"] not in ("coverage", "rise"):
    raise ValueError(f"Unknown weighting {a['weighting']!r}; valid are ['coverage', "
                     "'rise'].")
  if a["weighting"] == "rise" and not isinstance(source, masks_lib.RiseMasks):
    raise ValueError("weighting='rise' needs the RiseMasks source (it knows p).")
  return dict(a, effects=effects, masks=source,
              batch_size=validation.check_batch_size(a["batch_size"], source.num))


@jit(data=("effects", "masks"), prepare=_prepare_map)
def ce_map(effects: Effects, masks, *, weighting: str = "coverage",
           batch_size: int | None = None) -> Float[Array, "h w"] | Float[Array, "h w k"]:
  """Per-pixel map from per-mask effects.

  ``weighting="coverage"``: ``sum_i e_i M_i / sum_i M_i``, the mean effect of the
  interventions covering each pixel (0 where none does); overlapping sliding windows
  are averaged this way, as Captum's Occlusion does. For estimands that fall when
  evidence is removed (``probability``, ``logit``), important pixels are negative.

  ``weighting="rise"``: ``sum_i e_i (1 - M_i) / (N p)``, RISE's weighting of each
  value by the pixels *kept* (``1 - M_i``); ``p`` is the RISE keep probability (masks
  must be a ``RiseMasks`` source). Given the target probabilities ``f_t(I * kept_i)``
  as ``effects`` this is RISE itself (``saliency.rise``). Given CE effects it is a
  RISE-weighted CE map; note that ``sum_i kept_i(x) / (N p)`` varies from pixel to
  pixel at finite ``N``, so it is *not* RISE shifted by a constant and can rank
  pixels differently.

  Args:
    effects: ``(m,)`` or ``(m, k)``.
    masks: the masks the effects were computed with (array or mask source).
    batch_size: masks made at a time (bounds memory).

  Returns:
    ``(h, w)`` or ``(h, w, k)``. Compiled once per shapes and settings.
  """
  num, (h, w) = masks.num, masks.shape
  total = sharding.padded_size(num, batch_size, 1)
  e = jnp.pad(effects, [(0, total - num)] + [(0, 0)] * (effects.ndim - 1))
  e = e.reshape(-1, batch_size, *effects.shape[1:])
  valid = (jnp.arange(total) < num).reshape(-1, batch_size)
  idx = jnp.arange(total, dtype=jnp.int32).reshape(-1, batch_size)

  def body(carry, xs):
    num_acc, den_acc = carry
    i, e_chunk, ok = xs
    m = masks(i).astype(jnp.float32) * ok[:, None, None]
    weight = (1.0 - m) * ok[:, None, None] if weighting == "rise" else m
    num_acc = num_acc + jnp.tensordot(weight, e_chunk, axes=((0,), (0,)))
    return (num_acc, den_acc + m.sum(0)), None

  init = (jnp.zeros((h, w) + effects.shape[1:], jnp.float32), jnp.zeros((h, w)))
  (acc, coverage), _ = jax.lax.scan(body, init, (idx, e, valid))
  if weighting == "rise":
    return acc / (num * masks.p)
  cov = coverage.reshape(coverage.shape + (1,) * (acc.ndim - 2))
  return jnp.where(cov > 0, acc / jnp.where(cov > 0, cov, 1.0), 0.0)

__all__ = ["CEResult", "Forward", "causal_effect", "ce_map", "draw_keys"]
