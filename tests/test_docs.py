"""The documentation site builds without a warning, and every Python example in it runs.

Each ```python block of ``docs/**/*.md`` and of ``README.md`` is run as it is written,
with the repository root as the working directory, in a namespace of its own (a name
one block defines is not seen by the next, so each must be self-contained). Blocks share
an interpreter, two interpreters at a time, to pay the import of JAX and cejax once per
interpreter rather than once per block; a block that configures JAX or the process
(``jax.config.update``, ``os.environ``, ``jax.distributed``), which must come before JAX
starts, runs in a fresh interpreter of its own. The blocks inherit the suite's XLA flags
(``conftest.py`` sets them in this process's environment). A failing block is reported
by its file and line, with its own output.
"""

import concurrent.futures
import functools
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
# Blocks run two at a time (the machines the suite runs on have two cores or more), and
# one example may take at most this long.
WORKERS = 2
TIMEOUT_S = 120

pytestmark = pytest.mark.xdist_group("docs")

_FENCE = re.compile(r"^(?P<indent> *)(?P<fence>`{3,}|~{3,})(?P<info>[^`\n]*)$")


def python_blocks(path: Path) -> list[tuple[int, str]]:
  """The ```python blocks of a Markdown file: ``(line of the opening fence, code)``.

  A fence closes on a line of the same character, at least as long (CommonMark); blocks
  whose info string is anything but ``python`` (``bash``, ``{eval-rst}``) are skipped.
  A fence may be indented (inside a list item): its indentation is cut from the code.
  """
  blocks, lines, i = [], path.read_text().splitlines(), 0
  while i < len(lines):
    opening = _FENCE.match(lines[i])
    if not opening:
      i += 1
      continue
    fence, info = opening["fence"], opening["info"].strip()
    start, body = i + 1, []
    i += 1
    while i < len(lines):
      closing = _FENCE.match(lines[i])
      if (closing and closing["fence"][0] == fence[0] and len(closing["fence"]) >= len(fence)
          and not closing["info"].strip()):
        break
      body.append(lines[i][len(opening["indent"]):] if lines[i].startswith(
          opening["indent"]) else lines[i])
      i += 1
    i += 1
    if info.split(None, 1)[:1] == ["python"]:
      blocks.append((start, "\n".join(body) + "\n"))
  return blocks


def _sources() -> list[Path]:
  return [*sorted(DOCS.rglob("*.md")), ROOT / "README.md"]


BLOCKS = [(path.relative_to(ROOT).as_posix(), line, code) for path in _sources()
          if "_build" not in path.parts for line, code in python_blocks(path)]


# Runs blocks (a JSON list of code strings on stdin) one after another, each in a fresh
# namespace with its own captured output; prints one JSON result per block.
_RUNNER = r"""
import contextlib, io, json, sys, traceback
results = []
for code in json.loads(sys.stdin.read()):
  out, err, status = io.StringIO(), io.StringIO(), 0
  with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
    try:
      exec(compile(code, "<block>", "exec"), {"__name__": "__main__"})
    except SystemExit as e:
      status = e.code if isinstance(e.code, int) else 1
    except BaseException:
      traceback.print_exc()
      status = 1
  results.append([status, out.getvalue(), err.getvalue()])
print("\n" + json.dumps(results))
"""
# What must come before JAX starts, or changes the process for the blocks after it.
_OWN_INTERPRETER = ("jax.config.update", "os.environ", "jax.distributed")


def _run(codes: list[str]) -> list[subprocess.CompletedProcess]:
  env = dict(os.environ, XLA_FLAGS=os.environ.get("XLA_FLAGS", ""))
  timeout = TIMEOUT_S * len(codes)
  try:
    done = subprocess.run([sys.executable, "-c", _RUNNER], input=json.dumps(codes),
                          cwd=ROOT, env=env, text=True, capture_output=True,
                          timeout=timeout)
  except subprocess.TimeoutExpired as e:
    failed = subprocess.CompletedProcess(e.cmd, -1, str(e.stdout or ""),
                                         f"timed out after {timeout} s\n{e.stderr or ''}")
    return [failed] * len(codes)
  try:
    results = json.loads(done.stdout.rstrip().rsplit("\n", 1)[-1])
  except ValueError:  # the interpreter died: every block of it fails, with its output
    died = subprocess.CompletedProcess(done.args, done.returncode or -1, done.stdout,
                                       done.stderr)
    return [died] * len(codes)
  return [subprocess.CompletedProcess(done.args, status, out, err)
          for status, out, err in results]


@functools.cache
def _results() -> dict[tuple[str, int], subprocess.CompletedProcess]:
  """Every block run once (the first test to ask runs them all): the blocks that may
  share an interpreter split into ``WORKERS`` interpreters, the others one each."""
  alone = [b for b in BLOCKS if any(s in b[2] for s in _OWN_INTERPRETER)]
  shared = [b for b in BLOCKS if b not in alone]
  groups = [[b] for b in alone] + [shared[i::WORKERS] for i in range(WORKERS)]
  groups = [g for g in groups if g]
  with concurrent.futures.ThreadPoolExecutor(WORKERS) as pool:
    futures = [(g, pool.submit(_run, [code for _, _, code in g])) for g in groups]
    return {(name, line): result for g, future in futures
            for (name, line, _), result in zip(g, future.result(), strict=True)}


def test_docs_have_python_examples():
  names = {name for name, _, _ in BLOCKS}
  assert any(name.startswith("docs/guides/") for name in names), names


@pytest.mark.parametrize(("name", "line"), [(name, line) for name, line, _ in BLOCKS],
                         ids=[f"{name}:{line}" for name, line, _ in BLOCKS])
def test_python_block_runs(name, line):
  result = _results()[(name, line)]
  assert result.returncode == 0, (
      f"The ```python block at {name}:{line} failed (exit status {result.returncode}).\n"
      f"--- stdout ---\n{result.stdout[-4000:]}\n--- stderr ---\n{result.stderr[-4000:]}")


def test_blocks_sharing_an_interpreter_see_only_their_own_names_and_fail_alone():
  """The runner: a name defined by one block is a NameError in the next, a failing
  block leaves the next one running, and each block's output is its own."""
  first, second, third = _run(["x = 1\nprint('first')", "print(x)", "print('third')"])
  assert (first.returncode, first.stdout) == (0, "first\n")
  assert second.returncode == 1 and "NameError" in second.stderr and not second.stdout
  assert (third.returncode, third.stdout) == (0, "third\n")


def test_site_builds_without_warnings(tmp_path):
  result = subprocess.run(
      [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html", str(DOCS),
       str(tmp_path / "html")], cwd=ROOT, text=True, capture_output=True, timeout=600)
  assert result.returncode == 0, (
      f"sphinx-build failed (exit status {result.returncode}):\n{result.stdout[-6000:]}\n"
      f"{result.stderr[-6000:]}")
  assert (tmp_path / "html" / "index.html").exists()


def _index_rows() -> list[str]:
  """The record files the index table of ``results/README.md`` links to, in order."""
  text = (ROOT / "results" / "README.md").read_text()
  table = text.split("## Index", 1)[1].split("\n## ", 1)[0]
  return [m[1] for line in table.splitlines() if line.startswith("| ")
          for m in [re.search(r"\]\(([^)]+)\)", line.split("|")[3])] if m]


def test_results_index_covers_every_record_and_each_is_cited():
  """Every file in ``results/`` has a row of the index, every row's record exists, and
  every record is cited by the README or a docs page (by its file name)."""
  records = sorted(p.name for p in (ROOT / "results").iterdir() if p.name != "README.md")
  rows = _index_rows()
  assert sorted(set(rows)) == records, (
      f"unindexed: {sorted(set(records) - set(rows))}; "
      f"indexed but missing: {sorted(set(rows) - set(records))}")
  pages = [ROOT / "README.md", *DOCS.rglob("*.md")]
  cited = "\n".join(p.read_text() for p in pages)
  assert not [r for r in records if r not in cited], "records no page cites"
