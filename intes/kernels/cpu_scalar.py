"""The int32 scalar helpers every CPU kernel inlines: saturation, rescaling, what follows a
fused layer's rescale (``_after``), and division without a divide instruction.

numba widens int32 +, -, *, >> to int64, which halves the SIMD lanes and loses the
reference's int32 wrap-around. numpy's ufuncs on int32 scalars stay int32 and wrap like
numpy, so the kernels write np.add / np.subtract / np.multiply / np.right_shift on I32.
Where every value an op can meet fits int16 (for any int8 inputs, -128 included), it runs in
I16 the same way: twice the lanes per vector.
"""

from __future__ import annotations

import functools

import numpy as np
from numba import njit, types
from numba.extending import overload

from intes.intmath import FRAC_BITS, INT8_MAX, WKV_FRAC_BITS

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
