"""Where a benchmark record was measured: the CPU model and this checkout's commit."""

import platform
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def cpu() -> str:
  """The CPU model from ``lscpu`` (``platform.processor()`` where it is missing)."""
  try:
    out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    return next(line.split(":", 1)[1].strip() for line in out.splitlines()
                if line.startswith("Model name"))
  except (OSError, StopIteration, subprocess.CalledProcessError):
    return platform.processor()


def commit() -> str:
  """This checkout's short commit, or ``"unknown"`` outside a git checkout."""
  try:
    return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True,
                          capture_output=True, check=True).stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    return "unknown"
