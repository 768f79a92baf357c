"""The prepared GPU run (benchmarks/gpu_run.py) keeps working: its smoke mode runs every
section on a tiny network on the CPU, and what it writes is complete and sane."""

import json
import sys

import pytest
from conftest import ROOT


@pytest.mark.heavy(25)
def test_gpu_run_smoke_writes_every_section(tmp_path):
  sys.path.insert(0, str(ROOT / "benchmarks"))
  import gpu_run

  out = tmp_path / "gpu_run.json"
  data = gpu_run.main(["--smoke", "--out", str(out)])
  assert json.loads(out.read_text()) == json.loads(json.dumps(data, default=float))
  assert not data["errors"] and not data["skipped"] and data["finished"]
  assert set(data["peaks_tflop_s"]) == {"float32", "tf32", "bf16"}
  # exact on the CPU against float64 PyTorch: round-off only; bf16 is farther off.
  exact = data["exactness"]
  assert exact["exact"]["max_abs_error"] < 1e-6 < exact["bf16"]["max_abs_error"]
  for mode in ("exact", "tf32", "bf16"):
    section = data["cejax"][mode]
    assert section["best_batch"] in (8, section["auto_batch"])
    for family in ("grid", "rise"):
      r = section[family]
      assert r["per_s"] > 0 and 0 < r["fraction_of_peak"] < 1
  assert set(data["cejax"]["incremental"]) == {"grid", "sliding"}
  for variant in ("bf16", "float32", "compile_bf16"):
    assert set(data["torch"][variant]) == {"grid", "sliding", "rise"}
  for side in ("cejax", "torch"):
    assert data["extremal"][side]["per_s"] > 0 and data["extremal"][side]["iterations"] == 2
  for keep in ("keep 0.5", "keep 0.25"):
    for path in ("cejax pixel fill", "cejax token drop", "cejax attention mask",
                 "torch pixel fill", "torch token drop"):
      assert data["vit"][keep][path]["per_s"] > 0, (keep, path)
