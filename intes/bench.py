"""Throughput of one ES step against plain inference and against naive ES.

Every figure is tokens per second = members x seq_len / seconds, best of ``repeats`` timed
runs after one untimed warm-up (numba compiles there). The ways of spending the same
compute on the same N members and T tokens:

- es: ``Engine.step`` (noise, forward of all N members with a shared base product per
  layer, fitness, shaped update from seeds) and the new weights' packed forms (``prepare``,
  which the next step needs), timed as forward and update to report the update's share;
- inference: ``Engine.log_likelihood`` on the same N streams (forward + scoring, no noise,
  no update), i.e. what ``intes eval`` does;
- naive: ES without low-rank perturbations and without the shared base forward, the
  baseline the speed goal names: each member's weights W +- E_p with E_p full-rank noise,
  every weight its own hash value (``full_rank_pair_params``; a pair's noise made once for
  both its members), packed and evaluated on its own (batch 1) with the same backend. Timed
  on a few pairs and extrapolated to N, plus the same update; ``speedup`` = es / naive.
- naive low-rank: the same, but E_p = A_p B_p^T, the ES step's own perturbation written out
  (``low_rank_pair_params``); ``speedup_low_rank``. At rank 1 writing out the product costs
  about what hashing every weight does (``benchmarks/naive_split.py``), so the two baselines
  read within the host's noise of each other.

ES and inference run on the backend's threads (the cpu backend: a thread per core, the
population in slices of at most 2,048 rows); naive ES runs members one after another (see
``naive_member_seconds``), so ``speedup`` includes the cores it cannot use and
``speedup_cpu_seconds`` is the gain per core.
``speedup_ceiling`` = inference / naive: an ES step does inference's forward and more, so
no ES step reaches past it against this baseline, on this machine and model.

``es_int8_tops`` and ``inference_int8_tops`` count the base products' integer operations
(2 x the size of every matrix per member and token) over the ES step's and inference's wall
time; on a GPU the JSON adds its name, dense int8 peak and the ES step's ``share_of_peak``.

``gemm_gflops`` is this machine's float32 BLAS GEMM at the model's base-product shapes
(FLOP-weighted over its layers, rows sliced like the forward's (``Engine.chunks``), int8 operands
converted as the float32 engine converts them) and
``int8_gemm_gops``, ``avx2_gemm_gops`` and ``vnni_gemm_gops`` the same for the int8 GEMM
(where torch runs it), the AVX2 GEMM (where the CPU has AVX2) and the VNNI GEMM (where the CPU
has VNNI); ``base_product_gflops`` is what the shared base
product reached inside the ES step, for backends that expose it, and
``base_product_fraction`` its ratio to the float32 GEMM. With the VNNI engine the product
runs fused with its layer's projection, correction and rescale, and the time counted is the
whole fused layer's: a lower bound on the product's own rate.

On a shared machine other processes stretch any one run, so ES, inference and bare GEMM runs
are interleaved and the best of each counts; the JSON also gives CPU seconds and the load
average before and after, to judge how disturbed the figures were, and ``code``: the intes
version and, from a git checkout, the commit and whether tracked files had changes.
"""

from __future__ import annotations

import os
import platform
import resource
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from numba import njit
from tqdm import tqdm

from intes import noise as nz
from intes.engine import Engine, ModelConfig, TrainConfig, member_windows
from intes.errors import ConfigError
from intes.es import ESConfig
from intes.intmath import FRAC_BITS
from intes.kernels import get_backend
from intes.kernels.avx2_gemm import avx2_unavailable
from intes.kernels.base import Backend
from intes.kernels.cpu import usable_cores
from intes.kernels.cpu_noise import _gaussian, _mix32, _stream_indices
from intes.kernels.cpu_scalar import _sat8
from intes.kernels.gemm import Avx2Gemm, Float32Gemm, Int8Gemm, VnniGemm, int8_gemm_unavailable
from intes.kernels.vnni_gemm import vnni_unavailable
from intes.models.base import Ops, make_noise, prepare
from intes.runs import intes_version

VOCAB = 256
Tick = Callable[[], object]  # called once per unit of progress


def _no_tick() -> None:
    pass


NAIVE_PAIRS = 4  # pairs timed (per repeat) for the naive baselines; their cost is per member


def cpu_model() -> str:
    """The CPU's marketing name from /proc/cpuinfo (or what platform knows elsewhere)."""
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


# the vector extensions the int8 engines use or would use, as /proc/cpuinfo names them
ISA_FLAGS = ("avx2", "avx512f", "avx512bw", "avx512_vnni", "avx512vbmi", "avx_vnni",
              "avx_vnni_int8", "amx_int8")


def cpu_details() -> dict:
    """The clock /proc/cpuinfo reports and which of ``ISA_FLAGS`` the CPU has: a VM's
    "model name" can be the same for CPU generations whose int8 throughput differs."""
    details = {"cpu_mhz": None, "isa": []}
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                key, _, value = line.partition(":")
                if key.strip() == "cpu MHz" and details["cpu_mhz"] is None:
                    details["cpu_mhz"] = round(float(value))
                elif key.strip() == "flags":
                    flags = set(value.split())
                    details["isa"] = [f for f in ISA_FLAGS if f in flags]
                    break
    except (OSError, ValueError):
        pass
    return details


def code_info() -> dict:
    """Which intes took the figures: its version and, when it runs from a git checkout of its
    own, the commit and whether tracked files had changes (figures of uncommitted code)."""
    root = Path(__file__).resolve().parents[1]
    info = {"intes_version": intes_version(), "git_commit": None, "git_dirty": None}

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()

    try:
        if Path(git("rev-parse", "--show-toplevel")).resolve() != root:
            return info  # an installed copy inside some other repository
        info.update(git_commit=git("rev-parse", "--short", "HEAD"),
                    git_dirty=bool(git("status", "--porcelain", "--untracked-files=no")))
    except (OSError, subprocess.SubprocessError):
        pass
    return info


def machine_info(load_before: float) -> dict:
    """Cores, CPU model, clock and vector extensions, and the 1-minute load average before
    and after the measurement: on a shared machine the load says how much the figures were
    disturbed."""
    return {"cores": os.cpu_count(), "cpu_model": cpu_model(), **cpu_details(),
            "load_average_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)]}


class Clock:
    """Wall-clock and process CPU seconds of one run.

    Wall time is what the figures use. CPU time is reported beside it because on a shared
    machine other processes stretch wall time but not, for a single-threaded backend, CPU time.
    """

    def __enter__(self) -> Clock:
        self._wall, self._cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall = time.perf_counter() - self._wall
        self.cpu = time.process_time() - self._cpu


def best_time(fn: Callable[[], object], repeats: int) -> float:
    """Fastest of ``repeats`` wall-clock runs: the least disturbed by other load."""
    best = float("inf")
    for _ in range(repeats):
        with Clock() as clock:
            fn()
        best = min(best, clock.wall)
    return best


def make_engine(model: str, dim: int, layers: int, population: int, seq_len: int, rank: int,
                backend: Backend) -> Engine:
    # one window per pair: any even population runs, and the windows' sharing costs nothing
    es = ESConfig(population=population, group_size=2, rank=rank)
    cfg = TrainConfig(model=ModelConfig(kind=model, vocab_size=VOCAB, dim=dim, layers=layers),
                      es=es, seq_len=seq_len)
    return Engine(cfg, backend=backend)


def bench_windows(engine: Engine) -> np.ndarray:
    """(N, T + 1) member windows of fixed random tokens in 1..255 (0 would reset the state)."""
    cfg = engine.config
    groups = cfg.es.population // cfg.es.group_size
    rng = np.random.default_rng(0)
    seqs = rng.integers(1, VOCAB, size=(groups, cfg.seq_len + 1), dtype=np.int32)
    return member_windows(seqs, cfg.es.group_size)


# ---------------------------------------------------------------------------------------------
# base product: what BLAS can do at these shapes, and what the ES step got from it


def matrix_shapes(engine: Engine) -> list[tuple[int, int]]:
    """(out, in) of every linear layer called once per token."""
    return [s.shape for s in engine.specs if s.kind == "matrix"]


class GemmSuite:
    """One token's base products as bare GEMMs of one engine (``intes.kernels.gemm``),
    (N, in) @ (in, out) for each layer on random int8 operands, with the rows sliced over the
    engine's threads as its forward slices them (the forward's products are a token block's
    rows, 4-8 times taller: the bare rates are of one token's shapes)."""

    PASSES = 5  # passes per call; the fastest counts

    def __init__(self, engine: Engine, gemm) -> None:
        rng = np.random.default_rng(1)
        self.engine, self.gemm = engine, gemm
        self.slices = []
        for lo, hi in engine.chunks(engine.config.es.population, 1):
            operands = []
            for out_dim, in_dim in matrix_shapes(engine):
                operands.append((rng.integers(-127, 128, (hi - lo, in_dim)).astype(np.int8),
                                 gemm.prepare(rng.integers(-127, 128, (out_dim, in_dim))
                                              .astype(np.int8))))
            self.slices.append(operands)
        self.flops = sum(2.0 * x.size * out for ops in self.slices
                         for (x, _), (out, _) in zip(ops, matrix_shapes(engine), strict=True))

    def _pass(self, operands: list) -> None:
        for x, wt in operands:
            self.gemm.product(x, wt)

    def __call__(self) -> float:
        """Seconds of the fastest of PASSES passes over all layers (slices concurrently)."""
        return best_time(lambda: self.engine.map(self._pass, self.slices), self.PASSES)


class BaseProductTimer:
    """Wraps the cpu backend's GEMM engine's ``product`` (every separate base product, as
    the float32, AVX2 and int8 engines' layers make it) and the backend's ``fused_linear``
    (the VNNI engine's layers, the product fused with its epilogue) to add up their seconds
    and FLOPs over all threads."""

    def __init__(self, backend) -> None:
        self.seconds, self.flops = 0.0, 0.0
        self._lock = threading.Lock()
        self._wrapped = [(owner, name) for owner, name in self.targets(backend)
                         if hasattr(owner, name)]
        for owner, name in self._wrapped:
            setattr(owner, name, self._timed(getattr(owner, name)))

    @staticmethod
    def targets(backend) -> list[tuple[object, str]]:
        """(object, method name) of what the timer wraps."""
        return [(backend, "fused_linear"), (getattr(backend, "gemm", None), "product")]

    def close(self) -> None:
        """Unwrap: the naive baseline's many batch-1 calls must not pay the timer's clock
        reads and lock (14% of a narrow naive member)."""
        for owner, name in self._wrapped:
            delattr(owner, name)  # the instance's wrapper; the class's method shows again
        self._wrapped = []

    def _timed(self, inner: Callable) -> Callable:
        def timed(x: np.ndarray, *args):
            with Clock() as clock:
                result = inner(x, *args)
            with self._lock:
                self.seconds += clock.wall
                self.flops += 2.0 * x.shape[0] * x.shape[1] * result.shape[-1]
            return result
        return timed

    def reset(self) -> None:
        self.seconds, self.flops = 0.0, 0.0


# ---------------------------------------------------------------------------------------------
# the three measurements


def time_runs(engine: Engine, windows: np.ndarray, repeats: int,
              timer: BaseProductTimer | None, tick: Tick = _no_tick) -> tuple[dict, dict, dict]:
    """Best ES step, best inference pass and best bare-GEMM pass, interleaved so all three
    meet the same machine load (on a shared machine it changes within seconds).

    The ES step is split into forward+fitness and update, and carries its base-product time.
    Returns (es, inference, {GEMM engine: bare GFLOP/s}); no GEMMs for a backend on an
    accelerator, where this CPU's rates say nothing.
    """
    es, inference = None, None
    engines = {} if hasattr(engine.backend, "accelerator") else gemm_engines()
    suites = {name: GemmSuite(engine, gemm) for name, gemm in engines.items()}
    gemm_s = dict.fromkeys(suites, float("inf"))
    for _ in range(repeats):
        if timer:
            timer.reset()
        with Clock() as step:
            raw = engine.population_fitness(windows)
            with Clock() as update:
                engine.apply_fitness(raw)
                _ = engine.prepared  # the new weights' packed forms: the update's cost
        run = {"wall": step.wall, "cpu": step.cpu, "update_s": update.wall,
               "update_cpu": update.cpu,
               "base_s": timer.seconds if timer else None,
               "base_flops": timer.flops if timer else None}
        es = run if es is None or run["wall"] < es["wall"] else es
        with Clock() as infer:
            engine.log_likelihood(windows)
        run = {"wall": infer.wall, "cpu": infer.cpu}
        inference = run if inference is None or run["wall"] < inference["wall"] else inference
        for name, suite in suites.items():
            gemm_s[name] = min(gemm_s[name], suite())
        tick()
    return es, inference, {name: suites[name].flops / gemm_s[name] / 1e9 for name in suites}


def gemm_engines() -> dict:
    """The bare GEMMs to time: float32 BLAS always (the machine's float reference rate), the
    int8 GEMM where torch runs it, the AVX2 GEMM where the CPU has AVX2 and the VNNI GEMM where
    the CPU has VNNI."""
    engines = {"float32": Float32Gemm()}
    if int8_gemm_unavailable() is None:
        engines["int8"] = Int8Gemm()
    if avx2_unavailable() is None:
        engines["avx2"] = Avx2Gemm()
    if vnni_unavailable() is None:
        engines["vnni"] = VnniGemm()
    return engines


@njit(nogil=True, cache=True)
def _low_rank_pair(w, at, bt, shift, plus, minus):
    """plus, minus = sat8(w +- ((A B^T) >> shift)) for A^T (r, out) and B^T (r, in), one row
    at a time: the rank's products summed in an int32 row that vectorizes, then one pass
    writing both members of the pair."""
    row = np.empty(w.shape[1], dtype=np.int32)
    for i in range(w.shape[0]):
        row[:] = 0
        for r in range(at.shape[0]):
            ai = np.int32(at[r, i])
            for j in range(w.shape[1]):
                row[j] += ai * np.int32(bt[r, j])
        for j in range(w.shape[1]):
            wij, delta = np.int32(w[i, j]), row[j] >> shift
            plus[i, j] = _sat8(wij + delta)
            minus[i, j] = _sat8(wij - delta)


@njit(inline="always", cache=True)
def _write_pair(w, n, e, shift, plus, minus):
    """plus[n], minus[n] = sat8(w[n] +- rshift_round(e, shift)) for an int32 noise value e."""
    half = np.int32(1 << (shift - 1)) if shift > 0 else np.int32(0)
    delta = np.right_shift(np.add(e, half), shift)
    wn = np.int32(w[n])
    plus[n] = _sat8(np.add(wn, delta))
    minus[n] = _sat8(np.subtract(wn, delta))


@njit(nogil=True, cache=True)
def _full_rank_pair(w, key, idx, shift, plus, minus):
    """plus, minus = sat8(w +- rshift_round(E, shift)) for flat w, E[n] =
    gaussian(mix32(key ^ idx[n])) (``noise.hash_u32``, ``noise.gaussian_int8``): each noise
    value made once and applied to both members of the pair in the same pass."""
    for n in range(w.shape[0]):
        _write_pair(w, n, np.int32(_gaussian(_mix32(key ^ idx[n]))), shift, plus, minus)


@njit(nogil=True, cache=True)
def _vector_pair(w, noise, shift, plus, minus):
    """plus, minus = sat8(w +- rshift_round(noise, shift)): a vector's pair in one pass."""
    for n in range(w.shape[0]):
        _write_pair(w, n, np.int32(noise[n]), shift, plus, minus)


PairParams = tuple[dict[str, np.ndarray], dict[str, np.ndarray]]


def low_rank_pair_params(engine: Engine, pair: int) -> PairParams:
    """Both members of a pair with their perturbed weights written out in full:
    W +- (A_p B_p^T >> (4 + sigma)) for matrices, W +- rshift_round(noise_p, sigma) for
    vectors (members 2p and 2p + 1 of the ES step).

    Each matrix is made in one compiled pass for both members (``_low_rank_pair``): naive ES
    pays for its materialization, and the baseline should pay no more than a careful
    implementation would (numpy's int32 outer products and temporaries took 6.8 ms per rwkv
    member at width 256, more than its forward, against 1.1 ms for one compiled pass,
    ``benchmarks/naive_split.py``)."""
    cfg = engine.config
    host = None if hasattr(engine.backend, "accelerator") else engine.backend  # host factors
    noise = make_noise(engine.specs, cfg.seed, engine.step_index, np.array([pair]),
                       cfg.es.rank, cfg.es.noise_reuse, host)
    shift = np.int32(FRAC_BITS + cfg.es.sigma_shift)
    plus, minus, params = {}, {}, engine.params
    for s in engine.specs:
        w = params[s.name]
        plus[s.name], minus[s.name] = np.empty_like(w), np.empty_like(w)
        if s.kind == "vector":
            _vector_pair(w, noise[s.name][0], np.int32(cfg.es.sigma_shift), plus[s.name],
                         minus[s.name])
            continue
        _low_rank_pair(w, np.ascontiguousarray(noise[s.name].a[0].T),
                       np.ascontiguousarray(noise[s.name].b[0].T), shift, plus[s.name],
                       minus[s.name])
    return plus, minus


def full_rank_pair_params(engine: Engine, pair: int) -> PairParams:
    """Both members of a pair under full-rank noise, as ES without low-rank perturbations:
    W +- rshift_round(E, sigma), E the (rows x cols) stream of (seed, step, pair, tensor),
    every weight its own N(0, 16^2) integer, the scale of a vector parameter's noise and of
    the rank-r product's entries. Vectors get their own noise, as in
    ``low_rank_pair_params``."""
    cfg = engine.config
    step = nz.effective_step(engine.step_index, cfg.es.noise_reuse)
    # every tensor's key in one call: a numpy call per tensor cost as much as its hashing
    keys = nz.tensor_keys(cfg.seed, step, pair, list(range(len(engine.specs))))
    plus, minus, params = {}, {}, engine.params
    for key, s in zip(keys, engine.specs, strict=True):
        w = params[s.name]
        plus[s.name], minus[s.name] = np.empty_like(w), np.empty_like(w)
        _full_rank_pair(w.reshape(-1), key, _stream_indices(w.size),
                        np.int32(cfg.es.sigma_shift), plus[s.name].reshape(-1),
                        minus[s.name].reshape(-1))
    return plus, minus


def naive_member_seconds(engine: Engine, windows: np.ndarray, pairs: int, repeats: int,
                         make_pair: Callable[[Engine, int], PairParams] = full_rank_pair_params,
                         tick: Tick = _no_tick) -> tuple[float, float]:
    """(wall, CPU) seconds per member to materialize, prepare and evaluate the members of
    ``pairs`` pairs on their own windows, one after another: a pair's weights are made
    together (``make_pair``), each member is packed and evaluated at batch 1. Fastest of
    ``repeats``.

    One after another: at batch 1 each op is a few microseconds of Python around a GEMV, so
    members spread over threads contend for the GIL (measured slower than in sequence).
    """
    cfg = engine.config

    def one(p: int) -> None:
        for m, params in zip((2 * p, 2 * p + 1), make_pair(engine, p), strict=True):
            ops = Ops(engine.backend, engine.specs, params, None, cfg.es.sigma_shift,
                      prepare(engine.backend, engine.specs, params))
            engine.score(engine.model, ops, windows[m:m + 1])  # as ES and inference score

    one(0)  # warm-up: batch-1 shapes compile their own kernels
    tick()
    best = None
    for _ in range(repeats):
        with Clock() as clock:
            for p in range(pairs):
                one(p)
        best = clock if best is None or clock.wall < best.wall else best
        tick()
    return best.wall / (2 * pairs), best.cpu / (2 * pairs)


def run_bench(model: str = "rwkv", dim: int = 256, layers: int = 2, population: int = 1024,
              seq_len: int = 64, rank: int = 1, backend: str = "auto", repeats: int = 10,
              naive: bool = True, threads: int | None = None,
              gemm: str | None = None, progress: bool = False) -> dict:
    """All figures for one configuration, as a JSON-ready dict (see the module docstring).
    ``progress`` shows a bar on stderr over the warm-up and the timed runs."""
    engine = make_engine(model, dim, layers, population, seq_len, rank,
                         bench_backend(backend, threads, gemm))
    windows = bench_windows(engine)
    with tqdm(total=bench_runs(repeats, naive), desc="intes bench", unit="run", leave=False,
              disable=not progress, file=sys.stderr) as bar:
        return _measure(engine, windows, repeats, naive, bar.update)


def bench_runs(repeats: int, naive: bool) -> int:
    """Progress units of ``run_bench``: the warm-up, the timed rounds, and each naive
    baseline's warm-up and rounds."""
    return 1 + repeats + (2 * (1 + repeats) if naive else 0)


def _measure(engine: Engine, windows: np.ndarray, repeats: int, naive: bool, tick: Tick) -> dict:
    """``run_bench``'s figures for a made engine, ``tick`` called per ``bench_runs`` unit."""
    cfg = engine.config
    model, population, seq_len = cfg.model.kind, cfg.es.population, cfg.seq_len
    # warm-up at full size, excluded from timing: compiles every kernel and makes the
    # buffers of these shapes, so the first timed ES step pays no more than inference does
    engine.step(windows)
    engine.log_likelihood(windows)
    tick()
    timer = (BaseProductTimer(engine.backend) if hasattr(engine.backend, "gemm")
             else None)
    tokens, load_before = population * seq_len, os.getloadavg()[0]
    try:
        es, inference, gemm_rates = time_runs(engine, windows, repeats, timer, tick)
    finally:
        if timer:
            timer.close()
    result = {
        "config": {"model": model, "dim": cfg.model.dim, "layers": cfg.model.layers,
                   "population": population, "seq_len": seq_len, "rank": cfg.es.rank,
                   "vocab_size": VOCAB, "repeats": repeats},
        "backend": engine.backend.name,
        "gemm": getattr(getattr(engine.backend, "gemm", None), "description", None),
        "threads": getattr(engine.backend, "threads", None),
        "machine": machine_info(load_before),
        "code": code_info(),
        "es_tokens_per_s": tokens / es["wall"],
        "inference_tokens_per_s": tokens / inference["wall"],
        "ratio": inference["wall"] / es["wall"],
        "update_fraction": es["update_s"] / es["wall"],
        "cpu_seconds": {"es_step": es["cpu"], "inference": inference["cpu"],
                        "ratio": inference["cpu"] / es["cpu"]},
    }
    if naive:
        result.update(naive_figures(engine, windows, es, inference["wall"], tokens, repeats,
                                    tick))
    # the threads' base products overlap in time, so the rate is flops / (thread-seconds / k),
    # k the slices that can run at once: no more than the threads, the cores or the slices
    slices = len(engine.chunks(engine.config.es.pairs, 2))
    concurrent = min(engine.threads, usable_cores(), slices)
    achieved = es["base_flops"] * concurrent / es["base_s"] / 1e9 if es["base_s"] else None
    float_rate = gemm_rates.get("float32")
    result.update({"gemm_gflops": float_rate, "int8_gemm_gops": gemm_rates.get("int8"),
                   "avx2_gemm_gops": gemm_rates.get("avx2"),
                   "vnni_gemm_gops": gemm_rates.get("vnni"),
                   "base_product_gflops": achieved,
                   "base_product_fraction": achieved / float_rate if achieved else None})
    result.update(int8_rates(engine, result))
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return result


def int8_ops_per_token(engine: Engine) -> int:
    """Integer operations (2 per multiply-add) of one member's token through the base
    products: every matrix multiplies once per token (the embedding is a lookup)."""
    return 2 * sum(out * inp for out, inp in matrix_shapes(engine))


def int8_rates(engine: Engine, result: dict) -> dict:
    """The base products' int8 TOPS in the ES step and in inference (low-rank terms, update
    and elementwise ops not counted), and, on an accelerator, its peak and the ES step's
    share of it."""
    ops = int8_ops_per_token(engine) / 1e12
    rates = {"es_int8_tops": result["es_tokens_per_s"] * ops,
             "inference_int8_tops": result["inference_tokens_per_s"] * ops}
    if hasattr(engine.backend, "accelerator"):
        device = engine.backend.accelerator()
        peak = device["peak_int8_tops"]
        rates.update({"accelerator": device,
                      "share_of_peak": rates["es_int8_tops"] / peak if peak else None})
    return rates


def bench_backend(name: str, threads: int | None, gemm: str | None = None) -> Backend:
    """The named backend; a thread count and a GEMM engine apply to the cpu backend only (given
    for another, they are refused rather than ignored)."""
    backend = get_backend(name)
    if threads is None and gemm is None:
        return backend
    if backend.name != "cpu":
        raise ConfigError(f"--threads and --gemm set the cpu backend; the {backend.name} "
                          "backend takes neither")
    return type(backend)(threads, gemm)


def naive_figures(engine: Engine, windows: np.ndarray, es: dict, inference_s: float,
                  tokens: int, repeats: int, tick: Tick = _no_tick) -> dict:
    """Both naive baselines' tokens/s and speedups over the measured ES step (``es``), and
    ``speedup_ceiling``, naive ES's time over inference's (``inference_s``): an ES step does
    inference's forward and more, so its speedup over this baseline cannot pass that."""
    pairs = min(NAIVE_PAIRS, engine.config.es.pairs)
    population = engine.config.es.population

    def figures(make_pair: Callable[[Engine, int], PairParams]) -> tuple[float, float, float]:
        wall, cpu = naive_member_seconds(engine, windows, pairs, repeats, make_pair, tick)
        return wall, cpu, wall * population + es["update_s"]

    wall, cpu, step_s = figures(full_rank_pair_params)
    low_wall, _, low_step_s = figures(low_rank_pair_params)
    return {
        "naive_es_tokens_per_s": tokens / step_s,
        "speedup": step_s / es["wall"],
        "speedup_ceiling": step_s / inference_s,
        "speedup_cpu_seconds": (cpu * population + es["update_cpu"]) / es["cpu"],
        "naive_low_rank_es_tokens_per_s": tokens / low_step_s,
        "speedup_low_rank": low_step_s / es["wall"],
        "naive_note": (f"measured on {pairs} pairs ({2 * pairs} members, mean {wall:.4f} s "
                       "each, best of the repeats: a pair's full-rank noise hashed once into "
                       "W + E and W - E, each member packed and evaluated at batch 1, one after "
                       f"another), extrapolated to {population} members, plus the ES step's "
                       "own update time; speedup_cpu_seconds compares CPU seconds instead (ES "
                       "on all its threads, naive on one), the gain per core; the low-rank "
                       "figures write each pair's A_p B_p^T into its weights instead (mean "
                       f"{low_wall:.4f} s each)"),
    }
