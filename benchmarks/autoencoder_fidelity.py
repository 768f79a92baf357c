"""Fidelity of the paper's autoencoder inserted into a trained classifier.

Trains ``cejax.forwards.autoencoder.FeatureAutoencoder`` on the training images' features at a
stage of the frozen model, then measures on test images how closely the classifier
with the autoencoder inserted reproduces the original predictions::

    python benchmarks/autoencoder_fidelity.py --config=configs/synthetic.py \
        --workdir=runs/synthetic --stage=block2 --code-channels=16 --steps=600
"""

import argparse
import json
import os
import sys
import time

import numpy as np


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--config", default="configs/synthetic.py")
  p.add_argument("--workdir", required=True)
  p.add_argument("--stage", default="block2")
  p.add_argument("--code-channels", type=int, default=16)
  p.add_argument("--steps", type=int, default=600)
  p.add_argument("--tv-weight", type=float, default=0.01)
  p.add_argument("--train-images", type=int, default=2048)
  p.add_argument("--test-images", type=int, default=1000)
  p.add_argument("--json", default="")
  args = p.parse_args()
  root = os.path.join(os.path.dirname(__file__), "..")
  sys.path.insert(0, root)
  import importlib.util

  from cejax.data import pipeline
  from cejax.forwards import autoencoder
  from cejax.jobs import checkpoint

  spec = importlib.util.spec_from_file_location("cfg", os.path.join(root, args.config))
  cfg = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(cfg)
  config = cfg.get_config()
  g, params, stats, run = checkpoint.load_model(args.workdir)
  logits_fn = checkpoint.make_logits_fn(g, params, stats)
  prefix, suffix = checkpoint.make_stage_fns(g, params, stats, args.stage)
  data = pipeline.load_dataset(config.data)
  n = min(args.train_images, data.num_examples("train"))
  batches = [data.batch("train", np.arange(i, min(i + 64, n)))["image"]
             for i in range(0, n, 64)]
  width = prefix(batches[0][:1]).shape[-1]
  t0 = time.perf_counter()
  model, history = autoencoder.train_autoencoder(
      prefix, batches, features=width, code_channels=args.code_channels, steps=args.steps,
      learning_rate=3e-3, tv_weight=args.tv_weight)
  seconds = time.perf_counter() - t0
  m = min(args.test_images, data.num_examples("test"))
  test = data.batch("test", np.arange(m))["image"]
  fid = autoencoder.fidelity(logits_fn, prefix, suffix, model, test,
                             activation=checkpoint.activation_of(run))
  rec = dict(fid, stage=args.stage, stage_channels=int(width), code_channels=args.code_channels,
             steps=args.steps, tv_weight=args.tv_weight, train_seconds=seconds,
             test_images=int(m), final_l1=history[-1]["l1"], first_l1=history[0]["l1"],
             argv=sys.argv)
  print(json.dumps(rec, indent=2))
  if args.json:
    with open(args.json, "w") as f:
      json.dump(rec, f, indent=2)


if __name__ == "__main__":
  main()
