"""Exact integer GEMMs for the cpu backend's shared base product X (N, in) @ W^T (in, out).

Four engines, the same bits (every product of int8 values is summed exactly):

- ``VnniGemm``: this package's own AVX-512 VNNI kernel (``intes.kernels.vnni_gemm``). Its
  product is no faster than a library's; its point is that the cpu backend fuses each
  layer's ES projection, correction and rescale into it, panel by panel in cache, and the
  update's Z and step likewise. The default where the CPU has VNNI; needs no torch.
- ``Int8Gemm``: int8 x int8 -> int32 through ``torch._int_mm`` (oneDNN; VNNI dot-product
  instructions where the CPU has them). Exact by construction: int32 holds any sum of up to
  2^31 / 127^2 = 133,144 products, far past any layer width here. Fast only where the CPU
  has a VNNI dot-product instruction: it ran 5-7x the float32 BLAS GEMM of the same shapes
  on an AVX-512 VNNI machine, and at 4% of it (5.7 Gop/s against 128 Gflop/s) on an
  AVX2-only Zen 3. The default without AVX-512 VNNI where the CPU has AVX-VNNI or AMX and
  torch is installed.
- ``Avx2Gemm``: this package's own AVX2 kernel (``intes.kernels.avx2_gemm``): int16 pairs by
  vpmaddwd, exact for int8 operands at any fan-in below 133,000. It ran 1.6-1.8x the float32
  BLAS GEMM of the same shapes on one core of an AVX2-only Zen 3; the default on AVX2 CPUs
  without AVX-512 VNNI where the int8 engine cannot run (no int8 dot-product instruction, or
  no torch).
- ``Float32Gemm``: a float32 BLAS GEMM, exact while every partial sum is an integer below 2^24
  (``EXACT_K``); larger fan-in is split into exact K-chunks summed in int32. Needs only numpy.

Each engine also computes the update's Z = sum_p f_p A_p B_p^T = (A^T diag(f)) B exactly, as
one matrix product per tensor (``lowrank_sum``), and its vector form (``vector_sum``).

All keep BLAS (and torch's intra-op pool) at one thread: the cpu backend uses the cores one
level up, one population slice per thread (see ``intes.kernels.cpu``).
"""

from __future__ import annotations

import ctypes
import functools
import os
import threading
from collections.abc import Callable
from typing import Any

import numpy as np
from llvmlite import binding as llvm
from numba import njit

from intes.errors import ConfigError
from intes.intmath import INT8_MAX
from intes.kernels.avx2_gemm import PANEL_ROWS as AVX2_PANEL_ROWS
from intes.kernels.avx2_gemm import Avx2Weight, avx2_unavailable
from intes.kernels.avx2_gemm import pack as avx2_pack
from intes.kernels.avx2_gemm import product_into as avx2_product_into
from intes.kernels.vnni_gemm import BLOCK_COLS, VnniWeight, level_sum, vnni_unavailable
from intes.kernels.vnni_gemm import pack as vnni_pack
from intes.kernels.vnni_gemm import product as vnni_product
from intes.noise import NOISE_MAX

# float32 represents every integer of magnitude <= 2^24 exactly, and a GEMM's partial sums
# are sums of subsets of the K products, each |x_i w_i| <= 127 * 127. So a K-chunk is exact
# whatever order BLAS adds in (FMA included) while K * 127^2 < 2^24: 1040 * 16129 =
# 16,774,160 < 16,777,216, and 1041 * 16129 is not.
EXACT_K = 1040
F32_EXACT = 1 << 24
# f_p A_p split as 32 hi + lo: |f A| <= 15 * 55 = 825 gives hi in [-26, 25], lo in [0, 31]
_LO_BITS = 5  # Int8Gemm's update: f A = 2^_LO_BITS H + L
_LO_MASK = np.int32((1 << _LO_BITS) - 1)
_BYTE = np.int32(255)
GEMMS = ("auto", "vnni", "int8", "avx2", "float32")
_SCRATCH_LIMIT = 64  # distinct scratch shapes kept per thread before the cache is dropped
_BLAS_SETTERS = ("openblas_set_num_threads", "scipy_openblas_set_num_threads64_",
                 "openblas_set_num_threads64_", "scipy_openblas_set_num_threads")


def _blas_libraries() -> list[str]:
    """Paths of the OpenBLAS libraries loaded in this process (numpy's, usually one)."""
    try:
        with open("/proc/self/maps") as maps:
            return sorted({line.split()[-1] for line in maps if "openblas" in line.lower()})
    except OSError:
        return []


def pin_blas_threads(threads: int = 1) -> None:
    """Set the loaded OpenBLAS's thread count (process-wide: BLAS has no other setting).

    numpy exposes no BLAS thread control, so this calls OpenBLAS's own setter, as threadpoolctl
    does; with another BLAS nothing changes.
    """
    for path in _blas_libraries():
        lib = ctypes.CDLL(path)
        setter = next((getattr(lib, n) for n in _BLAS_SETTERS if hasattr(lib, n)), None)
        if setter is not None:
            setter(ctypes.c_int(threads))


@functools.cache
def k_chunks(fan_in: int) -> tuple[slice, ...]:
    """Equal K-chunks of at most EXACT_K columns (equal sizes keep every GEMM well shaped)."""
    count = -(-fan_in // EXACT_K)
    edges = [(fan_in * c) // count for c in range(count + 1)]
    return tuple(slice(lo, hi) for lo, hi in zip(edges[:-1], edges[1:], strict=True))


class Scratch:
    """Per-thread buffers reused across tokens, so per-token products allocate nothing.

    A buffer's contents live until the next request with the same key: the caller consumes
    them (the linear epilogue) before its next product.
    """

    def __init__(self) -> None:
        self._local = threading.local()

    def get(self, key: str, shape: tuple[int, ...], make) -> Any:
        cache = self._local.__dict__.setdefault("buffers", {})
        if (key, shape) not in cache:
            if len(cache) >= _SCRATCH_LIMIT:
                cache.clear()
            cache[key, shape] = make(shape)
        return cache[key, shape]


@njit(nogil=True, cache=True)
def _sum_chunks(base, out):
    """out = sum over K-chunks of base (chunks, N, out), each chunk exact, summed in int32."""
    for m in range(out.shape[0]):
        for o in range(out.shape[1]):
            out[m, o] = np.int32(base[0, m, o])
        for c in range(1, base.shape[0]):
            for o in range(out.shape[1]):
                out[m, o] = np.add(out[m, o], np.int32(base[c, m, o]))


@njit(nogil=True, cache=True)
def _scale(at, fitness, v):
    """v[p, r', o] = f_p at[p, r', o] as int8 (the caller checks |f| NOISE_MAX <= 127)."""
    for p in range(at.shape[0]):
        f = np.int32(fitness[p])
        for r in range(at.shape[1]):
            for o in range(at.shape[2]):
                v[p, r, o] = np.int8(f * np.int32(at[p, r, o]))


@njit(nogil=True, cache=True)
def _scale_split(at, fitness, hi, lo):
    """f_p at[p, r', o] = 32 hi[p, r', o] + lo[p, r', o], lo in [0, 31], in one pass."""
    for p in range(at.shape[0]):
        f = np.int32(fitness[p])
        for r in range(at.shape[1]):
            for o in range(at.shape[2]):
                v = f * np.int32(at[p, r, o])
                hi[p, r, o] = np.int8(v >> _LO_BITS)
                lo[p, r, o] = np.int8(v & _LO_MASK)


@njit(nogil=True, cache=True)
def _shift_add(hi, lo, out):
    """out = 32 hi + lo in int32 (wrapping like numpy)."""
    for i in range(out.shape[0]):
        for j in range(out.shape[1]):
            out[i, j] = np.add(np.left_shift(hi[i, j], np.int32(_LO_BITS)), lo[i, j])


@njit(nogil=True, cache=True)
def _vector_sum(fitness, noise, out):
    """out = sum_p f_p noise[p] in int32 (wrapping like numpy's int32 matmul)."""
    out[:] = 0
    for p in range(noise.shape[0]):
        f = np.int32(fitness[p])
        for j in range(noise.shape[1]):
            out[j] = np.add(out[j], np.multiply(f, np.int32(noise[p, j])))


def vector_sum(fitness: np.ndarray, noise: np.ndarray) -> np.ndarray:
    """sum_p f_p e_p of int32 fitness (P,) and int8 noise (P, n), in int32: a loop that
    vectorizes (numpy's int32 matmul has no BLAS behind it and ran 50x slower)."""
    out = np.empty(noise.shape[1], dtype=np.int32)
    _vector_sum(np.ascontiguousarray(fitness, dtype=np.int32), np.ascontiguousarray(noise), out)
    return out


def float_lowrank_sum(at: np.ndarray, bt: np.ndarray, fitness: np.ndarray) -> np.ndarray:
    """Z from factor-major at (P, r, out), bt (P, r, in) as ONE float GEMM, exact.

    Every partial sum is a sum of terms f_p a b with |a|, |b| <= NOISE_MAX, so its magnitude
    is at most sum|f_p| * r * NOISE_MAX^2: float32 is exact below 2^24, float64 below 2^53
    (ESConfig.validate keeps it below 2^31).
    """
    pairs, rank, rows = at.shape
    bound = int(np.abs(fitness.astype(np.int64)).sum()) * rank * NOISE_MAX**2
    dtype = np.float32 if bound < F32_EXACT else np.float64
    af = np.multiply(at, fitness.astype(dtype)[:, None, None], dtype=dtype)
    return af.reshape(pairs * rank, rows).T @ bt.reshape(pairs * rank, -1).astype(dtype)


def check_float_blas(matmul: Callable[[np.ndarray, np.ndarray], np.ndarray] = np.matmul
                     ) -> None:
    """RuntimeError unless float BLAS sums int8 products exactly up to the bounds the float
    paths rely on (float32 up to 2^24, float64 well past the update's 2^31): any IEEE BLAS
    does, in any summation order, but one that accumulates in reduced precision would not,
    and the engines' exactness rests on it. About a millisecond, once per engine."""
    for dtype, k, top in ((np.float32, EXACT_K, 127), (np.float64, 1 << 16, 127 << 12)):
        x = np.full((3, k), 127, dtype=dtype)
        w = np.full((k, 2), top, dtype=dtype)
        x[:, -1] = w[-1] = 1  # the least significant bit counts too
        want = (k - 1) * 127 * top + 1
        if not np.array_equal(matmul(x, w), np.full((3, 2), want, dtype=dtype)):
            raise RuntimeError(f"numpy's {np.dtype(dtype).name} BLAS does not sum integers "
                               "exactly; the float32 and avx2 engines need it to")


class FloatUpdate:
    """The update's sums for engines without an int8 product of their own to make them
    with: Z by ``float_lowrank_sum`` (exact), vectors by ``vector_sum``."""

    def lowrank_sum(self, at: np.ndarray, bt: np.ndarray, fitness: np.ndarray) -> np.ndarray:
        return float_lowrank_sum(at, bt, fitness)

    def vector_sum(self, fitness: np.ndarray, noise: np.ndarray) -> np.ndarray:
        return vector_sum(fitness, noise)


class Float32Gemm(FloatUpdate):
    """X @ W^T as float32 BLAS GEMMs over exact K-chunks (see ``EXACT_K``)."""

    name = "float32"
    description = "float32 BLAS GEMM, exact K-chunks (numpy)"

    def __init__(self) -> None:
        pin_blas_threads(1)
        check_float_blas()
        self._scratch = Scratch()

    def prepare(self, w: np.ndarray) -> np.ndarray:
        """The float32 transpose (in, out), C-contiguous, so X @ wt is a plain GEMM."""
        return np.ascontiguousarray(w.T, dtype=np.float32)

    def chunks(self, x: np.ndarray, wt: np.ndarray) -> np.ndarray:
        """(chunks, N, out) float32 exact partial products X[:, chunk] @ W^T[chunk]."""
        rows, fan_in = x.shape
        if fan_in != wt.shape[0]:  # the chunks would slice a prefix of W
            raise ValueError(f"x has {fan_in} columns, W {wt.shape[0]}")
        xf = self._scratch.get("x", x.shape, lambda s: np.empty(s, np.float32))
        np.copyto(xf, x)
        chunks = k_chunks(fan_in)
        base = self._scratch.get("base", (len(chunks), rows, wt.shape[1]),
                                 lambda s: np.empty(s, np.float32))
        for c, ks in enumerate(chunks):
            np.matmul(xf[:, ks], wt[ks], out=base[c])
        return base

    def product(self, x: np.ndarray, wt: np.ndarray) -> np.ndarray:
        """(N, out) exact X @ W^T: float32 for one chunk, else the chunks summed in int32."""
        base = self.chunks(x, wt)
        if len(base) == 1:
            return base[0]
        acc = self._scratch.get("sum", base.shape[1:], lambda s: np.empty(s, np.int32))
        _sum_chunks(base, acc)
        return acc


class Avx2Gemm(FloatUpdate):
    """X @ W^T by this package's own AVX2 kernel (``intes.kernels.avx2_gemm``); the update's
    Z through float BLAS (``float_lowrank_sum``: about 1% of a step). Needs no torch."""

    name = "avx2"
    description = "int16-pair AVX2 GEMM (numba, vpmaddwd)"

    def __init__(self) -> None:
        reason = avx2_unavailable()
        if reason is not None:
            raise RuntimeError(reason)
        pin_blas_threads(1)
        check_float_blas()
        self._scratch = Scratch()

    def prepare(self, w: np.ndarray) -> Avx2Weight:
        return avx2_pack(w)

    def product(self, x: np.ndarray, wt: Avx2Weight) -> np.ndarray:
        """(N, out) exact int32 X @ W^T, written into a per-thread buffer."""
        out = self._scratch.get("acc", (x.shape[0], wt.out_dim), lambda s: np.empty(s, np.int32))
        panel = self._scratch.get("panel", (AVX2_PANEL_ROWS, 2 * wt.packed.shape[1]),
                                  lambda s: np.empty(s, np.int16))
        avx2_product_into(np.ascontiguousarray(x, dtype=np.int8), wt, panel, out)
        return out


class Int8Gemm:
    """X @ W^T as one int8 x int8 -> int32 GEMM (``torch._int_mm``), exact by construction.

    Every thread that runs a GEMM sets torch's intra-op threads to one for itself (see
    ``matmul``); torch code run later on those threads inherits that.
    """

    name = "int8"
    description = "int8 GEMM with int32 accumulation (torch._int_mm, oneDNN)"

    def __init__(self) -> None:
        import torch  # ImportError when torch is missing: ``make_gemm`` says so

        self._torch = torch
        self._pinned = threading.local()
        pin_blas_threads(1)
        self._scratch = Scratch()
        probe = torch.full((17, 32), 127, dtype=torch.int8)
        if not bool((torch._int_mm(probe, -probe.t()) == -32 * 127**2).all()):
            raise RuntimeError("torch._int_mm gave a wrong int8 product")

    def prepare(self, w: np.ndarray) -> Any:
        """W (out, in) as an int8 tensor, passed transposed: oneDNN's preferred layout. A
        read-only W (an Engine's ``params``) is copied, as torch expects writable memory."""
        w = np.ascontiguousarray(w, dtype=np.int8)
        return self._torch.from_numpy(w if w.flags.writeable else w.copy()).t()

    def product(self, x: np.ndarray, wt: Any) -> np.ndarray:
        """(N, out) int32 X @ W^T, written into a per-thread buffer (numpy view of it)."""
        return self.matmul(x, wt, "acc")

    def matmul(self, a: np.ndarray, b: Any, key: str) -> np.ndarray:
        """int32 a @ b of int8 a (M, K) and b (K, N), numpy arrays or tensors, into the
        per-thread buffer ``key``; its contents live until the next call with that key.

        ``a`` may be a transposed view: oneDNN reads it as it is. torch._int_mm (2.13) trusts
        the strides of size-1 dimensions, which numpy and torch leave arbitrary, and misreads
        such views: those are copied into canonical row-major strides first.
        """
        torch = self._torch
        if not getattr(self._pinned, "done", False):
            # oneDNN sizes its OpenMP team from the calling thread's own setting, which a new
            # thread starts at all cores: with one population slice per core, each GEMM
            # would spin up a team per slice and the teams would fight for the cores.
            torch.set_num_threads(1)
            self._pinned.done = True
        a, b = (torch.from_numpy(t) if isinstance(t, np.ndarray) else t for t in (a, b))
        if a.shape[1] == 1:  # torch._int_mm leaves its output unwritten at K = 1 (torch 2.13)
            return a.numpy().astype(np.int32) @ b.numpy().astype(np.int32)
        out = self._scratch.get(key, (a.shape[0], b.shape[1]),
                                lambda s: torch.empty(s, dtype=torch.int32))
        if 1 in a.shape:
            a = torch.empty(a.shape, dtype=torch.int8).copy_(a)
        torch._int_mm(a, b, out=out)
        return out.numpy()

    def lowrank_sum(self, at: np.ndarray, bt: np.ndarray, fitness: np.ndarray) -> np.ndarray:
        """Z as int8 GEMMs with int32 accumulation, exact.

        V = diag(f) A is int8 when max|f| * NOISE_MAX <= 127 (sign fitness): one GEMM.
        Otherwise V = 32 H + L with H, L int8 and Z = 32 (H^T B) + L^T B: two. Each GEMM's
        sums stay below sum_p r * 127 * NOISE_MAX, far inside int32 for any population
        ESConfig.validate allows, and the final int32 shift-and-add wraps like the reference
        (mod 2^32), whose |Z| < 2^31. Fitness wider than any shaping makes (|V| could reach
        127 * 32) takes the float path.

        H and L (or V) are made in one pass and handed to oneDNN as transposed views (writing
        them transposed costs more than the GEMM gains from it).
        """
        pairs, rank, rows = at.shape
        widest = int(np.abs(fitness).max(initial=0)) * NOISE_MAX
        if widest >= INT8_MAX << _LO_BITS:
            return float_lowrank_sum(at, bt, fitness)
        b = bt.reshape(pairs * rank, -1)
        f32 = np.ascontiguousarray(fitness, dtype=np.int32)
        if widest <= INT8_MAX:
            v = np.empty(at.shape, dtype=np.int8)
            _scale(at, f32, v)
            return self.matmul(v.reshape(pairs * rank, rows).T, b, "z").copy()
        hi, lo = np.empty(at.shape, dtype=np.int8), np.empty(at.shape, dtype=np.int8)
        _scale_split(at, f32, hi, lo)
        z = self.matmul(hi.reshape(pairs * rank, rows).T, b, "z_hi")
        out = np.empty(z.shape, dtype=np.int32)
        _shift_add(z, self.matmul(lo.reshape(pairs * rank, rows).T, b, "z_lo"), out)
        return out

    def vector_sum(self, fitness: np.ndarray, noise: np.ndarray) -> np.ndarray:
        """sum_p f_p e_p as a (1, P) @ (P, n) int8 GEMM: shaped |f| <= 15 fits int8."""
        if int(np.abs(fitness).max(initial=0)) > INT8_MAX:
            return vector_sum(fitness, noise)
        return self.matmul(fitness.astype(np.int8)[None, :], noise, "zv")[0]


@njit(inline="always", cache=True)
def _word(b0, b1, b2, b3):
    """The int32 whose little-endian bytes are b0 .. b3 (each taken mod 256)."""
    return np.bitwise_or(np.bitwise_or(np.bitwise_and(b0, _BYTE), np.left_shift(
        np.bitwise_and(b1, _BYTE), np.int32(8))), np.bitwise_or(np.left_shift(
            np.bitwise_and(b2, _BYTE), np.int32(16)), np.left_shift(b3, np.int32(24))))


MAX_LEVELS = 32  # distinct |f| the VNNI update groups pairs by; wider fitness: the float path


@functools.lru_cache(maxsize=8)
def level_plan(fitness: bytes, rank: int) -> tuple[np.ndarray, np.ndarray] | None:
    """How the VNNI update orders the k = p r + r' of Z = sum_k f_k a_k b_k^T: pairs grouped
    by |f| (zero left out), each level padded to whole groups of 4 k. Made once per step
    (cached on the fitness bytes) and shared by every tensor.

    Returns (slots, levels): slots[s] = sign(f) (k + 1) of the k in slot s, 0 for padding;
    levels (L, 2) int32 = (end group, |f|) per level, as ``_tile_levels`` reads them. None
    past MAX_LEVELS distinct |f|. Both read-only, as the cache shares them.
    """
    f = np.frombuffer(fitness, dtype=np.int32).astype(np.int64)
    mags = np.abs(f)
    live = np.flatnonzero(mags)
    order = live[np.argsort(-mags[live], kind="stable")]  # by |f| descending, then pair
    values, counts = np.unique(-mags[order], return_counts=True)
    if len(values) > MAX_LEVELS:
        return None
    sizes = counts * rank
    padded = sizes + (-sizes % 4)
    ends = np.cumsum(padded)
    firsts = np.cumsum(counts) - counts  # each level's first index in ``order``
    level = np.repeat(np.arange(len(counts)), counts)
    start = ends[level] - padded[level] + (np.arange(len(order)) - firsts[level]) * rank
    slots = np.zeros(int(ends[-1]) if len(ends) else 0, dtype=np.int64)
    for r in range(rank):  # k = p r + r', stored as sign(f_p) (k + 1)
        slots[start + r] = np.sign(f[order]) * (order * rank + r + 1)
    levels = np.stack([ends // 4, -values], axis=1).astype(np.int32)  # (L, 2), L may be 0
    slots.flags.writeable = levels.flags.writeable = False
    return slots, levels


@njit(nogil=True, cache=True)
def _level_operands(at, bt, slots, levels, words, packed, comp):
    """The VNNI update's operands in ``level_plan`` order: words[g, o] holds the 4 bytes
    sign(f_k) A[k, o] of slots 4 g .. 4 g + 3, so words viewed as int8 (G, rows, 4) is the
    grouped V^T; packed (as int32 words, (blocks, G, 64)) holds B[k] in vpdpbusd's layout,
    zero past the width and in padding; comp[block, c] = -128 sum_s |f_s| B[k_s, 64 block + c],
    the x + 128 compensation summed over the levels as ``_tile_levels`` adds them (int32,
    wrapping like its sums). Word lanes vectorize where byte stores would not."""
    a = at.reshape(at.shape[0] * at.shape[1], at.shape[2])
    b = bt.reshape(bt.shape[0] * bt.shape[1], bt.shape[2])
    cols = b.shape[1]
    k = np.zeros(4, dtype=np.int64)
    sign = np.zeros(4, dtype=np.int32)
    total = np.zeros((packed.shape[0], BLOCK_COLS), dtype=np.int32)
    packed[:] = 0
    level = 0
    for g in range(words.shape[0]):
        while g >= levels[level, 0]:
            level += 1
        v = levels[level, 1]  # the group's |f|
        for i in range(4):
            s = slots[4 * g + i]
            k[i] = abs(s) - 1 if s != 0 else 0
            sign[i] = 1 if s > 0 else (-1 if s < 0 else 0)
        k0, k1, k2, k3 = k[0], k[1], k[2], k[3]
        s0, s1, s2, s3 = sign[0], sign[1], sign[2], sign[3]
        for o in range(words.shape[1]):
            words[g, o] = _word(s0 * np.int32(a[k0, o]), s1 * np.int32(a[k1, o]),
                                s2 * np.int32(a[k2, o]), s3 * np.int32(a[k3, o]))
        w0, w1, w2, w3 = s0 * s0, s1 * s1, s2 * s2, s3 * s3  # 0 in padding
        for block in range(packed.shape[0]):
            for c in range(min(BLOCK_COLS, cols - block * BLOCK_COLS)):
                o = block * BLOCK_COLS + c
                v0, v1 = w0 * np.int32(b[k0, o]), w1 * np.int32(b[k1, o])
                v2, v3 = w2 * np.int32(b[k2, o]), w3 * np.int32(b[k3, o])
                packed[block, g, c] = _word(v0, v1, v2, v3)
                total[block, c] += v * (v0 + v1 + v2 + v3)
    for block in range(packed.shape[0]):
        for c in range(BLOCK_COLS):
            comp[block, c] = np.int32(-128) * total[block, c]


class VnniGemm:
    """X @ W^T by this package's own AVX-512 VNNI kernel (``intes.kernels.vnni_gemm``).

    Its point is fusion: the cpu backend runs each linear layer's product, projection,
    correction and rescale panel by panel in cache (``CpuBackend.linear``). Needs no torch.
    """

    name = "vnni"
    description = "int8 VNNI GEMM with fused epilogues (numba, AVX-512 VNNI)"

    def __init__(self) -> None:
        reason = vnni_unavailable()
        if reason is not None:
            raise RuntimeError(reason)
        pin_blas_threads(1)  # the float path of lowrank_sum, past MAX_LEVELS

    def prepare(self, w: np.ndarray) -> VnniWeight:
        return vnni_pack(w)

    def product(self, x: np.ndarray, wt: VnniWeight) -> np.ndarray:
        return vnni_product(x, wt)

    def lowrank_sum(self, at: np.ndarray, bt: np.ndarray, fitness: np.ndarray) -> np.ndarray:
        """Z = (A^T diag(f)) B exactly, as ONE VNNI product per tensor: the rows of V^T =
        (sign(f) A)^T against B packed as the weight (its columns are B's rows), the pairs
        grouped by |f| (``level_plan``, ``_tile_levels``). More than MAX_LEVELS distinct
        |f| take the float path."""
        operands = self.update_operands(at, bt, fitness)
        if operands is None:
            return float_lowrank_sum(at, bt, fitness)
        x, b, levels = operands
        return level_sum(x, b, levels)

    @staticmethod
    def update_operands(at: np.ndarray, bt: np.ndarray, fitness: np.ndarray
                        ) -> tuple[np.ndarray, VnniWeight, np.ndarray] | None:
        """(grouped V^T rows, B packed as the weight with level-weighted comp, levels) for
        ``level_sum`` or a fused update; None past MAX_LEVELS distinct |f|.

        Each pair's term is one int8 product whatever its |f| (sign(f) a is int8), so Z
        costs one product of about P r (f = 0 left out), where a fitness-scaled A split
        into int8 halves costs two of P r.
        """
        pairs, rank, rows = at.shape
        plan = level_plan(np.ascontiguousarray(fitness, dtype=np.int32).tobytes(), rank)
        if plan is None:
            return None
        slots, levels = plan
        groups, cols = len(slots) // 4, bt.shape[2]
        blocks = -(-cols // BLOCK_COLS)
        words = np.empty((groups, rows), dtype=np.int32)
        packed = np.empty((blocks, groups, BLOCK_COLS), dtype=np.int32)
        comp = np.empty((blocks, BLOCK_COLS), dtype=np.int32)
        _level_operands(at, bt, slots, levels, words, packed, comp)
        shape_only = np.broadcast_to(np.int8(0), (cols, 4 * groups))  # W = B^T, not read
        weight = VnniWeight(shape_only,
                            packed.view(np.int8).reshape(blocks, groups, 4 * BLOCK_COLS), comp,
                            np.zeros((cols, 0), dtype=np.int8))
        return words.view(np.int8).reshape(groups, rows, 4), weight, levels

    def vector_sum(self, fitness: np.ndarray, noise: np.ndarray) -> np.ndarray:
        return vector_sum(fitness, noise)


def int8_dot_instructions() -> list[str]:
    """The int8 dot-product extensions (as LLVM names them) this CPU has: without one,
    oneDNN's int8 GEMM falls back to code far slower than float32 BLAS."""
    features = llvm.get_host_cpu_features()
    return [f for f in ("avx512vnni", "avxvnni", "amx-int8") if features.get(f, False)]


GemmEngine = Float32Gemm | Avx2Gemm | Int8Gemm | VnniGemm


def make_gemm(name: str | None = None) -> GemmEngine:
    """The named GEMM engine; 'auto' (or INTES_CPU_GEMM) takes the VNNI kernel where the CPU
    has AVX-512 VNNI, else int8 when torch can run it and the CPU has an int8 dot-product
    instruction, else the AVX2 kernel where the CPU has AVX2, else float32.

    An explicit 'vnni', 'int8' or 'avx2' that cannot run is an error, never a quiet fallback.
    """
    name = name or os.environ.get("INTES_CPU_GEMM", "auto")
    if name not in GEMMS:
        raise ConfigError(f"unknown cpu GEMM {name!r}; choose one of {GEMMS}")
    if name == "float32":
        return Float32Gemm()
    if name == "avx2":
        reason = avx2_unavailable()
        if reason is not None:
            raise ConfigError(f"the avx2 GEMM cannot run here: {reason}")
        return Avx2Gemm()
    if name in ("auto", "vnni"):
        reason = vnni_unavailable()
        if reason is None:
            return VnniGemm()
        if name == "vnni":
            raise ConfigError(f"the vnni GEMM cannot run here: {reason}")
    if name == "int8" or int8_dot_instructions():
        try:
            return Int8Gemm()
        except (ImportError, AttributeError, RuntimeError) as err:
            if name == "int8":
                raise ConfigError(
                    f"the int8 GEMM needs torch>=2.4 with torch._int_mm: {err}") from err
    return Avx2Gemm() if avx2_unavailable() is None else Float32Gemm()


def gemm_summary() -> str:
    """One line: the engine the cpu backend takes here (INTES_CPU_GEMM's, or what it cannot
    do, where that is set), the one 'auto' picks, and why any faster one cannot run."""
    slow_int8 = None if int8_dot_instructions() else (
        "auto skips the int8 GEMM: this CPU has no int8 dot-product instruction (VNNI, AMX)")
    notes = [why for why in (vnni_unavailable(), int8_gemm_unavailable(), slow_int8,
                             avx2_unavailable()) if why]
    chosen = os.environ.get("INTES_CPU_GEMM", "auto") or "auto"
    if chosen != "auto":
        try:
            notes.insert(0, f"INTES_CPU_GEMM={chosen}: {make_gemm(chosen).description}")
        except ConfigError as err:
            notes.insert(0, f"INTES_CPU_GEMM={chosen!r} makes the cpu backend fail: {err}")
    return "; ".join([f"{make_gemm('auto').description} (auto)", *notes])


def int8_gemm_unavailable() -> str | None:
    """None if the int8 GEMM runs here, else one line saying why not."""
    try:
        Int8Gemm()
    except (ImportError, AttributeError, RuntimeError) as err:
        return f"int8 GEMM unavailable ({err})"
    return None
