"""Compares two analyses' ``metrics.json``, number by number: a recorded check that a
change of structure left the analysis' results as they were.

    python benchmarks/compare_metrics.py OLD/metrics.json NEW/metrics.json --out RECORD.json

Every number of one file is matched with the number at the same path in the other;
the record lists the paths that differ, the largest absolute difference, and any path
found in only one file.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time


def _numbers(tree, prefix=""):
  if isinstance(tree, dict):
    for key, value in tree.items():
      yield from _numbers(value, f"{prefix}{key}/")
  elif isinstance(tree, list):
    for i, value in enumerate(tree):
      yield from _numbers(value, f"{prefix}{i}/")
  elif isinstance(tree, (int, float)) and not isinstance(tree, bool):
    yield prefix.rstrip("/"), float(tree)


def compare(old: dict, new: dict) -> dict:
  a, b = dict(_numbers(old)), dict(_numbers(new))
  both = sorted(set(a) & set(b))
  same = lambda x, y: x == y or (math.isnan(x) and math.isnan(y))  # noqa: E731
  differ = {k: [a[k], b[k]] for k in both if not same(a[k], b[k])}
  finite = [abs(a[k] - b[k]) for k in differ if math.isfinite(a[k] - b[k])]
  return {"numbers": len(both), "identical": len(both) - len(differ), "differ": differ,
          "max_abs_difference": max(finite, default=0.0),
          "only_old": sorted(set(a) - set(b)), "only_new": sorted(set(b) - set(a))}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("old")
  parser.add_argument("new")
  parser.add_argument("--out", default="")
  args = parser.parse_args()
  with open(args.old) as f, open(args.new) as g:
    record = compare(json.load(f), json.load(g))
  record = {"command": " ".join(sys.argv), "date": time.strftime("%Y-%m-%d"), **record}
  print(json.dumps({k: v for k, v in record.items() if k != "differ"}, indent=2))
  print(f"{len(record['differ'])} numbers differ")
  if args.out:
    with open(args.out, "w") as f:
      json.dump(record, f, indent=2)


if __name__ == "__main__":
  main()
