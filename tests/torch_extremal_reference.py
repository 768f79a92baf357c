"""Extremal perturbations in plain PyTorch, as a reference for the parity test.

Written step by step from the documented algorithm of TorchRay's
``torchray.attribution.extremal_perturbation`` (Fong, Patrick and Vedaldi, "Understanding
Deep Networks via Extremal Perturbations and Smooth Masks", ICCV 2019), not copied from
its source. Everything is float32 on the CPU; needs only ``torch``.
"""

import math

import torch

F = torch.nn.functional

_EPS = 1.19209290e-07  # float32 machine epsilon, as in TorchRay's imsmooth.
_COLDNESS = 20.0


def imsmooth(x, sigma):
  """Separable Gaussian blur of (N, C, H, W) ``x`` (vertical, then horizontal), zero
  padding, same-size output; ``sigma`` is a float or a float32 scalar tensor."""
  sigma = torch.as_tensor(sigma, dtype=torch.float32)
  w = int(math.ceil(float(4 * sigma)))
  i = torch.arange(-w, w + 1, dtype=torch.float32)
  sqrt2 = torch.tensor(math.sqrt(2), dtype=torch.float32)
  f = torch.exp(-(i / (sqrt2 * sigma + _EPS)) ** 2)
  f = f / f.sum()
  c = x.shape[1]
  x = F.conv2d(x, f.reshape(1, 1, -1, 1).expand(c, 1, 2 * w + 1, 1), padding=(w, 0), groups=c)
  return F.conv2d(x, f.reshape(1, 1, 1, -1).expand(c, 1, 1, 2 * w + 1), padding=(0, w),
                  groups=c)


def perturbation_pyramid(image, num_levels=8, max_blur=20.0, perturbation="blur"):
  """(L, C, H, W) stack of perturbed copies of the (1, C, H, W) ``image``: "blur" or
  "fade"; level 0 is the most perturbed, level L-1 the image itself."""
  s = torch.linspace(0, 1, num_levels, dtype=torch.float32)
  levels = []
  for level in range(num_levels):
    if perturbation == "blur":
      levels.append(imsmooth(image, (1 - s[level]) * max_blur))
    elif perturbation == "fade":
      levels.append(image * s[level])
    else:
      raise ValueError(f"unknown perturbation {perturbation!r}")
  return torch.cat(levels, dim=0)


def blur_pyramid(image, num_levels=8, max_blur=20.0):
  """The "blur" pyramid, (L, C, H, W); see ``perturbation_pyramid``."""
  return perturbation_pyramid(image, num_levels, max_blur, "blur")


def apply_pyramid(pyramid, mask):
  """(K, C, H, W) per-pixel interpolation between the levels of the (L, C, H, W)
  ``pyramid``; ``mask`` (K, 1, H, W) in [0, 1]: 0 picks level 0, 1 picks level L-1."""
  n_levels, c, h, w_ = pyramid.shape
  k_masks = mask.shape[0]
  w = mask * (n_levels - 1)
  k = torch.floor(w).detach()
  frac = w - k
  k = k.long()
  k1 = torch.clamp(k + 1, max=n_levels - 1)
  pyr = pyramid.unsqueeze(0).expand(k_masks, n_levels, c, h, w_)
  y0 = torch.gather(pyr, 1, k.unsqueeze(1).expand(k_masks, 1, c, h, w_)).squeeze(1)
  y1 = torch.gather(pyr, 1, k1.unsqueeze(1).expand(k_masks, 1, c, h, w_)).squeeze(1)
  return (1 - frac) * y0 + frac * y1


def mask_generator_shapes(shape, step, sigma):
  """Geometry of the mask generator for image ``shape`` (H, W), int ``step`` and float
  ``sigma`` (also the margin): dict of padding, radius, shape_in/mid/up/out."""
  margin = sigma
  padding = 1 + math.ceil((margin + sigma) / step)
  radius = 1 + math.ceil(sigma / step)
  shape_in = [math.ceil(z / step) for z in shape]
  shape_mid = [z + 2 * padding - (2 * radius + 1) + 1 for z in shape_in]
  shape_up = [step * z for z in shape_mid]
  shape_out = [z - step + 1 for z in shape_up]
  return dict(padding=padding, radius=radius, shape_in=shape_in, shape_mid=shape_mid,
              shape_up=shape_up, shape_out=shape_out)


def _generator_weight(shape, step, sigma):
  """(1, (2r+1)^2, out_h, out_w) float32 kernel weights of the mask generator."""
  g = mask_generator_shapes(shape, step, sigma)
  margin, pad, r = sigma, g["padding"], g["radius"]
  out_h, out_w = g["shape_out"]
  uy, ux = torch.meshgrid(torch.arange(out_h, dtype=torch.float32),
                          torch.arange(out_w, dtype=torch.float32), indexing="ij")
  inv = (torch.tensor(g["shape_mid"], dtype=torch.float32)
         / torch.tensor(g["shape_up"], dtype=torch.float32))
  weights = []
  for ky in range(2 * r + 1):
    for kx in range(2 * r + 1):
      iy = torch.floor(inv[0] * uy) + ky - pad
      ix = torch.floor(inv[1] * ux) + kx - pad
      delta = torch.sqrt((uy - (margin + step * iy)) ** 2 + (ux - (margin + step * ix)) ** 2)
      weights.append(torch.exp(-2 * torch.clamp(delta / sigma - 0.5, min=0) ** 2))
  return torch.stack(weights, dim=0).unsqueeze(0)


def generate(pmask, shape, step, sigma, weight=None):
  """Smooth masks from low-resolution parameters.

  Args:
    pmask: (K, 1, h_in, w_in) float32 parameters.
    shape: (H, W) of the image.
    step: int, upsampling stride.
    sigma: float, mask smoothness.
    weight: optional precomputed ``_generator_weight(shape, step, sigma)``.

  Returns:
    (cropped, full): (K, 1, H, W) and (K, 1, out_h, out_w) float32 masks in [0, 1].
  """
  g = mask_generator_shapes(shape, step, sigma)
  if weight is None:
    weight = _generator_weight(shape, step, sigma)
  n, side = pmask.shape[0], 2 * g["radius"] + 1
  (mid_h, mid_w), (out_h, out_w) = g["shape_mid"], g["shape_out"]
  v = F.unfold(pmask, (side, side), padding=g["padding"])
  v = v.reshape(n, side * side, mid_h, mid_w)
  v = v.repeat_interleave(step, dim=2).repeat_interleave(step, dim=3)
  v = v[:, :, :out_h, :out_w] * weight
  full = (v * torch.softmax(_COLDNESS * v, dim=1)).sum(dim=1, keepdim=True)
  full = torch.clamp(full, 0, 1)
  m = round(sigma)
  return full[:, :, m:m + shape[0], m:m + shape[1]], full


def extremal_perturbation(model, image, target, *, areas, iterations, variant="preserve",
                          step=7, sigma=21.0, num_levels=8, max_blur=20.0, jitter=True,
                          perturbation="blur", init=None):
  """Optimises one smooth extremal mask per target area.

  Args:
    model: torch.nn.Module, (N, C, H, W) float32 -> (N, num_classes) logits.
    image: (1, C, H, W) float32.
    target: int class index.
    areas: list of K floats, the target area fractions.
    iterations: number of SGD steps.
    variant: "preserve", "delete" or "dual".
    step: int, generator stride.
    sigma: float, generator smoothness.
    num_levels: pyramid levels.
    max_blur: blur sigma of the most perturbed level.
    jitter: flip the input horizontally on even iterations.
    perturbation: "blur" or "fade".
    init: optional (K, 1, h_in, w_in) initial parameters; TorchRay starts from ones.

  Returns:
    (masks, pmask): masks (K, 1, H, W) float32, the cropped mask generated at the last
    iteration (before its update); pmask (K, 1, h_in, w_in) float32 after all updates.
  """
  image = image.detach().to(torch.float32)
  shape = tuple(image.shape[2:])
  k_areas = len(areas)
  g = mask_generator_shapes(shape, step, sigma)
  weight = _generator_weight(shape, step, sigma)
  pyramid = perturbation_pyramid(image, num_levels, max_blur, perturbation)

  pmask = (torch.ones(k_areas, 1, *g["shape_in"], dtype=torch.float32) if init is None
           else init.detach().clone().to(torch.float32)).requires_grad_(True)
  max_area = g["shape_out"][0] * g["shape_out"][1]
  reference = torch.ones(k_areas, max_area, dtype=torch.float32)
  for i, a in enumerate(areas):
    reference[i, :int(max_area * (1 - a))] = 0
  optimizer = torch.optim.SGD([pmask], lr=0.01, momentum=0.9, dampening=0.9)
  regul_weight = 300.0

  saved = [p.requires_grad for p in model.parameters()]
  for p in model.parameters():
    p.requires_grad_(False)
  model.eval()
  try:
    masks = generate(pmask, shape, step, sigma, weight)[0].detach()
    for t in range(iterations):
      cropped, full = generate(pmask, shape, step, sigma, weight)
      masks = cropped.detach()
      if variant == "preserve":
        x = apply_pyramid(pyramid, cropped)
      elif variant == "delete":
        x = apply_pyramid(pyramid, 1 - cropped)
      elif variant == "dual":
        x = torch.cat([apply_pyramid(pyramid, cropped), apply_pyramid(pyramid, 1 - cropped)], 0)
      else:
        raise ValueError(f"unknown variant {variant!r}")
      if jitter and t % 2 == 0:
        x = torch.flip(x, dims=(3,))
      y = model(x)
      if variant == "preserve":
        reward = y[:, target]
      elif variant == "delete":
        reward = -y[:, target]
      else:
        reward = y[:k_areas, target] - y[k_areas:, target]
      reward = reward.reshape(k_areas, -1).mean(dim=1)
      ordered = torch.sort(full.reshape(k_areas, -1), dim=1, stable=True)[0]
      regul = -((ordered - reference) ** 2).mean(dim=1) * regul_weight
      energy = (reward + regul).sum()
      optimizer.zero_grad()
      (-energy).backward()
      optimizer.step()
      pmask.data = pmask.data.clamp(0, 1)
      regul_weight *= 1.0035
  finally:
    for p, r in zip(model.parameters(), saved, strict=True):
      p.requires_grad_(r)
  return masks, pmask.detach()
