"""The CPU backend's model ops other than the linear layers: intmath's functions on (rows, d)
int8 activations or (T, rows, d) token blocks, one fused numba pass each, the same bits
(``CpuElementwise``), and the integer log-likelihood that scores the members."""

from __future__ import annotations

import numpy as np
from numba import njit

from intes import intmath
from intes.intmath import (
    EXP2_FRAC_BITS,
    INT8_MAX,
    LL_FRAC_BITS,
    LOG2_MANTISSA,
    LOGIT_FRAC_BITS,
    WKV_EXP_TABLE,
)
from intes.kernels.cpu_scalar import (
    _BYTE8,
    _HI,
    _S7,
    _S7_16,
    _S8,
    _W0,
    _WKV_FRAC,
    I16,
    I32,
    MEAN_RECIPROCALS,
    NORM_BITS,
    U16,
    _div_by_reciprocal,
    _div_sat8,
    _floor_divider,
    _rounding,
    _row,
    _sat8,
    _sat8_16,
    kernel,
)
from intes.kernels.vbmi import WKV_EXP_BYTES, exp2_sum, lookup_flat, sigmoid_gate_flat

SUM16_WIDTH = 255  # a row's sum of |x| <= 255 * 128 fits int16 up to this width


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
