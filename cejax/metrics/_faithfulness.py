"""Faithfulness of attribution maps: Petsiuk et al.'s deletion and insertion curves."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from cejax import filters
from cejax._compile import jit, output_shape
from cejax._validation import check_channels_last
from cejax.estimands import activate, check_activation
from cejax.types import Images, LogitsFn, Maps, Targets

SUBSTRATES = ("zero", "blur")
CURVES = ("deletion_zero", "deletion_blur", "insertion_blur")


def substrate(images, kind: str):
  """What deleted pixels become, in the model's input space: ``"zero"`` (0, the data
  mean for normalised inputs; Petsiuk et al.'s deletion) or ``"blur"`` (their
  insertion start: ``filters.petsiuk_blur``, 11 x 11 kernel, sigma 5, zero padding)."""
  if kind == "zero":
    return jnp.zeros_like(images)
  if kind == "blur":
    return filters.petsiuk_blur(images)
  raise ValueError(f"Unknown substrate {kind!r}; valid are {list(SUBSTRATES)}.")


def _check_curve_inputs(a):
  """Concrete targets must be classes of the model (an index past the end would be
  clamped to the last class by the gather, silently)."""
  targets = a["targets"]
  if np.ndim(a["images"]) == 4:
    check_channels_last(np.shape(a["images"]), "images")
  if not isinstance(targets, jax.core.Tracer):
    t = np.asarray(targets)
    if t.size and not np.issubdtype(t.dtype, np.integer):
      raise ValueError(f"targets must be integer classes, got dtype {t.dtype}.")
    k = output_shape(a["logits_fn"], tuple(np.shape(a["images"])), jnp.float32)[-1]
    if t.size and (t.min() < 0 or t.max() >= k):
      raise ValueError(f"targets must be classes in [0, {k}) of the model's {k} logits, "
                       f"got values in [{t.min()}, {t.max()}].")
  return a


@jit(data=("images", "maps", "targets"), prepare=_check_curve_inputs)
def deletion_insertion(logits_fn: LogitsFn, images: Images, maps: Maps, targets: Targets, *,
                       step: int | None = None,
                       curves=CURVES, activation: str = "softmax",
                       batch_size: int = 16) -> dict[str, jax.Array]:
  """Deletion and insertion AUCs (Petsiuk et al., 2018), ``{curve: (n,)}``, as their
  ``CausalMetric`` computes them.

  Pixels are taken in decreasing map order, ``step`` at a time (default: one image row,
  their rule): after ``i`` steps the first ``min(i * step, h * w)`` pixels of the order
  are changed, for ``i = 0 .. ceil(h * w / step)``. ``"deletion_<s>"`` replaces them in
  the image by substrate ``s`` (a faithful map makes the target probability fall
  fast: low AUC is good); ``"insertion_<s>"`` starts from substrate ``s`` and restores
  them (high AUC is good). Petsiuk et al. delete to ``zero`` and insert into ``blur``;
  deleting to ``blur`` as well scores maps with a perturbation they were not built from
  (CE and occlusion maps are built from zero fills). The AUC is the trapezoid mean over
  the steps (their ``auc``). ``targets`` should be the predicted classes, as theirs are.

  Ties: their code orders pixels by ``np.flip(np.argsort(map))``, numpy's default,
  unstable sort, whose order among equal values depends on numpy's version and the
  CPU's vector instructions. cejax fixes that order to their expression with a stable
  sort (``np.flip(np.argsort(map, kind="stable"))``: among equal values, later pixels
  first); maps without ties are ordered identically.

  Args:
    logits_fn: pure ``images -> logits``.
    images: ``(n, h, w, c)`` in the model's input space.
    maps: ``(n, h, w)``.
    targets: int ``(n,)``, the class whose probability is tracked.
    step: pixels changed per step; None: ``w`` (one row).
    curves: names ``"deletion_<substrate>"`` / ``"insertion_<substrate>"``.
    activation: ``"softmax"`` or ``"sigmoid"``.
  """
  images = jnp.asarray(images, jnp.float32)
  maps = jnp.asarray(maps, jnp.float32)
  targets = jnp.asarray(targets, jnp.int32)
  n, h, w, _ = images.shape
  if maps.shape != (n, h, w):
    raise ValueError(f"maps must be {(n, h, w)} to match images, got {maps.shape}.")
  step = w if step is None else int(step)
  if step < 1:
    raise ValueError(f"step must be a positive number of pixels, got {step}.")
  act = functools.partial(activate, activation=check_activation(activation))
  parsed = []
  for name in curves:
    mode, _, kind = name.partition("_")
    if mode not in ("deletion", "insertion") or kind not in SUBSTRATES:
      raise ValueError(f"Unknown curve {name!r}; use 'deletion_<s>' or 'insertion_<s>' "
                       f"with s in {list(SUBSTRATES)}.")
    parsed.append((mode, kind))
  num_steps = -(-h * w // step)
  counts = jnp.minimum(jnp.arange(num_steps + 1) * step, h * w)

  def one(image, saliency, target):
    order = jnp.flip(jnp.argsort(saliency.reshape(-1), stable=True))
    rank = jnp.zeros(h * w, jnp.int32).at[order].set(jnp.arange(h * w)).reshape(h, w)
    fills = [substrate(image, kind) for _, kind in parsed]

    def curve_at(count):  # every curve's probability after ``count`` pixels
      top = (rank < count).astype(jnp.float32)[..., None]
      x = jnp.stack([image * (1 - top) + fill * top if mode == "deletion"
                     else image * top + fill * (1 - top)
                     for (mode, _), fill in zip(parsed, fills, strict=True)])
      return act(logits_fn(x).astype(jnp.float32))[:, target]

    curve = jax.lax.map(curve_at, counts, batch_size=max(1, batch_size // len(parsed))).T
    return (curve[:, 1:] + curve[:, :-1]).mean(1) / 2

  aucs = jax.lax.map(lambda a: one(*a), (images, maps, targets))
  return {name: aucs[:, i] for i, name in enumerate(curves)}
