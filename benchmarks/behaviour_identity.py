"""Whether two commits' jobs give the same bits: train, analyze and sweep the smoke config
from each commit (a git worktree each, same data directory, same machine), then compare
the analyses' ``metrics.json`` number by number and every array of the sweeps' chunks.

    python benchmarks/behaviour_identity.py OLD_COMMIT NEW_COMMIT \
        --json results/behaviour_identity_DATE.json

A record that a change of structure (a refactor) left every output as it was. The
sweep adds the optimised masks (extremal perturbations and CE-optimal masks, 3
iterations) to the smoke config's families so that they are compared too; the override
is given in each commit's own config keys (``--old_sweep_args``/``--new_sweep_args``,
for commits whose config schema differs).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
NEW_SWEEP = ["--config.sweep.optimised=('extremal', 'ce_optimal')",
             "--config.optimised.iterations=3", "--config.optimised.areas=(0.1,)",
             "--config.optimised.step=4", "--config.optimised.sigma=4.0",
             "--config.sweep.num_images=4", "--config.sweep.chunk_size=2"]
OLD_SWEEP = ["--config.sweep.optimised=('extremal', 'ce_optimal')",
             "--config.sweep.extremal_iterations=3", "--config.sweep.extremal_areas=(0.1,)",
             "--config.sweep.extremal_step=4", "--config.sweep.extremal_sigma=4.0",
             "--config.sweep.num_images=4", "--config.sweep.chunk_size=2"]


def run_jobs(tree: Path, work: Path, data_dir: Path, sweep_args) -> None:
  """Train, analyze and sweep the smoke config from the checkout ``tree``."""
  env = dict(os.environ, PYTHONPATH=str(tree))
  common = ["--config=configs/smoke.py", f"--config.data.data_dir={data_dir}",
            f"--workdir={work}"]
  for cmd in (["train.py", *common],
              ["analyze.py", *common, f"--out={work / 'analysis'}"],
              ["-m", "cejax.jobs.sweep", *common, f"--out={work / 'sweep'}", "--cpu_devices=2",
               *sweep_args]):
    proc = subprocess.run([sys.executable, *cmd], cwd=tree, env=env, capture_output=True,
                          text=True)
    if proc.returncode:
      raise SystemExit(f"{tree}: {' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")


def compare_chunks(old: Path, new: Path) -> dict:
  """Every array of every sweep chunk, bit for bit."""
  sys.path.insert(0, str(ROOT))
  from cejax.jobs import store

  files = sorted(p.name for p in (old / "chunks").glob("*.npz"))
  same, differ = 0, []
  for name in files:
    a, b = store.load_tree(old / "chunks" / name), store.load_tree(new / "chunks" / name)
    flat_a, flat_b = dict(_leaves(a)), dict(_leaves(b))
    if flat_a.keys() != flat_b.keys():
      differ.append(f"{name}: keys {sorted(set(flat_a) ^ set(flat_b))}")
      continue
    for key in flat_a:
      if np.array_equal(flat_a[key], flat_b[key]):
        same += 1
      else:
        differ.append(f"{name}/{key}")
  return {"chunks": len(files), "arrays_identical": same, "arrays_differ": differ}


def _leaves(tree, prefix=""):
  for key, value in tree.items():
    if isinstance(value, dict):
      yield from _leaves(value, f"{prefix}{key}/")
    else:
      yield f"{prefix}{key}", np.asarray(value)


def main():
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("old")
  p.add_argument("new")
  p.add_argument("--json", default="")
  args = p.parse_args()
  sys.path.insert(0, str(ROOT / "benchmarks"))
  import compare_metrics

  with tempfile.TemporaryDirectory() as tmp:
    tmp = Path(tmp)
    data_dir = tmp / "tfds"
    trees = {}
    for name, commit in (("old", args.old), ("new", args.new)):
      trees[name] = tmp / f"tree_{name}"
      subprocess.run(["git", "worktree", "add", "--detach", str(trees[name]), commit],
                     cwd=ROOT, check=True, capture_output=True)
    try:
      for name, sweep_args in (("old", OLD_SWEEP), ("new", NEW_SWEEP)):
        run_jobs(trees[name], tmp / name, data_dir, sweep_args)
      metrics = compare_metrics.compare(
          *(json.loads((tmp / name / "analysis" / "metrics.json").read_text())
            for name in ("old", "new")))
      chunks = compare_chunks(tmp / "old" / "sweep", tmp / "new" / "sweep")
    finally:
      for tree in trees.values():
        subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=ROOT,
                       capture_output=True)
  record = {"benchmark": "behaviour_identity", "date": datetime.date.today().isoformat(),
            "command": "python " + " ".join(sys.argv), "old": args.old, "new": args.new,
            "machine": platform.processor() or platform.machine(),
            "analysis_metrics": metrics, "sweep_chunks": chunks}
  print(json.dumps(record, indent=1))
  if args.json:
    Path(args.json).write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
  main()
