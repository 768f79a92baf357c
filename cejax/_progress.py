"""Progress bars of long eager calls (the optimised masks' hundreds of iterations,
run as segments of compiled iterations with the bar advanced between them)."""

from __future__ import annotations

import contextlib
import sys


@contextlib.contextmanager
def bar(total: int, desc: str, *, enabled: bool = True):
  """A tqdm bar of ``total`` iterations (on stderr), or None when not ``enabled``."""
  if not enabled or total <= 0:
    yield None
    return
  from tqdm import tqdm

  progress = tqdm(total=total, desc=desc, unit="it", leave=False, file=sys.stderr)
  try:
    yield progress
  finally:
    progress.close()
