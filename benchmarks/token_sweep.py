"""Token drop against pixel fill on a ViT, cejax against PyTorch (timm), side by side.

The same weights (timm's ``VisionTransformer``, random initialisation, copied into
``cejax.models.vit`` with ``load_timm``), the same image and the same masks: for each
keep fraction, ``--masks`` random masks on the patch grid that each keep the same number
of patches (so token drop needs no padding). Per keep fraction, masks/s of

- cejax, pixel fill: ``causal_effect(logits_fn, image, masks, intervention="zero")``,
  the full sequence of the zero-filled image;
- cejax, token drop: ``causal_effect(tokens.from_vit(model), image, masks)``;
- cejax, attention mask: the same with ``mode="attention"`` (full length);
  each of the three on one XLA CPU device and on one device per core (``--devices``;
  ``--batch-size`` masks per device, the one-device run takes the same masks per step);
  one XLA CPU device still spreads its work over every core, so pixel fill and token
  drop also run on one device with the whole process pinned to one core;
- PyTorch, pixel fill: timm's model on batches of zero-filled images
  (``torch.inference_mode``, float32), on ``--threads`` intra-op threads (every core)
  and on one thread pinned to one core;
- PyTorch, token drop: timm's patch embedding and position embedding once, then the
  kept tokens gathered by index per mask and timm's blocks, norm and head.

    python benchmarks/token_sweep.py --devices 2 --json results/token_sweep_DATE.json

Times are the best of ``--repeats`` whole sweeps after a warm-up (which compiles); a
path's figure (``best``) is the faster of its device counts. The logits of the
two token-drop paths are compared on the first batch (max abs difference).
"""

import argparse
import datetime
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import _provenance  # noqa: E402  (benchmarks/, the script's own folder)


def patch_masks(rng, num, grid, dropped, patch):
  """``(num, grid p, grid p)`` float32 masks, each dropping ``dropped`` random patches."""
  import numpy as np

  masks = np.zeros((num, grid * grid), np.float32)
  for mask in masks:
    mask[rng.choice(grid * grid, dropped, replace=False)] = 1
  return np.kron(masks.reshape(num, grid, grid), np.ones((patch, patch), np.float32))


def _threads(n, fn):
  """``fn()`` with PyTorch's intra-op threads set to ``n``."""
  import torch

  before = torch.get_num_threads()
  torch.set_num_threads(n)
  try:
    return fn()
  finally:
    torch.set_num_threads(before)


def _one_core(fn):
  """``fn()`` with every thread of this process on the first core (XLA:CPU's and
  PyTorch's thread pools included: Linux sets affinity per thread)."""
  every = os.sched_getaffinity(0)

  def pin(cores):  # threads started while pinned are unpinned afterwards too
    for tid in os.listdir("/proc/self/task"):
      try:
        os.sched_setaffinity(int(tid), cores)
      except OSError:  # a thread that has ended
        pass

  pin({min(every)})
  try:
    return fn()
  finally:
    pin(every)


def best_of(fn, repeats):
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return min(times), times


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--size", type=int, default=224)
  p.add_argument("--patch", type=int, default=16)
  p.add_argument("--embed-dim", type=int, default=384)  # ViT-S
  p.add_argument("--depth", type=int, default=12)
  p.add_argument("--heads", type=int, default=6)
  p.add_argument("--classes", type=int, default=14)
  p.add_argument("--masks", type=int, default=64)
  p.add_argument("--keeps", default="0.75,0.5,0.25")
  p.add_argument("--batch-size", type=int, default=16, help="masks per device step")
  p.add_argument("--devices", type=int, default=2)
  p.add_argument("--threads", type=int, default=os.cpu_count(),
                 help="PyTorch's intra-op threads (default: every core)")
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--json", default="")
  args = p.parse_args(argv)

  import jax
  jax.config.update("jax_num_cpu_devices", args.devices)
  import jax.numpy as jnp
  import numpy as np
  import timm_vit
  import torch
  from flax import nnx

  import cejax
  from cejax.forwards import tokens
  from cejax.models import vit

  torch.set_num_threads(args.threads)
  torch.manual_seed(0)
  config = dict(img_size=args.size, patch_size=args.patch, embed_dim=args.embed_dim,
                depth=args.depth, num_heads=args.heads)
  reference = timm_vit.vision_transformer()(num_classes=args.classes, **config).eval()
  with torch.no_grad():  # timm zero-initialises the head: random weights throughout
    for param in reference.parameters():
      param.add_(0.02 * torch.randn_like(param))
  model = vit.VisionTransformer(num_classes=args.classes, rngs=nnx.Rngs(0), **config)
  vit.load_timm(model, reference.state_dict())
  graphdef, state = nnx.split(model)
  logits_fn = lambda x: nnx.merge(graphdef, state)(x)  # noqa: E731
  # Built once: each from_vit call makes new functions, which jit sees as a new program.
  token_drop = tokens.from_vit(model)
  attention_mask = tokens.from_vit(model, mode="attention")

  rng = np.random.default_rng(0)
  image = rng.normal(size=(args.size, args.size, 3)).astype(np.float32)
  grid = args.size // args.patch
  # cejax on one device (XLA:CPU's dots still use every core) and on one per core.
  meshes = {"1 device": (cejax.mask_mesh(jax.devices()[:1]),
                         args.batch_size * args.devices),
            f"{args.devices} devices": (cejax.mask_mesh(), args.batch_size)}
  timage = torch.from_numpy(image.transpose(2, 0, 1).copy())[None]
  batch = args.batch_size * args.devices  # PyTorch's batch: the masks of one cejax step
  def measure(keep):
    """One row: every path on the same masks, keeping ``keep`` of the patches."""
    dropped = grid * grid - round(keep * grid * grid)
    masks = patch_masks(rng, args.masks, grid, dropped, args.patch)
    jmasks = jnp.asarray(masks)
    runs = {}
    for where, (mesh, per_device) in meshes.items():
      run = lambda model, mesh=mesh, per_device=per_device, **kw: (  # noqa: E731
          cejax.causal_effect(model, image, jmasks, batch_size=per_device, mesh=mesh,
                              **kw).effects.block_until_ready())
      runs[f"cejax pixel fill, {where}"] = (
          lambda run=run: run(logits_fn, intervention="zero"))
      runs[f"cejax token drop, {where}"] = lambda run=run: run(token_drop)
      runs[f"cejax attention mask, {where}"] = lambda run=run: run(attention_mask)
    # One core for the whole process: a per-core comparison (one XLA CPU device still
    # spreads its work over every core it may use).
    one_device = lambda model, **kw: cejax.causal_effect(  # noqa: E731
        model, image, jmasks, batch_size=args.batch_size * args.devices,
        mesh=meshes["1 device"][0], **kw).effects.block_until_ready()
    runs["cejax pixel fill, 1 device, 1 core"] = lambda: _one_core(
        lambda: one_device(logits_fn, intervention="zero"))
    runs["cejax token drop, 1 device, 1 core"] = lambda: _one_core(
        lambda: one_device(token_drop))
    tmasks = torch.from_numpy(masks)
    keep_index = [torch.from_numpy(np.concatenate([[0], 1 + np.flatnonzero(
        m[::args.patch, ::args.patch].reshape(-1) < 0.5)])) for m in masks]

    def torch_pixel():
      with torch.inference_mode():
        for s in range(0, args.masks, batch):
          reference(timage * (1 - tmasks[s:s + batch, None]))

    def torch_tokens(first_only=False):
      with torch.inference_mode():
        embedded = reference._pos_embed(reference.patch_embed(timage))[0]
        out = []
        for s in range(0, args.masks, batch):
          x = torch.stack([embedded[i] for i in keep_index[s:s + batch]])
          out.append(reference.forward_head(reference.norm(reference.blocks(x))))
          if first_only:
            return out[0]
        return out

    # PyTorch on every core, and on one thread: the per-core comparison with cejax on
    # one device, whose convolutions and dots XLA:CPU runs on one thread.
    runs[f"torch pixel fill, {args.threads} threads"] = lambda: _threads(
        args.threads, torch_pixel)
    runs[f"torch token drop, {args.threads} threads"] = lambda: _threads(
        args.threads, torch_tokens)
    runs["torch pixel fill, 1 thread, 1 core"] = lambda: _one_core(
        lambda: _threads(1, torch_pixel))
    runs["torch token drop, 1 thread, 1 core"] = lambda: _one_core(
        lambda: _threads(1, torch_tokens))
    row = {"keep": keep, "kept_patches": grid * grid - dropped, "masks": args.masks}
    for name, fn in runs.items():
      fn()  # warm-up (cejax: compiles)
      best, times = best_of(fn, args.repeats)
      row[name] = {"masks_per_s": args.masks / best, "seconds": times}
      print(f"keep {keep}: {name}: {args.masks / best:.1f} masks/s", flush=True)
    # The two token-drop paths on the first batch, logits against logits.
    forward = token_drop.prepare(jmasks[:batch], image=jnp.asarray(image),
                                             intervention=None)
    context = forward.setup(jnp.asarray(image))[1]
    ours = np.asarray(forward.logits(context, jnp.arange(min(batch, args.masks)), None)[0])
    row["token_drop_max_abs_diff"] = float(np.abs(ours - torch_tokens(True).numpy()).max())
    def rate(path):  # the best of a path's runs (cejax: of its device counts)
      return max(v["masks_per_s"] for k, v in row.items()
                 if isinstance(v, dict) and k.split(",")[0] == path)

    row["best"] = {path: rate(path) for path in (
        "cejax pixel fill", "cejax token drop", "cejax attention mask",
        "torch pixel fill", "torch token drop")}
    row["speedup_token_drop_over_pixel_fill"] = rate("cejax token drop") / rate(
        "cejax pixel fill")
    row["cejax_over_torch"] = {
        "pixel fill": rate("cejax pixel fill") / rate("torch pixel fill"),
        "token drop": rate("cejax token drop") / rate("torch token drop"),
        "best against best": max(rate("cejax pixel fill"), rate("cejax token drop"))
        / max(rate("torch pixel fill"), rate("torch token drop"))}
    one = lambda name: row[name]["masks_per_s"]  # noqa: E731
    row["cejax_over_torch_per_core"] = {  # both pinned to one core
        path: one(f"cejax {path}, 1 device, 1 core") / one(f"torch {path}, 1 thread, 1 core")
        for path in ("pixel fill", "token drop")}
    return row

  rows = [measure(float(k)) for k in args.keeps.split(",")]

  record = {"benchmark": "token_sweep", "date": datetime.date.today().isoformat(),
            "command": "python " + " ".join(sys.argv), "commit": _provenance.commit(),
            "machine": {"cpu": _provenance.cpu(), "cores": args.devices,
                        "python": platform.python_version(), "jax": jax.__version__,
                        "torch": torch.__version__},
            "model": dict(config, classes=args.classes), "batch_size": args.batch_size,
            "torch_threads": args.threads,
            "rows": rows}
  if args.json:
    Path(args.json).write_text(json.dumps(record, indent=1) + "\n")
  return record


if __name__ == "__main__":
  main()
