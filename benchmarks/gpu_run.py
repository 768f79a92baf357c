"""The prepared GPU run: DenseNet-121 CE sweeps in cejax and PyTorch, side by side, on one
GPU, in at most six minutes; one JSON and a log.

    bash benchmarks/gpu_run.sh OUT_DIR          # on the GPU machine (see gpu_run.sh)
    python benchmarks/gpu_run.py --smoke --out /tmp/gpu_smoke.json   # CPU, seconds

What it measures (random weights with torchvision's initialisation, 14 classes, 224 px,
the same weights in both frameworks):

- ``peaks``: the matrix-product peak of the device in float32 (HIGHEST), TF32 and bf16,
  measured in this run (the denominator of every fraction of peak);
- ``exactness``: the expected CE of a few masks in ``exact``, ``tf32`` and ``bf16`` on the
  device against a float64 reference on the CPU (the same network in PyTorch, float64);
- ``cejax``: masks/s of the full forward in each precision on the paper's 10 x 10 grid,
  16-px sliding windows at stride 4 (2,809 masks) and 1,000 RISE masks, each at its best
  batch size (``auto`` from the compiled program's memory analysis, and a small sweep on
  the windows), with XLA's FLOPs per forward, achieved TFLOP/s, the fraction of the
  measured peak and the peak device memory; and the incremental path (``exact``);
- ``torch``: the same sweeps in PyTorch (float32 with TF32 off, eager channels-last with
  bf16 autocast, and ``torch.compile`` of the latter);
- ``extremal`` (last, if time is left): images/s of extremal perturbations (TorchRay's
  settings and benchmark areas, 50 iterations) in cejax (``exact``, the areas of all
  images as one batch) and in the PyTorch reference written from TorchRay's algorithm
  (``tests/torch_extremal_reference.py``, float32, one image at a time as TorchRay runs);
- ``vit`` (if time is left): masks/s of a ViT-S/16 at 224 px on 256 fixed-count patch
  masks (``cejax.patch_subsets``) keeping 0.5 and 0.25 of the patches: cejax pixel fill,
  token drop and attention masking (``exact``), timm's model on zero-filled images and
  timm's blocks on the kept tokens gathered by index (float32, TF32 off).

Each section is time-boxed (``--budget-s``): what does not fit is recorded as skipped,
and the JSON is rewritten after every measurement, so a run stopped early keeps what
it measured. ``--smoke`` runs the whole script on a tiny network on the CPU (the test
suite does, so that it keeps working).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]  # cejax, and torch_densenet (plain torch)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

FULL = dict(size=224, arch=dict(growth=32, blocks=(6, 12, 24, 16), init=64, bn_size=4),
            grid=10, window=16, stride=4, rise=1000, batches=(64, 256), peak_n=8192,
            exact_masks=8, budget_s=330, memory_gb=60.0, seconds=3.0, repeats=2,
            compile_backend="inductor", extremal_images=4, extremal_iterations=50,
            extremal_mask=dict(step=7, sigma=21.0),
            peak_seconds=1.0, vit=dict(img_size=224, patch_size=16, embed_dim=384,
                                       depth=12, num_heads=6), vit_masks=256,
            vit_batch=64)
# The smoke run goes through every section once: one timed call each, and torch.compile
# with the eager backend (dynamo"s path without a C++ compiler); coarse extremal masks
# (sigma = step) that compile in a fraction of the time of TorchRay's 7 and 21.
SMOKE = dict(size=16, arch=dict(growth=4, blocks=(1,), init=8, bn_size=2),
             grid=4, window=8, stride=8, rise=8, batches=(8,), peak_n=128,
             exact_masks=4, budget_s=600, memory_gb=0.01, seconds=0.0, repeats=1,
             compile_backend="eager", extremal_images=1, extremal_iterations=2,
             extremal_mask=dict(step=4, sigma=4.0),
             peak_seconds=0.0, vit=dict(img_size=16, patch_size=4, embed_dim=16, depth=1,
                                        num_heads=2), vit_masks=8, vit_batch=4)
MEAN, STD = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])


class Record:
  """The run's JSON, rewritten after every entry; sections time-boxed by the budget."""

  def __init__(self, path: Path, budget_s: float):
    self.path, self.budget_s, self.t0 = path, budget_s, time.perf_counter()
    self.data: dict = {"started": time.strftime("%Y-%m-%d %H:%M:%S"), "skipped": [],
                       "errors": {}}

  def left(self) -> float:
    return self.budget_s - (time.perf_counter() - self.t0)

  def put(self, keys, value):
    node = self.data
    for k in keys[:-1]:
      node = node.setdefault(k, {})
    node[keys[-1]] = value
    self.data["elapsed_s"] = round(time.perf_counter() - self.t0, 1)
    tmp = self.path.with_suffix(".tmp")
    tmp.write_text(json.dumps(self.data, indent=2, default=float))
    os.replace(tmp, self.path)

  def attempt(self, keys, fn, *, need_s: float):
    """``fn()`` into ``keys`` if ``need_s`` seconds are left; errors are recorded."""
    name = "/".join(keys)
    if self.left() < need_s:
      self.data["skipped"].append(name)
      self.put(["skipped"], self.data["skipped"])
      return None
    print(f"[{time.perf_counter() - self.t0:6.1f} s] {name}", flush=True)
    try:
      value = fn()
    except Exception as e:  # a section that fails must not lose the others
      self.data["errors"][name] = f"{type(e).__name__}: {e}\n{traceback.format_exc()[-1500:]}"
      self.put(["errors"], self.data["errors"])
      return None
    self.put(keys, value)
    return value


def timed(fn, items: int, *, seconds: float = 3.0, repeats: int = 2) -> dict:
  """Steady-state throughput of ``fn`` (which blocks until done): the first call
  compiles and is timed on its own; then calls until ``seconds`` and ``repeats``."""
  t = time.perf_counter()
  fn()
  compile_s = time.perf_counter() - t
  times = []
  while len(times) < repeats or sum(times) < seconds:
    t = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t)
  return {"items": items, "compile_s": compile_s, "median_s": statistics.median(times),
          "per_s": items / statistics.median(times), "best_per_s": items / min(times),
          "runs": len(times)}


def torch_network(cfg, seed=0):
  """torchvision's DenseNet (tests/torch_densenet.py, module for module) with
  torchvision's initialisation, eval mode."""
  import torch
  from torch_densenet import TorchDenseNet

  torch.manual_seed(seed)
  a = cfg["arch"]
  model = TorchDenseNet(growth=a["growth"], blocks=a["blocks"], init=a["init"],
                        bn_size=a["bn_size"], classes=14, in_channels=3)
  for m in model.modules():  # torchvision.models.DenseNet.__init__'s initialisation
    if isinstance(m, torch.nn.Conv2d):
      torch.nn.init.kaiming_normal_(m.weight)
    elif isinstance(m, torch.nn.BatchNorm2d):
      torch.nn.init.constant_(m.weight, 1)
      torch.nn.init.constant_(m.bias, 0)
    elif isinstance(m, torch.nn.Linear):
      torch.nn.init.constant_(m.bias, 0)
  return model.eval()


def matmul_peaks(n: int, *, seconds: float) -> dict:
  """TFLOP/s of an n x n x n product: float32 at HIGHEST, TF32, and bf16, each timed for
  ``seconds`` (and at least 3 calls)."""
  out = {}
  for name, dtype, prec in (("float32", jnp.float32, "float32"),
                            ("tf32", jnp.float32, "tensorfloat32"),
                            ("bf16", jnp.bfloat16, "bfloat16")):
    a = jax.random.normal(jax.random.key(0), (n, n), dtype)
    with jax.default_matmul_precision(prec):
      f = jax.jit(lambda x: x @ x)
      r = timed(lambda f=f, a=a: f(a).block_until_ready(), 1, seconds=seconds, repeats=3)
    out[name] = 2 * n**3 * r["best_per_s"] / 1e12
  return out


def device_memory() -> int | None:
  stats = jax.local_devices()[0].memory_stats() or {}
  return stats.get("peak_bytes_in_use")


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--out", required=True)
  parser.add_argument("--smoke", action="store_true", help="tiny network, CPU, seconds")
  parser.add_argument("--budget-s", type=float, default=None)
  args = parser.parse_args(argv)
  cfg = dict(SMOKE if args.smoke else FULL)
  if args.budget_s:
    cfg["budget_s"] = args.budget_s
  import torch

  from cejax import effects, masks
  from cejax.forwards import incremental
  from cejax.jobs import convert, throughput

  rec = Record(Path(args.out), cfg["budget_s"])
  dev = jax.local_devices()[0]
  rec.put(["environment"], {
      "device": dev.device_kind, "platform": dev.platform, "jax": jax.__version__,
      "torch": torch.__version__, "python": platform.python_version(),
      "cuda": torch.version.cuda, "smoke": args.smoke, "command": " ".join(sys.argv),
      "config": {k: v for k, v in cfg.items() if k != "arch"} | {"arch": str(cfg["arch"])}})

  # The network, once in PyTorch and in cejax (float32 and bf16 compute), same weights.
  net = torch_network(cfg)
  nets = {}
  for name, dtype in (("float32", jnp.float32), ("bfloat16", jnp.bfloat16)):
    graphdef, params, stats, _ = convert.import_densenet(net.state_dict(), dtype=dtype)
    from flax import nnx

    model = nnx.merge(graphdef, params, stats)
    model.eval()
    graphdef, state = nnx.split(model)
    nets[name] = (model, lambda x, g=graphdef, s=state: nnx.merge(g, s)(x))
  size = cfg["size"]
  rng = np.random.default_rng(0)
  pixels = rng.uniform(size=(size, size, 3))
  image = jnp.asarray((pixels - MEAN) / STD, jnp.float32)
  sources = {
      "grid": masks.grid(shape=(size, size), n=cfg["grid"]),
      "sliding": masks.sliding_windows(shape=(size, size), window=cfg["window"],
                                       stride=cfg["stride"]),
      "rise": masks.rise(jax.random.key(0), num=cfg["rise"], shape=(size, size)),
  }
  rec.put(["masks"], {f: s.num for f, s in sources.items()})
  peaks = rec.attempt(["peaks_tflop_s"], lambda: matmul_peaks(
      cfg["peak_n"], seconds=cfg["peak_seconds"]), need_s=10)

  # Exactness: expected CE of a few masks on the device against float64 PyTorch on CPU.
  def exactness():
    chosen = masks.to_array(sources["grid"])[:cfg["exact_masks"]]
    m = np.asarray(chosen, np.float64)
    x = np.asarray(image, np.float64)
    batch = np.concatenate([x[None], x[None] * (1 - m[..., None])])
    with torch.no_grad():
      z = net.double()(torch.from_numpy(batch).permute(0, 3, 1, 2)).numpy()
    net.float()
    p = np.exp(z - z.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    reference = (p[0] * (p[1:] - p[0])).sum(-1)
    out = {"reference_max_abs": float(np.abs(reference).max())}
    for mode, dtype in (("exact", "float32"), ("tf32", "float32"), ("bf16", "bfloat16")):
      got = np.asarray(effects.causal_effect(nets[dtype][1], image, chosen, batch_size=4,
                                             precision=mode).effects, np.float64)
      out[mode] = {"max_abs_error": float(np.abs(got - reference).max())}
    return out

  rec.attempt(["exactness"], exactness, need_s=20)

  # cejax: best batch per precision on the windows, then every family at that batch.
  flops = rec.attempt(["cejax", "forward_flops"],
                      lambda: throughput.forward_flops(nets["float32"][1], image), need_s=10)
  peak_of = {"exact": "float32", "tf32": "tf32", "bf16": "bf16"}

  def sweep(forward, family, batch, mode):
    source = sources[family]
    run = lambda: effects.causal_effect(forward, image, source, batch_size=batch,  # noqa: E731
                                        precision=mode).effects.block_until_ready()
    r = timed(run, source.num, seconds=cfg["seconds"], repeats=cfg["repeats"])
    r["batch_size"] = batch
    if flops:
      r["tflop_s"] = r["best_per_s"] * flops / 1e12
      if peaks:
        r["fraction_of_peak"] = r["tflop_s"] / peaks[peak_of[mode]]
    r["peak_device_bytes"] = device_memory()
    return r

  for mode in ("bf16", "exact", "tf32"):
    logits_fn = nets["bfloat16" if mode == "bf16" else "float32"][1]

    def usage(batch, f=logits_fn, m=mode):  # the program timed below, compiled at a batch
      program = jax.jit(lambda x: effects.causal_effect(
          f, x, sources["sliding"], batch_size=batch, precision=m).effects)
      return throughput.compiled_bytes(program.lower(image).compile())

    auto = rec.attempt(["cejax", mode, "auto_batch"], lambda u=usage: throughput.
                       auto_batch_size(u, budget_bytes=cfg["memory_gb"] * 2**30,
                                       limit=sources["sliding"].num), need_s=20)
    candidates = sorted({b for b in (*cfg["batches"], auto) if b})
    results = {}
    for batch in candidates:
      results[batch] = rec.attempt(["cejax", mode, "sliding", f"B{batch}"],
                                   lambda f=logits_fn, b=batch, m=mode: sweep(f, "sliding",
                                                                              b, m),
                                   need_s=40)
    done = {b: r for b, r in results.items() if r}
    if not done:
      continue
    best = max(done, key=lambda b: done[b]["best_per_s"])
    rec.put(["cejax", mode, "best_batch"], best)
    for family in ("grid", "rise"):
      rec.attempt(["cejax", mode, family], lambda f=logits_fn, fam=family, b=best, m=mode:
                  sweep(f, fam, min(b, sources[fam].num), m), need_s=40)
  model = nets["float32"][0]
  for family in ("grid", "sliding"):
    for batch in cfg["batches"]:
      rec.attempt(["cejax", "incremental", family, f"B{batch}"],
                  lambda fam=family, b=batch: sweep(incremental.forward(model), fam,
                                                    min(b, sources[fam].num), "exact"),
                  need_s=40)

  # PyTorch: the same masks, the same weights, batched.
  device = "cuda" if torch.cuda.is_available() else "cpu"
  x = torch.from_numpy(np.array(image)).permute(2, 0, 1)[None].to(device)

  def torch_sweep(family, batch, variant):
    m_all = torch.from_numpy(np.asarray(masks.to_array(sources[family]))).to(device)
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    net_d = torch_network(cfg).to(device).to(memory_format=torch.channels_last)
    fn = (torch.compile(net_d, backend=cfg["compile_backend"]) if variant == "compile_bf16"
          else net_d)
    autocast = variant in ("bf16", "compile_bf16")

    def run():
      with torch.no_grad(), torch.autocast(device, torch.bfloat16, enabled=autocast):
        p0 = torch.softmax(fn(x.contiguous(memory_format=torch.channels_last)).float(), -1)
        out = []
        for i in range(0, len(m_all), batch):
          xm = (x * (1 - m_all[i:i + batch, None])).contiguous(
              memory_format=torch.channels_last)
          q = torch.softmax(fn(xm).float(), -1)
          out.append((p0 * (q - p0)).sum(-1))
        ce = torch.cat(out)
      if device == "cuda":
        torch.cuda.synchronize()
      return ce

    r = timed(run, len(m_all), seconds=cfg["seconds"], repeats=cfg["repeats"])
    r["batch_size"] = batch
    return r

  for variant in ("bf16", "float32", "compile_bf16"):
    for family in ("grid", "sliding", "rise"):
      batch = min(cfg["batches"][-1], sources[family].num)
      rec.attempt(["torch", variant, family], lambda f=family, b=batch, v=variant:
                  torch_sweep(f, b, v), need_s=60 if variant.startswith("compile") else 30)
  # Extremal perturbations: cejax (all images' areas as one batch) against the PyTorch
  # reference one image at a time, the same weights, images and iterations.
  from cejax import precision
  from cejax.optimised import extremal

  areas = (0.025, 0.05, 0.1, 0.2)
  n_ext, iterations = cfg["extremal_images"], cfg["extremal_iterations"]
  ext_images = jnp.asarray(rng.normal(0, 1, (n_ext, size, size, 3)), jnp.float32)
  ext_targets = []  # filled by the first section that runs (inside its time box)

  def targets():
    if not ext_targets:
      ext_targets.extend(int(t) for t in jnp.argmax(nets["float32"][1](ext_images), -1))
    return jnp.asarray(ext_targets, jnp.int32)

  def extremal_cejax():
    def run():
      with precision.policy("exact"):
        jax.block_until_ready(extremal.extremal_perturbation(
            nets["float32"][1], ext_images, targets(), areas=areas,
            iterations=iterations, batch_size=n_ext, **cfg["extremal_mask"]).masks)
    return timed(run, n_ext, seconds=cfg["seconds"], repeats=cfg["repeats"]) | {
        "iterations": iterations, "areas": list(areas), **cfg["extremal_mask"]}

  def extremal_torch():
    import torch_extremal_reference as reference

    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    net_d = torch_network(cfg).to(device)
    xs = torch.from_numpy(np.asarray(ext_images)).permute(0, 3, 1, 2).to(device)

    def run():
      with torch.device(device):  # the reference's own tensors on the same device
        for i in range(n_ext):
          reference.extremal_perturbation(net_d, xs[i:i + 1], int(targets()[i]),
                                          areas=list(areas), iterations=iterations,
                                          **cfg["extremal_mask"])
      if device == "cuda":
        torch.cuda.synchronize()
    return timed(run, n_ext, seconds=cfg["seconds"], repeats=cfg["repeats"]) | {
        "iterations": iterations, "areas": list(areas), **cfg["extremal_mask"]}

  # Compiling 50 iterations of DenseNet-121's forward and backward pass takes a while.
  rec.attempt(["extremal", "cejax"], extremal_cejax, need_s=120)
  rec.attempt(["extremal", "torch"], extremal_torch, need_s=45)

  # ViT (ViT-S/16 at 224 px in the full run): token drop, attention masking and pixel
  # fill on the same fixed-count patch masks, against timm's model (pixel fill, and
  # token drop by index gather), the same random weights.
  def vit_section():
    import timm_vit  # tests/: timm's VisionTransformer

    from cejax.forwards import tokens
    from cejax.models import vit

    config = cfg["vit"]
    side = config["img_size"]
    torch.manual_seed(0)
    reference = timm_vit.vision_transformer()(num_classes=14, **config).eval()
    with torch.no_grad():
      for param in reference.parameters():
        param.add_(0.02 * torch.randn_like(param))
    from flax import nnx

    vit_model = vit.VisionTransformer(num_classes=14, rngs=nnx.Rngs(0), **config)
    vit.load_timm(vit_model, reference.state_dict())
    graphdef, state = nnx.split(vit_model)
    vit_logits = lambda x: nnx.merge(graphdef, state)(x)  # noqa: E731
    forwards = {"token drop": tokens.from_vit(vit_model),
                "attention mask": tokens.from_vit(vit_model, mode="attention")}
    vit_image = jnp.asarray(rng.normal(size=(side, side, 3)), jnp.float32)
    ref_d = reference.to(device)
    x_d = torch.from_numpy(np.asarray(vit_image)).permute(2, 0, 1)[None].to(device)
    torch.backends.cuda.matmul.allow_tf32 = False
    out, batch, patch = {}, cfg["vit_batch"], config["patch_size"]
    for keep in (0.5, 0.25):
      source = masks.patch_subsets(jax.random.key(1), num=cfg["vit_masks"],
                                   shape=(side, side), patch_size=patch, keep=keep)
      row = {}
      for name, forward in (("pixel fill", vit_logits), *forwards.items()):
        kw = {"intervention": "zero"} if name == "pixel fill" else {}
        run = lambda f=forward, s=source, kw=kw: effects.causal_effect(  # noqa: E731
            f, vit_image, s, batch_size=batch, precision="exact",
            **kw).effects.block_until_ready()
        row[f"cejax {name}"] = timed(run, source.num, seconds=cfg["seconds"],
                                     repeats=cfg["repeats"])
      m_np = np.asarray(masks.to_array(source))
      m_t = torch.from_numpy(m_np).to(device)
      kept = [torch.from_numpy(np.concatenate(
          [[0], 1 + np.flatnonzero(m[::patch, ::patch].reshape(-1) < 0.5)])).to(device)
          for m in m_np]

      def torch_pixel(m_t=m_t):
        with torch.inference_mode():
          for i in range(0, len(m_t), batch):
            ref_d(x_d * (1 - m_t[i:i + batch, None]))
        if device == "cuda":
          torch.cuda.synchronize()

      def torch_drop(kept=kept):
        with torch.inference_mode():
          embedded = ref_d._pos_embed(ref_d.patch_embed(x_d))[0]
          for i in range(0, len(kept), batch):
            tokens_ = torch.stack([embedded[k] for k in kept[i:i + batch]])
            ref_d.forward_head(ref_d.norm(ref_d.blocks(tokens_)))
        if device == "cuda":
          torch.cuda.synchronize()

      row["torch pixel fill"] = timed(torch_pixel, len(m_np), seconds=cfg["seconds"],
                                      repeats=cfg["repeats"])
      row["torch token drop"] = timed(torch_drop, len(m_np), seconds=cfg["seconds"],
                                      repeats=cfg["repeats"])
      out[f"keep {keep}"] = row
    return out

  rec.attempt(["vit"], vit_section, need_s=90)
  rec.put(["finished"], time.strftime("%Y-%m-%d %H:%M:%S"))
  return rec.data


if __name__ == "__main__":
  main()
