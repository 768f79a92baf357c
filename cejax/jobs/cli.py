"""The command lines' front: clear errors instead of tracebacks, and help that exits 0."""

from __future__ import annotations

import functools
import os


def user_errors_exit(main):
  """Wraps a command-line ``main``: a ``ValueError``, ``OSError`` (``FileNotFoundError``
  too) or ``FloatingPointError`` (the jobs' errors about settings, files, disks and a
  diverged loss, each naming what is wrong) ends the program with its message and
  status 2, not a traceback. ``CEJAX_TRACEBACK=1`` shows the traceback too."""
  import sys

  @functools.wraps(main)
  def wrapped(*args, **kwargs):
    try:
      return main(*args, **kwargs)
    except (ValueError, OSError, FloatingPointError) as e:  # FileNotFoundError: OSError
      if os.environ.get("CEJAX_TRACEBACK"):
        raise
      print(f"error: {e}", file=sys.stderr)
      sys.exit(2)

  return wrapped


_HELP_FLAGS = ("--help", "-help", "-h", "-?", "--helpshort", "--helpfull", "--helpxml")


def run_app(main, argv=None) -> None:
  """``absl.app.run(main)`` for the command lines: a mistyped ``--config.x.y`` is named
  before any flag is parsed (``config.check_argv``), and asking for help exits with
  status 0 (absl's help flags exit with 1, which scripts read as a failure)."""
  import sys

  from absl import app

  from cejax.jobs import config as config_lib

  argv = list(sys.argv if argv is None else argv)
  config_lib.check_argv(argv)
  try:
    app.run(main, argv=argv)
  except SystemExit as e:
    if e.code == 1 and any(a.split("=")[0] in _HELP_FLAGS for a in argv[1:]):
      raise SystemExit(0) from None
    raise


__all__ = ["run_app", "user_errors_exit"]
