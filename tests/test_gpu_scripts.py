"""The GPU lease's scripts (``benchmarks/bench_gpu.py``, ``benchmarks/profile_gpu.py``) run in
their CPU dry runs (Triton's interpreter, the CUDA C built by g++), so a change that breaks
them shows here, not in the first minutes of a short lease on a GPU."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("triton")
if shutil.which("g++") is None:
    pytest.skip("no g++ to build the CPU emulation of the CUDA kernels", allow_module_level=True)

ROOT = Path(__file__).resolve().parent.parent


def dry_run(script: str, *args: str) -> str:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)}
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--dry-run", *args],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_bench_gpu_dry_run_checks_parity_and_times_every_figure(tmp_path):
    out = tmp_path / "sweep.json"
    dry_run("bench_gpu.py", "--out", str(out))
    (record,) = json.loads(out.read_text())
    assert record["parity"] is True
    for key in ("es_tokens_per_s", "inference_tokens_per_s", "naive_es_tokens_per_s",
                "ratio", "speedup", "es_int8_tops"):
        assert record[key] > 0, key
    assert record["ratio"] == pytest.approx(
        record["es_tokens_per_s"] / record["inference_tokens_per_s"])


def test_profile_gpu_dry_run_splits_the_whole_es_extra():
    """The split's shares cover the ES step's extra time over inference, and the predicted
    ratio is the totals' own."""
    result = json.loads(dry_run("profile_gpu.py"))
    assert all(ms > 0 for ms in {**result["ops_ms"], **result["step_ms"]}.values())
    for mode in ("cached", "kernel"):
        es = result[f"es_{mode}"]
        assert sum(es["extra_share"].values()) == pytest.approx(1.0)
        assert es["predicted_ratio"] == pytest.approx(result["inference_step_ms"] / es["step_ms"])
