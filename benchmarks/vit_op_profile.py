"""Where cejax's ViT forward loses to PyTorch's on a CPU core: one ViT-S/16 block's
operations timed one by one, XLA:CPU against PyTorch, side by side in one process.

``benchmarks/token_sweep.py`` measures whole sweeps (cejax 0.72-0.76x PyTorch per core
on 2026-12-07). This script splits the encoder block that makes up almost all of that
work into its operations at the sweep's shapes (``--batch`` sequences of ``T`` tokens,
width 384, 6 heads; ``T`` = 197 for the full sequence and for pixel fill, 99 and 50 for
token drop at keep 0.5 and 0.25):

- the four matrix products (``qkv``, attention ``proj``, MLP ``fc1`` and ``fc2``);
- the attention core (``q k^T`` scaled, softmax, ``@ v``), per head;
- the two LayerNorms and the GELU;
- the whole block (cejax's ``vit.Block`` against timm's ``Block``, the same weights).

Each is one compiled JAX program (``jax.jit``) and the same PyTorch expression under
``torch.inference_mode``, float32, both with every thread of the process pinned to one
core (``token_sweep._one_core``); the time is the best of ``--repeats`` runs of
``--iterations`` calls after a warm-up. The per-operation ratio (PyTorch time / JAX
time, above 1 where JAX is faster) and each operation's share of PyTorch's block say
which operations make the gap.

    python benchmarks/vit_op_profile.py --json results/vit_op_profile_DATE.json
"""

import argparse
import datetime
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))

import _provenance  # noqa: E402
from token_sweep import _one_core  # noqa: E402

WIDTH, HEADS, MLP = 384, 6, 1536


def _best(fn, *, iterations: int, repeats: int) -> float:
  """Best over ``repeats`` of the mean seconds per call of ``fn`` (``iterations``
  calls; ``fn`` blocks until its result is ready)."""
  fn()
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    for _ in range(iterations):
      fn()
    best = min(best, (time.perf_counter() - start) / iterations)
  return best


def operations(batch: int, tokens: int, seed: int = 0):
  """``{name: (jax_fn, torch_fn)}``: zero-argument callables on fixed random inputs of
  one block's shapes, each waiting for its result."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  import timm_vit  # tests/: timm without torchvision's compiled operators
  import torch
  from flax import nnx

  from cejax.models import vit

  rng = np.random.default_rng(seed)
  rows = batch * tokens
  hd = WIDTH // HEADS

  def arr(*shape):
    return rng.standard_normal(shape).astype(np.float32)

  def pair(jfn, tfn, *args):
    jargs = [jnp.asarray(a) for a in args]
    targs = [torch.from_numpy(a) for a in args]
    compiled = jax.jit(jfn)

    def run_torch():
      with torch.inference_mode():
        return tfn(*targs)
    return (lambda: jax.block_until_ready(compiled(*jargs)), run_torch)

  ops = {}
  for name, (din, dout) in {"qkv": (WIDTH, 3 * WIDTH), "proj": (WIDTH, WIDTH),
                            "fc1": (WIDTH, MLP), "fc2": (MLP, WIDTH)}.items():
    ops[f"matmul {name} ({rows}x{din} @ {din}x{dout})"] = pair(
        lambda x, w, b: x @ w + b, lambda x, w, b: torch.addmm(b, x, w),
        arr(rows, din), arr(din, dout), arr(dout))
  scale = hd ** -0.5

  def attention_jax(q, k, v):
    a = jax.nn.softmax(jnp.einsum("bhqd,bhkd->bhqk", q * scale, k), -1)
    return jnp.einsum("bhqk,bhkd->bhqd", a, v)

  def attention_torch(q, k, v):
    return (q * scale @ k.transpose(-2, -1)).softmax(-1) @ v

  qkv = [arr(batch, HEADS, tokens, hd) for _ in range(3)]
  ops[f"attention core ({batch}x{HEADS} heads, {tokens} tokens)"] = pair(
      attention_jax, attention_torch, *qkv)
  ln = nnx.LayerNorm(WIDTH, epsilon=1e-6, rngs=nnx.Rngs(0))
  tln = torch.nn.LayerNorm(WIDTH, eps=1e-6)
  ops[f"layernorm ({rows}x{WIDTH})"] = pair(lambda x: ln(x), tln, arr(rows, WIDTH))
  ops[f"gelu ({rows}x{MLP})"] = pair(lambda x: jax.nn.gelu(x, approximate=False),
                                     torch.nn.functional.gelu, arr(rows, MLP))
  tvt = sys.modules[timm_vit.vision_transformer().__module__]
  tblock = tvt.Block(WIDTH, HEADS, mlp_ratio=4.0, qkv_bias=True).eval()
  # The same weights in both (the block's share of cejax.models.vit.load_timm).
  model = vit.VisionTransformer(img_size=16, patch_size=16, embed_dim=WIDTH, depth=1,
                                num_heads=HEADS, rngs=nnx.Rngs(seed))
  reference = tvt.VisionTransformer(img_size=16, patch_size=16, embed_dim=WIDTH, depth=1,
                                    num_heads=HEADS).eval()
  tblock.load_state_dict({k[len("blocks.0."):]: v for k, v in
                          reference.state_dict().items() if k.startswith("blocks.0.")})
  vit.load_timm(model, reference.state_dict())
  block = model.blocks_[0]
  x = arr(batch, tokens, WIDTH)
  ops[f"whole block ({batch}x{tokens}x{WIDTH})"] = pair(lambda t: block(t), tblock, x)
  with torch.inference_mode():
    got = np.asarray(jax.jit(lambda t: block(t))(jnp.asarray(x)))
    want = tblock(torch.from_numpy(x)).numpy()
  return ops, float(np.abs(got - want).max())


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--batch", type=int, default=16)
  parser.add_argument("--tokens", type=int, nargs="+", default=[197, 99, 50])
  parser.add_argument("--iterations", type=int, default=5)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--json", type=Path)
  args = parser.parse_args(argv)
  import torch

  torch.set_num_threads(1)
  rows = []
  for tokens in args.tokens:
    ops, block_diff = operations(args.batch, tokens)
    timed = {}
    for name, (jfn, tfn) in ops.items():
      kw = dict(iterations=args.iterations, repeats=args.repeats)
      j = _one_core(lambda f=jfn, kw=kw: _best(f, **kw))
      t = _one_core(lambda f=tfn, kw=kw: _best(f, **kw))
      timed[name] = {"jax_ms": 1e3 * j, "torch_ms": 1e3 * t, "torch_over_jax": t / j}
    block = next(v for k, v in timed.items() if k.startswith("whole block"))
    for v in timed.values():
      v["share_of_torch_block"] = v["torch_ms"] / block["torch_ms"]
    rows.append({"tokens": tokens, "block_max_abs_diff": block_diff, "ops": timed})
    print(f"T={tokens}  (block outputs differ by at most {block_diff:.2e})")
    print(f"  {'operation':58s} {'jax ms':>8s} {'torch ms':>9s} {'torch/jax':>9s} "
          f"{'share':>6s}")
    for name, v in timed.items():
      print(f"  {name:58s} {v['jax_ms']:8.2f} {v['torch_ms']:9.2f} "
            f"{v['torch_over_jax']:9.2f} {v['share_of_torch_block']:6.2f}")
  record = {"benchmark": "vit_op_profile", "date": datetime.date.today().isoformat(),
            "command": "python benchmarks/vit_op_profile.py " + " ".join(
                argv if argv is not None else sys.argv[1:]),
            "commit": _provenance.commit(), "cpu": _provenance.cpu(),
            "versions": {"jax": __import__("jax").__version__, "torch": torch.__version__},
            "batch": args.batch, "width": WIDTH,
            "heads": HEADS, "one_core": True, "rows": rows}
  if args.json:
    args.json.write_text(json.dumps(record, indent=1) + "\n")
  return record


if __name__ == "__main__":
  main()
