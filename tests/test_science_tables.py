"""The science tables of the documentation (docs/science.md) are the output of
benchmarks/science_tables.py on the committed records they name (no number typed by
hand)."""

import json
import re
import sys

from conftest import ROOT


def test_science_tables_equal_the_committed_records_output():
  sys.path.insert(0, str(ROOT / "benchmarks"))
  import science_tables

  page = (ROOT / "docs" / "science.md").read_text()
  found = list(re.finditer(r"<!-- science-tables: python benchmarks/science_tables\.py "
                           r"(results/science_[\w-]+\.json) -->\n(.*?)"
                           r"<!-- /science-tables -->", page, re.S))
  assert found, "docs/science.md has no science-tables markers naming a record"
  for match in found:
    record = json.loads((ROOT / match.group(1)).read_text())
    assert match.group(2) == science_tables.tables(record), match.group(1)


def test_a_run_without_attacks_prints_no_attack_table():
  """The optimised masks' run has no attack evaluators: its metrics hold empty
  ``detection`` and ``attack_success``, and no table header without rows is printed."""
  sys.path.insert(0, str(ROOT / "benchmarks"))
  import science_tables

  path = ROOT / "results/science_optimised_2026-12-07.json"
  record = json.loads(path.read_text())
  assert record["metrics"]["detection"] == {} and record["metrics"]["attack_success"] == {}
  printed = science_tables.tables(record)
  assert "extremal perturbations (TorchRay)" in printed
  assert "| attack" not in printed
  assert not printed.rstrip().endswith("|---|---|---|---|---|---|")
