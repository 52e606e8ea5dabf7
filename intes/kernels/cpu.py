"""CPU backend: an exact integer GEMM for the shared base product, numba for everything else.

Bit-identical to ``ReferenceBackend`` (the numpy reference defines every answer). The base
product X @ W^T of every linear layer is ONE GEMM over all member rows, from
``intes.kernels.gemm``: this package's own VNNI kernel where the CPU has AVX-512 VNNI, with
each layer's projection, correction and rescale (and the update's step) fused into it (the
``_fused_*`` kernels); else int8 x int8 -> int32 (torch's oneDNN int8 GEMM) when torch is
installed and the CPU has an int8 dot-product instruction; else this package's int16-pair
AVX2 kernel; else float32 BLAS over exact K-chunks. Every other op is a serial numba kernel.

Floats appear only where a GEMM engine has no integer path, holding exact integers below
the bounds stated in intes.kernels.gemm: the float32 engine's base product, and the update
Z = A^T diag(f) B (``lowrank_sum``) of the float32 and AVX2 engines, or of the int8 and VNNI
engines for fitness values wider than their integer forms take. Divisions are integer:
the WKV recurrence's, whose divisor changes with every element, by restoring division of
the 7 quotient bits that survive sat8 (``_div_sat8``); the norm's, one divisor per row, by
an integer reciprocal (``_row_reciprocal``).

Integer overflow: where the reference computes in int32 these kernels do too (and wrap the
same way), so results agree even outside the argued bounds. Inputs follow ``intes.intmath``'s
conventions: int8 values in [-127, 127], never -128.

The per-step forms (``prepare``) are shared and read-only but for their ES-plan cache (dict
writes, atomic under the GIL); per-call scratch buffers are per thread, so one backend serves
several threads at once.

Threads: every kernel here is serial and releases the GIL, and the GEMM runs on one thread.
The cores are used one level up: ``Engine`` evaluates ``threads`` slices of the population
concurrently, each a whole forward over the sequence with its own GEMMs. Op-level threading
(numba prange, multi-threaded BLAS) waits at a barrier after every 0.1-5 ms op and its spinning
workers fight each other for the cores: an earlier version of this backend that threaded each
op ran 3x slower on 2 cores than on one thread. Slices meet only once per step.
"""

from __future__ import annotations

import ctypes
import functools
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numba import njit, types
from numba.extending import overload

from intes import intmath
from intes import noise as nz
from intes.errors import ConfigError
from intes.intmath import (
    EXP2_FRAC_BITS,
    FRAC_BITS,
    INT8_MAX,
    LL_FRAC_BITS,
    LOG2_MANTISSA,
    LOGIT_FRAC_BITS,
    WKV_EXP_TABLE,
    WKV_FRAC_BITS,
)
from intes.kernels.base import LowRank
from intes.kernels.gemm import GemmEngine, VnniGemm, make_gemm
from intes.kernels.vbmi import (
    HAVE_VBMI,
    WKV_EXP_BYTES,
    exp2_sum,
    lookup_flat,
    sigmoid_gate_flat,
)
from intes.kernels.vnni import factor_sums, pair_dot, project_pairs, quad_pair_dot
from intes.kernels.vnni_gemm import (
    BLOCK_COLS,
    PANEL_ROWS,
    VnniWeight,
    level_panel,
    merged_rescale_fits,
    odd_low,
    panel_product,
    prefetch_factor_rows,
    prefetch_rows,
    tiles_es,
    tiles_rescale,
)

# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_MMAP_THRESHOLD_MAX = 32 << 20  # glibc's ceiling for M_MMAP_THRESHOLD on 64-bit
# Tokens per forward call (see CpuBackend.token_block). With every engine but VNNI a
# slice of at most BLOCK_ROWS rows runs TOKEN_BLOCK tokens at once, a larger one token by token:
# measured on 2 cores at width 256 (ES step, blocks 1, 2, 4, 8), 256 and 512 rows ran fastest
# at 4 (+12-25% over 1), 1024 and 2048 rows at 1 (blocks of 2 or 4 were 8-14% slower there,
# their int32 products streaming through memory). The fused VNNI engine keeps no product in
# memory and runs TOKEN_BLOCK at every size: at 2048 rows ES tokens/s rose by 15-31% over
# single tokens at width 96 and tied at width 256. Blocks also amortize ES's own reads (each
# layer's noise factors and the per-member vectors, read once per block), so the fused
# engine takes FUSED_BLOCK tokens where one (T, rows, width) activation stays within
# FUSED_BLOCK_BYTES, i.e. 512 rows at width 256. Measured there (2 cores,
# INTES_CPU_TOKEN_BLOCK=4, 8 and 16 in turn under benchmarks/paired_rounds.py, medians):
# blocks of 8 against 4 made the ES step about 2% faster and left inference as it was,
# ES / inference 0.921 -> 0.937 (rwkv) and 0.921 -> 0.935 (egg); blocks of 16 slowed ES
# and inference down. (Single runs of intes bench had not told 4 and 8 apart.)
# A tiny batch (rows x width within SMALL_BATCH_BYTES: one member of naive ES, a few
# evaluation streams) is all Python per op, so it runs SMALL_BATCH_BLOCK tokens per call,
# a 64-token window in one: a batch-1 rwkv member's forward at width 256 took 1.05 ms
# against 2.81 ms in blocks of 8 (benchmarks/naive_split.py, INTES_CPU_TOKEN_BLOCK=8).
TOKEN_BLOCK, BLOCK_ROWS = 4, 512
FUSED_BLOCK, FUSED_BLOCK_BYTES = 8, 1 << 20
SMALL_BATCH_BLOCK, SMALL_BATCH_BYTES = 64, 1 << 14
# Member rows per forward call (CpuBackend.chunk_rows): a larger population goes to the
# threads in more chunks, a multiple of the threads, so a slice's activations stop growing
# with N. On the Zen 4 host (ES forward by rows per call, interleaved rounds,
# benchmarks/chunk_rows.py, benchmarks/results/cpu_chunk_rows_zen4.json) 8,192-row calls
# were 12% slower than 2,048-row ones at width 256 (N = 16384) and 5% at width 96; 4,096
# against 2,048 tied for rwkv at width 96 (N = 8192) and lost 7% for egg; 1,024 rows tied
# with 2,048 or ran up to 4% faster, within the host's noise, so the cap stays at the fewer
# calls. At N = 16384, width 256, intes bench's peak RSS fell from 1,758 to 1,388 MB.
CHUNK_ROWS = 2048


def keep_freed_memory() -> bool:
    """Have glibc's malloc keep freed blocks for reuse instead of unmapping them.

    A forward allocates its activations afresh every op, 0.1-2 MB each, and an ES step also
    makes its noise factors: with glibc's default, sliding thresholds, many of those blocks
    are mmapped and unmapped again, so every op pays page faults on fresh pages (measured: a
    third of the ES step's cost over inference). Fixed thresholds keep blocks up to 32 MB in
    the heap, where they are reused. Process-wide, like BLAS's thread count; False (and no
    change) without glibc.
    """
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX)) and bool(
        mallopt(_M_TRIM_THRESHOLD, 4 * _MMAP_THRESHOLD_MAX))


def usable_cores() -> int:
    """Cores this process may run on (its affinity mask, not the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def default_token_block() -> int | None:
    """INTES_CPU_TOKEN_BLOCK, else None (the measured rule, see ``BLOCK_ROWS``)."""
    value = os.environ.get("INTES_CPU_TOKEN_BLOCK")
    if value is None:
        return None
    if not value.isdigit() or int(value) < 1:
        raise ConfigError(f"INTES_CPU_TOKEN_BLOCK must be a positive integer, got {value!r}")
    return int(value)


def default_threads() -> int:
    """INTES_CPU_THREADS, else the usable cores shared among torchrun's local workers."""
    value = os.environ.get("INTES_CPU_THREADS")
    if value is None:
        workers = os.environ.get("LOCAL_WORLD_SIZE", "")
        share = int(workers) if workers.isdigit() and int(workers) > 0 else 1
        return max(1, usable_cores() // share)
    if not value.isdigit() or int(value) < 1:
        raise ConfigError(f"INTES_CPU_THREADS must be a positive integer, got {value!r}")
    return int(value)


@dataclass(frozen=True)
class CpuWeight:
    """A matrix in the form the base product wants, made once per step by ``prepare``.

    ``wt`` is W^T in the GEMM engine's own form (see ``intes.kernels.gemm``); ``es_plans``
    the ES layer plans made against it (``CpuBackend.fused_linear``), which go with it when
    the next step prepares new weights.
    """

    w: np.ndarray
    wt: Any
    es_plans: dict = field(default_factory=dict, compare=False)


# ---------------------------------------------------------------------------------------------
# scalar helpers (inlined into the kernels)
#
# int32 arithmetic: numba widens int32 +, -, *, >> to int64, which halves the SIMD lanes and
# loses the reference's int32 wrap-around. numpy's ufuncs on int32 scalars stay int32 and wrap
# like numpy, so the kernels write np.add / np.subtract / np.multiply / np.right_shift on I32.
# Where every value an op can meet fits int16 (for any int8 inputs, -128 included), it runs in
# I16 the same way: twice the lanes per vector.

# Every kernel: serial, GIL released, cached; numpy's error model, so that a division
# vectorizes instead of branching to raise ZeroDivisionError (each divisor here is >= 1).
kernel = njit(nogil=True, cache=True, error_model="numpy")

I32 = np.int32
_LO, _HI = I32(-INT8_MAX), I32(INT8_MAX)
_FRAC, _S7, _S8 = I32(FRAC_BITS), I32(7), I32(8)
_ONE = I32(1)
_BYTE8, _W0, _WKV_FRAC = I32(255), I32(128), I32(WKV_FRAC_BITS)
I16, U16, U32 = np.int16, np.uint16, np.uint32
_LO16, _HI16, _S7_16 = I16(-INT8_MAX), I16(INT8_MAX), I16(7)


@njit(inline="always", cache=True)
def _sat8(v):
    """Saturate to int8 in [-127, 127]."""
    return np.int8(np.minimum(np.maximum(v, _LO), _HI))


@njit(inline="always", cache=True)
def _sat8_16(v):
    """``_sat8`` of an int16."""
    return np.int8(np.minimum(np.maximum(v, _LO16), _HI16))


@njit(inline="always", cache=True)
def _div_sat8(num, den):
    """sat8(intmath.div_trunc(num, den)) for int32 num > -2^31 and den >= 1, in int32 lanes:
    restoring division of the quotient's magnitude, high bit first, over the 7 bits that
    survive sat8.

    Exact and overflow-free: bit b is set when |num| >> b >= den, i.e. the remainder is at
    least den 2^b, and then den 2^b <= remainder < 2^31 is subtracted (where the bit is
    clear, den << b may wrap, but that value is never chosen). Once the remainder is at
    least 2^(b+1) den it stays so after the subtraction, so |num| >= 128 den sets every bit:
    127, the saturated quotient, without a separate test. These compares and shifts
    vectorize, where an integer division instruction does not. Against a float64 division
    they made a WKV scan 10-30% slower, 0.4-1% of an rwkv forward at width 256 (Zen 4; one
    pair of profiles: benchmarks/results/cpu_profile_rwkv_n1024_{82ba972,8476213}_zen4.json,
    ``benchmarks/profile_cpu_ops.py --repeats 5`` from each checkout): the price of keeping
    floats out of the forward pass.
    """
    rem, q = np.abs(num), I32(0)
    for b in (6, 5, 4, 3, 2, 1, 0):
        bit = I32(b)
        take = np.right_shift(rem, bit) >= den
        rem = np.subtract(rem, np.left_shift(den, bit)) if take else rem
        q = np.bitwise_or(q, np.left_shift(_ONE, bit)) if take else q
    return np.int8(np.negative(q) if num < 0 else q)


NORM_BITS = 15  # |x w| <= 128 * 128 < 2^15 for any int8 x, w


@njit(inline="always", cache=True)
def _reciprocal(den, bits):
    """(m, k) in int64 with trunc(n / den) = sign(n) ((|n| m) >> k) for every |n| < 2^bits:
    k = bits + ceil(log2 den), m = ceil(2^k / den).

    Exact: m den = 2^k + e with 0 <= e < den <= 2^ceil(log2 den), so |n| m / 2^k =
    |n| / den + |n| e / (den 2^k), and |n| e < 2^k keeps the excess below 1 / den, less
    than the gap from |n| / den up to the next integer."""
    k = np.int64(bits)
    while (np.int64(1) << (k - bits)) < den:
        k += 1
    return ((np.int64(1) << k) + den - 1) // den, k


@njit(inline="always", cache=True)
def _row_reciprocal(den):
    """``_reciprocal`` for the norm's divisions: |n| < 2^NORM_BITS and 1 <= den <= 2^8, so
    m < 2^16 and the row divides in int16 lanes (``_div_by_reciprocal``; tested against every
    n and den)."""
    m, k = _reciprocal(den, NORM_BITS)
    return I32(m), I32(k)


@njit(inline="always", cache=True)
def _div_by_reciprocal(num, m, k):
    """trunc(num / den) for an int16 num > -2^15, as int16, from (m, k - NORM_BITS) as uint16
    for (m, k) = ``_row_reciprocal(den)``, in int16 lanes: ((2 |num| m) >> 16) >> (k - 15),
    whose first shift is one high-half multiply of uint16 lanes (vpmulhuw): 2 |num| < 2^16,
    m < 2^16 for every den <= 256 (tested), and k >= NORM_BITS = 15."""
    twice = np.left_shift(U16(np.abs(num)), U16(1))
    q = I16(np.right_shift(U16(np.right_shift(np.multiply(U32(twice), U32(m)), U32(16))), k))
    return np.negative(q) if num < 0 else q


@njit(cache=True)
def _reciprocal_table():
    table = np.empty((INT8_MAX + 1, 2), dtype=np.int32)
    for den in range(1, INT8_MAX + 2):
        table[den - 1, 0], table[den - 1, 1] = _row_reciprocal(den)
    return table


MEAN_RECIPROCALS = _reciprocal_table()  # _row_reciprocal(den) at row den - 1, den <= 128
MEAN_BITS = 30  # a row's sum of |x| below 2^30: any width below 2^23
SUM16_WIDTH = 255  # a row's sum of |x| <= 255 * 128 fits int16 up to this width


@njit(inline="always", cache=True)
def _floor_divider(d):
    """(m, s) with n // d = (n m) >> s (in int64) for every 0 <= n < 2^MEAN_BITS and
    1 <= d < 2^MEAN_BITS: ``_reciprocal`` at n >= 0, and n m < 2^30 (2^31 + 1) fits int64.
    The norm's row mean without a division per row (8% off the norm at width 96)."""
    return _reciprocal(d, MEAN_BITS)


@njit(inline="always", cache=True)
def _row(m, rows):
    """Row of a per-member parameter for activation row m: shared (1, d) vectors broadcast
    over all rows, (N, d) ones over the stacked copies of the N members in a token block."""
    return np.int64(m) % np.int64(rows)


@njit(inline="always", cache=True)
def _rescale(acc, half, shift):
    """sat8(rshift_round(acc, shift)) of an int32; the + half wraps like the reference's."""
    return _sat8(np.right_shift(np.add(acc, half), shift))


def _after(v, act, m, o):
    """What follows a fused layer's rescale for its int8 output v at (m, o), as the tiles
    apply it (``vnni_gemm.store_tile``): v itself without ``act``; for an activation table,
    max(v, 0), then act[v] for a table of 128 entries (an empty one: relu alone); for a
    residual, sat8(act[m, o] + v). numba compiles the one the type of ``act`` names
    (``_after_overload``)."""
    raise NotImplementedError("compiled by numba only")


@overload(_after, jit_options={"cache": True})
def _after_overload(v, act, m, o):
    """``_after`` for the type of ``act``: None, a residual (2-D) or an activation table."""
    if isinstance(act, types.NoneType):
        return lambda v, act, m, o: v
    if act.ndim == 2:
        return lambda v, act, m, o: _sat8(np.add(I32(act[m, o]), I32(v)))

    def activate(v, act, m, o):
        v = max(v, np.int8(0))
        return np.int8(act[v]) if len(act) else v
    return activate


@functools.lru_cache(maxsize=64)
def _rounding(shift: int) -> tuple[np.int32, np.int32]:
    """(half, shift) of intmath.rshift_round as int32; a shift <= 0 leaves values as they are."""
    return (I32(1 << (shift - 1)), I32(shift)) if shift > 0 else (I32(0), I32(0))


# ---------------------------------------------------------------------------------------------
# linear layer epilogue: exact base (rows, out) -> int8 (rows, out)
#
# ``acc`` is the base product as int32 or as float32 holding exact integers (one float32
# K-chunk, see intes.kernels.gemm); I32() converts either exactly. Rows are the N = 2P members,
# or T stacked copies of them (a token block: row t N + m is member m). Noise factors are used
# factor-major, at (P, r, out) and bt (P, r, in), so inner loops are unit stride and
# vectorize; ``CpuNoise`` generates them in that layout (see ``_factors``). The ES kernels go
# row by row (streaming the large acc buffer in order); one layer's factors for a slice of the
# population, P (in + out) bytes, stay in L2 across the copies of a token block.


@kernel
def _linear_plain(acc, half, shift, out):
    """Inference epilogue: sat8(rshift_round(x @ W^T, shift))."""
    for m in range(out.shape[0]):
        for o in range(out.shape[1]):
            out[m, o] = _rescale(I32(acc[m, o]), half, shift)


@njit(inline="always", cache=True)
def _project(x, m0, p, bt, xb):
    """xb[s, r] = (x_{m0+s} . B_p[:, r]) >> 4 for both members (rows m0, m0 + 1) of pair p,
    in int32 like the reference's einsum; B_p is read once for the pair."""
    for r in range(bt.shape[1]):
        xb[0, r], xb[1, r] = _project1(x, m0, p, bt, r)


@njit(inline="always", cache=True)
def _project1(x, m0, p, bt, r):
    """(x_{m0} . B_p[:, r]) >> 4 and (x_{m0+1} . B_p[:, r]) >> 4 (``pair_dot``: VNNI where
    the CPU has it)."""
    d0, d1 = pair_dot(x, m0, bt[p, r])
    return np.right_shift(d0, _FRAC), np.right_shift(d1, _FRAC)


@kernel
def _project_rank1(x, bt, xb):
    """xb[m] = (x_m . B_p) >> 4 for every row (rank 1), before the base product: x was just
    written by the op that made it and is still in cache (after the GEMM it is not), and the
    pairs' dot products are independent, so the CPU overlaps them. A token block's copies
    of a pair share B_p: four copies go in one call, 8 rows against one load of the factor."""
    members = 2 * bt.shape[0]
    first = 0
    while first + 4 * members <= x.shape[0]:
        for p in range(bt.shape[0]):
            m0 = first + 2 * p
            d = quad_pair_dot(x, m0, members, bt[p, 0])
            for c in range(4):
                m = m0 + c * members
                xb[m] = np.right_shift(d[2 * c], _FRAC)
                xb[m + 1] = np.right_shift(d[2 * c + 1], _FRAC)
        first += 4 * members
    while first < x.shape[0]:
        for p in range(bt.shape[0]):
            m0 = first + 2 * p
            xb[m0], xb[m0 + 1] = _project1(x, m0, p, bt, 0)
        first += members


@kernel
def _correct_rank1(acc, xb, at, sigma_shift, half, shift, out):
    """ES epilogue for rank 1: acc + sign * ((xb_m * A_p) >> sigma_shift), rescaled, in one
    pass per row. With the projection the extra work over inference is 2 (in + out)
    multiply-adds per pair of rows.

    One loop for both signs, the sign folded into the row's factor: -(y >> s) is
    ((-y) + 2^s - 1) >> s (floor of the negation is minus the ceiling), so an odd row uses
    -xb_m and adds 2^s - 1 before the shift; |xb_m A_p| + 2^s - 1 < 2^31 by
    ``linear_bound``. Against a pair's two rows in two sign-specialized loops this measured
    10-30% faster where acc streams from memory (a token block's rows), 5% slower where it
    sits in L2 (one token's).
    """
    members = 2 * at.shape[0]
    odd_bias = np.subtract(np.left_shift(I32(1), sigma_shift), I32(1))
    for m in range(out.shape[0]):
        p = (m % members) // 2
        if m % 2 == 0:
            x, bias = xb[m], I32(0)
        else:
            x, bias = np.negative(xb[m]), odd_bias
        for o in range(out.shape[1]):
            c = np.right_shift(np.add(np.multiply(x, I32(at[p, 0, o])), bias), sigma_shift)
            out[m, o] = _rescale(np.add(I32(acc[m, o]), c), half, shift)


@kernel
def _linear_lowrank(acc, x, at, bt, sigma_shift, half, shift, out):
    """ES epilogue for any rank: acc + sign * ((sum_r xb_m[r] A_p[:, r]) >> sigma_shift)."""
    pairs, rank, width = at.shape
    xb = np.empty((2, rank), dtype=np.int32)
    corr = np.empty(width, dtype=np.int32)
    for t in range(out.shape[0] // (2 * pairs)):
        for p in range(pairs):
            m0 = t * 2 * pairs + 2 * p
            _project(x, m0, p, bt, xb)
            for s in range(2):
                m = m0 + s
                corr[:] = 0
                for r in range(rank):
                    for o in range(width):
                        corr[o] = np.add(corr[o], np.multiply(xb[s, r], I32(at[p, r, o])))
                for o in range(width):
                    c = np.right_shift(corr[o], sigma_shift)
                    v = np.add(I32(acc[m, o]), c) if s == 0 else np.subtract(I32(acc[m, o]), c)
                    out[m, o] = _rescale(v, half, shift)


# ---------------------------------------------------------------------------------------------
# fused linear layers (the VNNI GEMM): each tile's epilogue applied in its registers


@kernel
def _fused_plain(x, packed, comp, tail, half, shift, out, act):
    """Inference: sat8(rshift_round(x @ W^T, shift)), then what ``act`` names, if not None:
    an activation (``EPILOGUES``) or a residual add (``_after``). Each tile is rescaled in
    registers right after its sums (``_tile_rescale``), panel by panel; with a fan-in tail
    the panel's sums go through a buffer first."""
    acc = np.empty((PANEL_ROWS, packed.shape[0] * BLOCK_COLS), dtype=np.int32)
    for r0 in range(0, x.shape[0], PANEL_ROWS):
        rows = min(PANEL_ROWS, x.shape[0] - r0)
        prefetch_rows(x, r0 + PANEL_ROWS, PANEL_ROWS, out)  # the next panel's
        if tail.shape[1] == 0:
            for block in range(packed.shape[0]):
                tiles_rescale(x, r0, rows, packed, comp, block, half, shift, out, act)
            continue
        panel_product(x, r0, rows, packed, comp, tail, acc)
        for j in range(rows):
            for o in range(out.shape[1]):
                out[r0 + j, o] = _after(_rescale(acc[j, o], half, shift), act, r0 + j, o)


@njit(inline="always", cache=True)
def _es_panel(x, r0, m0, rows, at, bt, bsum, xv, words, out):
    """Start the ES panel of rows r0 .. r0 + rows - 1 (members m0 ... of one copy of a token
    block, whole pairs): the next panel's rows and pairs prefetched, and xv[r, r0 + j] = the
    projections of its rows (odd rows negated), as the tiles' int16 words if ``words``, else
    as values (``project_pairs``, 16 rows at a time; bsum is ``factor_sums(bt)``).

    Panels go pair-major (``_es_panels``), so the next panel is the same members' in the next
    copy, or the next members' in the first copy."""
    members = 2 * at.shape[0]
    nxt = r0 + members if r0 + members < x.shape[0] else m0 + rows
    prefetch_rows(x, nxt, PANEL_ROWS, out)
    if nxt < members:  # new pairs
        prefetch_factor_rows(at, nxt // 2, PANEL_ROWS // 2)
        prefetch_factor_rows(bt, nxt // 2, PANEL_ROWS // 2)
    project_pairs(x, r0, m0, rows, bt, bsum, xv, words)


@njit(inline="always", cache=True)
def _es_panels(x, at):
    """The ES panels' (first row, first member, rows): up to PANEL_ROWS consecutive rows of
    one copy of a token block (whole pairs), pair-major: a chunk of pairs in every copy,
    then the next chunk. A chunk's factors, PANEL_ROWS / 2 (in + out) bytes per rank, stay
    in L1 and L2 across its copies; copy-major they were read once per copy, and ES layers
    ran 2-4% slower.

    A panel holds one copy's rows: panels that took a chunk of pairs across all copies, to
    share each pair's factors among its copies' rows, measured slower even with plain
    tiles, as a pair's copies lie N rows apart, a multiple of 4 KB at the usual sizes, so
    they fall into the same L1 sets, which with the W block's lines fill every way."""
    members = 2 * at.shape[0]
    panels = []
    for m0 in range(0, members, PANEL_ROWS):
        for r0 in range(m0, x.shape[0], members):
            panels.append((r0, m0, min(PANEL_ROWS, members - m0)))
    return panels


@kernel
def _fused_rank1(x, packed, comp, at, bt, bsum, sigma_shift, half, shift, out, act):
    """ES at rank 1, the same bits as ``_correct_rank1``, panel by panel (``_es_panels``):
    first the panel's projections (``project_pairs``, 16 rows per call), then its
    product block by block, each tile corrected and rescaled in registers (``_tile_es``,
    the two shifts merged), then what ``act`` names (``_fused_plain``). Only where
    ``merged_rescale_fits`` and the fan-in has no tail.

    A kernel of its own, not a branch of ``_fused_lowrank``: with both tile kinds inlined in
    one function the rank-1 path ran 3-5% slower."""
    total, low = np.add(sigma_shift, shift), odd_low(sigma_shift)
    xv = np.empty((1, x.shape[0]), dtype=np.int32)
    for r0, m0, rows in _es_panels(x, at):
        _es_panel(x, r0, m0, rows, at, bt, bsum, xv, True, out)
        for block in range(packed.shape[0]):
            tiles_es(x, r0, rows, packed, comp, block, at, m0 // 2, xv[0], half, sigma_shift,
                     low, total, out, act)


@kernel
def _fused_lowrank(x, packed, comp, at, bt, bsum, sigma_shift, half, shift, out, act):
    """``_fused_rank1`` at any rank: each tile sums the rank's corrections before the merged
    shift. The same bits as ``_linear_lowrank``."""
    total, low = np.add(sigma_shift, shift), odd_low(sigma_shift)
    xv = np.empty((at.shape[1], x.shape[0]), dtype=np.int32)
    for r0, m0, rows in _es_panels(x, at):
        _es_panel(x, r0, m0, rows, at, bt, bsum, xv, True, out)
        for block in range(packed.shape[0]):
            tiles_es(x, r0, rows, packed, comp, block, at, m0 // 2, xv, half, sigma_shift,
                     low, total, out, act)


@kernel
def _fused_buffered(x, packed, comp, tail, at, bt, bsum, sigma_shift, half, shift, out, act):
    """ES at any rank where the merged shift could overflow or the fan-in has a tail: each
    panel's int32 product through a buffer, then the unmerged epilogue of
    ``_linear_lowrank``."""
    rank = at.shape[1]
    odd_bias = np.subtract(np.left_shift(I32(1), sigma_shift), I32(1))
    acc = np.empty((PANEL_ROWS, packed.shape[0] * BLOCK_COLS), dtype=np.int32)
    xv = np.empty((rank, x.shape[0]), dtype=np.int32)
    for r0, m0, rows in _es_panels(x, at):
        _es_panel(x, r0, m0, rows, at, bt, bsum, xv, False, out)
        panel_product(x, r0, rows, packed, comp, tail, acc)
        for j in range(rows):
            m, p = r0 + j, (m0 + j) // 2
            bias = I32(0) if j % 2 == 0 else odd_bias
            for o in range(out.shape[1]):
                v = bias
                for r in range(rank):
                    v = np.add(v, np.multiply(xv[r, m], I32(at[p, r, o])))
                out[m, o] = _after(_rescale(np.add(acc[j, o], np.right_shift(v, sigma_shift)),
                                            half, shift), act, m, o)


# ---------------------------------------------------------------------------------------------
# embedding, log-likelihood, update (rows as in the linear layers: members, or stacked copies)


@kernel
def _embed_plain(table, tokens, out):
    """Inference embedding: the rows of the table, saturated to [-127, 127]."""
    for m in range(out.shape[0]):
        tok = tokens[m]
        for j in range(out.shape[1]):
            out[m, j] = _sat8(I32(table[tok, j]))


@kernel
def _embed_rank1(table, tokens, at, bt, shift, out):
    """_embed_lowrank at rank 1, one pass per row: table[tok] +- ((A_p[tok] B_p) >> shift),
    in int16 lanes (|A B| <= 128 * 128).

    Each row's A_p[tok] is one byte of a different cache line of A (P x vocab), so it is
    gathered for all rows first, in a loop of independent loads whose misses the CPU
    overlaps; read inside the row loop, each miss stalled a row's whole pass (2x slower
    measured, where the caches hold the forward's dirty activations)."""
    members = 2 * at.shape[0]
    a_rows = np.empty(out.shape[0], dtype=np.int16)
    for m in range(out.shape[0]):
        a_rows[m] = at[(m % members) // 2, 0, tokens[m]]
    shift16 = I16(min(shift, 15))  # |a b| < 2^15: any shift past 15 floors it to 0 or -1 too
    for m in range(out.shape[0]):
        p, tok, ar = (m % members) // 2, tokens[m], a_rows[m]
        for j in range(out.shape[1]):
            c = np.right_shift(np.multiply(ar, I16(bt[p, 0, j])), shift16)
            row = I16(table[tok, j])
            out[m, j] = _sat8_16(np.add(row, c) if m % 2 == 0 else np.subtract(row, c))


@kernel
def _embed_lowrank(table, tokens, at, bt, shift, out):
    """table[tok] + (A_p[tok] B_p^T >> shift), negated for odd rows, saturated."""
    pairs, rank, dim = bt.shape
    corr = np.empty(dim, dtype=np.int32)
    for m in range(out.shape[0]):
        p, tok = (m % (2 * pairs)) // 2, tokens[m]
        corr[:] = 0
        for r in range(rank):
            ar = I32(at[p, r, tok])
            for j in range(dim):
                corr[j] = np.add(corr[j], np.multiply(ar, I32(bt[p, r, j])))
        for j in range(dim):
            c = np.right_shift(corr[j], shift)
            row = I32(table[tok, j])
            out[m, j] = _sat8(np.add(row, c) if m % 2 == 0 else np.subtract(row, c))


@njit(inline="always", cache=True)
def _log2_fixed(s):
    """intmath.log2_fixed for one value: leading one by binary search, truncated mantissa."""
    e = 0
    for k in (16, 8, 4, 2, 1):
        if (s >> (e + k)) > 0:
            e += k
    mant = (s >> (e - 8) if e >= 8 else s << (8 - e)) & 255
    return e * 256 + LOG2_MANTISSA[mant]


@kernel
def _log_likelihood(logits, targets, out):
    """Per row: (target - max) << 4 - (log2(sum 2^16 2^((z - max) / 16)) - 16 * 256)."""
    for m in range(logits.shape[0]):
        top = I32(-INT8_MAX - 1)
        for j in range(logits.shape[1]):
            top = max(top, I32(logits[m, j]))
        total = exp2_sum(logits, m, top)  # < vocab 2^16: int32 for any vocab below 2^15
        lse = _log2_fixed(np.int64(total)) - EXP2_FRAC_BITS * 256
        target = np.int64(logits[m, targets[m]])
        out[m] = ((target - top) << (LL_FRAC_BITS - LOGIT_FRAC_BITS)) - lse


@njit(inline="always", cache=True)
def _stepped(w, z, threshold):
    """reference.step_by_sign for one weight: w +- 1 where |z| > threshold, saturated."""
    move = 0
    if abs(z) > threshold:
        move = 1 if z > 0 else (-1 if z < 0 else 0)
    return _sat8(np.int32(w) + move)


@kernel
def _step_by_sign(w, z, threshold, out):
    """reference.step_by_sign on flat arrays."""
    for i in range(w.shape[0]):
        out[i] = _stepped(w[i], z[i], threshold)


@kernel
def _fused_update(x, packed, comp, levels, w, threshold, out):
    """``_step_by_sign`` of Z = x @ B (the VNNI engine's update operands, pairs grouped by
    |f|: ``_tile_levels``), panel by panel: Z is never stored, each panel's moves are made
    while it is in cache."""
    acc = np.empty((PANEL_ROWS, packed.shape[0] * BLOCK_COLS), dtype=np.int32)
    for o0 in range(0, w.shape[0], PANEL_ROWS):
        count = min(PANEL_ROWS, w.shape[0] - o0)
        level_panel(x, o0, count, packed, comp, levels, acc)
        for j in range(count):
            for i in range(w.shape[1]):
                out[o0 + j, i] = _stepped(w[o0 + j, i], acc[j, i], threshold)


def step_by_sign(w: np.ndarray, z: np.ndarray, threshold: int) -> np.ndarray:
    out = np.empty(w.size, dtype=np.int8)
    _step_by_sign(np.ascontiguousarray(w).ravel(), np.ascontiguousarray(z).ravel(),
                  threshold, out)
    return out.reshape(w.shape)


# ---------------------------------------------------------------------------------------------
# noise: the same bits as intes.noise, compiled


_U32 = np.uint32
_MUL1, _MUL2 = _U32(0x7FEB352D), _U32(0x846CA68B)
_U8, _U15, _U16, _U24, _BYTE = _U32(8), _U32(15), _U32(16), _U32(24), _U32(255)
_PAIR_SALT = _U32(nz.PAIR_SALT)


@njit(inline="always", cache=True)
def _mix32(x):
    """noise.mix32 on one uint32. Every constant is a uint32 and each product is cast back
    to uint32 (numba widens it), so LLVM keeps 32-bit lanes and vectorizes."""
    x = x ^ (x >> _U16)
    x = _U32(x * _MUL1)
    x = x ^ (x >> _U15)
    x = _U32(x * _MUL2)
    return x ^ (x >> _U16)


@njit(inline="always", cache=True)
def _gaussian(h):
    """noise.gaussian_int8 on one uint32 hash."""
    s = np.int32((h & _BYTE) + ((h >> _U8) & _BYTE) + ((h >> _U16) & _BYTE) + (h >> _U24))
    return np.int8((np.int32(s - 510) * nz.NOISE_SCALE_NUM + (1 << (nz.NOISE_SCALE_SHIFT - 1)))
                   >> nz.NOISE_SCALE_SHIFT)


@kernel
def _gaussian_streams(keys, idx, out):
    """out[p, i] = gaussian(mix32(keys[p] ^ idx[i])): noise.hash_u32 then gaussian_int8."""
    for p in range(keys.shape[0]):
        k = keys[p]
        for i in range(idx.shape[0]):
            out[p, i] = _gaussian(_mix32(k ^ idx[i]))


@kernel
def _factor_streams(keys, idx, at, bt):
    """noise.lowrank_factors written factor-major: stream value o r + r' is at[p, r', o]."""
    pairs, rank, rows = at.shape
    for p in range(pairs):
        k = keys[p]
        for r in range(rank):
            for o in range(rows):
                at[p, r, o] = _gaussian(_mix32(k ^ idx[o * rank + r]))
            for i in range(bt.shape[2]):
                bt[p, r, i] = _gaussian(_mix32(k ^ idx[(rows + i) * rank + r]))


@functools.lru_cache(maxsize=256)
def _stream_indices(n: int) -> np.ndarray:
    """The n mixed counters every stream xors with its key: the same for every step, pair
    and tensor of a length, so made once (read-only) instead of per tensor per step."""
    idx = nz.mix32(np.arange(n, dtype=nz.U32) * nz.U32(nz.GOLDEN) + nz.U32(1))
    idx.flags.writeable = False
    return idx


@kernel
def _tensor_streams(prefixes, pairs, idx, layout, buf):
    """Every requested tensor's noise for these pairs in one call (``CpuNoise.tensor_noises``):
    tensor t's streams use key mix32(prefixes[t] ^ mix32(pair ^ PAIR_SALT)), the pair's half
    made once for all tensors. layout[t] = (rows, cols, rank, offset): a low-rank tensor's
    factor-major A (P, rank, rows) then B (P, rank, cols) at buf[offset:], as
    ``_factor_streams`` writes them; cols = 0 marks a vector tensor, (P, rows) as
    ``_gaussian_streams`` writes it."""
    count = pairs.shape[0]
    pair_mix = np.empty(count, dtype=np.uint32)
    for p in range(count):
        pair_mix[p] = _mix32(_U32(pairs[p]) ^ _PAIR_SALT)
    keys = np.empty(count, dtype=np.uint32)
    for t in range(layout.shape[0]):
        rows, cols, rank, offset = layout[t, 0], layout[t, 1], layout[t, 2], layout[t, 3]
        for p in range(count):
            keys[p] = _mix32(prefixes[t] ^ pair_mix[p])
        if cols == 0:
            out = buf[offset:offset + count * rows].reshape((count, rows))
            _gaussian_streams(keys, idx[:rows], out)
        else:
            a_size = count * rank * rows
            at = buf[offset:offset + a_size].reshape((count, rank, rows))
            bt = buf[offset + a_size:offset + a_size + count * rank * cols].reshape(
                (count, rank, cols))
            _factor_streams(keys, idx, at, bt)


def _factors(noise: LowRank) -> tuple[np.ndarray, np.ndarray]:
    """The factor-major (P, r, n) C-contiguous forms of A and B: free for CpuNoise's output."""
    return (np.ascontiguousarray(noise.a.transpose(0, 2, 1)),
            np.ascontiguousarray(noise.b.transpose(0, 2, 1)))


class CpuNoise:
    """``intes.noise``'s generators, same signatures and bits, compiled.

    Factors are returned as the (P, out, r) / (P, in, r) views the interface specifies of
    factor-major buffers, so the kernels read them with unit stride at no copy.
    """

    @staticmethod
    def lowrank_factors(seed: int, step: int, pairs: np.ndarray, tensor_id: int, rows: int,
                        cols: int, rank: int) -> tuple[np.ndarray, np.ndarray]:
        return CpuNoise.tensor_noises(seed, step, pairs, rank, [(tensor_id, (rows, cols))])[0]

    @staticmethod
    def vector_noise(seed: int, step: int, pairs: np.ndarray, tensor_id: int,
                     size: int) -> np.ndarray:
        return CpuNoise.tensor_noises(seed, step, pairs, 1, [(tensor_id, (size,))])[0]

    @staticmethod
    def tensor_noises(seed: int, step: int, pairs: np.ndarray, rank: int,
                      requests: list[tuple[int, tuple[int, ...]]]) -> list:
        """``lowrank_factors`` (2-D shapes) or ``vector_noise`` (1-D) of every (tensor_id,
        shape) in ``requests``, the same bits, from one kernel call into one buffer: a
        step's noise for a population slice is 33 tensors for a 2-layer model, and the
        Python around each call, taken in turn by the slices' threads under the GIL,
        delayed every slice's forward by a few milliseconds."""
        count = len(pairs)
        layout = np.empty((len(requests), 4), dtype=np.int64)
        offset, longest = 0, 0
        for t, (_, shape) in enumerate(requests):
            rows, cols, r = (shape[0], shape[1], rank) if len(shape) == 2 else (shape[0], 0, 1)
            layout[t] = rows, cols, r, offset
            offset += count * r * (rows + cols)
            longest = max(longest, r * (rows + cols))
        buf = np.empty(offset, dtype=np.int8)
        prefixes = nz.key_prefixes(seed, step, [tid for tid, _ in requests])
        _tensor_streams(prefixes, np.ascontiguousarray(pairs, dtype=np.int64),
                        _stream_indices(longest), layout, buf)
        out = []
        for rows, cols, r, start in layout.tolist():
            if cols == 0:
                out.append(buf[start:start + count * rows].reshape(count, rows))
                continue
            a_end = start + count * r * rows
            at = buf[start:a_end].reshape(count, r, rows)
            bt = buf[a_end:a_end + count * r * cols].reshape(count, r, cols)
            out.append((at.transpose(0, 2, 1), bt.transpose(0, 2, 1)))
        return out


# ---------------------------------------------------------------------------------------------
# elementwise model ops: intmath's functions on (rows, d) int8, fused, same bits


@njit(inline="always", cache=True)
def _abs_sum(x, m):
    """sum |x[m, j]| as int32, summed in int16 lanes up to SUM16_WIDTH."""
    if x.shape[1] <= SUM16_WIDTH:
        total16 = I16(0)
        for j in range(x.shape[1]):
            total16 = np.add(total16, np.abs(I16(x[m, j])))
        return I32(total16)
    total = I32(0)
    for j in range(x.shape[1]):
        total = np.add(total, np.abs(I32(x[m, j])))
    return total


@kernel
def _norm(x, w, out):
    """In int16 lanes: |x w| <= 128 * 128."""
    n, d = x.shape
    dm, ds = _floor_divider(d)
    for m in range(n):
        wr = _row(m, w.shape[0])
        total = _abs_sum(x, m)
        mean = max(I32(np.right_shift(np.multiply(np.int64(total), dm), ds)), I32(1))  # <= 128
        recip = U16(MEAN_RECIPROCALS[mean - 1, 0])
        k = U16(MEAN_RECIPROCALS[mean - 1, 1] - NORM_BITS)
        for j in range(d):
            v = np.multiply(I16(x[m, j]), I16(w[wr, j]))
            out[m, j] = _sat8_16(_div_by_reciprocal(v, recip, k))


@njit(inline="always", cache=True)
def _mixed(x, prev, mu):
    """intmath.token_mix of one int8 value, in int16 lanes: |(prev - x) mu| <= 255 * 128."""
    x16 = I16(x)
    step = np.multiply(np.subtract(I16(prev), x16), I16(mu))
    return _sat8_16(np.add(x16, np.right_shift(step, _S7_16)))


@kernel
def _token_mix(x, prev, mu, out):
    """``_mixed`` over rows."""
    for m in range(x.shape[0]):
        mr = _row(m, mu.shape[0])
        for j in range(x.shape[1]):
            out[m, j] = _mixed(x[m, j], prev[m, j], mu[mr, j])


@kernel
def _token_mixes(x, first, resets, has_resets, mus, outs):
    """``_token_mix`` of a token block x (T, N, d) against its previous tokens
    (``intmath.token_shift``: first[m] before x[0], zero where resets[t, m]) for every mu of
    mus at once: x and its previous token are read once for all the mixes, and no shifted
    copy is made."""
    tokens, rows, dim = x.shape
    zero = np.zeros(dim, dtype=np.int8)
    for t in range(tokens):
        for m in range(rows):
            if has_resets and resets[t, m]:
                prev = zero
            elif t == 0:
                prev = first[m]
            else:
                prev = x[t - 1, m]
            for i in range(len(mus)):
                mu, out = mus[i], outs[i]
                mr = _row(m, mu.shape[0])
                for j in range(dim):
                    out[t, m, j] = _mixed(x[t, m, j], prev[j], mu[mr, j])


@kernel
def _relu_sq(x, out):
    """RELU_SQ_TABLE's own formula, (max(x, 0)^2) >> 7: arithmetic vectorizes, a gather not."""
    for m in range(x.shape[0]):
        for j in range(x.shape[1]):
            r = max(I32(x[m, j]), I32(0))
            out[m, j] = np.int8(np.right_shift(np.multiply(r, r), _S7))


@kernel
def _relu(x, out):
    """max(x, 0) on int8 rows. numpy's int8 maximum took 3.4 ms on egg's 4 MB MLP block
    (8 tokens x 512 members x 1024) against 0.13 ms here: a tenth of egg's forward."""
    for m in range(x.shape[0]):
        for j in range(x.shape[1]):
            out[m, j] = max(x[m, j], np.int8(0))


@njit(inline="always", cache=True)
def _decay(s, w):
    """(s * w) >> 8 for int32 s and w in [1, 255], exactly, in int32 lanes (an int64 product
    does not vectorize on AVX2): with s = 256 hi + lo, lo in [0, 255], it is
    hi w + (lo w) >> 8, and |hi w| <= 2^23 * 255 leaves room for the < 2^8 remainder term."""
    hi = np.multiply(np.right_shift(s, _S8), w)
    return np.add(hi, np.right_shift(np.multiply(np.bitwise_and(s, _BYTE8), w), _S8))


@kernel
def _wkv_step(num, den, k, v, decay, wkv, num_out, den_out):
    """intmath.wkv_step: its int64 sums wrapped to int32 equal these int32 sums (mod 2^32)."""
    for m in range(num.shape[0]):
        dr = _row(m, decay.shape[0])
        for j in range(num.shape[1]):
            w = np.add(I32(decay[dr, j]), _W0)
            e = np.left_shift(WKV_EXP_TABLE[np.int64(k[m, j]) + INT8_MAX], _WKV_FRAC)
            n32 = np.add(_decay(num[m, j], w), np.multiply(e, I32(v[m, j])))
            d32 = np.add(_decay(den[m, j], w), e)
            num_out[m, j], den_out[m, j] = n32, d32
            wkv[m, j] = _div_sat8(n32, d32)


@kernel
def _wkv_scan(num, den, k_exp, v, decay, resets, has_resets, wkv, num_out, den_out):
    """_wkv_step over a token block v (T, N, d), row by row so a row's states stay in L1
    across its T tokens, k_exp holding WKV_EXP_TABLE[k] (``vbmi.lookup_flat``: read as
    bytes, not gathered from the table); with ``has_resets``, a row's states are cleared
    before token t where resets[t, m]."""
    tokens, rows, dim = k_exp.shape
    for m in range(rows):
        dr = _row(m, decay.shape[0])
        for j in range(dim):
            num_out[m, j], den_out[m, j] = num[m, j], den[m, j]
        for t in range(tokens):
            if has_resets and resets[t, m]:
                for j in range(dim):
                    num_out[m, j], den_out[m, j] = 0, 0
            for j in range(dim):
                w = np.add(I32(decay[dr, j]), _W0)
                e = np.left_shift(I32(k_exp[t, m, j]), _WKV_FRAC)
                n32 = np.add(_decay(num_out[m, j], w), np.multiply(e, I32(v[t, m, j])))
                d32 = np.add(_decay(den_out[m, j], w), e)
                num_out[m, j], den_out[m, j] = n32, d32
                wkv[t, m, j] = _div_sat8(n32, d32)


@kernel
def _sat_add2(a, b, out):
    """In int16 lanes, as ``_sat_add3``."""
    for m in range(out.shape[0]):
        ar, br = _row(m, a.shape[0]), _row(m, b.shape[0])
        for j in range(out.shape[1]):
            out[m, j] = _sat8_16(np.add(I16(a[ar, j]), I16(b[br, j])))


@kernel
def _sat_add3(a, b, c, out):
    """In int16 lanes: three int8 terms sum to at most 3 * 128."""
    for m in range(out.shape[0]):
        ar, br, cr = _row(m, a.shape[0]), _row(m, b.shape[0]), _row(m, c.shape[0])
        for j in range(out.shape[1]):
            out[m, j] = _sat8_16(np.add(np.add(I16(a[ar, j]), I16(b[br, j])), I16(c[cr, j])))


@kernel
def _gru_blend(h, f, target, out):
    for m in range(h.shape[0]):
        for j in range(h.shape[1]):
            h32 = I32(h[m, j])
            gap = np.multiply(np.add(I32(f[m, j]), _HI), np.subtract(I32(target[m, j]), h32))
            out[m, j] = np.int8(np.add(h32, np.right_shift(gap, _S8)))  # wraps like astype


@njit(inline="always", cache=True)
def _gru_gate(fx, uf, bf, h, f, gated):
    """EGG's gate for one token: f = sat8(fx + uf + bf) and the gated state ((f + 127) h)
    >> 8 (``gru_blend`` from zero) that the candidate's recurrent product reads."""
    for m in range(h.shape[0]):
        br = _row(m, bf.shape[0])
        for j in range(h.shape[1]):
            fm = _sat8(np.add(np.add(I32(fx[m, j]), I32(uf[m, j])), I32(bf[br, j])))
            f[m, j] = fm
            gated[m, j] = np.int8(np.right_shift(np.multiply(np.add(I32(fm), _HI),
                                                             I32(h[m, j])), _S8))


@njit(inline="always", cache=True)
def _gru_step(hx, uh, bh, f, h, hs):
    """EGG's state step for one token: h = gru_blend(h, f, sat8(hx + uh + bh)), in place,
    copied to hs."""
    for m in range(h.shape[0]):
        br = _row(m, bh.shape[0])
        for j in range(h.shape[1]):
            cand = _sat8(np.add(np.add(I32(hx[m, j]), I32(uh[m, j])), I32(bh[br, j])))
            h32 = I32(h[m, j])
            gap = np.multiply(np.add(I32(f[m, j]), _HI), np.subtract(I32(cand), h32))
            h[m, j] = hs[m, j] = np.int8(np.add(h32, np.right_shift(gap, _S8)))


@njit(inline="always", cache=True)
def _clear_reset_rows(h, resets, has_resets, t):
    if has_resets:
        for m in range(h.shape[0]):
            if resets[t, m]:
                h[m, :] = 0


@kernel
def _gru_scan_plain(fx, hx, h0, resets, has_resets, wf, half_f, shift_f, wh, half_h, shift_h,
                    bf, bh, hs):
    """EGG's recurrence over a token block (``intes.models.egg.gru_scan``) in one call, its
    recurrent products by ``_fused_plain`` (wf, wh: its weight arguments): the Python loop's
    eight calls per token, a few microseconds each, become none. (Chunks of rows, each
    through all T tokens with its state in L2, measured no faster on a Zen 4.)"""
    h, uf, uh = h0.copy(), np.empty_like(h0), np.empty_like(h0)
    f, gated = np.empty_like(h0), np.empty_like(h0)
    for t in range(fx.shape[0]):
        _clear_reset_rows(h, resets, has_resets, t)
        _fused_plain(h, *wf, half_f, shift_f, uf, None)
        _gru_gate(fx[t], uf, bf, h, f, gated)
        _fused_plain(gated, *wh, half_h, shift_h, uh, None)
        _gru_step(hx[t], uh, bh, f, h, hs[t])


@kernel
def _gru_scan_es(fx, hx, h0, resets, has_resets, wf, half_f, shift_f, wh, half_h, shift_h,
                 bf, bh, hs, lowrank):
    """``_gru_scan_plain`` for an ES step: the recurrent products by ``_fused_rank1``, or
    by ``_fused_lowrank`` if ``lowrank`` (wf, wh: an ES plan's arguments for either)."""
    h, uf, uh = h0.copy(), np.empty_like(h0), np.empty_like(h0)
    f, gated = np.empty_like(h0), np.empty_like(h0)
    for t in range(fx.shape[0]):
        _clear_reset_rows(h, resets, has_resets, t)
        if lowrank:
            _fused_lowrank(h, *wf, half_f, shift_f, uf, None)
        else:
            _fused_rank1(h, *wf, half_f, shift_f, uf, None)
        _gru_gate(fx[t], uf, bf, h, f, gated)
        if lowrank:
            _fused_lowrank(gated, *wh, half_h, shift_h, uh, None)
        else:
            _fused_rank1(gated, *wh, half_h, shift_h, uh, None)
        _gru_step(hx[t], uh, bh, f, h, hs[t])


@kernel
def _member_vectors(v, noise, half, shift, out):
    """intmath.member_vectors: rows 2p, 2p+1 = sat8(v +- rshift_round(noise_p, shift))."""
    for p in range(noise.shape[0]):  # a loop per row: with both rows' stores in one loop
        for j in range(v.shape[0]):   # LLVM does not vectorize it (measured 10x slower)
            delta = np.right_shift(np.add(I32(noise[p, j]), half), shift)
            out[2 * p, j] = _sat8(np.add(I32(v[j]), delta))
        for j in range(v.shape[0]):
            delta = np.right_shift(np.add(I32(noise[p, j]), half), shift)
            out[2 * p + 1, j] = _sat8(np.subtract(I32(v[j]), delta))


def _rows2d(v: np.ndarray) -> np.ndarray:
    """Any (..., d) array as 2-D rows (a view where it can be): a parameter vector (d,) as one
    shared row (1, d), a token block (T, N, d) as its T N stacked rows."""
    return v.reshape(-1, v.shape[-1])


def _like(x: np.ndarray, dtype=np.int8) -> tuple[np.ndarray, np.ndarray]:
    """A new array shaped like x, and its 2-D rows view for a kernel to write."""
    out = np.empty(x.shape, dtype=dtype)
    return out, _rows2d(out)


_NO_RESETS = np.zeros((1, 1), dtype=np.bool_)  # a typed stand-in where there are none


class CpuElementwise:
    """intmath's model ops, one fused pass each, on (rows, d) activations or (T, rows, d)
    token blocks (kernels see T rows-stacked copies: see ``_row``).

    Parameter vectors may be (d,), one shared row (1, d) or one row per member (rows, d).
    """

    @staticmethod
    def norm(x: np.ndarray, weight: np.ndarray) -> np.ndarray:
        out, rows = _like(x)
        _norm(_rows2d(x), _rows2d(weight), rows)
        return out

    @staticmethod
    def token_mix(x: np.ndarray, prev: np.ndarray, mu: np.ndarray) -> np.ndarray:
        out, rows = _like(x)
        _token_mix(_rows2d(x), _rows2d(prev), _rows2d(mu), rows)
        return out

    @staticmethod
    def token_mixes(x: np.ndarray, first: np.ndarray, resets: np.ndarray | None,
                    mus: tuple[np.ndarray, ...]) -> tuple[np.ndarray, ...]:
        outs = tuple(np.empty(x.shape, dtype=np.int8) for _ in mus)
        _token_mixes(np.ascontiguousarray(x), np.ascontiguousarray(first),
                     _NO_RESETS if resets is None else np.ascontiguousarray(resets),
                     resets is not None, tuple(np.ascontiguousarray(_rows2d(mu)) for mu in mus),
                     outs)
        return outs

    @staticmethod
    def sigmoid_gate(r: np.ndarray, v: np.ndarray) -> np.ndarray:
        out = np.empty(v.shape, dtype=np.int8)
        sigmoid_gate_flat(np.ascontiguousarray(r).reshape(-1), np.ascontiguousarray(v).reshape(-1),
                          out.reshape(-1))
        return out

    @staticmethod
    def relu_sq(x: np.ndarray) -> np.ndarray:
        out, rows = _like(x)
        _relu_sq(_rows2d(x), rows)
        return out

    @staticmethod
    def wkv_step(num: np.ndarray, den: np.ndarray, k: np.ndarray, v: np.ndarray,
                 decay: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        wkv, num_out, den_out = _like(k)[0], _like(num, np.int32)[0], _like(den, np.int32)[0]
        _wkv_step(num, den, k, v, _rows2d(decay), wkv, num_out, den_out)
        return wkv, num_out, den_out

    @staticmethod
    def wkv_scan(num: np.ndarray, den: np.ndarray, k: np.ndarray, v: np.ndarray,
                 decay: np.ndarray, resets: np.ndarray | None
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        wkv, num_out, den_out = _like(k)[0], _like(num, np.int32)[0], _like(den, np.int32)[0]
        _wkv_scan(num, den, lookup_flat(k, WKV_EXP_BYTES), v, _rows2d(decay),
                  _NO_RESETS if resets is None else resets, resets is not None, wkv, num_out,
                  den_out)
        return wkv, num_out, den_out

    token_shift = staticmethod(intmath.token_shift)  # numpy's copy; token_mixes needs none

    @staticmethod
    def sat_add(*terms: np.ndarray) -> np.ndarray:
        rows = [_rows2d(t) for t in terms]
        out, out_rows = _like(max(terms, key=lambda t: t.size))
        if len(rows) == 2:
            _sat_add2(rows[0], rows[1], out_rows)
        elif len(rows) == 3:
            _sat_add3(rows[0], rows[1], rows[2], out_rows)
        else:
            raise ValueError(f"sat_add takes 2 or 3 terms, got {len(rows)}")
        return out

    @staticmethod
    def gru_blend(h: np.ndarray, f: np.ndarray, target: np.ndarray) -> np.ndarray:
        out, rows = _like(h)
        _gru_blend(_rows2d(h), _rows2d(f), _rows2d(target), rows)
        return out

    @staticmethod
    def member_vectors(v: np.ndarray, noise: np.ndarray, sigma_shift: int) -> np.ndarray:
        out = np.empty((2 * noise.shape[0], v.shape[0]), dtype=np.int8)
        _member_vectors(v, noise, *_rounding(sigma_shift), out)
        return out

    @staticmethod
    def relu(x: np.ndarray) -> np.ndarray:
        out, rows = _like(x)
        _relu(_rows2d(x), rows)
        return out


# ---------------------------------------------------------------------------------------------


# The activations the VNNI tiles apply in registers (``vnni_gemm.store_tile``), as their
# ``act`` argument: relu clamps at 0 instead of -127 (an empty table), at no cost; relu^2
# also reads its table's entries for 0..127 by VBMI's vpermi2b. Without VBMI relu^2 runs
# as an op of its own after the layer. A residual is the other ``act`` the tiles take.
ACTIVATIONS = ("relu", "relu_sq")
EPILOGUES = {"relu": np.zeros(0, dtype=np.uint8)}
if HAVE_VBMI:
    EPILOGUES["relu_sq"] = intmath.RELU_SQ_TABLE[INT8_MAX:].astype(np.uint8)

ES_PLANS = 64  # plans kept per weight: one per population slice (or chunk) of a step


def _es_plan(w: CpuWeight, noise: LowRank, fan_in: int, sigma_shift: int,
             shift: np.int32) -> tuple:
    """(noise, kernel, its arguments before (half, shift, out)) of an ES layer, kept with
    its weight for the step: the same for all of the layer's token blocks, so each call
    after the first skips the factor views, the bound check and the kernel choice (a few
    microseconds a call, most of an ES layer's Python)."""
    p = w.wt
    at, bt = _factors(noise)
    rank, bsum = at.shape[1], factor_sums(bt)
    if p.tail.shape[1] or not merged_rescale_fits(fan_in, sigma_shift, int(shift), rank):
        kernel = _fused_buffered
        args = (p.packed, p.comp, p.tail, at, bt, bsum, I32(sigma_shift))
    else:
        kernel = _fused_rank1 if rank == 1 else _fused_lowrank
        args = (p.packed, p.comp, at, bt, bsum, I32(sigma_shift))
    if len(w.es_plans) >= ES_PLANS:  # forward after forward on the same weights
        w.es_plans.clear()
    plan = w.es_plans[id(noise), sigma_shift, int(shift)] = (noise, kernel, args)
    return plan


def _kept_plan(w: CpuWeight, noise: LowRank, fan_in: int, sigma_shift: int,
               shift: np.int32) -> tuple:
    """The ES plan of this layer and noise, made on the first call of the step."""
    plan = w.es_plans.get((id(noise), sigma_shift, int(shift)))
    if plan is None or plan[0] is not noise:
        plan = _es_plan(w, noise, fan_in, sigma_shift, shift)
    return plan


class CpuBackend:
    """numba/BLAS backend; ``ew`` and ``noise_source`` are its elementwise ops and generator.

    ``token_block`` (fixed, INTES_CPU_TOKEN_BLOCK, or by default the measured rule, see
    ``TOKEN_BLOCK``): tokens per forward call (see ``intes.kernels.base``). A block makes each
    op one call over T times the rows, which pays where a slice's rows are few and per-call
    costs (Python, GEMM dispatch) a large share.
    """

    name = "cpu"
    ew = CpuElementwise
    fused_epilogues = (*ACTIVATIONS, "residual")  # what linear(...) takes after the layer
    noise_source = CpuNoise
    chunk_rows = CHUNK_ROWS  # member rows per forward call, at most (see CHUNK_ROWS)

    def __init__(self, threads: int | None = None, gemm: str | None = None,
                 token_block: int | None = None) -> None:
        self.threads = threads or default_threads()  # population slices run concurrently
        if self.threads < 1:
            raise ConfigError(f"threads must be >= 1, got {self.threads}")
        self.fixed_block = token_block or default_token_block()
        if self.fixed_block is not None and self.fixed_block < 1:
            raise ConfigError(f"token block must be >= 1, got {self.fixed_block}")
        self.gemm: GemmEngine = make_gemm(gemm)
        keep_freed_memory()

    def token_block(self, rows: int, width: int) -> int:
        """Tokens per forward call for a slice of ``rows`` member rows of a model ``width``
        wide."""
        if self.fixed_block is not None:
            return self.fixed_block
        if rows * width <= SMALL_BATCH_BYTES:
            return SMALL_BATCH_BLOCK
        if isinstance(self.gemm, VnniGemm):
            fits = FUSED_BLOCK * rows * width <= FUSED_BLOCK_BYTES
            return FUSED_BLOCK if fits else TOKEN_BLOCK
        return TOKEN_BLOCK if rows <= BLOCK_ROWS else 1

    def prepare(self, w: np.ndarray) -> CpuWeight:
        return CpuWeight(w, self.gemm.prepare(w))

    def base_product(self, x: np.ndarray, w: CpuWeight) -> np.ndarray:
        """(rows, out) exact X @ W^T: int32, or float32 holding exact integers."""
        return self.gemm.product(x, w.wt)

    def fused_linear(self, x: np.ndarray, w: CpuWeight, half: np.int32, shift: np.int32,
                     noise: LowRank | None, sigma_shift: int, act: np.ndarray | None = None
                     ) -> np.ndarray:
        """int8 (rows, out) of a layer whose product and epilogue run fused, panel by panel
        (the VNNI engine): plain for inference, or ES at any rank; ``act`` what follows
        the rescale: an activation's table (``EPILOGUES``), a residual (rows, out), or
        None."""
        p, out = w.wt, np.empty((x.shape[0], w.w.shape[0]), dtype=np.int8)
        if noise is None:
            _fused_plain(x, p.packed, p.comp, p.tail, half, shift, out, act)
            return out
        _, kernel, args = _kept_plan(w, noise, x.shape[1], sigma_shift, shift)
        kernel(x, *args, half, shift, out, act)
        return out

    def gru_scan(self, fx: np.ndarray, hx: np.ndarray, h: np.ndarray, resets: np.ndarray | None,
                 uf: tuple, uh: tuple, bf: np.ndarray, bh: np.ndarray, sigma_shift: int
                 ) -> tuple[np.ndarray, np.ndarray] | None:
        """EGG's recurrence over a token block in one kernel call (see
        ``intes.models.egg.gru_scan``; uf, uh are (weight, shift, noise)), or None where its
        layers have no fused kernel to call from there: an engine other than VNNI, or an ES
        layer whose plan is the buffered kernel (a fan-in tail, or past the merged bound)."""
        (wf, shift_f, noise_f), (wh, shift_h, noise_h) = uf, uh
        if not (isinstance(wf.wt, VnniWeight) and isinstance(wh.wt, VnniWeight)):
            return None
        (half_f, shift_f), (half_h, shift_h) = _rounding(shift_f), _rounding(shift_h)
        hs = np.empty(fx.shape, dtype=np.int8)
        args = (fx, hx, np.ascontiguousarray(h), _NO_RESETS if resets is None else resets,
                resets is not None)
        if noise_f is None and noise_h is None:
            args_f, args_h = ((w.wt.packed, w.wt.comp, w.wt.tail) for w in (wf, wh))
            _gru_scan_plain(*args, args_f, half_f, shift_f, args_h, half_h, shift_h,
                            _rows2d(bf), _rows2d(bh), hs)
            return hs, hs[-1] if len(hs) else h
        if noise_f is None or noise_h is None:
            return None
        (_, kernel_f, args_f), (_, kernel_h, args_h) = (
            _kept_plan(wf, noise_f, h.shape[1], sigma_shift, shift_f),
            _kept_plan(wh, noise_h, h.shape[1], sigma_shift, shift_h))
        if kernel_f is not kernel_h or kernel_f not in (_fused_rank1, _fused_lowrank):
            return None  # a fan-in tail or past the merged bound: the buffered kernel
        _gru_scan_es(*args, args_f, half_f, shift_f, args_h, half_h, shift_h, _rows2d(bf),
                     _rows2d(bh), hs, kernel_f is _fused_lowrank)
        return hs, hs[-1] if len(hs) else h

    def linear(self, x, w, shift, noise, sigma_shift, activation=None, residual=None):
        """``Backend.linear``, then ``activation`` (relu or relu_sq, intmath's op of that
        name) or the ``residual`` add sat_add(residual, output): in the VNNI tiles'
        registers where they can (``EPILOGUES``, any residual), else by ``ew`` on the
        output."""
        if activation is not None and activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}")
        if activation is not None and residual is not None:
            raise ValueError("an activation or a residual, not both")
        rows = np.ascontiguousarray(_rows2d(x))
        half, shift = _rounding(shift)
        shape = (*x.shape[:-1], w.w.shape[0])
        if residual is not None:
            if residual.shape != shape or residual.dtype != np.int8:
                raise ValueError(f"residual {residual.dtype}{residual.shape}, layer int8{shape}")
            residual = np.ascontiguousarray(_rows2d(residual))
        if isinstance(w.wt, VnniWeight) and (activation in EPILOGUES or residual is not None):
            after = residual if activation is None else EPILOGUES[activation]
            out = self.fused_linear(rows, w, half, shift, noise, sigma_shift, after)
            activation = residual = None
        elif isinstance(w.wt, VnniWeight):
            out = self.fused_linear(rows, w, half, shift, noise, sigma_shift)
        else:
            out = self._unfused_linear(rows, w, half, shift, noise, sigma_shift)
        if activation is not None:
            out = getattr(self.ew, activation)(out)
        if residual is not None:
            out = self.ew.sat_add(residual, out)
        return out.reshape(shape)

    def _unfused_linear(self, rows: np.ndarray, w: CpuWeight, half: np.int32,
                        shift: np.int32, noise: LowRank | None, sigma_shift: int
                        ) -> np.ndarray:
        """A layer on the other GEMM engines: their int32 (or exact float32) product, then
        the epilogue in a pass of its own."""
        rank1 = noise is not None and noise.a.shape[2] == 1
        factors = None if noise is None else _factors(noise)
        if rank1:  # projected before the GEMM, while x is in cache
            xb = np.empty(len(rows), dtype=np.int32)
            _project_rank1(rows, factors[1], xb)
        acc = self.base_product(rows, w)
        out = np.empty(acc.shape, dtype=np.int8)
        if factors is None:
            _linear_plain(acc, half, shift, out)
        elif rank1:
            _correct_rank1(acc, xb, factors[0], I32(sigma_shift), half, shift, out)
        else:
            _linear_lowrank(acc, rows, *factors, I32(sigma_shift), half, shift, out)
        return out

    def embed(self, table, tokens, noise, sigma_shift):
        out = np.empty((*tokens.shape, table.shape[1]), dtype=np.int8)
        flat, rows = np.ascontiguousarray(tokens, dtype=np.int64).reshape(-1), _rows2d(out)
        if noise is None:
            _embed_plain(table, flat, rows)
        else:
            at, bt = _factors(noise)
            kernel = _embed_rank1 if at.shape[1] == 1 else _embed_lowrank
            kernel(table, flat, at, bt, I32(FRAC_BITS + sigma_shift), rows)
        return out

    def log_likelihood(self, logits, targets):
        out = np.empty(targets.shape, dtype=np.int32)
        _log_likelihood(_rows2d(logits), np.ascontiguousarray(targets, dtype=np.int64).reshape(-1),
                        out.reshape(-1))
        return out

    def update_matrix(self, w, noise, fitness, threshold):
        factors = _factors(noise)
        if isinstance(self.gemm, VnniGemm):
            operands = self.gemm.update_operands(*factors, fitness)
            if operands is not None:
                x, b, levels = operands
                out = np.empty(w.shape, dtype=np.int8)
                _fused_update(x, b.packed, b.comp, levels, np.ascontiguousarray(w), threshold,
                              out)
                return out
        return step_by_sign(w, self.gemm.lowrank_sum(*factors, fitness), threshold)

    def update_vector(self, v, noise, fitness, threshold):
        return step_by_sign(v, self.gemm.vector_sum(fitness, noise), threshold)
