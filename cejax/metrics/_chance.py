"""Chance levels: maps that know nothing about the model, scored like every method, and
the columns where they reach the best method."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

CHANCE_MAPS = ("chance_noise", "chance_center", "chance_box")


def chance_maps(key, *, num: int, shape, box_shape) -> dict[str, Float[Array, "n h w"]]:
  """Maps that know nothing about the model, scored like any method to give each
  metric its chance level:

  - ``chance_noise``: i.i.d. uniform noise on [0, 1) per pixel;
  - ``chance_center``: a Gaussian centred on the image, ``sigma`` a quarter of each
    side (a prior that findings lie near the middle), the same for every image;
  - ``chance_box``: 1 inside a box of ``box_shape`` ``(bh, bw)`` pixels (the mean
    ground-truth box) placed uniformly at random inside the image, 0 outside.

  Args:
    key: PRNG key (the noise and the box positions).
    num: how many maps of each kind.
    shape: ``(h, w)``.
    box_shape: ``(bh, bw)`` in pixels, rounded and clipped to ``[1, side]``.

  Returns:
    ``{name: (num, h, w)}`` float32.
  """
  h, w = (int(s) for s in shape)
  bh, bw = (min(max(int(round(float(b))), 1), side) for b, side in zip(box_shape, (h, w),
                                                                        strict=True))
  k_noise, k_row, k_col = jax.random.split(key, 3)
  noise = jax.random.uniform(k_noise, (num, h, w))
  yy, xx = np.mgrid[:h, :w].astype(np.float32)
  centre = np.exp(-(((yy - (h - 1) / 2) / (h / 4)) ** 2
                    + ((xx - (w - 1) / 2) / (w / 4)) ** 2) / 2)
  top = jax.random.randint(k_row, (num, 1, 1), 0, h - bh + 1)
  left = jax.random.randint(k_col, (num, 1, 1), 0, w - bw + 1)
  rows, cols = jnp.arange(h)[None, :, None], jnp.arange(w)[None, None, :]
  box = ((rows >= top) & (rows < top + bh) & (cols >= left) & (cols < left + bw))
  return {"chance_noise": noise,
          "chance_center": jnp.broadcast_to(jnp.asarray(centre), (num, h, w)),
          "chance_box": box.astype(jnp.float32)}


# Metrics where lower is better; every other score is higher-is-better.
LOWER_IS_BETTER = ("deletion_zero", "deletion_blur")


def uninformative(rows: dict, *, chance: str = "chance_noise") -> dict:
  """Which metric columns do not separate methods from chance: those where the
  ``chance`` row's 95 % interval overlaps the best other method's (the largest mean, or
  the smallest for ``LOWER_IS_BETTER``), or where noise scores better than it.

  Args:
    rows: ``{method: {metric: (mean, lo, hi) or [(mean, lo, hi), ...] per level}}``.
    chance: the row of uniform noise.

  Returns:
    ``{metric: bool}``, or a list of bools per level for list-valued metrics; metrics
    the chance row lacks are left out.
  """
  if chance not in rows:
    return {}
  others = {m: r for m, r in rows.items() if m not in CHANCE_MAPS}
  out = {}
  for metric, noise in rows[chance].items():
    levels = noise if _is_list_of_intervals(noise) else [noise]
    flags = []
    for i, level in enumerate(levels):
      candidates = []
      for r in others.values():
        value = r.get(metric)
        if value is None:
          continue
        value = value[i] if _is_list_of_intervals(noise) else value
        if np.isfinite(value[0]):
          candidates.append(value)
      if not candidates or not np.isfinite(level[0]):
        flags = None
        break
      if metric in LOWER_IS_BETTER:
        best = min(candidates, key=lambda v: v[0])
        flags.append(bool(level[1] <= best[2]))  # noise's low end reaches the best's high
      else:
        best = max(candidates, key=lambda v: v[0])
        flags.append(bool(level[2] >= best[1]))  # noise's high end reaches the best's low
    if flags is not None:
      out[metric] = flags if _is_list_of_intervals(noise) else flags[0]
  return out


def _is_list_of_intervals(value) -> bool:
  return (isinstance(value, (list, tuple)) and len(value) > 0
          and isinstance(value[0], (list, tuple)))
