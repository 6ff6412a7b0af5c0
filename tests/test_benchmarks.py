"""The GPU check script runs end to end at smoke size (tiny networks on CPU, Triton kernels through its
interpreter) and every report it writes is complete. No timing is checked: CPU timings at this size say
nothing about a GPU. What is checked is what would waste a GPU session if it were broken: the script,
the flags it passes, and that each benchmark reports every method it compares."""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def check_throughputs(report: dict, methods: set[str]) -> None:
    assert set(report["methods"]) == methods
    for method, row in report["methods"].items():
        if method == "spikingjelly" and "error" in row and "not installed" in row["error"]:
            continue  # an optional dependency
        assert row["throughput"] > 0 and row["seconds"] > 0 and row["peak_mb"] > 0, (method, row)
    assert report["ratios"] and all(r > 0 for r in report["ratios"].values())


def test_device_script_at_smoke_size_writes_every_report(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "SMOKE": "1", "OUT": str(out), "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    env.pop("TRITON_INTERPRET", None)
    # This run checks the script and its reports, not rounding. Under ATEN_CPU_CAPABILITY=default (the
    # old-CPU check of the README) inductor still emits vector code for the CPU it finds, and with torch
    # 2.14.1 that C++ does not compile, so torch.compile's row would hold an error; the variable is
    # only an emulation, so it is left out of this run.
    env.pop("ATEN_CPU_CAPABILITY", None)
    result = subprocess.run(["bash", str(ROOT / "benchmarks" / "run_device.sh")], capture_output=True, text=True,
                            timeout=600, cwd=tmp_path, env=env)
    log = result.stdout[-4000:] + result.stderr[-2000:]
    assert result.returncode == 0, log
    assert "annsnn /" in result.stdout, log  # the ratio tables are printed

    check_throughputs(json.loads((out / "simulate.json").read_text()), {"step_by_step", "spikingjelly", "annsnn"})
    check_throughputs(json.loads((out / "train.json").read_text()), {"dataloader", "annsnn", "annsnn_compile"})

    check = json.loads((out / "check.json").read_text())
    T = check["T"]
    assert len(check["reference"]) == T and set(check["fast"]) == {"bfloat16", "float16", "float32"}
    for name, row in check["fast"].items():
        assert len(row["acc"]) == T and row["max_diff_pp"] >= 0, name
    assert check["fast"]["float32"]["identical"] and check["fast"]["float32"]["max_diff_pp"] == 0
    spikes = check["float32_spike_for_spike"]
    assert spikes and all(spikes.values()), spikes

    kernels = (out / "kernel_tests.txt").read_text()
    assert " passed" in kernels and "failed" not in kernels, kernels
