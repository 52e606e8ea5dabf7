"""``intes bench``: its JSON, its progress, and the naive baselines it measures ES against."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

import intes
from intes import intmath as im
from intes import noise as nz
from intes.bench import (
    ISA_FLAGS,
    BaseProductTimer,
    _measure,
    bench_runs,
    bench_windows,
    code_info,
    full_rank_pair_params,
    int8_ops_per_token,
    low_rank_pair_params,
    make_engine,
)
from intes.cli import cli
from intes.cli.bench import bench
from intes.engine import Engine, ModelConfig, TrainConfig
from intes.es import ESConfig
from intes.kernels.avx2_gemm import avx2_unavailable
from intes.kernels.cpu import CpuBackend
from intes.kernels.gemm import int8_gemm_unavailable
from intes.kernels.reference import ReferenceBackend
from intes.kernels.vnni_gemm import vnni_unavailable
from intes.models.base import make_noise
from intes.runs import intes_version

CPU, F32 = CpuBackend(), CpuBackend(gemm="float32")
INT8_MISSING, AVX2_MISSING, VNNI_MISSING = (
    int8_gemm_unavailable(), avx2_unavailable(), vnni_unavailable())
seeds = st.integers(0, 2**32 - 1)


def test_bench_prints_one_json_object():
    """``intes bench`` at a toy size: every figure present and positive, stdout pure JSON."""
    args = ["--dim", "8", "--layers", "1", "--population", "4", "--seq-len", "3",
            "--repeats", "1", "--backend", "cpu"]
    done = CliRunner().invoke(bench, args)
    assert done.exit_code == 0, done.output
    result = json.loads(done.stdout)  # the JSON alone on stdout; the progress bar on stderr
    assert "intes bench" in done.stderr
    assert result["backend"] == "cpu" and result["config"]["population"] == 4
    for key in ("es_tokens_per_s", "inference_tokens_per_s", "ratio", "naive_es_tokens_per_s",
                "speedup", "speedup_ceiling", "naive_low_rank_es_tokens_per_s", "speedup_low_rank",
                "update_fraction", "gemm_gflops", "base_product_gflops", "peak_rss_mb"):
        assert result[key] > 0, key
    assert result["speedup_ceiling"] == pytest.approx(result["speedup"] / result["ratio"])
    assert result["gemm"] == CPU.gemm.description
    ops = int8_ops_per_token(make_engine("rwkv", 8, 1, 4, 3, 1, CPU)) / 1e12
    assert result["es_int8_tops"] == pytest.approx(result["es_tokens_per_s"] * ops)
    assert result["inference_int8_tops"] == pytest.approx(result["inference_tokens_per_s"] * ops)
    assert "accelerator" not in result and "share_of_peak" not in result
    assert (result["int8_gemm_gops"] is None) == (INT8_MISSING is not None)
    assert (result["avx2_gemm_gops"] is None) == (AVX2_MISSING is not None)
    machine = result["machine"]
    assert machine["cores"] >= 1 and set(machine["isa"]) <= set(ISA_FLAGS)
    if Path("/proc/cpuinfo").exists():
        assert machine["cpu_mhz"] > 0
        assert ("avx512_vnni" in machine["isa"]) == (VNNI_MISSING is None)
    forced = json.loads(CliRunner().invoke(bench, [*args, "--gemm", "float32"]).stdout)
    assert forced["gemm"] == F32.gemm.description
    assert forced["base_product_gflops"] > 0  # timed on the unfused engines' path too
    assert result["code"] == code_info()


def test_the_base_product_timer_leaves_the_backend_as_it_found_it():
    """The naive baseline runs after the timed rounds: it must not pay the timer's wrapper."""
    backend = CpuBackend(threads=1, gemm="float32")
    targets = BaseProductTimer.targets(backend)
    originals = [getattr(owner, name) for owner, name in targets]
    timer = BaseProductTimer(backend)
    assert all(getattr(o, n) != f for (o, n), f in zip(targets, originals, strict=True))
    timer.close()
    assert all(getattr(o, n) == f for (o, n), f in zip(targets, originals, strict=True))
    assert not any(name in vars(owner) for owner, name in targets)


def test_code_info_names_this_checkouts_commit():
    """The commit and dirty flag are git's own for the checkout intes runs from; None where
    intes is not a git checkout of its own (an installed copy)."""
    root = Path(intes.__file__).resolve().parents[1]
    info = code_info()
    assert info["intes_version"] == intes_version()
    if not (root / ".git").exists():
        assert info["git_commit"] is None and info["git_dirty"] is None
        return

    def git(*args):
        return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True,
                              check=True).stdout.strip()

    assert info["git_commit"] == git("rev-parse", "--short", "HEAD")
    assert info["git_dirty"] == bool(git("status", "--porcelain", "--untracked-files=no"))


@pytest.mark.parametrize("flags", [["--gemm", "float32"], ["--threads", "2"]])
def test_bench_refuses_cpu_flags_for_another_backend(flags):
    done = CliRunner().invoke(cli, ["bench", "--dim", "8", "--population", "4", "--backend",
                                    "reference", *flags])
    assert done.exit_code == 1 and isinstance(done.exception, SystemExit)
    assert done.stderr.strip().splitlines() == [
        "error: --threads and --gemm set the cpu backend; the reference backend takes neither"]


@given(model=st.sampled_from(["rwkv", "egg"]), dim=st.sampled_from([8, 16, 24]),
       layers=st.integers(1, 3), rows=st.integers(1, 4), tokens=st.integers(1, 3))
def test_int8_ops_per_token_counts_every_base_product(model, dim, layers, rows, tokens):
    """The TOPS figures' operation count is what the linear layers of a forward compute."""
    counted = []

    class Counting(ReferenceBackend):
        def linear(self, x, w, shift, noise, sigma_shift):
            out = super().linear(x, w, shift, noise, sigma_shift)
            counted.append(2 * x.shape[0] * x.shape[1] * out.shape[1])
            return out

    engine = make_engine(model, dim, layers, 4, tokens, 1, Counting())
    windows = np.random.default_rng(0).integers(0, 256, size=(rows, tokens + 1))
    engine.log_likelihood(windows)
    assert sum(counted) == int8_ops_per_token(engine) * rows * tokens


def test_bench_on_an_accelerator_reports_its_share_of_peak():
    """A backend on an accelerator gets the device, its peak and the ES step's share of it,
    and no bare CPU GEMMs (this CPU's rates say nothing about it)."""
    device = {"name": "test accelerator", "peak_int8_tops": 1e-6}

    class OnAccelerator(ReferenceBackend):
        def accelerator(self):
            return device

    engine = make_engine("rwkv", 8, 1, 4, 3, 1, OnAccelerator())
    result = _measure(engine, bench_windows(engine), 1, False, lambda: None)
    assert result["accelerator"] == device
    assert result["share_of_peak"] == result["es_int8_tops"] / device["peak_int8_tops"] > 0
    assert result["gemm_gflops"] is None and result["vnni_gemm_gops"] is None


@settings(max_examples=6, deadline=None)
@given(repeats=st.integers(1, 3), naive=st.booleans())
def test_bench_progress_counts_every_run(repeats, naive):
    """The progress bar's total is the number of ticks the measurement makes, so it ends full."""
    engine = make_engine("rwkv", 8, 1, 4, 3, 1, CPU)
    ticks = []
    _measure(engine, bench_windows(engine), repeats, naive, lambda: ticks.append(1))
    assert len(ticks) == bench_runs(repeats, naive)


@given(seed=seeds, model=st.sampled_from(["rwkv", "egg"]), dim=st.sampled_from([8, 16, 24]),
       rank=st.integers(1, 3), sigma=st.integers(0, 6), pair=st.integers(0, 3))
def test_naive_low_rank_pair_is_the_perturbed_weights(seed, model, dim, rank, sigma, pair):
    """The low-rank baseline's pair is W +- (A_p B_p^T >> (4 + sigma)) for matrices and
    W +- rshift_round(noise_p, sigma) for vectors, saturated: the ES step's low-rank
    perturbation of members 2p and 2p + 1 written out in full as weights."""
    cfg = TrainConfig(model=ModelConfig(kind=model, dim=dim, layers=1),
                      es=ESConfig(population=8, group_size=2, rank=rank, sigma_shift=sigma),
                      seed=seed)
    engine = Engine(cfg, backend=CPU)
    members = low_rank_pair_params(engine, pair)
    noise = make_noise(engine.specs, seed, 0, np.array([pair]), rank, 1)
    for spec in engine.specs:
        w = engine.params[spec.name].astype(np.int64)
        if spec.kind == "vector":
            delta = im.rshift_round(noise[spec.name][0].astype(np.int64), sigma)
        else:
            a, b = (f[0].astype(np.int64) for f in (noise[spec.name].a, noise[spec.name].b))
            delta = (a @ b.T) >> (im.FRAC_BITS + sigma)
        for sign, params in zip((1, -1), members, strict=True):
            assert params[spec.name].dtype == np.int8
            assert np.array_equal(params[spec.name], np.clip(w + sign * delta, -127, 127))


@given(seed=seeds, model=st.sampled_from(["rwkv", "egg"]), dim=st.sampled_from([8, 16, 24]),
       sigma=st.integers(0, 6), pair=st.integers(0, 3), step=st.integers(0, 5),
       reuse=st.integers(1, 3))
def test_naive_full_rank_pair_hashes_every_weight(seed, model, dim, sigma, pair, step, reuse):
    """The full-rank baseline's pair is W +- rshift_round(E, sigma), saturated, with E the
    tensor's (seed, step, pair) stream as long as the tensor (noise.hash_u32 then
    gaussian_int8): a vector's own noise, and for a matrix one value per weight."""
    cfg = TrainConfig(model=ModelConfig(kind=model, dim=dim, layers=1),
                      es=ESConfig(population=8, group_size=2, sigma_shift=sigma,
                                  noise_reuse=reuse), seed=seed)
    engine = Engine(cfg, backend=CPU, step=step)
    members, lowrank = full_rank_pair_params(engine, pair), low_rank_pair_params(engine, pair)
    at = nz.effective_step(step, reuse)
    for tid, spec in enumerate(engine.specs):
        w = engine.params[spec.name].astype(np.int64)
        key = nz.stream_key(seed, at, np.array([pair]), tid)
        e = nz.gaussian_int8(nz.hash_u32(key, w.size))[0].reshape(w.shape).astype(np.int64)
        for sign, params, low in zip((1, -1), members, lowrank, strict=True):
            want = np.clip(w + sign * im.rshift_round(e, sigma), -127, 127)
            assert params[spec.name].dtype == np.int8
            assert np.array_equal(params[spec.name], want), spec.name
            if spec.kind == "vector":
                assert np.array_equal(params[spec.name], low[spec.name])
