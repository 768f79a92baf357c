"""Extremal perturbations on DenseNet-121 at 224 px: cejax against a PyTorch run.

cejax optimises the 4 areas of every image as one batch, ``batch_size`` images at a
time, the images spread over one XLA CPU device per core; the PyTorch side is the
reference written from TorchRay's documented algorithm (``tests/torch_extremal_reference.py``)
run one image at a time, as TorchRay runs it (intra-op threads: one per core). Same
weights (torchvision layout, random initialisation, BatchNorm statistics randomised),
same images, same areas (TorchRay's benchmark: 0.025, 0.05, 0.1, 0.2), same iteration
count (fewer than TorchRay's 800, on both sides).

    python benchmarks/extremal_speed.py --images 4 --iterations 5 --devices 2 \
        --json results/extremal_speed_DATE.json

Times are wall clock of one whole run per side after a warm-up (cejax's warm-up
compiles; it is reported apart). The masks of the two sides are compared too (max abs
difference; from TorchRay's all-ones start, exact ties let them part at round-off).
"""

import argparse
import datetime
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import _provenance  # noqa: E402  (benchmarks/, the script's own folder)


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--images", type=int, default=4)
  p.add_argument("--iterations", type=int, default=5)
  p.add_argument("--size", type=int, default=224)
  p.add_argument("--devices", type=int, default=2)
  p.add_argument("--batch-size", type=int, default=1, help="cejax images per device step")
  p.add_argument("--json", default="")
  args = p.parse_args()

  import jax
  jax.config.update("jax_num_cpu_devices", args.devices)
  import jax.numpy as jnp
  import numpy as np
  import torch
  import torch_extremal_reference as reference
  from torch_densenet import TorchDenseNet, randomize

  from cejax import sharding
  from cejax.jobs import checkpoint, convert
  from cejax.optimised import extremal

  areas = [0.025, 0.05, 0.1, 0.2]
  torch.manual_seed(0)
  net = randomize(TorchDenseNet(), 0)
  with tempfile.TemporaryDirectory() as tmp:
    torch.save(net.state_dict(), Path(tmp) / "w.pth")
    graphdef, params, stats, _ = convert.import_densenet(Path(tmp) / "w.pth")
  logits_fn = checkpoint.make_logits_fn(graphdef, params, stats)
  rng = np.random.default_rng(0)
  images = rng.normal(0, 1, (args.images, args.size, args.size, 3)).astype(np.float32)
  with torch.no_grad():
    targets = net(torch.from_numpy(images.transpose(0, 3, 1, 2))).argmax(1).numpy()

  mesh = sharding.mask_mesh(jax.devices()[:args.devices])
  kwargs = dict(areas=tuple(areas), iterations=args.iterations, batch_size=args.batch_size,
                mesh=mesh)
  run = lambda: extremal.extremal_perturbation(  # noqa: E731
      logits_fn, jnp.asarray(images), jnp.asarray(targets, jnp.int32), **kwargs)
  start = time.perf_counter()
  jax.block_until_ready(run().masks)
  first = time.perf_counter() - start
  start = time.perf_counter()
  ours = np.asarray(jax.block_until_ready(run().masks))
  cejax_s = time.perf_counter() - start

  torch.set_num_threads(args.devices)
  theirs = []
  start = time.perf_counter()
  for image, target in zip(images, targets, strict=True):
    masks, _ = reference.extremal_perturbation(
        net, torch.from_numpy(image.transpose(2, 0, 1)[None]), int(target), areas=areas,
        iterations=args.iterations)
    theirs.append(masks[:, 0].numpy())
  torch_s = time.perf_counter() - start

  record = {
      "benchmark": "extremal_speed", "date": datetime.date.today().isoformat(),
      "command": "python " + " ".join(sys.argv), "cpu": _provenance.cpu(),
      "cores": args.devices,
      "model": "densenet121 (torchvision layout, random weights, 14 classes)",
      "size": args.size, "images": args.images, "areas": areas,
      "iterations": args.iterations, "batch_size": args.batch_size,
      "cejax_first_call_s": round(first, 2), "cejax_s": round(cejax_s, 2),
      "torch_s": round(torch_s, 2),
      "cejax_images_per_s": round(args.images / cejax_s, 4),
      "torch_images_per_s": round(args.images / torch_s, 4),
      "speedup": round(torch_s / cejax_s, 2),
      "max_abs_mask_difference": float(np.abs(ours - np.stack(theirs)).max()),
      "versions": {"jax": jax.__version__, "torch": torch.__version__},
  }
  print(json.dumps(record, indent=1))
  if args.json:
    Path(args.json).write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
  main()
