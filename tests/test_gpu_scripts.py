"""The GPU lease's scripts (``benchmarks/bench_gpu.py``, ``benchmarks/profile_gpu.py``) run in
their CPU dry runs (Triton's interpreter, the CUDA C built by g++), so a change that breaks
them shows here, not in the first minutes of a short lease on a GPU; and the g++ build they
share with the tests' emulated kernels survives builders that run at once."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

import intes.kernels.cupy as ck
from intes.kernels.cuda import unavailable_reason

ROOT = Path(__file__).resolve().parent.parent


def _dry_run_missing() -> str | None:
    for module in ("torch", "triton"):
        if importlib.util.find_spec(module) is None:
            return f"no {module}"
    if shutil.which("g++") is None:
        return "no g++ to build the CPU emulation of the CUDA kernels"
    return None


needs_dry_run = pytest.mark.skipif(_dry_run_missing() is not None,
                                   reason=_dry_run_missing() or "")


def _with_root() -> dict[str, str]:
    """The environment with the project on PYTHONPATH, as the docs run the scripts."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join(
        p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)}


def dry_run(script: str, *args: str) -> str:
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--dry-run", *args],
                          capture_output=True, text=True, env=_with_root(), timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


@pytest.mark.skipif(unavailable_reason() is None, reason="a GPU is here")
@pytest.mark.parametrize("script", ["bench_gpu.py", "profile_gpu.py"])
def test_without_a_gpu_the_scripts_say_why_in_one_line(script, tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--repeats", "1",
                           *(["--out", str(tmp_path / "x.json")] if script == "bench_gpu.py"
                             else [])],
                          capture_output=True, text=True, env=_with_root(), timeout=300)
    assert done.returncode == 1
    assert done.stderr.strip() == unavailable_reason()


@needs_dry_run
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


@needs_dry_run
def test_profile_gpu_dry_run_splits_the_whole_es_extra():
    """The split's shares cover the ES step's extra time over inference, and the predicted
    ratio is the totals' own."""
    result = json.loads(dry_run("profile_gpu.py"))
    assert all(ms > 0 for ms in {**result["ops_ms"], **result["step_ms"]}.values())
    for mode in ("cached", "kernel"):
        es = result[f"es_{mode}"]
        assert sum(es["extra_share"].values()) == pytest.approx(1.0)
        assert es["predicted_ratio"] == pytest.approx(result["inference_step_ms"] / es["step_ms"])


def test_emulation_builders_at_once_never_share_a_file(tmp_path, monkeypatch):
    """A second build that starts while the first compiles (another process; a thread here)
    writes its own source and library: the first one's half-written library is left alone,
    and the two end as one source and one library under the content's name. A failed build
    leaves nothing."""
    compiles = []  # (source, output) of each compile, in order

    def compile_(cmd, **kwargs):
        source, out = Path(cmd[-3]), Path(cmd[-1])
        compiles.append((source, out))
        text = source.read_text()
        out.write_bytes(b"half ")
        if len(compiles) == 1:  # another builder runs while this one writes its library
            with ThreadPoolExecutor(1) as other:
                other.submit(ck._build_emulation, tmp_path).result()
        assert out.read_bytes() == b"half " and source.read_text() == text
        with out.open("ab") as f:
            f.write(f"of {out.name}".encode())

    monkeypatch.setattr(ck.shutil, "which", lambda name: "/usr/bin/g++")
    monkeypatch.setattr(ck.subprocess, "run", compile_)
    lib = ck._build_emulation(tmp_path)
    (first, first_out), (second, second_out) = compiles
    assert first != second and first_out != second_out
    assert lib.read_bytes() == f"half of {first_out.name}".encode()  # whole, the last renamed
    assert sorted(p.name for p in tmp_path.iterdir()) == [lib.stem + ".cpp", lib.name]

    def failing(cmd, **kwargs):
        Path(cmd[-1]).write_bytes(b"half ")
        raise subprocess.CalledProcessError(1, cmd)

    monkeypatch.setattr(ck.subprocess, "run", failing)
    empty = tmp_path / "failed"
    empty.mkdir()
    with pytest.raises(subprocess.CalledProcessError):
        ck._build_emulation(empty)
    assert list(empty.iterdir()) == []


@pytest.mark.skipif(shutil.which("g++") is None, reason="no g++ to build the CUDA emulation")
def test_the_emulation_stops_at_undefined_signed_arithmetic(tmp_path):
    """Signed overflow is undefined on the device as in C++: the emulation aborts on it
    instead of wrapping, so the CUDA kernels' tests passing shows none of them relies on it."""
    script = textwrap.dedent(f"""
        import ctypes
        from pathlib import Path
        import intes.kernels.cupy as ck
        ck.SOURCE += 'extern "C" __global__ void plus_one(int* x) {{ x[0] = x[0] + 1; }}'
        lib = ctypes.CDLL(str(ck._build_emulation(Path({str(tmp_path)!r}))))
        value = (ctypes.c_int * 1)(2**31 - 2)
        lib.plus_one(value)
        print("fine", value[0], flush=True)
        value[0] = 2**31 - 1
        lib.plus_one(value)
        print("wrapped", value[0], flush=True)
    """)
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=300)
    assert run.stdout == f"fine {2**31 - 1}\n", (run.stdout, run.stderr)
    assert run.returncode != 0 and "signed integer overflow" in run.stderr, run.stderr
