"""CheXNet-style DenseNet-121 on NIH ChestX-ray14, multi-label, 224x224.

Needs the manual download (see ``cejax/data/chestxray14.py``). Run::

    python train.py --config=configs/chestxray14.py --workdir=runs/cxr14 \
        --config.data.manual_dir=/path/to/ChestX-ray14
"""

from configs import synthetic


def get_config():
  config = synthetic.get_config()
  config.data.name = "chestxray14"
  config.data.image_size = 256  # stored size; center-cropped to 224 (CheXNet)
  config.data.crop_size = 224
  config.data.channels = 3
  config.data.mean = (0.485, 0.456, 0.406)  # ImageNet
  config.data.std = (0.229, 0.224, 0.225)
  config.data.max_boxes = 4
  config.model.preset = "densenet121"
  config.train.batch_size = 16
  config.train.num_epochs = 20
  config.train.optimizer = "adam"
  config.train.learning_rate = 1e-3
  config.train.weight_decay = 0.0
  config.train.warmup_epochs = 0.0
  config.train.schedule = "constant"
  config.train.checkpoint_every_steps = 1000
  config.train.best_metric = "mean_auroc"
  config.train.eval_batch_size = 32
  return config
