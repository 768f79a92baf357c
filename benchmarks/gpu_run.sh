#!/usr/bin/env bash
# The prepared GPU run (benchmarks/gpu_run.py): one JSON, a log and nvidia-smi's view
# in OUT_DIR. On the GPU machine, from the repository root:
#
#   bash benchmarks/gpu_run.sh "$OUT"            # at most 6 minutes on one GPU
#
# The run itself needs only what the target image holds (Python 3.12, JAX 0.11 with its
# CUDA 13 plugin, Flax, Optax, Orbax, Chex, jaxtyping, PyTorch): cejax is used from this
# checkout. If .whl/ holds wheels (the rest of a full cejax install, for the jobs; see
# README "GPUs"), they are installed first, without an index and without dependencies:
#   python3 -m pip install --no-index --no-deps --target /tmp/site .whl/*.whl
set -euo pipefail
cd "$(dirname "$0")/.."
out_dir=${1:-${OUT:-runs/gpu_run}}
shift || true
mkdir -p "$out_dir"
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
      --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-}
export PYTHONUNBUFFERED=1
# JAX takes 75 % of the GPU's memory at start by default; leave PyTorch its share.
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.6}
nvidia-smi > "$out_dir/nvidia-smi.txt" 2>&1 || true
python3 benchmarks/gpu_run.py --out "$out_dir/gpu_run.json" "$@" 2>&1 \
    | tee "$out_dir/gpu_run.log"
