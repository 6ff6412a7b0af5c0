"""The benchmarks run (--smoke: a tiny network on CPU) and report every method. No timing is checked:
CPU timings at this size say nothing about a GPU."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("name,methods", [
    ("bench_simulate", {"step_by_step", "spikingjelly", "annsnn"}),
    ("bench_train", {"dataloader", "annsnn"}),
])
def test_smoke_benchmark_reports_every_method(name, methods, tmp_path):
    out = tmp_path / f"{name}.json"
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / f"{name}.py"), "--smoke", "--out", str(out)],
                            capture_output=True, text=True, timeout=300, cwd=tmp_path,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert set(report["methods"]) == methods
    for method, row in report["methods"].items():
        if method == "spikingjelly" and "error" in row and "not installed" in row["error"]:
            continue  # an optional dependency
        assert row["throughput"] > 0 and row["seconds"] > 0 and row["peak_mb"] > 0, (method, row)
    assert report["ratios"] and all(r > 0 for r in report["ratios"].values())
    assert "annsnn /" in result.stdout  # the ratio table is printed
