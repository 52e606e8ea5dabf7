"""The cpu backend returns the reference backend's bits, op by op and for whole ES steps.

Random shapes (fan-in past the float32 chunk size EXACT_K included), values (all +-127
extremes included), seeds, ranks 1..4, shifts and population chunkings; with every GEMM
engine that runs here (the fused VNNI kernel, int8 through torch, the AVX2 kernel, float32
BLAS).
"""

from __future__ import annotations

import platform

import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st
from numba import njit

from intes import intmath as im
from intes import kernels
from intes import noise as nz
from intes.engine import Engine, ModelConfig, TrainConfig
from intes.errors import ConfigError
from intes.es import NORMALIZED_MAX, ESConfig
from intes.kernels import available, vbmi
from intes.kernels.avx2_gemm import avx2_unavailable
from intes.kernels.base import LowRank
from intes.kernels.cpu import (
    BLOCK_ROWS,
    EPILOGUES,
    ES_PLANS,
    FUSED_BLOCK,
    FUSED_BLOCK_BYTES,
    SMALL_BATCH_BLOCK,
    SMALL_BATCH_BYTES,
    TOKEN_BLOCK,
    CpuBackend,
    keep_freed_memory,
)
from intes.kernels.cpu_elementwise import SUM16_WIDTH, CpuElementwise
from intes.kernels.cpu_noise import CpuNoise
from intes.kernels.cpu_scalar import (
    MEAN_BITS,
    MEAN_RECIPROCALS,
    NORM_BITS,
    _div_by_reciprocal,
    _div_sat8,
    _floor_divider,
    _row_reciprocal,
)
from intes.kernels.gemm import (
    EXACT_K,
    MAX_LEVELS,
    check_float_blas,
    gemm_summary,
    int8_dot_instructions,
    int8_gemm_unavailable,
    k_chunks,
    level_plan,
    make_gemm,
)
from intes.kernels.reference import ReferenceBackend
from intes.kernels.vnni import (
    HAVE_VNNI,
    factor_sums,
    pair_dot,
    pair_dot_loop,
    project_pairs,
    quad_pair_dot,
    quad_pair_dot_loop,
)
from intes.kernels.vnni_gemm import merged_rescale_fits, vnni_unavailable
from intes.models.base import Ops, make_noise
from intes.models.egg import EGG, gru_scan

CPU, REF = CpuBackend(), ReferenceBackend()
F32 = CpuBackend(gemm="float32")
INT8_MISSING = int8_gemm_unavailable()
VNNI_MISSING = vnni_unavailable()
VNNI = None if VNNI_MISSING else CpuBackend(gemm="vnni")
AVX2_MISSING = avx2_unavailable()
AVX2 = None if AVX2_MISSING else CpuBackend(gemm="avx2")
GEMM_BACKENDS = ([F32] + ([] if INT8_MISSING else [CpuBackend(gemm="int8")])
                 + ([] if AVX2 is None else [AVX2]) + ([] if VNNI is None else [VNNI]))
FILLS = ("random", "max", "min", "signs")
seeds = st.integers(0, 2**32 - 1)
fills = st.sampled_from(FILLS)
ranks = st.integers(1, 4)
afters = st.sampled_from([None, "relu", "relu_sq", "residual"])


def after_layer(rng: np.random.Generator, after: str | None, shape, fill: str) -> dict:
    """``linear``'s keyword for ``after``: an activation's name, or a residual of the
    output's shape."""
    if after is None:
        return {}
    if after == "residual":
        return {"residual": int8s(rng, shape, fill)}
    return {"activation": after}


def followed(y: np.ndarray, activation: str | None = None,
             residual: np.ndarray | None = None) -> np.ndarray:
    """The reference's layer output y, then intmath's op ``activation`` or the residual
    add, if given."""
    if residual is not None:
        return im.sat_add(residual, y)
    return y if activation is None else getattr(im, activation)(y)


def int8s(rng: np.random.Generator, shape, fill: str = "random", bound: int = 127) -> np.ndarray:
    """int8 in [-bound, bound]: random, all +bound, all -bound, or random signs of bound."""
    if fill == "max":
        return np.full(shape, bound, dtype=np.int8)
    if fill == "min":
        return np.full(shape, -bound, dtype=np.int8)
    if fill == "signs":
        return (bound * rng.choice(np.array([-1, 1]), size=shape)).astype(np.int8)
    return rng.integers(-bound, bound + 1, size=shape).astype(np.int8)


def lowrank(rng, pairs: int, rows: int, cols: int, rank: int, fill: str, seed: int) -> LowRank:
    """Generator noise in either layout (numpy's or CpuNoise's), or extreme +-NOISE_MAX."""
    if fill == "random":
        gen = nz if seed % 2 else CpuNoise
        return LowRank(*gen.lowrank_factors(seed, 3, np.arange(pairs), 5, rows, cols, rank))
    return LowRank(int8s(rng, (pairs, rows, rank), fill, nz.NOISE_MAX),
                   int8s(rng, (pairs, cols, rank), fill, nz.NOISE_MAX))


def same(a: np.ndarray, b: np.ndarray) -> None:
    assert a.dtype == b.dtype and a.shape == b.shape
    np.testing.assert_array_equal(a, b)


# ---------------------------------------------------------------------------------------------
# ops


@given(seed=seeds, pairs=st.integers(1, 4), fan_in=st.integers(1, 2200),
       out=st.integers(1, 40), rank=ranks, sigma=st.integers(0, 8), shift=st.integers(0, 14),
       x_fill=fills, w_fill=fills, n_fill=fills, noisy=st.booleans(),
       cpu=st.sampled_from(GEMM_BACKENDS), tokens=st.sampled_from([None, 1, 3, 4, 5, 8]),
       after=afters)
def test_linear(seed, pairs, fan_in, out, rank, sigma, shift, x_fill, w_fill, n_fill, noisy, cpu,
                tokens, after):
    """One token's rows (N, in) or a token block's (T, N, in): the projection takes a block's
    copies of a pair four at a time, the rest one by one. An activation or a residual
    (applied in the VNNI tiles, after the layer on the other engines) gives intmath's op
    of the output."""
    rng = np.random.default_rng(seed)
    x = int8s(rng, (2 * pairs, fan_in) if tokens is None else (tokens, 2 * pairs, fan_in), x_fill)
    w = int8s(rng, (out, fan_in), w_fill)
    noise = lowrank(rng, pairs, out, fan_in, rank, n_fill, seed) if noisy else None
    kw = after_layer(rng, after, (*x.shape[:-1], out), x_fill)
    same(cpu.linear(x, cpu.prepare(w), shift, noise, sigma, **kw),
         followed(REF.linear(x, REF.prepare(w), shift, noise, sigma), **kw))


@given(seed=seeds, pairs=st.integers(1, 3), fan_in=st.integers(1, 300), out=st.integers(1, 30),
       rank=ranks, step=st.integers(2, 3))
def test_linear_of_a_strided_view(seed, pairs, fan_in, out, rank, step):
    """Inputs need not be contiguous (the projection's vector loads want them so)."""
    rng = np.random.default_rng(seed)
    x = int8s(rng, (2 * pairs, fan_in * step))[:, ::step]
    w = int8s(rng, (out, fan_in))
    noise = lowrank(rng, pairs, out, fan_in, rank, "random", seed)
    same(CPU.linear(x, CPU.prepare(w), 6, noise, 3), REF.linear(x, REF.prepare(w), 6, noise, 3))


@given(seed=seeds, n=st.integers(0, 700), fill=fills, offset=st.integers(0, 63),
       rows=st.integers(2, 12), data=st.data())
def test_row_dots_are_the_exact_dot_products(seed, n, fill, offset, rows, data):
    """Rows' int32 dot products with one factor, VNNI blocks and masked tail alike, 2 rows
    (pair_dot) and 4 pairs at a stride (quad_pair_dot), at any length and alignment,
    extremes included."""
    rng = np.random.default_rng(seed)
    stride = data.draw(st.integers(2, rows), label="stride")
    m0 = data.draw(st.integers(0, rows - 2), label="m0")
    height = m0 + 3 * stride + 2
    x = int8s(rng, offset + height * n, fill)[offset:].reshape(height, n)
    b = int8s(rng, offset + n, fill)[offset:]
    want = x.astype(np.int64) @ b.astype(np.int64)
    pair = (int(want[m0]), int(want[m0 + 1]))
    assert pair_dot_loop(x, m0, b) == pair
    assert pair_dot(x, m0, b) == pair
    quad = tuple(int(want[m0 + c * stride + s]) for c in range(4) for s in range(2))
    assert quad_pair_dot_loop(x, m0, stride, b) == quad
    assert quad_pair_dot(x, m0, stride, b) == quad


@pytest.mark.skipif(VNNI_MISSING is not None, reason=str(VNNI_MISSING))
@given(seed=seeds, pairs=st.integers(1, 40), fan_in=st.integers(1, 600),
       out=st.integers(1, 200), sigma=st.integers(0, 8), shift=st.integers(0, 14),
       x_fill=fills, w_fill=fills, n_fill=fills, noisy=st.booleans(),
       tokens=st.sampled_from([None, 1, 2, 3, 4, 5, 8]), rank=st.sampled_from([1, 1, 2, 3]),
       after=afters)
def test_fused_linear_over_many_panels(seed, pairs, fan_in, out, sigma, shift, x_fill, w_fill,
                                       n_fill, noisy, tokens, rank, after):
    """The VNNI engine's fused layers where shapes span several panels, column blocks and
    tile remainders: up to 40 pairs (a panel holds 24 of them, inside one token's copy),
    widths past and between multiples of 64 (and last blocks of at most 32 columns), fan-in
    with and without a 1-3 column tail, ranks 1-3, with and without an activation (whole
    64-column rows looked up at once, partial and narrow blocks 16 columns at a time) or a
    residual (masked loads in a partial block)."""
    rng = np.random.default_rng(seed)
    x = int8s(rng, (2 * pairs, fan_in) if tokens is None else (tokens, 2 * pairs, fan_in), x_fill)
    w = int8s(rng, (out, fan_in), w_fill)
    noise = lowrank(rng, pairs, out, fan_in, rank, n_fill, seed) if noisy else None
    kw = after_layer(rng, after, (*x.shape[:-1], out), w_fill)
    same(VNNI.linear(x, VNNI.prepare(w), shift, noise, sigma, **kw),
         followed(REF.linear(x, REF.prepare(w), shift, noise, sigma), **kw))


@pytest.mark.skipif(VNNI_MISSING is not None, reason=str(VNNI_MISSING))
@given(seed=seeds, pairs=st.integers(1, 64), rows=st.integers(1, 150), cols=st.integers(1, 150),
       rank=ranks, kind=st.sampled_from(["sign", "normalized", "extreme", "wide", "many"]),
       w_fill=fills, n_fill=fills, threshold=st.integers(0, 40000))
def test_fused_update_over_many_panels(seed, pairs, rows, cols, rank, kind, w_fill, n_fill,
                                       threshold):
    """The VNNI engine's fused update (Z never stored) where the tensor spans several
    panels and column blocks, P r is not a multiple of 4 and the pairs fall into up to 15
    levels of |f|, or a few far wider (any |f| is one level), or more distinct |f| than
    MAX_LEVELS (the float path)."""
    rng = np.random.default_rng(seed)
    w = int8s(rng, (rows, cols), w_fill)
    noise = lowrank(rng, pairs, rows, cols, rank, n_fill, seed)
    fmax = 1 if kind == "sign" else NORMALIZED_MAX
    fitness = rng.integers(-fmax, fmax + 1, pairs).astype(np.int32)
    if kind == "extreme":
        fitness = np.where(fitness < 0, -fmax, fmax).astype(np.int32)
    if kind == "wide":  # |Z| stays below 2^31 (64 pairs x rank 3 x 1000 x 55^2)
        fitness = rng.choice(rng.integers(-1000, 1001, 5), pairs).astype(np.int32)
    if kind == "many":
        assume(pairs > MAX_LEVELS)
        fitness = (rng.permutation(pairs) + 1) * rng.choice([-1, 1], pairs)
        fitness = fitness.astype(np.int32)
    same(VNNI.update_matrix(w, noise, fitness, threshold),
         REF.update_matrix(w, noise, fitness, threshold))
    z = VNNI.gemm.lowrank_sum(*(np.ascontiguousarray(f.transpose(0, 2, 1))
                                for f in (noise.a, noise.b)), fitness)
    want = np.einsum("por,pir,p->oi", noise.a.astype(np.int64), noise.b.astype(np.int64),
                     fitness.astype(np.int64))
    np.testing.assert_array_equal(z, want)


@pytest.mark.skipif(VNNI_MISSING is not None, reason=str(VNNI_MISSING))
@pytest.mark.parametrize("fan_in", [4, 1024, 1027, 4099])
@pytest.mark.parametrize("sign", [1, -1])
def test_vnni_product_at_extreme_values(fan_in, sign):
    """All +-127 operands: the largest sums (x + 128 = 255 or 1 against +-127 weights, the
    compensation at its widest), across a fan-in tail."""
    for value in (127, -127):
        x = np.full((7, fan_in), value, dtype=np.int8)
        w = np.full((65, fan_in), 127 * sign, dtype=np.int8)
        got = VNNI.base_product(x, VNNI.prepare(w))
        assert (got.astype(np.int64) == value * sign * 127 * fan_in).all()


@pytest.mark.skipif(VNNI_MISSING is not None, reason=str(VNNI_MISSING))
def test_vnni_layers_run_fused_at_every_rank(monkeypatch):
    """Plain layers and ES layers at any rank take the fused path, never the separate base
    product: no silent fallback."""
    calls = []
    backend = CpuBackend(1, "vnni")
    for name in ("fused_linear", "base_product"):
        inner = getattr(backend, name)
        monkeypatch.setattr(backend, name,
                            lambda *a, _n=name, _f=inner: calls.append(_n) or _f(*a))
    rng = np.random.default_rng(0)
    x, w = int8s(rng, (4, 2, 40)), backend.prepare(int8s(rng, (70, 40)))
    for rank, want in ((None, "fused_linear"), (1, "fused_linear"), (2, "fused_linear"),
                       (5, "fused_linear")):
        noise = None if rank is None else lowrank(rng, 2, 70, 40, rank, "random", 7)
        calls.clear()
        same(backend.linear(x, w, 6, noise, 3), REF.linear(x, REF.prepare(w.w), 6, noise, 3))
        assert calls == [want]


@pytest.mark.skipif(VNNI_MISSING is not None, reason=str(VNNI_MISSING))
@pytest.mark.parametrize("activation", ["relu", "relu_sq"])
def test_vnni_layers_apply_activations_in_the_tiles(monkeypatch, activation):
    """relu, and relu^2 where the CPU has VBMI, run inside the fused layer: the elementwise
    op is never called. Without VBMI relu^2 is that op, after the layer."""
    inside = activation in EPILOGUES
    assert inside == (activation == "relu" or vbmi.HAVE_VBMI)
    calls = []
    inner = getattr(CpuElementwise, activation)
    monkeypatch.setattr(CpuElementwise, activation,
                        staticmethod(lambda y: calls.append(activation) or inner(y)))
    backend = CpuBackend(1, "vnni")
    rng = np.random.default_rng(1)
    x, w = int8s(rng, (3, 4, 96)), int8s(rng, (130, 96))
    for noise in (None, lowrank(rng, 2, 130, 96, 1, "random", 3)):
        calls.clear()
        same(backend.linear(x, backend.prepare(w), 7, noise, 3, activation=activation),
             followed(REF.linear(x, REF.prepare(w), 7, noise, 3), activation))
        assert calls == ([] if inside else [activation])


@pytest.mark.parametrize("cpu", GEMM_BACKENDS, ids=lambda b: b.gemm.name)
def test_residual_adds_to_the_saturated_output(cpu):
    """sat8(r + sat8(y)), not sat8(r + y): outputs far past +-127 against a residual of the
    other sign give 0, plain and ES, on every GEMM engine."""
    rng = np.random.default_rng(2)
    x = np.full((2, 4, 64), 127, dtype=np.int8)
    for sign in (1, -1):
        w = np.full((70, 64), 127 * sign, dtype=np.int8)
        r = np.full((2, 4, 70), -127 * sign, dtype=np.int8)
        for noise in (None, lowrank(rng, 2, 70, 64, 1, "random", 5)):
            got = cpu.linear(x, cpu.prepare(w), 4, noise, 3, residual=r)
            same(got, followed(REF.linear(x, REF.prepare(w), 4, noise, 3), residual=r))
            assert not got.any()


def test_bad_epilogues_are_refused():
    """An unknown activation, an activation and a residual at once, a residual of another
    shape or dtype than the layer's output."""
    rng = np.random.default_rng(0)
    x, w = int8s(rng, (2, 8)), CPU.prepare(int8s(rng, (6, 8)))
    with pytest.raises(ValueError, match="unknown activation"):
        CPU.linear(x, w, 4, None, 3, activation="gelu")
    with pytest.raises(ValueError, match="not both"):
        CPU.linear(x, w, 4, None, 3, activation="relu", residual=int8s(rng, (2, 6)))
    for residual in (int8s(rng, (2, 5)), int8s(rng, (2, 6)).astype(np.int16)):
        with pytest.raises(ValueError, match="residual"):
            CPU.linear(x, w, 4, None, 3, residual=residual)


def bad_layer(case: str) -> tuple[np.ndarray, LowRank | None, str, bool]:
    """An input a (64, 64) layer must refuse (x, noise of 4 pairs), what it says, and whether
    the reference raises ValueError too (it casts any dtype, and broadcasts a rank-1 B)."""
    rng = np.random.default_rng(5)
    x, noise = int8s(rng, (2, 8, 64)), lowrank(rng, 4, 64, 64, 2, "random", 1)
    a, b = noise.a, noise.b
    return {"fan_in": (x[..., :60], None, "takes int8", True),
            "fan_in_es": (x[..., :60], noise, "takes int8", True),
            "dtype": (x.astype(np.int16), None, "takes int8", False),
            "rows": (x[:, :5], noise, "whole copies", True),
            "noise_out": (x, LowRank(a[:, :60], b), "do not fit", True),
            "noise_in": (x, LowRank(a, b[:, :60]), "do not fit", True),
            "noise_rank": (x, LowRank(a, b[..., :1]), "do not fit", False),
            "noise_dtype": (x, LowRank(a.astype(np.int16), b), "do not fit", False)}[case]


@pytest.mark.parametrize("case", ["fan_in", "fan_in_es", "dtype", "rows", "noise_out",
                                  "noise_in", "noise_rank", "noise_dtype"])
@pytest.mark.parametrize("cpu", GEMM_BACKENDS, ids=lambda b: b.gemm.name)
def test_bad_layer_inputs_are_refused(cpu, case):
    """x of another fan-in or dtype, rows that are not whole copies of the noise's members,
    noise factors that do not fit the weight: ValueError before any kernel reads or writes
    past an array."""
    x, noise, match, ref_raises = bad_layer(case)
    w = int8s(np.random.default_rng(6), (64, 64))
    with pytest.raises(ValueError, match=match):
        cpu.linear(x, cpu.prepare(w), 6, noise, 3)
    if noise is None:
        with pytest.raises(ValueError, match=match):
            cpu.base_product(np.ascontiguousarray(x[0]), cpu.prepare(w))
    if ref_raises:
        with pytest.raises(ValueError):
            REF.linear(x, REF.prepare(w), 6, noise, 3)


@pytest.mark.skipif(VNNI_MISSING is not None, reason=str(VNNI_MISSING))
def test_bad_gru_scan_inputs_are_refused():
    """EGG's fused recurrence takes int8 state whose width is its weights' and whose rows are
    whole copies of the members, blocks fx, hx of the state's rows, per-token resets and
    biases as wide as the state, noise that fits the weights."""
    rng = np.random.default_rng(7)
    d, rows, tokens = 32, 8, 3
    w = VNNI.prepare(int8s(rng, (d, d)))
    noise = lowrank(rng, 4, d, d, 1, "random", 2)
    fx, hx, h, b = (int8s(rng, s) for s in ((tokens, rows, d), (tokens, rows, d), (rows, d),
                                            (d,)))

    def scan(fx=fx, hx=hx, h=h, resets=None, bf=b, noise=noise):
        return VNNI.gru_scan(fx, hx, h, resets, (w, 6, noise), (w, 6, noise), bf, b, 3)

    assert scan() is not None  # the fused kernel runs these
    wide = int8s(rng, (tokens, rows, d + 8))
    for kw, match in (({"h": h.astype(np.int16)}, "takes int8"),
                      ({"fx": fx[:, :6], "hx": hx[:, :6], "h": h[:6]}, "whole copies"),
                      ({"fx": wide, "hx": wide, "h": wide[0]}, "gru_scan of"),
                      ({"hx": hx[:2]}, "gru_scan of"),
                      ({"fx": fx.astype(np.int16)}, "gru_scan of"),
                      ({"bf": b[:16]}, "gru_scan of"),
                      ({"resets": np.zeros((tokens, rows + 2), dtype=bool)}, "gru_scan of"),
                      ({"noise": LowRank(noise.a[:, :16], noise.b)}, "do not fit")):
        with pytest.raises(ValueError, match=match):
            scan(**kw)


def test_bad_embed_and_log_likelihood_inputs_are_refused():
    """Tokens that are not whole copies of the noise's members, noise that does not fit the
    table, a table that is not (vocab, dim), logits that are not one row per target."""
    rng = np.random.default_rng(8)
    table, tokens = int8s(rng, (16, 8)), rng.integers(0, 16, 8)
    noise = lowrank(rng, 4, 16, 8, 2, "random", 3)
    for args, match, ref_raises in (
            ((table, tokens[:6], noise), "whole copies", True),
            ((table, tokens, LowRank(noise.a[:, :12], noise.b)), "do not fit", False),
            ((table, tokens, LowRank(noise.a, noise.b[:, :6])), "do not fit", True),
            ((table[None], tokens, None), r"want \(vocab, dim\)", False)):
        with pytest.raises(ValueError, match=match):
            CPU.embed(*args, 3)
        if ref_raises:
            with pytest.raises(ValueError):
                REF.embed(*args, 3)
    with pytest.raises(ValueError, match="for targets"):
        CPU.log_likelihood(int8s(rng, (6, 16)), tokens[:5])


@pytest.mark.parametrize("cpu", GEMM_BACKENDS, ids=lambda b: b.gemm.name)
def test_bad_update_inputs_are_refused(cpu):
    """Noise that does not fit the matrix or vector, fitness of another population."""
    rng = np.random.default_rng(9)
    w, v = int8s(rng, (20, 12)), int8s(rng, (12,))
    noise, vnoise = lowrank(rng, 4, 20, 12, 2, "random", 4), int8s(rng, (4, 12), bound=8)
    f = rng.integers(-15, 16, 4).astype(np.int32)
    for args, match in (((w, LowRank(noise.a[:, :16], noise.b), f), "do not fit"),
                        ((w, LowRank(noise.a, noise.b[:, :10]), f), "do not fit"),
                        ((w, noise, f[:3]), "fitness")):
        with pytest.raises(ValueError, match=match):
            cpu.update_matrix(*args, 40)
        with pytest.raises(ValueError):
            REF.update_matrix(*args, 40)
    for args, match in (((v, vnoise[:, :10], f), "for a vector"), ((v, vnoise, f[:3]), "fitness")):
        with pytest.raises(ValueError, match=match):
            cpu.update_vector(*args, 40)
        with pytest.raises(ValueError):
            REF.update_vector(*args, 40)


@pytest.mark.skipif(VNNI_MISSING is not None, reason=str(VNNI_MISSING))
@pytest.mark.parametrize(("sigma", "rank"), [(3, 1), (8, 1), (6, 3)])
def test_fused_es_on_both_sides_of_the_merged_bound(sigma, rank):
    """The widest fan-in whose merged rescale fits int32 and the next one (which goes
    through the int32 buffer and the unmerged formula), all-extreme inputs and noise. The
    outputs saturate, so a residual of either sign tells sat8(r + sat8(y)) from
    sat8(r + y)."""
    fits = [k for k in range(4, 20000, 4) if merged_rescale_fits(k, sigma, 12, rank)]
    for fan_in in (fits[-1], fits[-1] + 4):
        assert merged_rescale_fits(fan_in, sigma, 12, rank) == (fan_in == fits[-1])
        for sign in (1, -1):
            x = np.full((2, 4, fan_in), 127, dtype=np.int8)
            w = np.full((3, fan_in), 127 * sign, dtype=np.int8)
            noise = LowRank(np.full((2, 3, rank), nz.NOISE_MAX, dtype=np.int8),
                            np.full((2, fan_in, rank), -nz.NOISE_MAX * sign, dtype=np.int8))
            for after in (None, "relu", "relu_sq", "residual"):
                kw = after_layer(np.random.default_rng(fan_in), after, (2, 4, 3), "signs")
                same(VNNI.linear(x, VNNI.prepare(w), 12, noise, sigma, **kw),
                     followed(REF.linear(x, REF.prepare(w), 12, noise, sigma), **kw))


@pytest.mark.skipif(AVX2_MISSING is not None, reason=str(AVX2_MISSING))
@given(rows=st.integers(1, 100), fan_in=st.integers(1, 70), out=st.integers(1, 50),
       fill=fills, seed=seeds)
def test_avx2_product_is_exact(rows, fan_in, out, fill, seed):
    """Every tile height (1-6 rows), panels, odd fan-in and partial column blocks."""
    rng = np.random.default_rng(seed)
    x, w = int8s(rng, (rows, fan_in), fill), int8s(rng, (out, fan_in), fill)
    got = AVX2.base_product(x, AVX2.prepare(w))
    assert got.shape == (rows, out)
    assert (got == x.astype(np.int64) @ w.astype(np.int64).T).all()


@pytest.mark.skipif(AVX2_MISSING is not None, reason=str(AVX2_MISSING))
@pytest.mark.parametrize("fan_in", [1, 1041, 4099])
def test_avx2_product_at_extreme_values(fan_in):
    """All +-127 operands: every pair sum at its widest, past float32's exact K-chunk."""
    for value, sign in ((127, 1), (127, -1), (-127, 1)):
        x = np.full((7, fan_in), value, dtype=np.int8)
        w = np.full((17, fan_in), 127 * sign, dtype=np.int8)
        got = AVX2.base_product(x, AVX2.prepare(w))
        assert (got.astype(np.int64) == value * sign * 127 * fan_in).all()



@njit
def _projections(x, m0, rows, bt, bsum, xv, words):
    """project_pairs with its ``words`` made literal (the fused kernels pass a constant)."""
    if words:
        project_pairs(x, m0, m0, rows, bt, bsum, xv, True)
    else:
        project_pairs(x, m0, m0, rows, bt, bsum, xv, False)


@pytest.mark.skipif(not HAVE_VNNI, reason="this CPU has no AVX-512 VNNI")
@given(seed=seeds, pairs=st.integers(1, 30), n=st.integers(1, 300), rank=st.integers(1, 3),
       fill=fills, words=st.booleans(), data=st.data())
def test_pair_projections_are_the_shifted_dot_products(seed, pairs, n, rank, fill, words, data):
    """The fused ES panels' projections (``project_pairs``: 16, 8, 4 and 2 rows per call)
    are each row's (x . B_p[:, r]) >> 4 against its own pair's factor, negated on odd rows
    (and as int16 words (v & 255, v >> 8) where asked), at any length, rank and offset."""
    rng = np.random.default_rng(seed)
    m0 = 2 * data.draw(st.integers(0, pairs - 1), label="first pair")
    rows = 2 * data.draw(st.integers(1, pairs - m0 // 2), label="pairs projected")
    x = int8s(rng, (2 * pairs, n), fill)
    bt = int8s(rng, (pairs, rank, n), fill)
    xv = np.zeros((rank, 2 * pairs), dtype=np.int32)
    _projections(x, m0, rows, bt, factor_sums(bt), xv, words)
    members = np.arange(m0, m0 + rows)
    dots = np.einsum("mk,mrk->rm", x[members].astype(np.int64),
                     bt[members // 2].astype(np.int64)) >> 4
    want = np.where(members % 2, -dots, dots)
    if words:
        want = (want & 255) | ((want >> 8) << 16)
    assert (xv[:, members] == want).all()
    assert not xv[:, :m0].any() and not xv[:, m0 + rows:].any()

def test_vnni_is_used_where_the_cpu_has_it():
    from llvmlite import binding

    assert HAVE_VNNI == bool(binding.get_host_cpu_features().get("avx512vnni", False))
    assert (pair_dot is not pair_dot_loop) == HAVE_VNNI
    assert (quad_pair_dot is not quad_pair_dot_loop) == HAVE_VNNI


@given(seed=seeds, rows=st.integers(1, 70), fan_in=st.integers(1, 300), out=st.integers(1, 70),
       fill=fills, cpu=st.sampled_from(GEMM_BACKENDS))
def test_base_product_is_the_exact_integer_product(seed, rows, fan_in, out, fill, cpu):
    """Any batch (batch 1 of naive ES included) and any fan-in, K = 1 included."""
    rng = np.random.default_rng(seed)
    x, w = int8s(rng, (rows, fan_in), fill), int8s(rng, (out, fan_in), "random")
    want = x.astype(np.int64) @ w.T.astype(np.int64)
    np.testing.assert_array_equal(cpu.base_product(x, cpu.prepare(w)).astype(np.int64), want)


@pytest.mark.skipif(INT8_MISSING is not None, reason=str(INT8_MISSING))
@given(seed=seeds, m=st.integers(1, 40), k=st.integers(1, 600), n=st.integers(1, 40),
       transposed=st.booleans(), fill=fills)
def test_int8_matmul_of_any_view_is_exact(seed, m, k, n, transposed, fill):
    """The update's transposed factor views and every size-1 edge (torch._int_mm misreads
    size-1 strides and K = 1 on its own); all-+-127 operands at K = 600 reach 2^23."""
    rng = np.random.default_rng(seed)
    a = int8s(rng, (k, m), fill).T if transposed else int8s(rng, (m, k), fill)
    b = int8s(rng, (k, n), fill)
    got = CpuBackend(gemm="int8").gemm.matmul(a, b, "test")
    np.testing.assert_array_equal(got, a.astype(np.int64) @ b.astype(np.int64))


@pytest.mark.parametrize("fan_in", [EXACT_K, EXACT_K + 1, 2048])
@pytest.mark.parametrize("sign", [1, -1])
def test_base_product_exact_at_the_chunk_bound(fan_in, sign):
    """All-127 products: the largest partial sums, exact on both sides of EXACT_K."""
    assert EXACT_K * 127 * 127 < 2**24 <= (EXACT_K + 1) * 127 * 127
    x = np.full((2, fan_in), 127, dtype=np.int8)
    w = np.full((3, fan_in), 127 * sign, dtype=np.int8)
    chunks = F32.gemm.chunks(x, F32.gemm.prepare(w))
    total = sum(chunks[c].astype(np.int64) for c in range(len(chunks)))
    assert (total == sign * fan_in * 127 * 127).all()
    assert len(chunks) == -(-fan_in // EXACT_K)
    for cpu in GEMM_BACKENDS:
        same(cpu.linear(x, cpu.prepare(w), 15, None, 4), REF.linear(x, w, 15, None, 4))


def test_one_float32_chunk_past_the_bound_would_be_inexact():
    """Why the chunks exist: 1041 * 127^2 is odd and above 2^24, so float32 cannot hold it."""
    ones = np.full((1, EXACT_K + 1), 127, dtype=np.float32)
    assert int((ones @ ones.T)[0, 0]) != (EXACT_K + 1) * 127 * 127


def _accumulating_in(dtype):
    """A BLAS stand-in that sums in ``dtype``: what the float engines must refuse."""
    def matmul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        with np.errstate(over="ignore"):  # float16 overflows to inf: inexact all the same
            return (a.astype(dtype) @ b.astype(dtype)).astype(a.dtype)
    return matmul


def test_float_engines_refuse_a_blas_that_does_not_sum_exactly():
    """The float32 and avx2 engines' exactness rests on float BLAS summing integers exactly
    (float32 below 2^24, float64 below 2^53); one that sums in less precision is refused."""
    check_float_blas()  # numpy's own
    for lossy in (np.float16, np.float32):  # float32 sums are too short for the float64 path
        with pytest.raises(RuntimeError, match="does not sum integers exactly"):
            check_float_blas(_accumulating_in(lossy))


@given(fan_in=st.integers(1, 20000))
def test_k_chunks_cover_fan_in_within_the_bound(fan_in):
    chunks = k_chunks(fan_in)
    assert chunks[0].start == 0 and chunks[-1].stop == fan_in
    assert all(a.stop == b.start for a, b in zip(chunks, chunks[1:], strict=False))
    assert all(0 < c.stop - c.start <= EXACT_K for c in chunks)


@given(seed=seeds, pairs=st.integers(1, 5), vocab=st.integers(1, 50), dim=st.integers(1, 40),
       rank=ranks, sigma=st.integers(0, 12), t_fill=fills, n_fill=fills, noisy=st.booleans())
def test_embed(seed, pairs, vocab, dim, rank, sigma, t_fill, n_fill, noisy):
    """Every sigma shift a config allows (the rank-1 kernel's int16 shift is capped at 15)."""
    rng = np.random.default_rng(seed)
    table = int8s(rng, (vocab, dim), t_fill)
    tokens = rng.integers(0, vocab, 2 * pairs)
    noise = lowrank(rng, pairs, vocab, dim, rank, n_fill, seed) if noisy else None
    same(CPU.embed(table, tokens, noise, sigma), REF.embed(table, tokens, noise, sigma))


@given(seed=seeds, rows=st.integers(1, 9), vocab=st.integers(2, 3000), fill=fills)
def test_log_likelihood(seed, rows, vocab, fill):
    rng = np.random.default_rng(seed)
    logits = int8s(rng, (rows, vocab), fill)
    targets = rng.integers(0, vocab, rows)
    same(CPU.log_likelihood(logits, targets), REF.log_likelihood(logits, targets))


def test_log_likelihood_at_max_vocab():
    """Equal logits over 2^15 tokens: the exp2 sum reaches 2^31 and wraps in both."""
    logits = np.zeros((2, im.MAX_VOCAB), dtype=np.int8)
    logits[1, ::2] = -127
    targets = np.array([0, 1])
    same(CPU.log_likelihood(logits, targets), REF.log_likelihood(logits, targets))


@given(seed=seeds, pairs=st.integers(1, 300), rows=st.integers(1, 24), cols=st.integers(1, 24),
       rank=ranks, kind=st.sampled_from(["sign", "normalized", "extreme", "wide"]), w_fill=fills,
       n_fill=fills, threshold=st.integers(0, 40000), cpu=st.sampled_from(GEMM_BACKENDS))
def test_update_matrix(seed, pairs, rows, cols, rank, kind, w_fill, n_fill, threshold, cpu):
    """Sign, normalized and all-+-15 fitness: the last crosses float32's 2^24 bound (float32
    GEMM) and needs the hi/lo split (int8 GEMM); fitness wider than shaping makes (+-200)
    takes the int8 engine's float path."""
    rng = np.random.default_rng(seed)
    w = int8s(rng, (rows, cols), w_fill)
    noise = lowrank(rng, pairs, rows, cols, rank, n_fill, seed)
    fmax = {"sign": 1, "normalized": NORMALIZED_MAX, "extreme": NORMALIZED_MAX, "wide": 200}[kind]
    fitness = rng.integers(-fmax, fmax + 1, pairs).astype(np.int32)
    if kind == "extreme":
        fitness = np.where(fitness < 0, -fmax, fmax).astype(np.int32)
    same(cpu.update_matrix(w, noise, fitness, threshold),
         REF.update_matrix(w, noise, fitness, threshold))


@given(seed=seeds, pairs=st.integers(1, 300), size=st.integers(1, 64), fill=fills,
       threshold=st.integers(0, 3000), fmax=st.sampled_from([1, NORMALIZED_MAX, 200]),
       cpu=st.sampled_from(GEMM_BACKENDS))
def test_update_vector(seed, pairs, size, fill, threshold, fmax, cpu):
    """Sign and normalized fitness, and fitness wider than int8 (the int8 engine's int32 path)."""
    rng = np.random.default_rng(seed)
    v = int8s(rng, size, fill)
    noise = nz.vector_noise(seed, 1, np.arange(pairs), 2, size)
    fitness = rng.integers(-fmax, fmax + 1, pairs).astype(np.int32)
    same(cpu.update_vector(v, noise, fitness, threshold),
         REF.update_vector(v, noise, fitness, threshold))


@given(seed=seeds, step=seeds, first=st.integers(0, 2**20), pairs=st.integers(1, 6),
       tid=st.integers(0, 4096), rows=st.integers(1, 30), cols=st.integers(1, 30), rank=ranks)
def test_noise_source(seed, step, first, pairs, tid, rows, cols, rank):
    ids = np.arange(first, first + pairs)
    for got, want in zip(CpuNoise.lowrank_factors(seed, step, ids, tid, rows, cols, rank),
                         nz.lowrank_factors(seed, step, ids, tid, rows, cols, rank), strict=True):
        same(got, want)
    same(CpuNoise.vector_noise(seed, step, ids, tid, cols), nz.vector_noise(seed, step, ids, tid,
                                                                            cols))


@given(seed=seeds, step=seeds, first=st.integers(0, 2**20), pairs=st.integers(1, 6), rank=ranks,
       shapes=st.lists(st.tuples(st.integers(1, 30), st.integers(0, 30)), min_size=1,
                       max_size=6),
       tids=st.lists(st.integers(0, 2**32 - 1), min_size=6, max_size=6, unique=True))
def test_tensor_noises_in_one_call(seed, step, first, pairs, rank, shapes, tids):
    """The batched generator gives every tensor the bits of its own generator call, for any
    mix of low-rank (2-D) and vector (1-D: a zero second size) tensors, ids and pairs."""
    ids = np.arange(first, first + pairs)
    requests = [(tid, (rows, cols) if cols else (rows,))
                for tid, (rows, cols) in zip(tids, shapes, strict=False)]
    made = CpuNoise.tensor_noises(seed, step, ids, rank, requests)
    assert len(made) == len(requests)
    for (tid, shape), got in zip(requests, made, strict=True):
        if len(shape) == 1:
            same(got, nz.vector_noise(seed, step, ids, tid, shape[0]))
            continue
        for g, w in zip(got, nz.lowrank_factors(seed, step, ids, tid, *shape, rank),
                        strict=True):
            same(g, w)


# ---------------------------------------------------------------------------------------------
# elementwise ops: CpuElementwise vs intes.intmath


@njit
def _reciprocal_mismatches(limit, dens, lanes16):
    """Count of (n, den), |n| < limit, den in dens, where the norm's reciprocal division
    differs from truncating division: the kernel's int16 one if ``lanes16``, else the
    reciprocal's formula sign(n) ((|n| m) >> k) in int64."""
    bad = 0
    for den in dens:
        m, k = _row_reciprocal(den)
        for n in range(-limit + 1, limit):
            q = abs(n) // den
            want = -q if n < 0 else q
            if lanes16:
                got = np.int64(_div_by_reciprocal(np.int16(n), np.uint16(m),
                                                  np.uint16(k - NORM_BITS)))
            else:
                got = (abs(n) * np.int64(m)) >> np.int64(k)
                got = -got if n < 0 else got
            if got != want:
                bad += 1
    return bad


def test_norm_reciprocal_divides_exactly():
    """The norm's per-row reciprocal division, in int16 lanes, is truncating division for
    every int16 numerator (|x w| <= 2^14 in the norm) and every divisor 1..256 (mean |x| is
    at most 128); with one more bit of numerator the reciprocal itself would fail: the bound
    is tight where it matters."""
    assert _reciprocal_mismatches(1 << NORM_BITS, np.arange(1, 257), True) == 0
    assert _reciprocal_mismatches(1 << NORM_BITS, np.arange(1, 257), False) == 0
    assert _reciprocal_mismatches(1 << (NORM_BITS + 1), np.arange(1, 257), False) > 0
    for den in range(1, 257):  # what the int16 form takes: m fits uint16, k - 15 >= 0
        m, k = _row_reciprocal(den)
        assert 0 < m < 1 << 16 and NORM_BITS <= k < NORM_BITS + 16


@given(d=st.integers(1, (1 << MEAN_BITS) - 1), data=st.data())
def test_norm_row_mean_is_floor_division(d, data):
    """The norm's row mean sum // d by multiply and shift (int64) is the floor for any
    width and every sum below 2^MEAN_BITS, the extremes included."""
    m, shift = _floor_divider(d)
    picks = data.draw(st.lists(st.integers(0, (1 << MEAN_BITS) - 1), max_size=50))
    n = np.array([0, 1, d - 1, d, d + 1, 127 * d, (1 << MEAN_BITS) - 1, *picks], dtype=np.int64)
    n = n[n < (1 << MEAN_BITS)]
    same(np.right_shift(np.multiply(n, np.int64(m)), np.int64(shift)), n // d)


def test_norm_reciprocal_table_is_the_reciprocals():
    for den in range(1, 129):
        assert tuple(MEAN_RECIPROCALS[den - 1]) == _row_reciprocal(den)


@njit
def _wkv_divisions(num, den, out):
    for i in range(num.shape[0]):
        out[i] = _div_sat8(num[i], den[i])


@given(dens=st.lists(st.one_of(st.integers(1, 300), st.integers(1, 2**31 - 1)), min_size=1,
                     max_size=20),
       quotients=st.lists(st.integers(-200, 200), min_size=1, max_size=20),
       data=st.data())
def test_wkv_division_is_saturated_truncating_division(dens, quotients, data):
    """The WKV's all-integer division equals sat8(div_trunc) for every int32 numerator above
    -2^31 and divisor >= 1: numerators q den + (-1, 0, 1) around each quotient (127 and 128,
    where it saturates, included), the int32 extremes and any others."""
    den = np.array(dens, dtype=np.int64)[:, None]
    q = np.array([*quotients, 0, 1, 127, 128, -127, -128], dtype=np.int64)[None, :, None]
    num = (q * den[:, :, None] + np.array([-1, 0, 1])).reshape(len(dens), -1)
    extremes = [2**31 - 1, -(2**31 - 1), 0, 1, -1, *data.draw(
        st.lists(st.integers(-(2**31 - 1), 2**31 - 1), max_size=20))]
    num = np.concatenate([num, np.broadcast_to(extremes, (len(dens), len(extremes)))], axis=1)
    den = np.broadcast_to(den, num.shape)
    inside = np.abs(num) < 2**31
    num, den = num[inside].astype(np.int32), den[inside].astype(np.int32)
    got = np.empty(num.shape, dtype=np.int8)
    _wkv_divisions(num, den, got)
    same(got, im.sat8(im.div_trunc(num, den)))


@given(length=st.integers(0, 600), start=st.integers(0, 254),
       table=st.sampled_from([im.WKV_EXP_TABLE, im.SIGMOID_TABLE, np.arange(255)]))
def test_byte_table_lookups(length, start, table):
    """lookup_flat (64 bytes per VBMI lookup where the CPU has it, a scalar tail) and the
    loop CPUs without VBMI run give table[x + 127] for every x, at any length and offset."""
    x = np.tile(np.arange(-128, 128, dtype=np.int8), 4)[start:start + length]
    want = table[x.astype(np.int64) + 127].astype(np.uint8)  # -128: index -1, as numpy reads
    bytes_ = vbmi.byte_table(table)
    same(vbmi.lookup_flat(x, bytes_), want)
    loop = np.empty(len(x), dtype=np.uint8)
    vbmi._lookup_loop(x, loop, bytes_)
    same(loop, want)


@given(seed=seeds, vocab=st.integers(1, 700), fill=fills, offset=st.integers(0, 254))
def test_exp2_sums_are_the_table_sums(seed, vocab, fill, offset):
    """The log-likelihood's sum of EXP2_TABLE[max - z] over a row: by 64-byte VBMI lookups
    (where the CPU has them) and by the loop other CPUs run, equal to numpy's, for every
    distance 0..254 from the row's max (a row sweeping all of them from any offset)."""
    rng = np.random.default_rng(seed)
    sweep = (127 - (np.arange(offset, offset + vocab) % 255)).astype(np.int8)
    z = np.stack([sweep, int8s(rng, vocab, fill)])
    for m in range(2):
        top = np.int32(z[m].max())
        want = im.EXP2_TABLE[top - z[m].astype(np.int32)].sum(dtype=np.int32)
        assert vbmi._exp2_sum_loop(z, m, top) == want
        if vbmi.HAVE_VBMI:
            assert vbmi._exp2_sum_vbmi(z, m, top) == want


@given(length=st.integers(0, 300), start=st.integers(0, 254))
def test_sigmoid_gate_covers_every_input_pair(length, start):
    """The gate's 64-byte table lookups (VBMI where the CPU has it) and their scalar tail
    equal the reference for every (r, v) pair, in any stretch of them and at any length."""
    grid = np.arange(-128, 128, dtype=np.int8)  # -128 too, outside the int8 convention
    r, v = grid.repeat(256), np.tile(grid, 256)  # all 256 x 256 pairs
    same(CpuElementwise.sigmoid_gate(r, v), im.sigmoid_gate(r, v))
    part = slice(start * 256, start * 256 + length)
    same(CpuElementwise.sigmoid_gate(r[part], v[part]), im.sigmoid_gate(r[part], v[part]))
    loop = np.empty(length, dtype=np.int8)  # the loop CPUs without VBMI run
    vbmi._gate_loop(r[part], v[part], loop, vbmi.GATE_TABLE)
    same(loop, im.sigmoid_gate(r[part], v[part]))


@given(seed=seeds, rows=st.integers(1, 9), dim=st.integers(1, 70), shared=st.booleans(),
       fills=st.tuples(fills, fills, fills))
def test_elementwise(seed, rows, dim, shared, fills):
    """Every op on (rows, d); parameters as one shared row or one row per member."""
    rng = np.random.default_rng(seed)
    x, prev, y = (int8s(rng, (rows, dim), f) for f in fills)
    vec = int8s(rng, (1 if shared else rows, dim), fills[0])
    mu = rng.integers(0, 128, vec.shape).astype(np.int8)  # token-mix weights are in [0, 127]
    ew = CpuElementwise
    same(ew.norm(x, vec), im.norm(x, vec))
    same(ew.token_mix(x, prev, mu), im.token_mix(x, prev, mu))
    same(ew.sigmoid_gate(y, x), im.sigmoid_gate(y, x))
    same(ew.relu_sq(x), im.relu_sq(x))
    same(ew.sat_add(x, y), im.sat_add(x, y))
    same(ew.sat_add(x, y, vec), im.sat_add(x, y, vec))
    same(ew.sat_add(vec, x), im.sat_add(vec, x))
    same(ew.gru_blend(x, prev, y), im.gru_blend(x, prev, y))
    same(ew.gru_blend(np.zeros_like(x), prev, y), im.gru_blend(np.zeros_like(x), prev, y))
    same(ew.relu(x), im.relu(x))


@given(seed=seeds, tokens=st.integers(1, 8), rows=st.integers(1, 9), dim=st.integers(1, 130),
       count=st.integers(1, 3), shared=st.booleans(), fill=fills, resets=st.booleans())
def test_token_mixes_read_the_block_once(seed, tokens, rows, dim, count, shared, fill, resets):
    """A token block's mixes against its own previous tokens (first before token 0, zero
    where a row is reset), one to three of them in one pass, equal intmath's token_shift then
    token_mix, with mu shared or one row per member and any int8 value."""
    rng = np.random.default_rng(seed)
    x, first = int8s(rng, (tokens, rows, dim), fill), int8s(rng, (rows, dim))
    mus = tuple(int8s(rng, (1 if shared else rows, dim), fill) for _ in range(count))
    cleared = rng.random((tokens, rows)) < 0.3 if resets else None
    got = CpuElementwise.token_mixes(x, first, cleared, mus)
    prev = im.token_shift(x, first, cleared)
    assert len(got) == count == len(im.token_mixes(x, first, cleared, mus))
    for out, want, mu in zip(got, im.token_mixes(x, first, cleared, mus), mus, strict=True):
        same(out, want)
        same(out, im.token_mix(x, prev, mu))


def test_int16_ops_cover_every_int8_value():
    """token_mix and sat_add run in int16 lanes; every (x, prev) and (a, b) pair of int8
    values, -128 included, under every mu and every third term, equals the reference."""
    grid = np.arange(-128, 128, dtype=np.int8)
    x, prev = np.repeat(grid[:, None], 256, axis=1), np.repeat(grid[None, :], 256, axis=0)
    ew = CpuElementwise
    same(ew.sat_add(x, prev), im.sat_add(x, prev))
    for value in grid:
        row = np.full((1, 256), value, dtype=np.int8)
        same(ew.token_mix(x, prev, row), im.token_mix(x, prev, row))
        same(ew.sat_add(x, prev, row), im.sat_add(x, prev, row))


@given(seed=seeds, rows=st.integers(1, 4),
       dim=st.one_of(st.integers(1, 600), st.sampled_from([SUM16_WIDTH, SUM16_WIDTH + 1])),
       shared=st.booleans(), fill=st.sampled_from(["random", "max", "min", "signs"]),
       w_fill=st.sampled_from(["random", "max", "min", "signs"]))
def test_norm_at_any_width_and_int8_value(seed, rows, dim, shared, fill, w_fill):
    """The norm sums |x| in int16 up to SUM16_WIDTH and in int32 beyond; at any width and
    for int8 values out to -128 it equals the reference (an all -128 row at SUM16_WIDTH + 1
    would overflow an int16 sum)."""
    rng = np.random.default_rng(seed)

    def values(shape, kind):
        """Any int8: random, all 127, all -128, or random picks of the two."""
        ends = np.array([-128, 127], dtype=np.int8)
        picks = {"max": ends[1:], "min": ends[:1], "signs": ends}.get(kind)
        return (rng.integers(-128, 128, shape) if picks is None
                else rng.choice(picks, size=shape)).astype(np.int8)

    x, w = values((rows, dim), fill), values((1 if shared else rows, dim), w_fill)
    same(CpuElementwise.norm(x, w), im.norm(x, w))


@given(seed=seeds, pairs=st.integers(1, 9), dim=st.integers(1, 70), sigma=st.integers(0, 8),
       fills=st.tuples(fills, fills))
def test_member_vectors(seed, pairs, dim, sigma, fills):
    rng = np.random.default_rng(seed)
    v, noise = int8s(rng, dim, fills[0]), int8s(rng, (pairs, dim), fills[1], nz.NOISE_MAX)
    same(CpuElementwise.member_vectors(v, noise, sigma), im.member_vectors(v, noise, sigma))


@given(seed=seeds, rows=st.integers(1, 9), dim=st.integers(1, 40), shared=st.booleans(),
       fill=fills, steps=st.integers(1, 4), wide=st.booleans())
def test_wkv_step(seed, rows, dim, shared, fill, steps, wide):
    """Recurrent states from the argued ranges (|num| <= 2^23, 0 <= den <= 2^16), iterated;
    or any int32 num and non-negative den, where the reference's int64 sums wrap."""
    rng = np.random.default_rng(seed)
    num_bound, den_bound = (2**31 - 1, 2**31 - 1) if wide else (2**23, 2**16)
    num = rng.integers(-num_bound, num_bound + 1, (rows, dim)).astype(np.int32)
    den = rng.integers(0, den_bound + 1, (rows, dim)).astype(np.int32)
    decay = int8s(rng, (1 if shared else rows, dim), fill)
    n1, d1, n2, d2 = num, den, num, den
    for _ in range(steps):
        k, v = int8s(rng, (rows, dim), fill), int8s(rng, (rows, dim), fill)
        w1, n1, d1 = CpuElementwise.wkv_step(n1, d1, k, v, decay)
        w2, n2, d2 = im.wkv_step(n2, d2, k, v, decay)
        for got, want in ((w1, w2), (n1, n2), (d1, d2)):
            same(got, want)


@given(seed=seeds, tokens=st.integers(1, 5), rows=st.integers(1, 9), dim=st.integers(1, 40),
       shared=st.booleans(), fill=fills, reset_rate=st.sampled_from([0.0, 0.3, 1.0]),
       no_resets=st.booleans())
def test_token_block_ops(seed, tokens, rows, dim, shared, fill, reset_rate, no_resets):
    """wkv_scan and token_shift over a block equal intmath's, resets in any row and token
    (a block of one token with a reset outside row 0 included)."""
    rng = np.random.default_rng(seed)
    num = rng.integers(-2**23, 2**23 + 1, (rows, dim)).astype(np.int32)
    den = rng.integers(0, 2**16 + 1, (rows, dim)).astype(np.int32)
    k, v, x = (int8s(rng, (tokens, rows, dim), f) for f in (fill, "random", fill))
    decay = int8s(rng, (1 if shared else rows, dim), fill)
    first = int8s(rng, (rows, dim))
    resets = None if no_resets else rng.random((tokens, rows)) < reset_rate
    got, want = (ew.wkv_scan(num, den, k, v, decay, resets) for ew in (CpuElementwise, im))
    for a, b in zip(got, want, strict=True):
        same(a, b)
    same(CpuElementwise.token_shift(x, first, resets), im.token_shift(x, first, resets))


@pytest.mark.skipif(VNNI_MISSING is not None, reason=str(VNNI_MISSING))
@given(seed=seeds, pairs=st.integers(1, 40), dim=st.integers(1, 70), tokens=st.integers(0, 6),
       rank=st.sampled_from([None, 1, 2]), sigma=st.integers(0, 8), w_fill=fills,
       x_fill=fills, n_fill=fills, reset_rate=st.sampled_from([None, 0.3, 1.0]))
def test_gru_scan_is_the_token_loop(seed, pairs, dim, tokens, rank, sigma, w_fill, x_fill,
                                    n_fill, reset_rate):
    """EGG's recurrence over a token block in one cpu kernel call equals the reference's
    loop token by token (plain and ES, resets, extreme weights, inputs and noise), and runs
    fused wherever its layers' kernel can be called from there (plain, or ES on the tile
    kernels: fan-in a multiple of 4, merged bound): no silent fallback."""
    rng = np.random.default_rng(seed)
    rows, model = 2 * pairs, EGG(8, dim, 1)
    params = {s.name: int8s(rng, s.shape, w_fill) for s in model.specs}
    noise = None
    if rank is not None:
        noise = make_noise(model.specs, seed, 1, np.arange(pairs), rank)
        for name, e in noise.items():
            if n_fill != "random" and isinstance(e, LowRank):
                noise[name] = lowrank(rng, pairs, e.a.shape[1], e.b.shape[1], rank, n_fill, 0)
    fx, hx = (int8s(rng, (tokens, rows, dim), x_fill) for _ in range(2))
    h = int8s(rng, (rows, dim), x_fill)
    resets = None if reset_rate is None else rng.random((tokens, rows)) < reset_rate
    ops = {b: Ops(b, model.specs, params, noise, sigma) for b in (VNNI, REF)}
    got, want = (gru_scan(ops[b], "blocks.0.", fx, hx, h, resets) for b in (VNNI, REF))
    for a, b in zip(got, want, strict=True):
        same(a, b)
    o = ops[VNNI]
    fused = VNNI.gru_scan(fx, hx, h, resets, o.layer("blocks.0.gru.uf"),
                          o.layer("blocks.0.gru.uh"), o.vec("blocks.0.gru.bf"),
                          o.vec("blocks.0.gru.bh"), sigma) is not None
    shift = next(s.shift for s in model.specs if s.name == "blocks.0.gru.uf")
    assert fused == (rank is None or (dim % 4 == 0
                                      and merged_rescale_fits(dim, sigma, shift, rank)))


# ---------------------------------------------------------------------------------------------
# whole ES steps


@given(seed=st.integers(0, 2**31), model=st.sampled_from(["rwkv", "egg"]),
       pairs=st.integers(1, 6), rank=ranks, sigma=st.integers(2, 6),
       fitness=st.sampled_from(["sign", "normalized"]), data=st.data())
def test_es_steps_match_reference(seed, model, pairs, rank, sigma, fitness, data):
    """Same fitness, inference scores and, after 2 steps, weights as the reference (which goes
    token by token), for any chunking, any number of threads evaluating the chunks
    concurrently and any token block, document resets (token 0) included."""
    seq_len = data.draw(st.integers(1, 12), label="seq_len")
    cfg = TrainConfig(model=ModelConfig(kind=model, vocab_size=32, dim=16, layers=2),
                      es=ESConfig(population=2 * pairs, group_size=2, rank=rank, sigma_shift=sigma,
                                  fitness=fitness, alpha_steps=2),
                      seq_len=seq_len, seed=seed)
    threads = data.draw(st.integers(1, 3), label="threads")
    gemm = data.draw(st.sampled_from([b.gemm.name for b in GEMM_BACKENDS]), label="gemm")
    block = data.draw(st.integers(1, 6), label="token_block")
    cpu = Engine(cfg, backend=CpuBackend(threads, gemm, block))
    ref = Engine(cfg, backend="reference")
    rng = np.random.default_rng(seed)
    for _ in range(2):
        windows = rng.integers(0, 32, (2 * pairs, cfg.seq_len + 1)).astype(np.int32)
        chunk = data.draw(st.none() | st.integers(1, pairs), label="chunk_pairs")
        same(cpu.log_likelihood(windows), ref.log_likelihood(windows))
        same(cpu.step(windows, chunk_pairs=chunk), ref.step(windows))
    for name in ref.params:
        same(cpu.params[name], ref.params[name])


@pytest.mark.parametrize(("env", "want"), [({}, 8), ({"INTES_CPU_THREADS": "3"}, 3),
                                           ({"INTES_CPU_THREADS": "3", "LOCAL_WORLD_SIZE": "4"}, 3),
                                           ({"LOCAL_WORLD_SIZE": "4"}, 2),
                                           ({"LOCAL_WORLD_SIZE": "3"}, 2),
                                           ({"LOCAL_WORLD_SIZE": "64"}, 1),
                                           ({"LOCAL_WORLD_SIZE": "x"}, 8),
                                           ({"LOCAL_WORLD_SIZE": "\u00b2"}, 8),
                                           ({"LOCAL_WORLD_SIZE": "0"}, 8)])
def test_default_threads_follow_the_environment(monkeypatch, env, want):
    """An explicit count wins; torchrun's local workers share the usable cores (8 here), at
    least one each; a LOCAL_WORLD_SIZE that is not a positive count is ignored."""
    monkeypatch.setattr("intes.kernels.cpu.usable_cores", lambda: 8)
    for name in ("INTES_CPU_THREADS", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert CpuBackend().threads == want


@pytest.mark.parametrize("value", ["0", "two", "-1", "\u00b2"])  # "²" passes str.isdigit
@pytest.mark.parametrize("name", ["INTES_CPU_THREADS", "INTES_CPU_TOKEN_BLOCK"])
def test_bad_thread_count_or_token_block_is_a_config_error(monkeypatch, name, value):
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError, match=f"{name} must be a positive integer"):
        CpuBackend()


def test_zero_threads_or_token_block_is_refused_not_auto():
    """None asks for the default; an explicit 0 is an error, not a request for it."""
    with pytest.raises(ConfigError, match="threads must be >= 1"):
        CpuBackend(0)
    with pytest.raises(ConfigError, match="token block must be >= 1"):
        CpuBackend(1, token_block=0)


def test_token_block_rule_and_overrides(monkeypatch):
    """By default a tiny batch runs SMALL_BATCH_BLOCK tokens at once, small slices blocks of
    TOKEN_BLOCK tokens and large ones token by token; the fused VNNI engine blocks tokens at
    any size, FUSED_BLOCK of them where one block's activation fits FUSED_BLOCK_BYTES; the
    environment and the constructor fix it; a bad value is a config error."""
    monkeypatch.delenv("INTES_CPU_TOKEN_BLOCK", raising=False)
    for gemm in ("float32", *(["vnni"] if VNNI is not None else [])):
        small = CpuBackend(1, gemm)
        assert small.token_block(1, 256) == SMALL_BATCH_BLOCK
        assert small.token_block(SMALL_BATCH_BYTES // 256, 256) == SMALL_BATCH_BLOCK
        assert small.token_block(SMALL_BATCH_BYTES // 256 + 1, 256) < SMALL_BATCH_BLOCK
    auto = CpuBackend(1, "float32")
    assert auto.token_block(BLOCK_ROWS, 256) == TOKEN_BLOCK
    assert auto.token_block(BLOCK_ROWS + 2, 256) == 1
    if VNNI is not None:
        fused = CpuBackend(1, "vnni")
        assert fused.token_block(BLOCK_ROWS * 8, 256) == TOKEN_BLOCK
        rows = FUSED_BLOCK_BYTES // (FUSED_BLOCK * 256)
        assert fused.token_block(rows, 256) == FUSED_BLOCK
        assert fused.token_block(rows + 2, 256) == TOKEN_BLOCK
    assert CpuBackend(1, token_block=3).token_block(10**6, 256) == 3
    monkeypatch.setenv("INTES_CPU_TOKEN_BLOCK", "6")
    assert CpuBackend(1).token_block(2, 8) == 6
    monkeypatch.setenv("INTES_CPU_TOKEN_BLOCK", "0")
    with pytest.raises(ConfigError, match="INTES_CPU_TOKEN_BLOCK"):
        CpuBackend(1)


def test_default_gemm_is_the_fastest_that_runs(monkeypatch):
    """vnni where the CPU has it, else int8 where torch runs it and the CPU has an int8 dot
    product instruction, else avx2 where the CPU has AVX2, else float32; an explicit engine
    that cannot run is an error, not a fallback."""
    monkeypatch.delenv("INTES_CPU_GEMM", raising=False)
    int8_fast = INT8_MISSING is None and int8_dot_instructions()
    fallback = "avx2" if AVX2_MISSING is None else "float32"
    want = "vnni" if VNNI_MISSING is None else ("int8" if int8_fast else fallback)
    assert make_gemm().name == want
    if VNNI_MISSING is not None:
        with pytest.raises(ConfigError, match="vnni"):
            make_gemm("vnni")
    monkeypatch.setenv("INTES_CPU_GEMM", "float32")
    assert CpuBackend().gemm.name == "float32"


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_glibc_accepts_the_fixed_malloc_thresholds():
    assert keep_freed_memory() is True


def test_unknown_gemm_is_a_config_error():
    with pytest.raises(ConfigError, match="unknown cpu GEMM"):
        CpuBackend(gemm="int4")


@pytest.mark.parametrize("cuda", [None, "cuda backend unavailable: no CUDA GPU"])
def test_auto_picks_cpu_with_or_without_a_gpu(monkeypatch, cuda):
    """The cpu backend outran the cuda backend through the Engine (AUTO_ORDER's comment)."""
    status = {**available(), "cuda": cuda}
    monkeypatch.setattr(kernels, "available", lambda: status)
    assert kernels.resolve("auto") == "cpu"
    status["cpu"] = "cpu backend unavailable: no numba"
    assert kernels.resolve("auto") == ("cuda" if cuda is None else "reference")


def test_gemm_summary_names_the_engine_intes_cpu_gemm_asks_for(monkeypatch):
    monkeypatch.setenv("INTES_CPU_GEMM", "float32")
    assert f"INTES_CPU_GEMM=float32: {F32.gemm.description}" in gemm_summary()
    monkeypatch.setenv("INTES_CPU_GEMM", "bogus")
    assert "INTES_CPU_GEMM='bogus' makes the cpu backend fail" in gemm_summary()


@given(seed=seeds, pairs=st.integers(1, 80), rank=ranks, spread=st.integers(1, 40))
def test_level_plan_groups_pairs_by_magnitude(seed, pairs, rank, spread):
    """Every k = p r + r' with f_p != 0 sits once in the level of its |f|, signed as f_p;
    each level is whole groups of 4 with zero padding; past MAX_LEVELS there is no plan.
    The cached plan is read-only."""
    rng = np.random.default_rng(seed)
    fitness = rng.integers(-spread, spread + 1, pairs).astype(np.int32)
    plan = level_plan(fitness.tobytes(), rank)
    distinct = len(np.unique(np.abs(fitness[fitness != 0])))
    if distinct > MAX_LEVELS:
        assert plan is None
        return
    slots, levels = plan
    assert not slots.flags.writeable and not levels.flags.writeable
    assert len(slots) % 4 == 0 and len(levels) == distinct
    assert len(slots) == 4 * (levels[-1, 0] if len(levels) else 0)
    start = 0
    for end, v in levels:
        assert end > start
        level = slots[4 * start:4 * end]
        k = np.abs(level[level != 0]) - 1
        assert (np.abs(fitness[k // rank]) == v).all()
        assert (np.sign(level[level != 0]) == np.sign(fitness[k // rank])).all()
        assert np.count_nonzero(level == 0) < 4
        start = end
    k = np.sort(np.abs(slots[slots != 0]) - 1)
    want = np.flatnonzero(np.repeat(fitness != 0, rank))
    np.testing.assert_array_equal(k, want)


@pytest.mark.skipif(VNNI_MISSING is not None, reason=str(VNNI_MISSING))
def test_es_plans_follow_the_noise_and_shifts():
    """One prepared weight serves many noise objects (more than the plans it keeps), the same
    noise again, and other shifts: every call matches the reference, so a kept plan is never
    used for noise or shifts it was not made for."""
    rng = np.random.default_rng(3)
    x, w = int8s(rng, (4, 6, 40)), int8s(rng, (70, 40))
    prepared = VNNI.prepare(w)
    noises = [lowrank(rng, 3, 70, 40, 1 + i % 2, "random", i) for i in range(ES_PLANS + 6)]
    for noise in [*noises, noises[0], noises[-1]]:
        for shift, sigma in ((6, 3), (6, 4), (9, 3)):
            same(VNNI.linear(x, prepared, shift, noise, sigma),
                 REF.linear(x, REF.prepare(w), shift, noise, sigma))
    assert 0 < len(prepared.es_plans) <= ES_PLANS
