"""Building and tracing a DenseNet: eager against abstract construction, and the
tracing workaround of ``cejax.models._tracing`` on and off.

Each case runs in a fresh interpreter (compilation caches start empty, as in a user's
job), one after another, at XLA's default flags:

- ``eager``: ``create_densenet(...)`` as a training run builds it (every initialiser
  compiles and runs op by op);
- ``abstract``: ``nnx.eval_shape`` of the same (what ``checkpoint.load_model`` and the
  PyTorch import do now: the weights come from a file);
- ``abstract_no_workaround`` / ``train_trace_no_workaround``: the same with
  ``short_sharding_errors`` doing nothing (JAX 0.10's tracer ``sharding`` message then
  walks the whole trace at every Flax variable assignment);
- ``train_trace``: tracing one training step (BatchNorm statistics assigned).

Run::

    python benchmarks/model_build_time.py --preset densenet121 --out results.json
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CASE = r"""
import functools, importlib, sys, time
sys.path.insert(0, {root!r})
case, preset = {case!r}, {preset!r}
import jax, jax.numpy as jnp, optax
from flax import nnx
from cejax.models import densenet
if case.endswith("no_workaround"):  # what the workaround does on a JAX without the defect
  importlib.import_module("cejax.models._tracing")._ORIGINAL = None
build = lambda: densenet.create_densenet(preset, num_classes=14, rngs=nnx.Rngs(0))
t0 = time.perf_counter()
if case == "eager":
  jax.block_until_ready(nnx.state(build()))
elif case.startswith("abstract"):
  nnx.eval_shape(build)
else:
  from cejax.jobs import training
  model = build()
  opt = optax.adam(1e-3)
  graphdef, params, stats = nnx.split(model, nnx.Param, nnx.BatchStat)
  state = dict(step=0, params=nnx.to_pure_dict(params), batch_stats=nnx.to_pure_dict(stats))
  state["opt_state"] = opt.init(state["params"])
  batch = dict(image=jnp.zeros((2, 224, 224, 3)), label=jnp.zeros((2, 14)))
  step = jax.jit(functools.partial(training.train_step, graphdef, optimizer=opt,
                                   activation="sigmoid"))
  t0 = time.perf_counter()
  step.trace(state, batch)
print(time.perf_counter() - t0)
"""

CASES = ("eager", "abstract", "abstract_no_workaround", "train_trace",
         "train_trace_no_workaround")


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--preset", default="densenet121")
  parser.add_argument("--cases", nargs="+", default=list(CASES), choices=CASES)
  parser.add_argument("--out", type=Path, required=True)
  args = parser.parse_args(argv)
  results = {}
  for case in args.cases:
    code = CASE.format(root=str(ROOT), case=case, preset=args.preset)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True)
    results[case] = round(float(proc.stdout.split()[-1]), 2)
    print(f"{case}: {results[case]} s", flush=True)
  record = {"preset": args.preset, "seconds": results,
            "date": time.strftime("%Y-%m-%d"), "command": " ".join(sys.argv),
            "machine": platform.processor() or platform.machine(),
            "python": platform.python_version()}
  import jax
  record["jax"] = jax.__version__
  args.out.write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
  main()
