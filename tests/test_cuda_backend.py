"""The cuda backend against the numpy reference, bit for bit.

On a CUDA GPU every Backend op and two full ES steps of tiny Engines are compared with
``ReferenceBackend``, in both noise modes; without one those tests skip with the one-line
reason of ``intes.kernels.cuda.unavailable_reason()``. What needs no GPU runs everywhere: the
CUDA C source compiles for an H100 (nvcc), its kernels built for the CPU by g++ (the same
source, ``emulated_kernels``) match the reference, and the module imports and reports without
torch, triton or cupy. The Triton kernels are checked on a CPU in test_triton_interpret.py.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from intes import es
from intes import intmath as im
from intes import noise as nz
from intes.engine import Engine, ModelConfig, TrainConfig
from intes.errors import ConfigError
from intes.kernels import cuda, get_backend
from intes.kernels import cupy as ck
from intes.kernels.base import LowRank
from intes.kernels.reference import ReferenceBackend

REASON = cuda.unavailable_reason()
needs_gpu = pytest.mark.skipif(REASON is not None, reason=REASON or "")
REF = ReferenceBackend()
seeds = st.integers(0, 2**32 - 1)


def _int8(rng: np.random.Generator, shape: tuple[int, ...], extreme: bool) -> np.ndarray:
    """int8 values in [-127, 127], or only +-127 (the bounds' worst case)."""
    if extreme:
        return rng.choice(np.array([-127, 127], dtype=np.int8), size=shape)
    return rng.integers(-127, 128, size=shape).astype(np.int8)


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def emulated() -> ck.Kernels:
    if shutil.which("g++") is None:
        pytest.skip("no g++ to build the CPU emulation of the CUDA kernels")
    return ck.emulated_kernels()


@pytest.fixture(scope="module", params=["emulated", pytest.param("cupy", marks=needs_gpu)])
def kernels(request) -> ck.Kernels:
    """The CUDA C kernels: built by g++ for the CPU, or by NVRTC for the GPU."""
    if request.param == "emulated":
        return request.getfixturevalue("emulated")
    return ck.cupy_kernels()


@pytest.fixture(scope="module", params=["cached", "kernel"])
def gpu(request) -> cuda.CudaBackend:
    if REASON is not None:
        pytest.skip(REASON)
    return cuda.CudaBackend(request.param)


def run(kernels: ck.Kernels, name: str, *args, **kwargs) -> np.ndarray:
    """Call a kernel wrapper on host arrays (moved to its device) and bring the result back."""
    xp = kernels.xp

    def move(a):
        if isinstance(a, tuple):
            return tuple(move(v) for v in a)
        return xp.asarray(a) if isinstance(a, np.ndarray) else a

    out = getattr(kernels, name)(*[move(a) for a in args],
                                 **{k: move(v) for k, v in kwargs.items()})
    if isinstance(out, tuple):
        return tuple(_host(o) for o in out)
    return _host(out)


def _host(a) -> np.ndarray:
    return a if isinstance(a, np.ndarray) else a.get()


# ---------------------------------------------------------------- no GPU needed


def test_unavailable_reason_is_one_line_or_none() -> None:
    reason = cuda.unavailable_reason()
    assert reason is None or (reason.startswith("cuda backend unavailable: ")
                              and "\n" not in reason)


@pytest.mark.skipif(REASON is None, reason="a usable GPU is present")
def test_get_backend_cuda_says_why_not() -> None:
    with pytest.raises(ConfigError, match="cuda backend unavailable"):
        get_backend("cuda")


def test_module_imports_without_gpu_libraries() -> None:
    """Importing the backend (and asking it why not) pulls in none of torch, triton, cupy."""
    code = ("import sys, importlib.util as u, intes.kernels\n"
            "before, real = set(sys.modules), u.find_spec\n"
            "u.find_spec = lambda n, *a: None if n in ('torch', 'triton', 'cupy') "
            "else real(n, *a)\n"
            "from intes.kernels import cuda; print(cuda.unavailable_reason())\n"
            "assert not {'torch', 'triton', 'cupy'} & (set(sys.modules) - before)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == ("cuda backend unavailable: torch not installed "
                                  "(pip install torch)")


@pytest.mark.parametrize("name,peak", [("NVIDIA H200", 1979.0), ("NVIDIA H100 PCIe", 1513.0),
                                       ("NVIDIA H100 80GB HBM3", 1979.0), ("Tesla T4", None)])
def test_peak_int8_tops_by_device_name(name: str, peak: float | None) -> None:
    assert cuda.peak_int8_tops(name) == peak


def test_emulated_backend_names_its_device(emulated) -> None:
    pytest.importorskip("torch")
    pytest.importorskip("triton")
    backend = cuda.CudaBackend(device="cpu", kernels=emulated)
    assert backend.accelerator() == {"name": "cpu (emulated kernels)", "peak_int8_tops": None}
    from intes.kernels.cpu_elementwise import CpuElementwise
    assert backend.ew is CpuElementwise  # the host's fused elementwise ops, not numpy's


def test_device_ops_linear_applies_what_ops_linear_does(emulated) -> None:
    """DeviceOps.linear takes Ops.linear's activation or residual and applies it after the
    layer with the CUDA C kernels. The layer itself is the reference's (a stand-in for the
    Triton kernel, which test_triton_interpret.py checks)."""
    rng = np.random.default_rng(4)
    x, w, calls = _int8(rng, (4, 24), True), _int8(rng, (16, 24), False), []
    y = REF.linear(x, w, 5, None, 0)

    def device_linear(*args):
        calls.append(args[1:])
        return emulated.xp.asarray(y)

    ops = SimpleNamespace(vectors={}, prepared={"w": w}, shifts={"w": 5}, noise={},
                          sigma_shift=0)
    dev = cuda.DeviceOps(SimpleNamespace(kernels=emulated, device_linear=device_linear), ops)
    r = _int8(rng, y.shape, True)
    assert np.array_equal(_host(dev.linear("w", x)), y)
    assert calls == [(w, 5, None, 0)]
    for activation in ("relu", "relu_sq"):
        got = dev.linear("w", x, activation=activation)
        assert np.array_equal(_host(got), getattr(im, activation)(y))
    assert np.array_equal(_host(dev.linear("w", x, residual=r)), im.sat_add(r, y))
    with pytest.raises(ValueError, match="not both"):
        dev.linear("w", x, activation="relu", residual=r)


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="no nvcc (CUDA toolkit) here")
def test_cuda_source_compiles_for_h100() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "kernels.cu"
        src.write_text(ck.SOURCE)
        out = subprocess.run(["nvcc", "-arch=sm_90", "-cubin", "-std=c++17",
                              *ck.compile_options(), "-o", str(Path(tmp) / "k.cubin"), str(src)],
                             capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


@given(seed=seeds, step=seeds, tensor_id=st.integers(0, 999), pairs=st.integers(1, 6),
       rows=st.integers(1, 40), cols=st.integers(1, 40), rank=st.integers(1, 3))
def test_factors_match_intes_noise(kernels, seed, step, tensor_id, pairs, rows, cols, rank):
    keys = nz.stream_key(seed, step, np.arange(pairs), tensor_id)
    a, b = run(kernels, "lowrank_factors", keys.view(np.int32), rows, cols, rank)
    want_a, want_b = nz.lowrank_factors(seed, step, np.arange(pairs), tensor_id, rows, cols, rank)
    assert np.array_equal(a, want_a) and np.array_equal(b, want_b)


@given(pairs=st.integers(1, 600), n=st.integers(1, 50), fit=st.sampled_from([1, 15, 1 << 24]),
       threshold=st.integers(-1, 4000), extreme=st.booleans(), seed=seeds)
def test_update_vector_matches_reference(kernels, pairs, n, fit, threshold, extreme, seed):
    rng = np.random.default_rng(seed)
    v, e = _int8(rng, (n,), extreme), _int8(rng, (pairs, n), extreme)
    f = rng.integers(-fit, fit + 1, size=pairs).astype(np.int32)
    got = run(kernels, "update_vector", v, e, f, threshold, chunk=7)
    assert np.array_equal(got, REF.update_vector(v, e, f, threshold))


@given(pairs=st.integers(1, 4), vocab=st.integers(2, 40), d=st.integers(1, 40),
       rank=st.integers(1, 3), sigma=st.integers(0, 8),
       mode=st.sampled_from(["none", "hashed", "loaded", "explicit"]), extreme=st.booleans(),
       seed=seeds)
def test_embed_matches_reference(kernels, pairs, vocab, d, rank, sigma, mode, extreme, seed):
    rng = np.random.default_rng(seed)
    table = _int8(rng, (vocab, d), extreme)
    tokens = rng.integers(0, vocab, size=2 * pairs)
    a, b = nz.lowrank_factors(seed, 0, np.arange(pairs), 1, vocab, d, rank)
    if mode == "explicit":
        a, b = _int8(rng, a.shape, extreme), _int8(rng, b.shape, extreme)
    kw = {}
    if mode == "hashed":
        kw = {"keys": nz.stream_key(seed, 0, np.arange(pairs), 1).view(np.int32), "rank": rank}
    elif mode != "none":
        kw = {"factors": (a, b)}
    got = run(kernels, "embed", table, tokens, sigma, **kw)
    want = REF.embed(table, tokens, None if mode == "none" else LowRank(a, b), sigma)
    assert np.array_equal(got, want)


@given(rows=st.integers(1, 6), vocab=st.integers(2, 300), extreme=st.booleans(), seed=seeds)
def test_log_likelihood_matches_reference(kernels, rows, vocab, extreme, seed):
    rng = np.random.default_rng(seed)
    logits = _int8(rng, (rows, vocab), extreme)
    targets = rng.integers(0, vocab, size=rows)
    assert np.array_equal(run(kernels, "log_likelihood", logits, targets),
                          REF.log_likelihood(logits, targets))


def test_log_likelihood_at_the_largest_vocab(kernels) -> None:
    """2^15 equal logits: the int32 sum is exactly 2^31 and wraps, in both."""
    logits = np.zeros((2, im.MAX_VOCAB), dtype=np.int8)
    targets = np.array([0, 5])
    assert np.array_equal(run(kernels, "log_likelihood", logits, targets),
                          REF.log_likelihood(logits, targets))


@given(rows=st.integers(1, 6), d=st.integers(1, 64), per_row=st.booleans(),
       extreme=st.booleans(), seed=seeds)
def test_norm_matches_intmath(kernels, rows, d, per_row, extreme, seed):
    rng = np.random.default_rng(seed)
    x = _int8(rng, (rows, d), extreme)
    w = _int8(rng, (rows if per_row else 1, d), extreme)
    assert np.array_equal(run(kernels, "norm", x, w), im.norm(x, w))


@given(rows=st.integers(1, 6), d=st.integers(1, 64), terms=st.integers(2, 3),
       broadcast=st.booleans(), extreme=st.booleans(), seed=seeds)
def test_sat_add_matches_intmath(kernels, rows, d, terms, broadcast, extreme, seed):
    rng = np.random.default_rng(seed)
    ops = [_int8(rng, (rows, d), extreme) for _ in range(terms - 1)]
    ops.append(_int8(rng, (d,) if broadcast else (rows, d), extreme))
    assert np.array_equal(run(kernels, "sat_add", *ops), im.sat_add(*ops))


@given(rows=st.integers(1, 6), d=st.integers(1, 64), per_row=st.booleans(),
       extreme=st.booleans(), seed=seeds)
def test_token_mix_matches_intmath(kernels, rows, d, per_row, extreme, seed):
    rng = np.random.default_rng(seed)
    x, prev = _int8(rng, (rows, d), extreme), _int8(rng, (rows, d), extreme)
    mu = _int8(rng, (rows if per_row else 1, d), extreme)
    assert np.array_equal(run(kernels, "token_mix", x, prev, mu), im.token_mix(x, prev, mu))


@given(rows=st.integers(1, 6), d=st.integers(1, 64), extreme=st.booleans(), seed=seeds)
def test_gates_and_activations_match_intmath(kernels, rows, d, extreme, seed):
    rng = np.random.default_rng(seed)
    a, b, c = (_int8(rng, (rows, d), extreme) for _ in range(3))
    assert np.array_equal(run(kernels, "sigmoid_gate", a, b), im.sigmoid_gate(a, b))
    assert np.array_equal(run(kernels, "gru_blend", a, b, c), im.gru_blend(a, b, c))
    assert np.array_equal(run(kernels, "relu", a), im.relu(a))
    assert np.array_equal(run(kernels, "relu_sq", a), im.relu_sq(a))  # the lut8 kernel


@given(rows=st.integers(1, 6), d=st.integers(1, 64), per_row=st.booleans(),
       steps=st.integers(1, 40), extreme=st.booleans(), seed=seeds)
def test_wkv_steps_match_intmath(kernels, rows, d, per_row, steps, extreme, seed):
    """Many steps, so the int32 states reach the sizes the bounds allow."""
    rng = np.random.default_rng(seed)
    decay = _int8(rng, (rows if per_row else 1, d), extreme)
    num = den = np.zeros((rows, d), dtype=np.int32)
    got_num, got_den = num, den
    for _ in range(steps):
        k, v = _int8(rng, (rows, d), extreme), _int8(rng, (rows, d), extreme)
        wkv, num, den = im.wkv_step(num, den, k, v, decay)
        got, got_num, got_den = run(kernels, "wkv_step", got_num, got_den, k, v, decay)
        assert np.array_equal(got, wkv)
        assert np.array_equal(got_num, num) and np.array_equal(got_den, den)


# ---------------------------------------------------------------- the backend on a GPU


@needs_gpu
@given(pairs=st.integers(1, 70), n_in=st.integers(1, 300), n_out=st.integers(1, 300),
       rank=st.integers(1, 4), shift=st.integers(0, 12), sigma=st.integers(0, 8),
       mode=st.sampled_from(["none", "keyed", "host"]), extreme=st.booleans(), seed=seeds)
def test_linear_matches_reference(gpu, pairs, n_in, n_out, rank, shift, sigma, mode, extreme,
                                  seed):
    rng = np.random.default_rng(seed)
    rows = 2 * pairs
    x, w = _int8(rng, (rows, n_in), extreme), _int8(rng, (n_out, n_in), extreme)
    a, b = nz.lowrank_factors(seed, 2, np.arange(pairs), 4, n_out, n_in, rank)
    noise = {"none": None, "host": LowRank(a, b),
             "keyed": LowRank(*gpu.noise_source.lowrank_factors(seed, 2, np.arange(pairs), 4,
                                                                n_out, n_in, rank))}[mode]
    want = REF.linear(x, w, shift, None if mode == "none" else LowRank(a, b), sigma)
    assert np.array_equal(gpu.linear(x, gpu.prepare(w), shift, noise, sigma), want)


@needs_gpu
@given(pairs=st.integers(1, 300), rows=st.integers(1, 200), cols=st.integers(1, 200),
       rank=st.integers(1, 4), fit=st.sampled_from([1, 15, 512]),  # |Z| < 2^31: no overflow
       threshold=st.integers(-1, 20000), keyed=st.booleans(), seed=seeds)
def test_update_matrix_matches_reference(gpu, pairs, rows, cols, rank, fit, threshold, keyed,
                                         seed):
    rng = np.random.default_rng(seed)
    w = _int8(rng, (rows, cols), False)
    f = rng.integers(-fit, fit + 1, size=pairs).astype(np.int32)
    a, b = nz.lowrank_factors(seed, 5, np.arange(pairs), 0, rows, cols, rank)
    noise = (LowRank(*gpu.noise_source.lowrank_factors(seed, 5, np.arange(pairs), 0, rows, cols,
                                                       rank)) if keyed else LowRank(a, b))
    want = REF.update_matrix(w, LowRank(a, b), f, threshold)
    assert np.array_equal(gpu.update_matrix(w, noise, f, threshold), want)


@needs_gpu
@given(pairs=st.integers(1, 8), vocab=st.integers(2, 300), d=st.integers(1, 64),
       rank=st.integers(1, 3), sigma=st.integers(0, 8), seed=seeds)
def test_backend_embed_matches_reference(gpu, pairs, vocab, d, rank, sigma, seed):
    rng = np.random.default_rng(seed)
    table = _int8(rng, (vocab, d), False)
    tokens = rng.integers(0, vocab, size=2 * pairs)
    keyed = LowRank(*gpu.noise_source.lowrank_factors(seed, 7, np.arange(pairs), 3, vocab, d,
                                                      rank))
    ref = LowRank(*nz.lowrank_factors(seed, 7, np.arange(pairs), 3, vocab, d, rank))
    assert np.array_equal(gpu.embed(table, tokens, keyed, sigma),
                          REF.embed(table, tokens, ref, sigma))
    assert np.array_equal(gpu.embed(table, tokens, None, sigma),
                          REF.embed(table, tokens, None, sigma))


@needs_gpu
@given(rows=st.integers(1, 70), vocab=st.integers(2, 3000), seed=seeds)
def test_backend_log_likelihood_matches_reference(gpu, rows, vocab, seed):
    rng = np.random.default_rng(seed)
    logits = _int8(rng, (rows, vocab), False)
    targets = rng.integers(0, vocab, size=rows)
    assert np.array_equal(gpu.log_likelihood(logits, targets), REF.log_likelihood(logits, targets))


@needs_gpu
@given(pairs=st.integers(1, 300), n=st.integers(1, 300), seed=seeds)
def test_vector_noise_and_update_match_reference(gpu, pairs, n, seed):
    rng = np.random.default_rng(seed)
    e = gpu.noise_source.vector_noise(seed, 9, np.arange(pairs), 6, n)
    assert np.array_equal(e, nz.vector_noise(seed, 9, np.arange(pairs), 6, n))
    v = _int8(rng, (n,), False)
    f = rng.integers(-15, 16, size=pairs).astype(np.int32)
    assert np.array_equal(gpu.update_vector(v, e, f, 40), REF.update_vector(v, e, f, 40))


@needs_gpu
@pytest.mark.parametrize("kind", ["rwkv", "egg"])
def test_two_es_steps_match_reference(gpu, kind) -> None:
    """Members scored with activations and state on the device (CudaBackend.score)."""
    cfg = TrainConfig(model=ModelConfig(kind=kind, vocab_size=64, dim=32, layers=2),
                      es=es.ESConfig(population=16, group_size=2, rank=2, fitness="normalized"),
                      seq_len=6, seed=5)
    ref, dev = Engine(cfg, backend=ReferenceBackend()), Engine(cfg, backend=gpu)
    rng = np.random.default_rng(1)
    for _ in range(2):
        windows = rng.integers(1, 64, size=(16, 7))
        windows[rng.random(windows.shape) < 0.1] = 0  # document starts: states reset there
        assert np.array_equal(dev.step(windows, chunk_pairs=3), ref.step(windows))
        for name, value in ref.params.items():
            assert np.array_equal(dev.params[name], value), name
    assert np.array_equal(dev.log_likelihood(windows), ref.log_likelihood(windows))
