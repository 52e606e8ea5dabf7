"""The Triton kernels of the cuda backend, checked bit for bit on a CPU.

Triton's interpreter (``TRITON_INTERPRET=1``) runs the kernels on numpy, but the variable
must be set before a kernel is decorated and it would turn every later Triton kernel of the
process into an interpreted one (test_cuda_backend.py needs compiled ones on a GPU). So the
checks run in ONE child process (this file run as a script, with the variable set); each
pytest item below reports one check of it. This process imports the kernels too, compiled
(decorating runs nothing). The child also runs the whole ``CudaBackend`` (its CUDA C kernels
built by g++, see ``intes.kernels.cupy.emulated_kernels``) through two ES steps of a tiny
Engine. HYPOTHESIS_PROFILE=dev searches harder, as for the other tests.

Independently, the kernels are compiled ahead of time for an H100 (sm_90), which checks they
lower to int8 tensor-core instructions and fit its shared memory, without a GPU.
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
import subprocess
import sys
import traceback
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from intes import noise as nz
from intes.kernels.base import LowRank
from intes.kernels.reference import ReferenceBackend

torch = pytest.importorskip("torch")
triton = pytest.importorskip("triton")
tl = triton.language
tk = importlib.import_module("intes.kernels.triton")  # interpreted only in the child

CHECKS: dict[str, Callable[[], None]] = {}
SM90_SHARED_BYTES = 232448  # an H100's shared memory per block (227 KiB)
_DEV = os.environ.get("HYPOTHESIS_PROFILE") == "dev"
_examples = settings(max_examples=60 if _DEV else 8, deadline=None, derandomize=not _DEV,
                     database=None)


def check(fn: Callable[[], None]) -> Callable[[], None]:
    """Register a check that the interpreter child runs."""
    CHECKS[fn.__name__] = fn
    return fn


def _int8(rng: np.random.Generator, shape: tuple[int, ...], extreme: bool) -> np.ndarray:
    """int8 values in [-127, 127], or only +-127 (the bounds' worst case)."""
    if extreme:
        return (rng.choice([-127, 127], size=shape)).astype(np.int8)
    return rng.integers(-127, 128, size=shape).astype(np.int8)


def _t(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a))


@triton.jit
def _probe_kernel(keys_ptr, mixed_ptr, hashed_ptr, values_ptr, pairs, n,
                  BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr):
    """mix32(key), the raw stream hash and the noise values of tk, for each key and index."""
    ps = tl.arange(0, BLOCK_P)
    idx = tl.arange(0, BLOCK_N)
    key = tl.load(keys_ptr + ps, mask=ps < pairs, other=0).to(tl.uint32, bitcast=True)
    tl.store(mixed_ptr + ps, tk.mix32(key).to(tl.int32, bitcast=True), mask=ps < pairs)
    h = tk.mix32(key[:, None] ^ tk.mix32(idx.to(tl.uint32) * 0x9E3779B9 + 1)[None, :])
    offs = ps[:, None] * n + idx[None, :]
    mask = (ps < pairs)[:, None] & (idx < n)[None, :]
    tl.store(hashed_ptr + offs, h.to(tl.int32, bitcast=True), mask=mask)
    vals = tk.noise_value(key[:, None], idx.to(tl.uint32)[None, :])
    tl.store(values_ptr + offs, vals.to(tl.int8), mask=mask)


def _hash_probe(keys: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(mix32(keys), hash_u32(keys, n), gaussian values) as Triton computes them (n <= 512)."""
    pairs = len(keys)
    mixed = torch.empty(pairs, dtype=torch.int32)
    hashed = torch.empty((pairs, n), dtype=torch.int32)
    values = torch.empty((pairs, n), dtype=torch.int8)
    _probe_kernel[(1,)](_t(keys.view(np.int32)), mixed, hashed, values, pairs, n,
                        BLOCK_P=8, BLOCK_N=512)
    return mixed.numpy().view(np.uint32), hashed.numpy().view(np.uint32), values.numpy()


# ---------------------------------------------------------------- checks (child process)


@check
@_examples
@given(seed=st.integers(0, 2**32 - 1), step=st.integers(0, 2**32 - 1),
       tensor_id=st.integers(0, 500), pairs=st.integers(1, 5), n=st.integers(1, 300))
def hash_matches_intes_noise(seed: int, step: int, tensor_id: int, pairs: int, n: int) -> None:
    """mix32, the stream hash and gaussian_int8 in Triton give intes.noise's bits."""
    keys = nz.stream_key(seed, step, np.arange(pairs), tensor_id)
    mixed, hashed, values = _hash_probe(keys, n)
    assert np.array_equal(mixed, nz.mix32(keys))
    assert np.array_equal(hashed, nz.hash_u32(keys, n))
    assert np.array_equal(values, nz.gaussian_int8(nz.hash_u32(keys, n)))


@check
@_examples
@given(pairs=st.integers(2, 20), n_in=st.integers(16, 80), n_out=st.integers(16, 72),
       rank=st.integers(1, 2), shift=st.integers(0, 10), sigma=st.integers(0, 6),
       mode=st.sampled_from(["none", "hashed", "loaded", "explicit"]), extreme=st.booleans(),
       odd=st.booleans(), seed=st.integers(0, 2**32 - 1))
def linear_matches_reference(pairs: int, n_in: int, n_out: int, rank: int, shift: int,
                             sigma: int, mode: str, extreme: bool, odd: bool, seed: int) -> None:
    """tk.linear == ReferenceBackend.linear: no noise, hashed in kernel, or loaded factors;
    the sizes cross the interpreter's tile edges (16 pairs, 32 outputs, 32 inputs a step)."""
    rng = np.random.default_rng(seed)
    rows = 2 * pairs - (odd and mode == "none")  # odd row counts only without noise
    x, w = _int8(rng, (rows, n_in), extreme), _int8(rng, (n_out, n_in), extreme)
    noise, dev = None, None
    if mode != "none":
        a, b = nz.lowrank_factors(seed, 3, np.arange(pairs), 5, n_out, n_in, rank)
        if mode == "explicit":  # any int8 factors, not just the hash's range
            a, b = _int8(rng, a.shape, extreme), _int8(rng, b.shape, extreme)
        noise = LowRank(a, b)
        keys = nz.stream_key(seed, 3, np.arange(pairs), 5).view(np.int32)
        dev = (tk.DeviceNoise(rank, keys=_t(keys)) if mode == "hashed"
               else tk.DeviceNoise(rank, a=_t(a), b=_t(b)))
    want = ReferenceBackend().linear(x, w, shift, noise, sigma)
    got = tk.linear(_t(x), _t(w), shift, dev, sigma).numpy()
    assert np.array_equal(got, want)


@check
@_examples
@given(pairs=st.integers(1, 20), rows=st.integers(1, 40), cols=st.integers(1, 40),
       rank=st.integers(1, 2), fit=st.sampled_from(["sign", "normalized", "wide"]),
       threshold=st.integers(-1, 3000), explicit=st.booleans(), seed=st.integers(0, 2**32 - 1))
def update_matches_reference(pairs: int, rows: int, cols: int, rank: int, fit: str,
                             threshold: int, explicit: bool, seed: int) -> None:
    """tk.update_matrix == ReferenceBackend.update_matrix for any int32 fitness; pairs x rank
    up to 40 crosses the interpreter's 32-deep reduction tile."""
    rng = np.random.default_rng(seed)
    w = _int8(rng, (rows, cols), False)
    w[0, :] = 127  # saturation at both ends
    w[-1, :] = -127
    a, b = nz.lowrank_factors(seed, 1, np.arange(pairs), 2, rows, cols, rank)
    if explicit:
        a, b = _int8(rng, a.shape, False), _int8(rng, b.shape, False)
    bound = {"sign": 1, "normalized": 15, "wide": 1 << 11}[fit]  # 20 * 2^11 * 2 * 127^2 < 2^31
    f = rng.integers(-bound, bound + 1, size=pairs).astype(np.int32)
    want = ReferenceBackend().update_matrix(w, LowRank(a, b), f, threshold)
    got = tk.update_matrix(_t(w), _t(a), _t(b), _t(f), threshold).numpy()
    assert np.array_equal(got, want)


class _OnDevice(np.ndarray):
    """A numpy array standing for one in device memory: like a CuPy array, it refuses to be
    mixed with host arrays in numpy functions, arithmetic and indexing."""

    def __array_function__(self, func, types, args, kwargs):
        if np.ndarray in types:
            raise TypeError(f"np.{func.__name__} mixes host and device arrays")
        out = func(*_host_views(args),
                   **dict(zip(kwargs, _host_views(kwargs.values()), strict=True)))
        return out.view(_OnDevice) if isinstance(out, np.ndarray) else out

    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        if any(type(a) is np.ndarray for a in (*inputs, *kwargs.get("out", ()))):
            raise TypeError(f"{ufunc.__name__} mixes host and device arrays")
        plain = [a.view(np.ndarray) if isinstance(a, _OnDevice) else a for a in inputs]
        if "out" in kwargs:
            kwargs["out"] = tuple(a.view(np.ndarray) for a in kwargs["out"])
        out = getattr(ufunc, method)(*plain, **kwargs)
        return out.view(_OnDevice) if isinstance(out, np.ndarray) else out

    def __setitem__(self, index, value):
        if type(index) is np.ndarray or type(value) is np.ndarray:
            raise TypeError("indexing a device array with host arrays")
        super().__setitem__(index, value)


def _host_views(items) -> list:
    """Plain ndarray views of _OnDevice arrays, in lists and tuples too (numpy's own code runs
    on them, as CuPy runs its own)."""
    return [a.view(np.ndarray) if isinstance(a, _OnDevice) else
            type(a)(_host_views(a)) if isinstance(a, list | tuple) else a for a in items]


class _DeviceXp:
    """The array module of the strict emulation: numpy whose arrays are ``_OnDevice``; its
    ``ascontiguousarray`` (what every kernel wrapper calls on its inputs), like CuPy's, takes
    device arrays only, and ``asarray`` is the explicit upload."""

    int8, int32, uint32 = np.int8, np.int32, np.uint32

    @staticmethod
    def asarray(a, dtype=None):
        return np.asarray(a, dtype=dtype).view(_OnDevice)

    @staticmethod
    def ascontiguousarray(a, dtype=None):
        if not isinstance(a, _OnDevice):
            raise TypeError(f"a kernel got a host array ({type(a).__name__})")
        return np.ascontiguousarray(a.view(np.ndarray), dtype=dtype).view(_OnDevice)

    @staticmethod
    def empty(shape, dtype):
        return np.empty(shape, dtype=dtype).view(_OnDevice)

    @staticmethod
    def empty_like(a):
        return np.empty_like(a.view(np.ndarray)).view(_OnDevice)

    @staticmethod
    def zeros(shape, dtype):
        return np.zeros(shape, dtype=dtype).view(_OnDevice)

    @staticmethod
    def from_dlpack(t):
        return np.from_dlpack(t).view(_OnDevice)


@check
@settings(max_examples=24 if _DEV else 4, deadline=None, derandomize=not _DEV, database=None)
@given(mode=st.sampled_from(["cached", "kernel"]), kind=st.sampled_from(["rwkv", "egg"]),
       pairs=st.integers(2, 4), dim=st.sampled_from([8, 16]), rank=st.integers(1, 3),
       noise_reuse=st.integers(1, 2), chunk=st.integers(1, 4), seed=st.integers(0, 2**32 - 1))
def cuda_backend_two_es_steps_match_reference(mode: str, kind: str, pairs: int, dim: int,
                                              rank: int, noise_reuse: int, chunk: int,
                                              seed: int) -> None:
    """The whole CudaBackend on a CPU: two ES steps of a tiny Engine (members scored with
    activations and state in the backend's memory, ``CudaBackend.score``), every op, and
    plain inference, same bits, over models, noise modes, sizes, ranks, seeds and chunkings;
    documents start mid-window, so states are reset there. Its kernels see "device" arrays
    that refuse host ones as CuPy's do, so a host array that reaches a kernel, or a device
    array mixed with a host one, fails here as on a GPU."""
    if shutil.which("g++") is None:
        raise _Skip("no g++ to build the CPU emulation of the CUDA kernels")
    from intes import es
    from intes.engine import Engine, ModelConfig, TrainConfig
    from intes.kernels.cuda import CudaBackend
    from intes.kernels.cupy import Kernels, emulated_kernels

    kernels = Kernels(_DeviceXp(), emulated_kernels().launch)  # strict: see _OnDevice
    population = 2 * pairs
    cfg = TrainConfig(model=ModelConfig(kind=kind, vocab_size=16, dim=dim, layers=1),
                      es=es.ESConfig(population=population, group_size=2, rank=rank,
                                     noise_reuse=noise_reuse, fitness="normalized"),
                      seq_len=3, seed=seed)
    ref = Engine(cfg, backend=ReferenceBackend())
    gpu = Engine(cfg, backend=CudaBackend(mode, device="cpu", kernels=kernels))
    rng = np.random.default_rng(seed)
    for _ in range(2):
        windows = rng.integers(1, 16, size=(population, 4))
        windows[rng.random(windows.shape) < 0.2] = 0  # document starts
        assert np.array_equal(gpu.step(windows, chunk_pairs=chunk), ref.step(windows))
        for name, value in ref.params.items():
            assert np.array_equal(gpu.params[name], value), name
    assert np.array_equal(gpu.log_likelihood(windows), ref.log_likelihood(windows))


@check
def bench_naive_baselines_run_on_the_cuda_backend() -> None:
    """``intes bench --backend cuda`` times both naive baselines: their pairs' noise is made
    on the host (the backend's own is keys for its kernels) and members are scored by the
    backend's own loop, as ES and inference are."""
    if shutil.which("g++") is None:
        raise _Skip("no g++ to build the CPU emulation of the CUDA kernels")
    from intes import bench
    from intes.kernels.cuda import CudaBackend
    from intes.kernels.cupy import emulated_kernels

    engine = bench.make_engine("rwkv", 8, 1, 4, 2, 1,
                               CudaBackend(device="cpu", kernels=emulated_kernels()))
    windows = bench.bench_windows(engine)
    for make_pair in (bench.full_rank_pair_params, bench.low_rank_pair_params):
        wall, cpu = bench.naive_member_seconds(engine, windows, 1, 1, make_pair)
        assert wall > 0 and cpu > 0


class _Skip(Exception):
    """A check that cannot run here (reported as a pytest skip)."""


def _run_checks() -> dict[str, str]:
    """Run every check: name -> "ok", "skip: why" or the failure's traceback."""
    report = {}
    for name, fn in CHECKS.items():
        try:
            fn()
            report[name] = "ok"
        except _Skip as why:
            report[name] = f"skip: {why}"
        except Exception:
            report[name] = traceback.format_exc()
    return report


# ---------------------------------------------------------------- pytest side (parent process)


@pytest.fixture(scope="module")
def child() -> subprocess.Popen:
    """The interpreter child, started once and early so compiles below overlap with it."""
    root = str(Path(__file__).resolve().parents[1])  # intes importable, installed or not
    path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": path}
    proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve())], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    yield proc
    if proc.poll() is None:
        proc.kill()


@pytest.fixture(scope="module")
def report(child: subprocess.Popen) -> dict[str, str]:
    out, err = child.communicate(timeout=600)
    lines = out.strip().splitlines()
    if child.returncode != 0 or not lines:
        pytest.fail(f"interpreter child failed (exit {child.returncode}):\n{err[-4000:]}")
    return json.loads(lines[-1])


def _compile_sm90(kernel, constexprs: dict, config) -> tuple[str, int]:
    """PTX and shared-memory bytes of a Triton kernel for an H100, with one autotune config."""
    import triton
    from triton.backends.compiler import GPUTarget

    pointers = {"x_ptr": "*i8", "w_ptr": "*i8", "out_ptr": "*i8", "a_ptr": "*i8", "b_ptr": "*i8",
                "xb_ptr": "*i32", "keys_ptr": "*i32", "f_ptr": "*i32"}
    consts = {**constexprs, **config.kwargs}
    fn = kernel.fn
    signature = {n: "constexpr" if n in consts else pointers.get(n, "i32") for n in fn.arg_names}
    compiled = triton.compile(
        triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=consts),
        target=GPUTarget("cuda", 90, 32),
        options={"num_warps": config.num_warps, "num_stages": config.num_stages,
                 "enable_fp_fusion": False})  # integer kernels: nothing to fuse, said so
    return compiled.asm["ptx"], compiled.metadata.shared


_KERNELS = [("_linear_kernel", {"RANK": 2, "NOISE": 1}, True),
            ("_xb_kernel", {"RANK": 2, "HASHED": True}, False),
            ("_update_kernel", {"RANK": 2}, True)]


@pytest.mark.parametrize("name,constexprs,tensor_cores,config", [
    (name, cx, tc, i) for name, cx, tc in _KERNELS for i in range(len(getattr(tk, name).configs))])
def test_kernel_compiles_for_h100(child, name: str, constexprs: dict, tensor_cores: bool,
                                  config: int) -> None:
    """Every autotune config of each kernel lowers for sm_90: int8 tensor-core MMAs where it
    multiplies, and it fits the shared memory."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("TRITON_INTERPRET=1 in this process: kernels are not compilable")
    kernel = getattr(tk, name)
    ptx, shared = _compile_sm90(kernel, constexprs, kernel.configs[config])
    assert shared <= SM90_SHARED_BYTES
    mma = [line for line in ptx.splitlines() if "mma" in line and ".s8.s8" in line]
    assert bool(mma) == tensor_cores, mma[:2]


@pytest.mark.parametrize("name", list(CHECKS))
def test_interpreted(report: dict[str, str], name: str) -> None:
    """One check of the interpreter child (see the check's docstring)."""
    result = report[name]
    if result.startswith("skip: "):
        pytest.skip(result[6:])
    assert result == "ok", result


if __name__ == "__main__":  # the interpreter child: the parent set TRITON_INTERPRET=1
    print(json.dumps(_run_checks()))
