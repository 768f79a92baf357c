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
  return config
