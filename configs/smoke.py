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
  config.train.batch_size = 32
  config.train.num_epochs = 2
  config.train.checkpoint_every_steps = 4
  config.train.log_every_steps = 2
  config.train.eval_batch_size = 32
  return config
