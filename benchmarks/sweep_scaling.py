"""Throughput of the dataset-scale sweep (``cejax.jobs.sweep``) for DenseNet-121 at 224 px:
one device, two devices (one per core), two processes of one device each.

    python benchmarks/sweep_scaling.py --images=12 --out=/tmp/sweep_bench

Builds a random-weight DenseNet-121 workdir (1 channel, 5 classes, like the synthetic
set) and a 224-px synthetic test split, then runs the paper's 10 x 10 grid with the
zero fill and the expected estimand over ``--images`` images in each layout, with full
forward passes (``--incremental``: the job's incremental recompute). Each
layout runs in a fresh process (the device count is fixed when JAX starts); the
second and later chunks give the steady-state rate (the first pays for compilation).
Prints one JSON line per layout and writes them to ``<out>/results.json``.
"""

import argparse
import json
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

RUN = textwrap.dedent("""
    import json, sys
    import jax
    devices, pid, procs, port, workdir, out, config_json = sys.argv[1:8]
    jax.config.update("jax_num_cpu_devices", int(devices))
    if int(procs) > 1:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}",
                                   num_processes=int(procs), process_id=int(pid))
    import ml_collections
    from cejax.jobs import sweep
    config = ml_collections.ConfigDict(json.loads(config_json))
    summary = sweep.run(config, workdir, out=out, progress=False)
    print("SUMMARY " + json.dumps(summary))
""")


def make_workdir(workdir: Path) -> None:
  from flax import nnx

  from cejax.jobs import checkpoint

  if (workdir / "run.json").exists():
    return
  run = {"preset": "densenet121", "num_classes": 5, "in_channels": 1, "dtype": "float32",
         "overrides": {}, "class_names": [f"class_{i}" for i in range(5)],
         "best_metric": None, "mean": [0.45], "std": [0.25], "multi_label": False,
         "image_size": 224, "source": "random weights (benchmark)", "profile": "none"}
  model = checkpoint.build_model(run, seed=0)
  model.eval()
  _, params, stats = nnx.split(model, nnx.Param, nnx.BatchStat)
  checkpoint.check_or_write_run(workdir, run)
  ckpt = checkpoint.Checkpointer(workdir, keep=1)
  try:
    ckpt.save(0, {"step": 0, "params": nnx.to_pure_dict(params),
                  "batch_stats": nnx.to_pure_dict(stats)})
  finally:
    ckpt.close()


def make_config(out: Path, images: int, incremental: bool):
  from configs import synthetic

  config = synthetic.get_config()
  config.data.data_dir = str(out / "tfds")
  config.data.image_size = 224
  config.data.num_train, config.data.num_validation = 16, 16
  config.data.num_test = images
  s = config.sweep
  s.num_images, s.chunk_size, s.batch_size = images, 2, 25
  s.families, s.interventions, s.estimands = ("grid",), ("zero",), ("expected",)
  config.masks.grid_cells = 10
  s.path = "incremental" if incremental else "full"
  return config


def launch(layout, *, devices, procs, workdir, out, config):
  with socket.socket() as sock:
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
  run_out = out / layout
  cmds = [[sys.executable, "-c", RUN, str(devices), str(p), str(procs), str(port),
           str(workdir), str(run_out), config.to_json()] for p in range(procs)]
  logs = [subprocess.Popen(c, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           text=True) for c in cmds]
  summaries = []
  for p in logs:
    text, _ = p.communicate()
    if p.returncode:
      raise RuntimeError(text[-3000:])
    summaries += [json.loads(line[8:]) for line in text.splitlines()
                  if line.startswith("SUMMARY ")]
  # Steady state: each process's rate over its chunks after the first (which pays for
  # compilation); GFLOP/s from the FLOPs of the path that ran (the job's count).
  rate = sum(s["steady_masks_per_s"] for s in summaries)
  flops = summaries[0]["flops_per_mask"]["grid"]["flops"]
  return {"layout": layout, "devices_per_process": devices, "processes": procs,
          "images": config.sweep.num_images, "masks_per_s": rate,
          "masks_per_s_with_compilation": sum(s["masks_per_s"] for s in summaries),
          "gflops_per_s": rate * flops / 1e9,
          "peak_gflops_per_s": [s.get("peak_gflops_per_s") for s in summaries],
          "fraction_of_peak": [s["steady_masks_per_s"] * flops / (s["peak_gflops_per_s"] * 1e9)
                               for s in summaries],
          "seconds": max(s["seconds"] for s in summaries),
          "forward_gflops": flops / 1e9,
          "flops_counted_by": summaries[0]["flops_per_mask"]["grid"]["counted_by"]}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--images", type=int, default=12)
  parser.add_argument("--out", type=Path, default=Path("/tmp/sweep_bench"))
  parser.add_argument("--incremental", action="store_true",
                      help="let the job use incremental recompute (default: full forward)")
  args = parser.parse_args()
  sys.path.insert(0, str(ROOT))
  args.out.mkdir(parents=True, exist_ok=True)
  workdir = args.out / "densenet121"
  make_workdir(workdir)
  config = make_config(args.out, args.images, args.incremental)
  from cejax.data import pipeline

  pipeline.load_dataset(config.data)  # build the 224-px split once, before timing
  results = []
  for layout, devices, procs in (("1 device", 1, 1), ("2 devices", 2, 1),
                                 ("2 processes x 1 device", 1, 2)):
    results.append(launch(layout, devices=devices, procs=procs, workdir=workdir,
                          out=args.out, config=config))
    print(json.dumps(results[-1]), flush=True)
  base = results[0]["masks_per_s"]
  for r in results[1:]:
    r["scaling_efficiency"] = r["masks_per_s"] / (2 * base)
  (args.out / "results.json").write_text(json.dumps(results, indent=2))
  print(json.dumps([{k: r[k] for k in ("layout", "masks_per_s")} | {
      "efficiency": r.get("scaling_efficiency")} for r in results], indent=2))


if __name__ == "__main__":
  main()
