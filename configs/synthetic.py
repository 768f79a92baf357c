"""The default demo: a tiny DenseNet on the embedded synthetic X-ray set (CPU-minutes).

Run::

    python train.py --config=configs/synthetic.py --workdir=runs/synthetic
    python analyze.py --config=configs/synthetic.py --workdir=runs/synthetic

Any field can be overridden, e.g. ``--config.train.num_epochs=2``.
"""

import ml_collections


def get_config():
  config = ml_collections.ConfigDict()

  config.data = ml_collections.ConfigDict()
  config.data.name = "synthetic"
  config.data.data_dir = ""  # TFDS default (~/tensorflow_datasets) when empty
  config.data.image_size = 64
  config.data.num_train = 10_000
  config.data.num_validation = 1_000
  config.data.num_test = 1_000
  config.data.seed = 0
  config.data.channels = 1
  config.data.mean = (0.45,)
  config.data.std = (0.25,)
  config.data.crop_size = 0
  config.data.max_boxes = 1
  config.data.manual_dir = ""

  config.model = ml_collections.ConfigDict()
  config.model.preset = "tiny"
  config.model.dtype = "float32"

  config.train = ml_collections.ConfigDict()
  config.train.seed = 0
  config.train.batch_size = 64
  config.train.num_epochs = 8
  config.train.optimizer = "adamw"
  config.train.learning_rate = 3e-3
  config.train.weight_decay = 1e-4
  config.train.warmup_epochs = 0.5
  config.train.schedule = "cosine"
  config.train.momentum = 0.9  # sgd only
  config.train.checkpoint_every_steps = 200
  config.train.keep_checkpoints = 2
  config.train.best_metric = "accuracy"  # validation metric that picks the best checkpoint
  config.train.log_every_steps = 20
  config.train.eval_batch_size = 250

  # analyze.py: CE maps vs baselines, attacks, detector and defenses on test images.
  config.analysis = ml_collections.ConfigDict()
  config.analysis.split = "test"
  config.analysis.num_images = 64
  config.analysis.chunk_size = 16  # images per resumable unit of work
  config.analysis.seed = 0
  config.analysis.batch_size = 64  # masks per forward call
  config.analysis.grid_cells = 10  # grid masks: n x n blocks (the paper's 10 x 10)
  config.analysis.window_div = 4  # sliding window = image size / 4 ...
  config.analysis.stride_div = 16  # ... moved by image size / 16
  config.analysis.rise_masks = 500
  config.analysis.rise_cells = 8
  config.analysis.latent_stage = "block2"
  config.analysis.noise_samples = 50  # SmoothGrad and Smooth Grad-CAM++ (Smilkov: ~50)
  config.analysis.noise_level = 0.15  # noise std / image range (Smilkov: 10-20 %)
  config.analysis.ig_steps = 32
  config.analysis.deletion_steps = 16
  config.analysis.sanity = True
  config.analysis.attacks = ("fgsm", "bim", "pgd")
  config.analysis.epsilons = (2 / 255, 8 / 255)
  config.analysis.attack_steps = 10
  config.analysis.defenses = ("ordered_dither", "error_diffusion", "bit_depth", "median")
  config.analysis.defense_eps = 8 / 255
  return config
