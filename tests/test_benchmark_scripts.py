"""The CPU benchmark scripts the docs quote: their tables and their one-line errors (the GPU
scripts are in test_gpu_scripts.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def script(name: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)}
    return subprocess.run([sys.executable, str(ROOT / "benchmarks" / name), *args],
                          capture_output=True, text=True, env=env, timeout=300)


def sweep_run(dim: int, population: int, naive: bool) -> dict:
    run = {"config": {"dim": dim, "population": population}, "es_tokens_per_s": 2.0e5,
           "inference_tokens_per_s": 2.1e5, "ratio": 0.95, "update_fraction": 0.02,
           "peak_rss_mb": 400.0 + population / 16}
    if naive:
        run.update(naive_es_tokens_per_s=4.0e4, speedup=5.0, speedup_low_rank=4.8)
    return run


@pytest.mark.parametrize("naive", [True, False])
def test_plot_sweep_tables_a_sweep_with_or_without_naive_es(tmp_path, naive):
    sweep = tmp_path / "sweep.json"
    sweep.write_text(json.dumps({
        "sweep": {"model": "rwkv", "layers": 1, "seq_len": 8, "rank": 1},
        "results": [sweep_run(d, n, naive) for d in (64, 128) for n in (64, 256)]}))
    done = script("plot_sweep.py", str(sweep), "--out", str(tmp_path / "sweep.png"))
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [line for line in done.stdout.splitlines() if line.startswith("| 64 ")]
    assert rows == [f"| 64 | 0.95-0.95 | {'5.0-5.0×' if naive else '-'} "
                    f"({'4.8-4.8×' if naive else '-'}) | 2% → 2% | 404 → 416 MB |"]
    assert (tmp_path / "sweep.png").stat().st_size > 0


@pytest.mark.parametrize(("args", "message"), [
    (["runs/a"], "'runs/a' is not NAME=RUN_DIR"),
    (["a=/nonexistent/run"], "error: a: no checkpoint at /nonexistent/run"),
])
def test_eval_runs_bad_input_is_one_line(args, message):
    done = script("eval_runs.py", *args)
    assert done.returncode != 0
    assert message in done.stderr and "Traceback" not in done.stderr


def test_bench_ratio_runs_names_a_missing_pool_file(tmp_path):
    done = script("bench_ratio_runs.py", "--pool", str(tmp_path / "none.json"))
    assert done.returncode == 2
    assert f"--pool: no file {tmp_path / 'none.json'}" in done.stderr
    assert "Traceback" not in done.stderr


def test_hf_arch_sweep_finds_rwkv_generating_otherwise_and_every_completion_alike(tmp_path):
    pytest.importorskip("transformers")
    out = tmp_path / "sweep.json"
    done = script("hf_arch_sweep.py", "--archs", "gpt2,rwkv,no_such_arch", "--out", str(out))
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(out.read_text())
    records = {r["arch"]: r for r in result["records"]}
    assert records["gpt2"]["batching"] is None and records["gpt2"]["alike_alone"]
    assert records["rwkv"]["batching"].startswith("generating without its cache")
    assert records["rwkv"]["alike_alone"]
    assert records["no_such_arch"]["built"] is False
    assert result["summary"]["ran"] == result["summary"]["alike_alone"] == 2
