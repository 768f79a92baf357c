"""A seconds-long smoke run of the synthetic pipeline, used by the tests.

Run::

    python train.py --config=configs/smoke.py --workdir=/tmp/cejax_smoke
"""

from configs import synthetic


def get_config():
  config = synthetic.get_config()
  config.data.image_size = 32
  config.data.num_train = 256
  config.data.num_validation = 64
  config.data.num_test = 64
  # The tiny preset cut to two blocks of two layers: every test of a trained model
  # compiles the network into its programs, and compile time grows with its depth.
  config.model.overrides.block_config = (2, 2)
  config.train.batch_size = 32
  config.train.num_epochs = 2
  config.train.checkpoint_every_steps = 4
  config.train.log_every_steps = 2
  config.train.eval_batch_size = 32
  config.analysis.num_images = 8
  config.analysis.chunk_size = 4
  config.analysis.batch_size = 32
  config.masks.grid_cells = 4
  config.masks.stride = 4  # pixels (window: 32 / 4 = 8 pixels)
  config.masks.rise_masks = 64
  config.masks.rise_cells = 4
  config.analysis.noise_samples = 2
  config.analysis.ig_steps = 4
  config.analysis.deletion_step = 256  # 4 steps at 32 x 32
  config.analysis.attacks = ("fgsm", "pgd")
  config.analysis.epsilons = (8 / 255,)
  config.analysis.attack_steps = 3
  config.analysis.defenses = ("error_diffusion", "bit_depth")
  return config
