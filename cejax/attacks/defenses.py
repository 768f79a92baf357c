"""Input-transform defenses: halftoning (input recharacterization), bit depth, median.

Each is a pure ``pixels (n, h, w, c) in [0, 1] -> pixels`` function, applied before
the model's normalisation. They are *not* robust to adaptive attacks: ordered
dithering, error diffusion, bit-depth reduction and median filtering are (almost
everywhere) non-differentiable or gradient-masking, and ``attacks.bpda_pgd``, which
back-propagates through them as the identity, defeats them (measured by analyze.py).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from cejax._compile import jit
from cejax.estimands import activate


def _bayer(n: int) -> np.ndarray:
  """The ``n x n`` Bayer index matrix (n a power of two), thresholds in (0, 1)."""
  m = np.zeros((1, 1))
  while m.shape[0] < n:
    m = np.block([[4 * m, 4 * m + 2], [4 * m + 3, 4 * m + 1]])
  return (m + 0.5) / m.size


def ordered_dither(images, *, size: int = 4):
  """Binary halftone with a tiled Bayer threshold matrix (``size`` in 2, 4, 8, 16)."""
  if size not in (2, 4, 8, 16):
    raise ValueError(f"size must be 2, 4, 8 or 16, got {size}.")
  _, h, w, _ = images.shape
  t = np.tile(_bayer(size), (-(-h // size), -(-w // size)))[:h, :w]
  return (images > jnp.asarray(t, images.dtype)[None, :, :, None]).astype(images.dtype)


def error_diffusion(images):
  """Floyd-Steinberg binary halftone (serpentine-free raster order), exact.

  Rows are scanned in a ``lax.scan``; within a row the error carried to the right is
  another scan, and the errors pushed to the next row are accumulated in a carry.
  """
  x = jnp.moveaxis(jnp.asarray(images), -1, 1)  # (n, c, h, w)
  n, c, h, w = x.shape

  def row_step(below, row):
    # below: error diffused into this row from the previous one, (n, c, w).
    row = row + below

    def px(right, v):
      val = v + right
      out = (val >= 0.5).astype(val.dtype)
      return 7 / 16 * (val - out), (out, val - out)

    _, (out, err) = jax.lax.scan(px, jnp.zeros((n, c)), jnp.moveaxis(row, -1, 0))
    out, err = jnp.moveaxis(out, 0, -1), jnp.moveaxis(err, 0, -1)
    nxt = 5 / 16 * err
    nxt = nxt.at[..., :-1].add(3 / 16 * err[..., 1:])  # below-left
    nxt = nxt.at[..., 1:].add(1 / 16 * err[..., :-1])  # below-right
    return nxt, out

  _, rows = jax.lax.scan(row_step, jnp.zeros((n, c, w), x.dtype), jnp.moveaxis(x, 2, 0))
  return jnp.moveaxis(jnp.moveaxis(rows, 0, 2), 1, -1)


def bit_depth(images, *, bits: int = 3):
  """Rounds pixels to ``2**bits`` levels (Xu et al.'s bit-depth squeezer:
  ``rint(x (2^bits - 1)) / (2^bits - 1)``)."""
  if not 1 <= bits <= 8:
    raise ValueError(f"bits must be in [1, 8], got {bits}.")
  levels = 2**bits - 1
  return jnp.round(images * levels) / levels


def median_smoothing(images, *, size: int = 3):
  """Median over a ``size x size`` window per channel, equal to
  ``scipy.ndimage.median_filter(images, size=(1, size, size, 1), mode="reflect")`` (Xu
  et al.'s squeezer): the window of pixel ``i`` spans ``i - size // 2`` to
  ``i - size // 2 + size - 1``, edges are mirrored (``d c b a | a b c d``), and an even
  window takes the upper of its two middle values, as scipy's rank filter does."""
  if size < 1:
    raise ValueError(f"size must be a positive integer, got {size}.")
  before, after = size // 2, size - 1 - size // 2
  _, h, w, _ = images.shape
  padded = jnp.pad(images, ((0, 0), (before, after), (before, after), (0, 0)),
                   mode="symmetric")
  windows = jnp.stack([padded[:, i:i + h, j:j + w] for i in range(size) for j in range(size)])
  return jnp.sort(windows, axis=0)[size * size // 2]


@jit(data=("pixels", "space"))
def squeeze_score(logits_fn, pixels, *, space, activation: str = "softmax",
                  bits: int = 5, median: int = 2):
  """Feature squeezing's detection score (Xu et al., NDSS 2018), per image ``(n,)``:
  the largest L1 distance between the prediction on the input and on each squeezed
  input, ``max(||f(x) - f(bit_depth(x))||_1, ||f(x) - f(median(x))||_1)``, ``f`` the
  probabilities. Their ImageNet and CIFAR-10 squeezers are 5-bit depth and a 2 x 2
  median (MNIST: 1 bit); their non-local means squeezer for colour images is not
  included. ``pixels`` in [0, 1]; the model sees ``space.normalize``."""
  def prediction(x):
    return activate(logits_fn(space.normalize(x)).astype(jnp.float32), activation)

  clean = prediction(pixels)
  return jnp.stack([jnp.abs(clean - prediction(squeezed)).sum(-1) for squeezed in (
      bit_depth(pixels, bits=bits), median_smoothing(pixels, size=median))]).max(0)


DEFENSES = {
    "ordered_dither": ordered_dither,
    "error_diffusion": error_diffusion,
    "bit_depth": bit_depth,
    "median": median_smoothing,
}
