"""Deterministic generator of X-ray-like images whose class lives only in a box.

Each image is a chest-like background (body, two lung fields, mediastinum, ribs,
smooth low-frequency texture and pixel noise), drawn independently of the label.
A finding of one of several types is then added inside a ground-truth box:

* ``nodule``: a solid round opacity;
* ``cavity``: a ring (bright wall, background centre);
* ``fibrosis``: a patch of parallel streaks at a random orientation;
* ``cluster``: several small dots.

``no_finding`` images get no finding and no box. Position, size and contrast of
the finding are drawn from the same distributions for every type, so nothing
outside the box predicts the class: the box *is* the causal ground truth.

Every example is a pure function of ``(seed, index)``, so splits are reproducible
and can be generated in any order.
"""

from __future__ import annotations

import numpy as np

CLASS_NAMES = ("no_finding", "nodule", "cavity", "fibrosis", "cluster")


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
  """Bilinearly upsampled coarse noise in [-1, 1] (low-frequency texture)."""
  coarse = rng.uniform(-1.0, 1.0, (cells + 1, cells + 1))
  t = np.linspace(0.0, cells, size)
  i = np.minimum(t.astype(int), cells - 1)
  f = t - i
  rows = coarse[i] * (1 - f)[:, None] + coarse[i + 1] * f[:, None]
  return rows[:, i] * (1 - f)[None, :] + rows[:, i + 1] * f[None, :]


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
  yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
  img = np.full((size, size), 0.55 + rng.uniform(-0.08, 0.08), np.float32)
  # Body outline: darker outside an ellipse.
  body = ((xx - 0.5) / 0.47) ** 2 + ((yy - 0.55) / 0.55) ** 2
  img -= 0.35 * np.clip(body - 1.0, 0.0, 1.0) * 4
  # Two lungs: dark ellipses, position and size jittered.
  lungs = np.zeros_like(img)
  for side in (-1, 1):
    cx = 0.5 + side * (0.2 + rng.uniform(-0.02, 0.02))
    cy = 0.5 + rng.uniform(-0.03, 0.03)
    rx, ry = 0.15 + rng.uniform(-0.02, 0.02), 0.3 + rng.uniform(-0.03, 0.03)
    d = ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2
    lungs = np.maximum(lungs, np.clip(1.5 * (1.0 - d), 0.0, 1.0))
  img -= (0.28 + rng.uniform(-0.05, 0.05)) * lungs
  # Ribs: periodic curved bands, visible mostly over the lungs.
  period = 0.11 + rng.uniform(-0.015, 0.015)
  phase = rng.uniform(0, 2 * np.pi)
  curve = yy + 0.25 * (xx - 0.5) ** 2
  ribs = np.maximum(np.sin(2 * np.pi * curve / period + phase), 0.0) ** 3
  img += 0.07 * ribs * lungs
  # Mediastinum and heart: a bright central column.
  img += 0.15 * np.exp(-(((xx - 0.5 + rng.uniform(-0.02, 0.02)) / 0.09) ** 2)) * (yy > 0.15)
  img += 0.07 * _smooth_noise(rng, size, 4) + 0.03 * _smooth_noise(rng, size, 12)
  return img


def _finding(kind: int, rng: np.random.Generator, size: int, box_size: float):
  """A finding pattern in [0, 1] on a ``(b, b)`` patch, b = ceil(box_size)."""
  b = int(np.ceil(box_size))
  yy, xx = (np.mgrid[0:b, 0:b].astype(np.float32) + 0.5 - b / 2) / (b / 2)
  r = np.sqrt(xx**2 + yy**2)
  if kind == 1:  # nodule
    return np.clip((1.0 - r) * 4.0, 0.0, 1.0) ** 1.5
  if kind == 2:  # cavity: ring of width ~0.3 radius
    return np.clip(1.0 - np.abs(r - 0.72) / 0.2, 0.0, 1.0)
  if kind == 3:  # fibrosis: streaks, 3 to 4 periods across the box
    theta = rng.uniform(0, np.pi)
    u = xx * np.cos(theta) + yy * np.sin(theta)
    stripes = np.maximum(np.cos(np.pi * u * rng.uniform(3.0, 4.0)), 0.0)
    return stripes * np.clip((1.0 - r) * 3.0, 0.0, 1.0)
  if kind == 4:  # cluster of 4 to 6 small dots
    out = np.zeros((b, b), np.float32)
    for _ in range(rng.integers(4, 7)):
      cy, cx = rng.uniform(-0.6, 0.6, 2)
      d = np.sqrt((xx - cx) ** 2 + (yy - cy) ** 2)
      out = np.maximum(out, np.clip((0.22 - d) / 0.08, 0.0, 1.0))
    return out
  raise ValueError(f"Unknown finding kind {kind}.")


def generate_example(seed: int, index: int, *, image_size: int = 64,
                     label: int | None = None):
  """One example: ``(image uint8 (s, s, 1), label int, boxes (n, 4) float32)``.

  ``label`` forces the class (an intervention on the label); the background,
  box and contrast stay those of ``(seed, index)``, so only pixels inside the box
  can change. By default the label is drawn from ``(seed, index)``.

  Boxes are ``[x_min, y_min, x_max, y_max]`` in pixel coordinates of the image
  (continuous; a pixel ``(i, j)`` covers ``[j, j+1) x [i, i+1)``). ``n`` is 1 for
  a finding and 0 for ``no_finding``.
  """
  if image_size < 32:
    raise ValueError(f"image_size must be at least 32, got {image_size}.")
  rng = np.random.default_rng([seed, index])
  drawn = int(rng.integers(0, len(CLASS_NAMES)))
  label = drawn if label is None else int(label)
  if not 0 <= label < len(CLASS_NAMES):
    raise ValueError(f"label must be in [0, {len(CLASS_NAMES)}), got {label}.")
  img = _background(rng, image_size)
  boxes = np.zeros((0, 4), np.float32)
  # Box geometry and contrast are drawn for every image, so the random stream
  # (and so the background noise below) does not depend on the label.
  box_size = rng.uniform(0.14, 0.24) * image_size
  b = int(np.ceil(box_size))
  # Positions inside the lung fields' bounding region.
  x0 = int(rng.integers(int(0.18 * image_size), int(0.82 * image_size) - b))
  y0 = int(rng.integers(int(0.22 * image_size), int(0.80 * image_size) - b))
  contrast = rng.uniform(0.16, 0.32)
  finding_rng = np.random.default_rng([seed, index, 1])
  noise = rng.normal(0.0, 0.025, img.shape).astype(np.float32)
  if label != 0:
    patch = _finding(label, finding_rng, image_size, box_size)
    img[y0:y0 + b, x0:x0 + b] += contrast * patch
    boxes = np.array([[x0, y0, x0 + b, y0 + b]], np.float32)
  img += noise
  img = np.clip(img, 0.0, 1.0)
  return (np.round(img * 255).astype(np.uint8)[..., None], label, boxes)
