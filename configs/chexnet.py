"""Analyze an imported CheXNet (DenseNet-121, 14 findings) on NIH ChestX-ray14.

Convert the PyTorch checkpoint, then analyze with CheXNet's preprocessing (resize to
256, center crop 224, ImageNet mean/std, 3 channels) and multi-label estimands;
localization is scored on ChestX-ray14's boxes, rescaled through resize and crop::

    python -m cejax.jobs.convert --input=m-25012018-123527.pth.tar --workdir=runs/chexnet
    python analyze.py --config=configs/chexnet.py --workdir=runs/chexnet \\
        --config.data.manual_dir=/path/to/ChestX-ray14

For jrzech's preprocessing (resize to 224, no crop) add
``--config.data.image_size=224 --config.data.crop_size=0``. The paper's own code puts
a softmax on the 14 logits: convert with ``--profile=chexnet_softmax`` for that.
DenseNet-121 at 224 x 224 runs about 30 forwards/s on a 2-core CPU, so the analysis
settings below are modest; raise them on an accelerator.
"""

from configs import chestxray14


def get_config():
  config = chestxray14.get_config()
  config.data.image_size = 256
  config.data.crop_size = 224
  a = config.analysis
  a.split = "all"  # a small local copy (like ../shared/data) may leave a split empty
  a.num_images = 32
  a.chunk_size = 4
  a.batch_size = 16
  m = config.masks
  m.grid_cells = 10  # the paper's 10 x 10 grid (22-pixel blocks)
  m.window = 56  # 56-pixel windows ...
  m.stride = 28  # ... every 28 pixels
  m.rise_masks = 4000  # Petsiuk et al.'s count and cells at 224 px
  m.rise_cells = 7
  a.noise_samples = 50
  a.ig_steps = 8
  a.deletion_step = 224 * 28  # 8 steps (Petsiuk: one row, 224 steps, on a GPU)
  a.evaluators = ("maps", "localization", "attacks", "detection", "defenses")
  a.attacks = ("fgsm", "pgd")
  a.epsilons = (1 / 255, 4 / 255)
  a.attack_steps = 5
  a.defenses = ("bit_depth", "median")
  a.defense_eps = 4 / 255
  return config
