"""The precision policy's modes against a float64 reference, on CPU, and what ``exact``
costs on CPU (side by side with JAX's default precision).

    python benchmarks/precision_study.py --workdir runs/synthetic \\
        --out results/precision_DATE.json

For the trained demo model (``--workdir``, its first ``--images`` test images) and a
DenseNet-121 converted from PyTorch (torchvision's initialisation, 14 classes, 224 px,
``--images`` random images), the expected CE of the paper's 10 x 10 grid (zero fill)
in each mode is compared with the same network in float64 (JAX with x64, on the CPU):
the largest absolute error, that error relative to the largest effect, and the rank
agreement of the 100 effects (Spearman; and how many of the reference's 10 strongest
cells are among the mode's 10 strongest). Modes:

- ``exact``: float32, every product at HIGHEST (the default);
- ``tf32``: emulated, since CPUs have no TF32: every dot and convolution operand rounded
  to TF32's 10-bit mantissa (``lax.reduce_precision``), products accumulated in float32,
  as TF32 tensor cores do;
- ``bf16``: as the jobs run it: the network in bfloat16 (weights float32).

The timing part runs the DenseNet-121 grid sweep on the float32 network with every
product at HIGHEST (``exact``) and at DEFAULT (what JAX uses when nothing is set; on a
CPU ``precision="bf16"`` of a float32 network is exactly that), interleaved,
``--rounds`` times each.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import scipy.stats

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]


def round_products(fn, *, mantissa_bits: int, every_output: bool = False):
  """``fn`` with every dot and convolution operand rounded to ``mantissa_bits``: a
  jaxpr interpreter (nested jit programs and custom-derivative functions included).
  ``every_output``: also round the floating-point result of every operation, as a
  network that stores its activations in that format does."""
  from jax.extend import core

  def rounded(x):
    return (jax.lax.reduce_precision(x, exponent_bits=8, mantissa_bits=mantissa_bits)
            if jnp.issubdtype(x.dtype, jnp.floating) else x)

  def run(jaxpr, consts, *args):
    env = {}
    read = lambda v: v.val if isinstance(v, core.Literal) else env[v]  # noqa: E731
    for var, val in zip(jaxpr.constvars, consts, strict=True):
      env[var] = val
    for var, val in zip(jaxpr.invars, args, strict=True):
      env[var] = val
    for eqn in jaxpr.eqns:
      invals = [read(v) for v in eqn.invars]
      name = eqn.primitive.name
      if name in ("dot_general", "conv_general_dilated"):
        outs = eqn.primitive.bind(*[rounded(x) for x in invals], **eqn.params)
      elif name in ("pjit", "jit", "custom_jvp_call", "custom_vjp_call"):
        # A nested program (jit, or a function with custom derivatives, e.g. relu):
        # its forward computation, interpreted too.
        closed = eqn.params.get("jaxpr") or eqn.params.get("call_jaxpr")
        outs = run(closed.jaxpr, closed.consts, *invals)
      else:
        outs = eqn.primitive.bind(*invals, **eqn.params)
      outs = outs if eqn.primitive.multiple_results else [outs]
      if every_output and name not in ("pjit", "jit", "custom_jvp_call", "custom_vjp_call"):
        outs = [rounded(o) for o in outs]
      for var, val in zip(eqn.outvars, outs, strict=True):
        env[var] = val
    return [read(v) for v in jaxpr.outvars]

  def wrapped(x):
    closed = jax.make_jaxpr(fn)(x)
    return run(closed.jaxpr, closed.consts, x)[0]

  return wrapped


def networks(args):
  """``{name: (images float32, {dtype: logits_fn})}``."""
  import torch
  from flax import nnx
  from gpu_run import FULL, MEAN, STD, torch_network

  from cejax.data import pipeline
  from cejax.jobs import checkpoint, convert
  from configs import synthetic

  out = {}
  fns = {}
  for dtype in ("float32", "bfloat16", "float64"):
    g, p, s, run = checkpoint.load_model(args.workdir, compute_dtype=dtype)
    if dtype == "float64":
      p, s = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), (p, s))
    fns[dtype] = checkpoint.make_logits_fn(g, p, s)
  config = synthetic.get_config()
  images = pipeline.load_dataset(config.data).batch("test", list(range(args.images)))["image"]
  out["demo (trained, 64 px)"] = (np.asarray(images, np.float32), fns)

  net = torch_network(FULL)
  fns = {}
  for dtype in ("float32", "bfloat16", "float64"):
    g, p, s, _ = convert.import_densenet(net.state_dict(), dtype=getattr(jnp, dtype))
    if dtype == "float64":
      p, s = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), (p, s))
    model = nnx.merge(g, p, s)
    model.eval()
    gd, st = nnx.split(model)
    fns[dtype] = lambda x, gd=gd, st=st: nnx.merge(gd, st)(x)
  rng = np.random.default_rng(0)
  pixels = rng.uniform(size=(args.images, 224, 224, 3))
  out["densenet121 (converted, 224 px)"] = (((pixels - MEAN) / STD).astype(np.float32), fns)
  del torch
  return out


def effects_of(logits_fn, image, grid, **kwargs):
  from cejax import effects

  return np.asarray(effects.causal_effect(logits_fn, image, grid, batch_size=25,
                                          **kwargs).effects, np.float64)


def reference_effects(logits_fn64, image, grid):
  """The expected CE of zero-filled masks from float64 logits, in numpy float64 (not
  through the engine, which keeps logits in float32)."""
  from cejax import masks

  m = np.asarray(masks.to_array(grid), np.float64)
  x = np.asarray(image, np.float64)
  batch = np.concatenate([x[None], x[None] * (1 - m[..., None])])
  z = np.concatenate([np.asarray(logits_fn64(jnp.asarray(batch[i:i + 26])), np.float64)
                      for i in range(0, len(batch), 26)])
  p = np.exp(z - z.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  return (p[0] * (p[1:] - p[0])).sum(-1)


def compare(got, ref) -> dict:
  top = lambda e: set(np.argsort(-np.abs(e))[:10])  # noqa: E731
  return {"max_abs_error": float(np.abs(got - ref).max()),
          "relative_to_max_effect": float(np.abs(got - ref).max() / np.abs(ref).max()),
          "spearman": float(scipy.stats.spearmanr(got, ref).statistic),
          "top10_shared": len(top(got) & top(ref))}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--workdir", required=True, help="the trained demo run")
  parser.add_argument("--images", type=int, default=4)
  parser.add_argument("--rounds", type=int, default=5)
  parser.add_argument("--out", default="")
  args = parser.parse_args()
  jax.config.update("jax_enable_x64", True)  # the float64 reference
  from cejax import masks

  record = {"command": " ".join(sys.argv), "date": time.strftime("%Y-%m-%d"),
            "machine": platform.processor() or platform.machine(), "jax": jax.__version__,
            "errors": {}, "timing": {}}
  for name, (images, fns) in networks(args).items():
    grid = masks.grid(shape=images.shape[1:3], n=10)
    rows = {"exact": [], "tf32": [], "bf16": []}
    for x in images:
      ref = reference_effects(fns["float64"], x, grid)
      x32 = jnp.asarray(x, jnp.float32)
      rows["exact"].append(compare(effects_of(fns["float32"], x32, grid), ref))
      rows["tf32"].append(compare(effects_of(round_products(fns["float32"],
                                                            mantissa_bits=10), x32, grid),
                                  ref))
      rows["bf16"].append(compare(effects_of(fns["bfloat16"], x32, grid), ref))
    record["errors"][name] = {
        mode: {"per_image": r, "worst": {k: (min if k in ("spearman", "top10_shared")
                                              else max)(i[k] for i in r) for k in r[0]}}
        for mode, r in rows.items()}
    print(name, json.dumps({m: v["worst"] for m, v in record["errors"][name].items()},
                           indent=1))
    if name.startswith("densenet121"):
      x32 = jnp.asarray(images[0], jnp.float32)
      times = {"exact (HIGHEST)": [], "DEFAULT (JAX's default)": []}
      from cejax import effects

      def sweep(mode, fn=fns["float32"], x32=x32, grid=grid):
        # The same float32 network; only the products' precision differs.
        mode = "exact" if mode.startswith("exact") else "bf16"
        return effects.causal_effect(fn, x32, grid, batch_size=25,
                                     precision=mode).effects.block_until_ready()

      for mode in times:
        sweep(mode)  # compile
      for _ in range(args.rounds):
        for mode in times:
          t = time.perf_counter()
          sweep(mode)
          times[mode].append(grid.num / (time.perf_counter() - t))
      record["timing"] = {"masks_per_s": times,
                          "median": {m: statistics.median(v) for m, v in times.items()}}
      print("timing", record["timing"]["median"])
  if args.out:
    Path(args.out).write_text(json.dumps(record, indent=2))


if __name__ == "__main__":
  main()
