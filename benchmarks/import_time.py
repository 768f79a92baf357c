"""Import time of ``cejax`` against ``jax`` plus ``flax.nnx``, side by side.

Each command runs in a fresh interpreter, the commands interleaved round by round so
that a busy machine slows them alike; the median wall time of ``--rounds`` runs is
reported. ``--old DIR`` adds ``import cejax`` from another checkout (e.g. the commit
before a change) for a before/after figure::

    git worktree add /tmp/before <commit>
    python benchmarks/import_time.py --old /tmp/before --out results/import.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

COMMANDS = {
    "jax + flax.nnx": "import jax; from flax import nnx",
    "cejax": "import cejax",
}
JOB_MODULES = ("orbax", "tensorflow_datasets", "matplotlib", "ml_collections")
# Not the checkout: `python -c` puts the working directory first on sys.path, ahead of
# PYTHONPATH, so a run from the checkout would import its cejax for --old too.
NEUTRAL_DIR = tempfile.gettempdir()


def _python(code: str, path: str | None, **kwargs):
  env = dict(os.environ, PYTHONPATH=path) if path else None
  return subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=NEUTRAL_DIR,
                        **kwargs)


def _run(code: str, path: str | None) -> float:
  t0 = time.perf_counter()
  _python(code, path)
  return time.perf_counter() - t0


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--rounds", type=int, default=9)
  parser.add_argument("--old", default="", help="another checkout's root, for a before figure")
  parser.add_argument("--out", default="")
  args = parser.parse_args()
  runs = {name: (code, None) for name, code in COMMANDS.items()}
  if args.old:
    runs["cejax (old)"] = ("import cejax", args.old)
  for code, path in runs.values():  # warm the file cache once
    _run(code, path)
  times = {name: [] for name in runs}
  for _ in range(args.rounds):
    for name, (code, path) in runs.items():
      times[name].append(_run(code, path))
  probe = ("import sys, cejax; print(cejax.__file__, sorted({m.split('.')[0] for m in "
           f"sys.modules}} & set({list(JOB_MODULES)!r})))")
  loaded = {name: _python(probe, path, capture_output=True, text=True).stdout.strip()
            for name, (code, path) in runs.items() if "cejax" in name}
  medians = {name: statistics.median(t) for name, t in times.items()}
  record = {"command": " ".join(sys.argv), "python": platform.python_version(),
            "machine": platform.processor() or platform.machine(),
            "date": time.strftime("%Y-%m-%d"), "rounds": args.rounds,
            "median_s": medians, "all_s": times, "job_modules_loaded": loaded,
            "cejax_minus_jax_flax_s": medians["cejax"] - medians["jax + flax.nnx"]}
  print(json.dumps(record, indent=2))
  if args.out:
    with open(args.out, "w") as f:
      json.dump(record, f, indent=2)


if __name__ == "__main__":
  main()
