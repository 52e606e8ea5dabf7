"""CuPy RawKernels of the cuda backend: noise, the vector update, embeddings and integer ops.

One CUDA C source (``SOURCE``) holds every kernel. Each is a grid-stride loop with one thread
per output element (or row) and no shared memory or barriers, so the exact same source also
runs on a CPU: ``emulated_kernels()`` builds it with g++ behind a tiny shim (one "thread" walks
the whole loop) and hands numpy arrays to it. That is how the tests check these kernels bit
for bit against ``intes.kernels.reference`` without a GPU; ``nvcc -cubin -arch=sm_90`` checks
that they compile for an H100. Their speed, and their run under CuPy/NVRTC, are verified
only on a GPU run (``tests/test_cuda_backend.py``, ``benchmarks/bench_gpu.py``).

Integer semantics follow numpy's: int32 sums wrap mod 2^32 (computed in unsigned arithmetic,
so C has no undefined overflow), C's ``/`` truncates toward zero like ``intmath.div_trunc``,
and signed ``>>`` is arithmetic. Arrays move in and out by DLPack (``xp.from_dlpack``), so
torch tensors, Triton and CuPy share device memory without copies. The matrix update is a
GEMM and lives in ``intes.kernels.triton`` (tensor cores); the vector update is a GEMV and
lives here.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from intes import intmath as im
from intes import noise as nz

THREADS = 256
MAX_BLOCKS = 1 << 16  # grid-stride loops cover the rest

DEFINES = {
    "GOLDEN": f"{nz.GOLDEN:#x}u",
    "NOISE_SCALE_NUM": nz.NOISE_SCALE_NUM,
    "NOISE_SCALE_SHIFT": nz.NOISE_SCALE_SHIFT,
    "INT8_MAX": im.INT8_MAX,
    "EXP2_FRAC_BITS": im.EXP2_FRAC_BITS,
    "LL_FRAC_BITS": im.LL_FRAC_BITS,
    "LOGIT_FRAC_BITS": im.LOGIT_FRAC_BITS,
    "WKV_FRAC_BITS": im.WKV_FRAC_BITS,
}

SOURCE = r"""
typedef unsigned int u32;
typedef signed char i8;

#define GRID_STRIDE(i, n) \
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < (n); \
         i += (long long)blockDim.x * gridDim.x)

/* intes.noise.mix32 */
__device__ __forceinline__ u32 mix32(u32 x) {
    x ^= x >> 16; x *= 0x7FEB352Du; x ^= x >> 15; x *= 0x846CA68Bu; return x ^ (x >> 16);
}

/* value idx of the stream of key: intes.noise.hash_u32 then gaussian_int8, in [-55, 55] */
__device__ __forceinline__ int noise_value(u32 key, u32 idx) {
    u32 h = mix32(key ^ mix32(idx * GOLDEN + 1u));
    int s = (int)((h & 255u) + ((h >> 8) & 255u) + ((h >> 16) & 255u) + (h >> 24));
    return ((s - 510) * NOISE_SCALE_NUM + (1 << (NOISE_SCALE_SHIFT - 1))) >> NOISE_SCALE_SHIFT;
}

__device__ __forceinline__ i8 sat8(int v) {
    return (i8)(v < -INT8_MAX ? -INT8_MAX : (v > INT8_MAX ? INT8_MAX : v));
}

/* numpy's np.abs on int32: INT_MIN stays INT_MIN */
__device__ __forceinline__ int abs32(int v) { return (int)(v < 0 ? 0u - (u32)v : (u32)v); }

/* out (pairs, n): values 0..n-1 of each pair's stream (A's rows * r values, then B's) */
extern "C" __global__ void noise_values(const u32* keys, int pairs, long long n, i8* out) {
    GRID_STRIDE(e, (long long)pairs * n) {
        long long p = e / n;
        out[e] = (i8)noise_value(keys[p], (u32)(e - p * n));
    }
}

/* z (n,) += f (pairs,) @ e (pairs, n) over the pairs of one chunk: a deterministic integer
   sum whatever the order; u32 arithmetic wraps mod 2^32 as numpy's int32 does */
extern "C" __global__ void vector_partial(const i8* e, const int* f, int pairs, int n,
                                          int chunk, u32* z) {
    long long chunks = (pairs + chunk - 1) / chunk;
    GRID_STRIDE(t, chunks * n) {
        int c = (int)(t / n), i = (int)(t % n);
        int stop = min(pairs, (c + 1) * chunk);
        u32 acc = 0u;
        for (int p = c * chunk; p < stop; ++p) acc += (u32)f[p] * (u32)(int)e[(long long)p * n + i];
        atomicAdd(z + i, acc);
    }
}

/* w' = sat8(w + sign(z)) where |z| > threshold: reference.step_by_sign */
extern "C" __global__ void step_by_sign(const i8* w, const u32* z, long long n, int threshold,
                                        i8* out) {
    GRID_STRIDE(i, n) {
        int zi = (int)z[i];
        int move = abs32(zi) > threshold ? (zi > 0) - (zi < 0) : 0;
        out[i] = sat8((int)w[i] + move);
    }
}

/* table rows of tokens plus each member's rank-r correction (reference embed); mode 0: none,
   1: factors hashed from keys, 2: factors loaded from a (P, vocab, r) and b (P, d, r) */
extern "C" __global__ void embed(const i8* table, const int* tokens, int rows, int d, int vocab,
                                 int mode, const u32* keys, const i8* a, long long a_stride,
                                 const i8* b, long long b_stride, int rank, int shift, i8* out) {
    GRID_STRIDE(e, (long long)rows * d) {
        int n = (int)(e / d), i = (int)(e % d), tok = tokens[n];
        int v = table[(long long)tok * d + i];
        if (mode != 0) {
            int p = n >> 1, s = 0;
            for (int j = 0; j < rank; ++j) {
                int av = mode == 1 ? noise_value(keys[p], (u32)(tok * rank + j))
                                   : a[p * a_stride + (long long)tok * rank + j];
                int bv = mode == 1 ? noise_value(keys[p], (u32)((vocab + i) * rank + j))
                                   : b[p * b_stride + (long long)i * rank + j];
                s += av * bv;
            }
            int c = s >> shift;
            v += (n & 1) ? -c : c;
        }
        out[e] = sat8(v);
    }
}

/* intmath.log2_fixed: log2(s) * 256 for s >= 1 (and its value, mantissa[0], for s <= 0) */
__device__ __forceinline__ int log2_fixed(int s, const int* mantissa) {
    int e = s > 0 ? 31 - __clz(s) : 0;
    u32 us = (u32)s;
    int m = (int)((e >= 8 ? us >> (e - 8) : us << (8 - e)) & 255u);
    return e * 256 + mantissa[m];
}

/* intmath.log_likelihood, one thread per row: vocab <= 2^15 terms <= 2^16, summed mod 2^32
   as numpy's int32 sum (which wraps only at vocab = 2^15 with all logits equal) */
extern "C" __global__ void log_likelihood(const i8* logits, const int* targets, int rows,
                                          int vocab, const int* exp2_table,
                                          const int* log2_mantissa, int* out) {
    GRID_STRIDE(n, rows) {
        const i8* z = logits + n * vocab;
        int m = -128;
        u32 total = 0u;
        for (int v = 0; v < vocab; ++v) m = max(m, (int)z[v]);
        for (int v = 0; v < vocab; ++v) total += (u32)exp2_table[m - z[v]];
        int lse = log2_fixed((int)total, log2_mantissa) - EXP2_FRAC_BITS * 256;
        out[n] = ((int)z[targets[n]] - m) * (1 << (LL_FRAC_BITS - LOGIT_FRAC_BITS)) - lse;
    }
}

/* intmath.norm, pass 1, one thread per row: max(sum |x| / d, 1) (|sum| <= d * 127) */
extern "C" __global__ void row_mean_abs(const i8* x, int rows, int d, int* mean_abs) {
    GRID_STRIDE(n, rows) {
        const i8* xr = x + n * d;
        int total = 0;
        for (int i = 0; i < d; ++i) total += abs32(xr[i]);
        mean_abs[n] = max(total / d, 1);
    }
}

/* intmath.norm, pass 2, one thread per element (coalesced): x * w / mean|x|, truncated;
   w_stride 0 broadcasts one weight row to all rows */
extern "C" __global__ void scale_rows(const i8* x, const i8* w, const int* mean_abs, int rows,
                                      int d, int w_stride, i8* out) {
    GRID_STRIDE(e, (long long)rows * d) {
        long long n = e / d, i = e % d;
        out[e] = sat8((int)x[e] * w[n * w_stride + i] / mean_abs[n]);
    }
}

/* intmath.lut cast to int8 as numpy's astype does (relu_sq: table values in [0, 126]) */
extern "C" __global__ void lut8(const int* table, const i8* x, long long n, i8* out) {
    GRID_STRIDE(i, n) out[i] = (i8)table[x[i] + INT8_MAX];
}

/* intmath.relu */
extern "C" __global__ void relu(const i8* x, long long n, i8* out) {
    GRID_STRIDE(i, n) out[i] = x[i] > 0 ? x[i] : 0;
}

/* intmath.token_mix: x + ((prev - x) * mu >> 7), saturated; mu_stride 0 broadcasts one row */
extern "C" __global__ void token_mix(const i8* x, const i8* prev, const i8* mu, int rows, int d,
                                     int mu_stride, i8* out) {
    GRID_STRIDE(e, (long long)rows * d) {
        long long n = e / d, i = e % d;
        int xi = x[e];
        out[e] = sat8(xi + ((((int)prev[e] - xi) * (int)mu[n * mu_stride + i]) >> 7));
    }
}

/* intmath.sigmoid_gate: sat8(SIGMOID_TABLE[r] * v >> 7) */
extern "C" __global__ void sigmoid_gate(const int* table, const i8* r, const i8* v, long long n,
                                        i8* out) {
    GRID_STRIDE(i, n) out[i] = sat8((table[r[i] + INT8_MAX] * (int)v[i]) >> 7);
}

/* intmath.gru_blend: h + ((f + 127) * (target - h) >> 8), cast to int8 as numpy's astype */
extern "C" __global__ void gru_blend(const i8* h, const i8* f, const i8* target, long long n,
                                     i8* out) {
    GRID_STRIDE(i, n) {
        int hi = h[i];
        out[i] = (i8)(hi + ((((int)f[i] + 127) * ((int)target[i] - hi)) >> 8));
    }
}

/* intmath.wkv_step, one thread per element: the products with w in 64 bits, the states cast
   to int32 as numpy's astype; C's / truncates toward zero like intmath.div_trunc (den > 0) */
extern "C" __global__ void wkv_step(const int* num, const int* den, const i8* k, const i8* v,
                                    const i8* decay, int rows, int d, int decay_stride,
                                    const int* exp_table, i8* wkv, int* num_out, int* den_out) {
    GRID_STRIDE(e, (long long)rows * d) {
        long long n = e / d, i = e % d;
        long long w = (long long)decay[n * decay_stride + i] + 128;
        long long ex = (long long)exp_table[k[e] + INT8_MAX] << WKV_FRAC_BITS;
        int nn = (int)(((num[e] * w) >> 8) + ex * v[e]);
        int dd = (int)(((den[e] * w) >> 8) + ex);
        num_out[e] = nn;
        den_out[e] = dd;
        wkv[e] = sat8(nn / dd);
    }
}

/* intmath.sat_add of 2 or 3 int8 (rows, d) terms; a stride of 0 broadcasts one row */
extern "C" __global__ void sat_add(const i8* a, const i8* b, const i8* c, int terms, int rows,
                                   int d, int b_stride, int c_stride, i8* out) {
    GRID_STRIDE(e, (long long)rows * d) {
        long long n = e / d, i = e % d;
        int v = (int)a[e] + b[n * b_stride + i];
        if (terms == 3) v += c[n * c_stride + i];
        out[e] = sat8(v);
    }
}
"""

# What the CPU build needs to read SOURCE as C++: one thread that walks every grid-stride loop.
_SHIM = r"""
#define __global__
#define __device__
#define __forceinline__ inline
#include <algorithm>
using std::max; using std::min;
struct intes_dim3 { unsigned int x; };
static const intes_dim3 threadIdx = {0}, blockIdx = {0}, blockDim = {1}, gridDim = {1};
static inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz((unsigned int)x); }
static inline unsigned int atomicAdd(unsigned int* p, unsigned int v) {
    unsigned int old = *p; *p = old + v; return old;
}
"""

Launch = Callable[[str, int, tuple], None]


def compile_options() -> list[str]:
    """-D flags that give SOURCE its constants from intes.noise and intes.intmath."""
    return [f"-D{k}={v}" for k, v in DEFINES.items()]


class Kernels:
    """numpy-like wrappers over the kernels of SOURCE, for arrays of the module ``xp``.

    ``launch(name, threads, args)`` runs one kernel over ``threads`` grid-stride iterations;
    scalars in ``args`` are numpy scalars of the exact C parameter type. Every wrapper takes
    and returns ``xp`` arrays and copies nothing it does not have to.
    """

    def __init__(self, xp: ModuleType, launch: Launch):
        self.xp = xp
        self.launch = launch
        self._tables: dict[str, Any] = {}

    def _dense(self, a: Any, dtype: Any) -> Any:
        return self.xp.ascontiguousarray(a, dtype=dtype)

    def _table(self, name: str) -> Any:
        """A lookup table of intes.intmath on this module's device, uploaded once."""
        if name not in self._tables:
            self._tables[name] = self.xp.asarray(getattr(im, name), dtype=self.xp.int32)
        return self._tables[name]

    def noise_values(self, keys: Any, n: int) -> Any:
        """int8 (P, n): values 0..n-1 of each key's stream (keys: int32 bits of uint32 keys)."""
        keys = self._dense(keys, self.xp.int32)
        out = self.xp.empty((len(keys), n), dtype=self.xp.int8)
        self.launch("noise_values", len(keys) * n, (keys, np.int32(len(keys)), np.int64(n), out))
        return out

    def lowrank_factors(self, keys: Any, rows: int, cols: int, rank: int) -> tuple[Any, Any]:
        """int8 a (P, rows, r), b (P, cols, r): intes.noise.lowrank_factors from stream keys.

        Both are views of one (P, (rows + cols) r) buffer (pair stride (rows + cols) r).
        """
        vals = self.noise_values(keys, (rows + cols) * rank)
        pairs = vals.shape[0]
        a = vals[:, : rows * rank].reshape(pairs, rows, rank)
        b = vals[:, rows * rank:].reshape(pairs, cols, rank)
        return a, b

    def update_vector(self, v: Any, noise: Any, fitness: Any, threshold: int,
                      chunk: int = 256) -> Any:
        """New int8 v: +-1 where |sum_p f_p e_p| > threshold, saturated (reference)."""
        xp = self.xp
        v, e, f = self._dense(v, xp.int8), self._dense(noise, xp.int8), self._dense(fitness,
                                                                                   xp.int32)
        pairs, n = e.shape
        z = xp.zeros(n, dtype=xp.uint32)
        chunks = -(-pairs // chunk)
        self.launch("vector_partial", chunks * n,
                    (e, f, np.int32(pairs), np.int32(n), np.int32(chunk), z))
        out = xp.empty_like(v)
        self.launch("step_by_sign", n, (v, z, np.int64(n), np.int32(threshold), out))
        return out

    def embed(self, table: Any, tokens: Any, sigma_shift: int, keys: Any = None,
              factors: tuple[Any, Any] | None = None, rank: int = 1) -> Any:
        """int8 (N, d) table rows plus each member's correction.

        Noise: ``keys`` (P,) with ``rank`` (factors hashed in the kernel), or ``factors``
        (a (P, vocab, r), b (P, d, r)) loaded, or neither for plain rows.
        """
        xp = self.xp
        table, tokens = self._dense(table, xp.int8), self._dense(tokens, xp.int32)
        vocab, d = table.shape
        rows = len(tokens)
        mode, key_arg, a, b = 0, tokens, table, table  # pointers a mode does not read
        if keys is not None:
            mode, key_arg = 1, self._dense(keys, xp.int32)
        elif factors is not None:
            mode, a, b = 2, _inner_dense(xp, factors[0]), _inner_dense(xp, factors[1])
            rank = a.shape[2]
        out = xp.empty((rows, d), dtype=xp.int8)
        self.launch("embed", rows * d, (
            table, tokens, np.int32(rows), np.int32(d), np.int32(vocab), np.int32(mode), key_arg,
            a, np.int64(a.strides[0]), b, np.int64(b.strides[0]), np.int32(rank),
            np.int32(im.FRAC_BITS + sigma_shift), out))
        return out

    def log_likelihood(self, logits: Any, targets: Any) -> Any:
        """int32 (N,) log2 p(target) in 1/256 bit (intmath.log_likelihood)."""
        xp = self.xp
        logits, targets = self._dense(logits, xp.int8), self._dense(targets, xp.int32)
        rows, vocab = logits.shape
        out = xp.empty(rows, dtype=xp.int32)
        self.launch("log_likelihood", rows, (
            logits, targets, np.int32(rows), np.int32(vocab), self._table("EXP2_TABLE"),
            self._table("LOG2_MANTISSA"), out))
        return out

    def norm(self, x: Any, weight: Any) -> Any:
        """intmath.norm of int8 (N, d) rows by an int8 weight row (d,) / (1, d) or rows (N, d)."""
        xp = self.xp
        x, w = self._dense(x, xp.int8), self._dense(weight, xp.int8)
        rows, d = x.shape
        mean_abs = xp.empty(rows, dtype=xp.int32)
        self.launch("row_mean_abs", rows, (x, np.int32(rows), np.int32(d), mean_abs))
        out = xp.empty_like(x)
        self.launch("scale_rows", rows * d, (x, w, mean_abs, np.int32(rows), np.int32(d),
                                             _row_stride(w, rows, d), out))
        return out

    def lut8(self, name: str, x: Any) -> Any:
        """intmath.lut(intmath.<name>, x).astype(int8)."""
        x = self._dense(x, self.xp.int8)
        out = self.xp.empty(x.shape, dtype=self.xp.int8)
        self.launch("lut8", x.size, (self._table(name), x, np.int64(x.size), out))
        return out

    def relu_sq(self, x: Any) -> Any:
        """intmath.relu_sq: the relu² table, as int8."""
        return self.lut8("RELU_SQ_TABLE", x)

    def relu(self, x: Any) -> Any:
        """intmath.relu."""
        x = self._dense(x, self.xp.int8)
        out = self.xp.empty_like(x)
        self.launch("relu", x.size, (x, np.int64(x.size), out))
        return out

    def token_mix(self, x: Any, prev: Any, mu: Any) -> Any:
        """intmath.token_mix of (N, d) rows, mu one row (d,) / (1, d) or one per row."""
        xp = self.xp
        x, prev, mu = (self._dense(t, xp.int8) for t in (x, prev, mu))
        rows, d = x.shape
        out = xp.empty_like(x)
        self.launch("token_mix", rows * d, (x, prev, mu, np.int32(rows), np.int32(d),
                                            _row_stride(mu, rows, d), out))
        return out

    def sigmoid_gate(self, r: Any, v: Any) -> Any:
        """intmath.sigmoid_gate of same-shaped int8 r and v."""
        xp = self.xp
        r, v = self._dense(r, xp.int8), self._dense(v, xp.int8)
        out = xp.empty_like(v)
        self.launch("sigmoid_gate", v.size, (self._table("SIGMOID_TABLE"), r, v,
                                             np.int64(v.size), out))
        return out

    def gru_blend(self, h: Any, f: Any, target: Any) -> Any:
        """intmath.gru_blend of same-shaped int8 arrays."""
        xp = self.xp
        h, f, target = (self._dense(t, xp.int8) for t in (h, f, target))
        out = xp.empty_like(h)
        self.launch("gru_blend", h.size, (h, f, target, np.int64(h.size), out))
        return out

    def wkv_step(self, num: Any, den: Any, k: Any, v: Any, decay: Any) -> tuple[Any, Any, Any]:
        """intmath.wkv_step of (N, d) states and activations, decay one row or one per row."""
        xp = self.xp
        num, den = self._dense(num, xp.int32), self._dense(den, xp.int32)
        k, v, decay = (self._dense(t, xp.int8) for t in (k, v, decay))
        rows, d = k.shape
        wkv, num_out, den_out = xp.empty_like(k), xp.empty_like(num), xp.empty_like(den)
        self.launch("wkv_step", rows * d, (
            num, den, k, v, decay, np.int32(rows), np.int32(d), _row_stride(decay, rows, d),
            self._table("WKV_EXP_TABLE"), wkv, num_out, den_out))
        return wkv, num_out, den_out

    def sat_add(self, a: Any, *terms: Any) -> Any:
        """intmath.sat_add of int8 (N, d) a and 1 or 2 terms of shape (N, d), (1, d) or (d,)."""
        xp = self.xp
        if len(terms) not in (1, 2):
            raise ValueError(f"sat_add takes 2 or 3 terms, got {len(terms) + 1}")
        a = self._dense(a, xp.int8)
        rows, d = a.shape
        b = self._dense(terms[0], xp.int8)
        c = self._dense(terms[-1], xp.int8)
        out = xp.empty_like(a)
        self.launch("sat_add", rows * d, (
            a, b, c, np.int32(len(terms) + 1), np.int32(rows), np.int32(d),
            _row_stride(b, rows, d), _row_stride(c, rows, d), out))
        return out


def _row_stride(t: Any, rows: int, d: int) -> np.int32:
    """Elements between rows of a (rows, d) operand, 0 for one broadcast row."""
    if t.size == d:
        return np.int32(0)
    if t.size != rows * d:
        raise ValueError(f"operand of {t.size} values does not broadcast to ({rows}, {d})")
    return np.int32(d)


def _inner_dense(xp: ModuleType, f: Any) -> Any:
    """A (P, n, r) int8 factor with dense (n, r) blocks (any pair stride), as SOURCE indexes."""
    if f.dtype != xp.int8 or f.strides[1:] != (f.shape[2], 1):
        f = xp.ascontiguousarray(f, dtype=xp.int8)
    return f


def _blocks(threads: int) -> int:
    return max(1, min(-(-threads // THREADS), MAX_BLOCKS))


def cupy_kernels() -> Kernels:
    """The kernels compiled by NVRTC for the current CUDA device (cupy must import)."""
    import cupy

    module = cupy.RawModule(code=SOURCE, options=("--std=c++17", *compile_options()))

    functions: dict[str, Any] = {}

    def launch(name: str, threads: int, args: tuple) -> None:
        if threads > 0:
            if name not in functions:
                functions[name] = module.get_function(name)
            functions[name]((_blocks(threads),), (THREADS,), args)

    return Kernels(cupy, launch)


def emulated_kernels(build_dir: Path | None = None) -> Kernels:
    """The same SOURCE built by g++ for this CPU, on numpy arrays: for tests without a GPU.

    One emulated thread runs each grid-stride loop to the end, so results are those of any
    grid (no kernel shares memory between threads except through integer atomics).
    """
    lib = ctypes.CDLL(str(_build_emulation(build_dir or Path(tempfile.gettempdir()))))
    ctypes_of = {np.int32: ctypes.c_int32, np.int64: ctypes.c_int64, np.uint32: ctypes.c_uint32}

    def launch(name: str, threads: int, args: tuple) -> None:
        cargs = [ctypes.c_void_p(a.ctypes.data) if isinstance(a, np.ndarray)
                 else ctypes_of[type(a)](a) for a in args]
        getattr(lib, name)(*cargs)

    return Kernels(np, launch)


def _build_emulation(build_dir: Path) -> Path:
    """Compile SOURCE with the shim into a shared library (cached by content).

    Builders that run at once (two test sessions sharing the temporary directory, say) each
    write and compile files of their own, named by process and a random tag, then rename them
    onto the content-named ones; a rename is atomic, so none compiles from, or loads,
    another's half-written file.
    """
    compiler = shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        raise RuntimeError("no C++ compiler (g++) to build the CPU emulation of the CUDA kernels")
    text = _SHIM + SOURCE
    # signed overflow and out-of-range shifts are undefined in CUDA C++ too, where NVRTC may
    # compile them into anything: the emulation aborts on them (UBSan) rather than wrapping
    # (-fwrapv), so the tests prove the kernels' wrapping is all in unsigned arithmetic
    flags = ["-O2", "-shared", "-fPIC", "-fsanitize=signed-integer-overflow,shift",
             "-fno-sanitize-recover=all", "-std=c++17", *compile_options()]
    digest = hashlib.sha256((text + " ".join(flags)).encode()).hexdigest()[:16]
    name = f"intes-cuda-emulation-{digest}"
    lib = build_dir / f"{name}.so"
    if not lib.exists():
        own = f"{name}.{os.getpid()}-{uuid.uuid4().hex[:12]}"
        src, tmp = build_dir / f"{own}.cpp", build_dir / f"{own}.tmp.so"
        try:
            src.write_text(text)
            subprocess.run([compiler, *flags, str(src), "-o", str(tmp)], check=True,
                           capture_output=True, text=True)
            src.replace(build_dir / f"{name}.cpp")
            tmp.replace(lib)
        finally:  # a failed build leaves nothing behind
            src.unlink(missing_ok=True)
            tmp.unlink(missing_ok=True)
    return lib
