"""Integer primitives shared by every backend: saturation, rounding shifts, lookup tables.

Conventions:
- int8 values live in [-127, 127]; -128 never appears, so negation is always safe.
- Weights, activations and noise are fixed point "value x 16" (``FRAC_BITS`` = 4).
- Logits are log2-probabilities in units of 1/16 bit; log-likelihoods are int32 in units of
  1/256 bit (``LL_FRAC_BITS``), so a pair's fitness difference rarely ties.

Lookup tables are built once at import with Python's ``decimal`` (exact, platform independent
software arithmetic), never with libm floats, so every machine gets the same table bits.
"""

from __future__ import annotations

from decimal import (
    MAX_EMAX,
    MIN_EMIN,
    ROUND_HALF_EVEN,
    Context,
    Decimal,
    DivisionByZero,
    InvalidOperation,
    Overflow,
    localcontext,
)
from fractions import Fraction
from functools import lru_cache

import numpy as np

INT8_MAX = 127
FRAC_BITS = 4
LOGIT_FRAC_BITS = 4
LL_FRAC_BITS = 8
EXP2_FRAC_BITS = 16  # softmax terms are 2^16 * 2^(-d/16)
WKV_FRAC_BITS = 7
MAX_VOCAB = 1 << 15  # vocab < this: the sum of V terms <= 2^16 each stays below 2^31

def exact_context(prec: int) -> Context:
    """A decimal context fixed in full (precision, half-even rounding, exponent range, traps),
    not derived from the caller's, which is per thread and may round or trap otherwise: the
    same digits for every caller. Importing intes leaves the caller's context as it was."""
    return Context(prec=prec, rounding=ROUND_HALF_EVEN, Emin=MIN_EMIN, Emax=MAX_EMAX, clamp=0,
                   flags=[], traps=[InvalidOperation, DivisionByZero, Overflow])


TABLE_PREC = 40  # decimal digits of the tables' arithmetic
with localcontext(exact_context(TABLE_PREC)):
    _LN2 = Decimal(2).ln()


def _round(d: Decimal) -> int:
    return int(d.to_integral_value(rounding=ROUND_HALF_EVEN))


def _exp2(x: Decimal) -> Decimal:
    return (x * _LN2).exp()


def _log2(x: Decimal) -> Decimal:
    return x.ln() / _LN2


def sat8(x: np.ndarray) -> np.ndarray:
    """Saturate to int8 in [-127, 127]."""
    return np.clip(x, -INT8_MAX, INT8_MAX).astype(np.int8)


def rshift_round(x: np.ndarray, shift: int) -> np.ndarray:
    """Right shift rounding half up; the caller guarantees x + 2^(shift-1) fits its dtype."""
    if shift <= 0:
        return x
    return (x + (1 << (shift - 1))) >> shift


def div_trunc(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """Integer division rounding toward zero (den > 0): symmetric, and C/Triton/CUDA native."""
    q = np.abs(num) // den
    return np.where(num < 0, -q, q).astype(num.dtype)


def fan_in_shift(fan_in: int) -> int:
    """Shift that rescales an int32 dot product of two x16 values over fan_in terms.

    Dividing by 16 * sqrt(fan_in) keeps unit-variance activations at unit variance; the sqrt
    is rounded up to a power of two so the rescale is a shift.
    """
    return FRAC_BITS + ((fan_in - 1).bit_length() + 1) // 2


with localcontext(exact_context(TABLE_PREC)):
    # exp2 of a logit below the max: index d = max - logit in [0, 254].
    EXP2_TABLE = np.array(
        [_round(_exp2(Decimal(-d) / 16) * (1 << EXP2_FRAC_BITS)) for d in range(255)],
        dtype=np.int32,
    )
    # log2(1 + m/256) * 256 for the 8 mantissa bits after the leading one.
    LOG2_MANTISSA = np.array(
        [_round(_log2(1 + Decimal(m) / 256) * 256) for m in range(256)], dtype=np.int32
    )
    # sigmoid(x / 16) * 128 over int8 x (index x + 127): a gate in [0, 128], applied as
    # (g * v) >> 7.
    SIGMOID_TABLE = np.array(
        [_round(128 / (1 + (Decimal(-x) / 16).exp())) for x in range(-127, 128)], dtype=np.int32
    )
    # exp2(k / 32 + 4) over int8 k (index k + 127): WKV weights in [1, 251] (see wkv_step).
    WKV_EXP_TABLE = np.array(
        [max(1, _round(_exp2(Decimal(k) / 32 + 4))) for k in range(-127, 128)], dtype=np.int32
    )

# relu(x)^2 >> 7 over int8 x (index x + 127): RWKV channel-mix activation, result in [0, 126].
RELU_SQ_TABLE = np.array([(max(x, 0) ** 2) >> 7 for x in range(-127, 128)], dtype=np.int32)


QUANTILE_PREC = 50  # decimal digits of normal_quantile's arithmetic
_PI = Decimal("3.14159265358979323846264338327950288419716939937510")


@lru_cache(maxsize=64)  # one per step of the schedule, then the same one every step
def normal_quantile(p: Fraction) -> Decimal:
    """The z with Phi(z) = p, for 1/2 <= p < 1, in decimal software arithmetic, so that the same
    p gives the same digits on every machine (the update's thresholds rest on it; libm's
    log, which a float quantile needs, may differ in its last bit between platforms).

    Newton's method from z = 0 on Phi(z) - 1/2 = phi(z) * sum_n z^(2n+1) / (2n+1)!!, a series
    of positive terms; Phi - 1/2 is concave for z >= 0, so every iterate stays below the root
    and the iteration is a deterministic function of p. Good to about 40 digits.
    """
    if not Fraction(1, 2) <= p < 1:
        raise ValueError(f"p must be in [1/2, 1), got {p}")
    with localcontext(exact_context(QUANTILE_PREC)):
        target = Decimal(p.numerator) / p.denominator - Decimal("0.5")
        root_2pi = (2 * _PI).sqrt()
        tolerance = Decimal(10) ** (10 - QUANTILE_PREC)  # Newton's: 40 digits of z
        precision = Decimal(10) ** -QUANTILE_PREC  # the series': terms past it change nothing
        z = Decimal(0)
        for _ in range(1000):
            density = (-z * z / 2).exp() / root_2pi
            term = total = z
            n = 0
            while term > total * precision:
                n += 1
                term = term * z * z / (2 * n + 1)
                total += term
            correction = (target - density * total) / density
            z += correction
            if abs(correction) <= tolerance:
                return z
    raise ArithmeticError(f"normal_quantile({p}) did not converge")  # not reached for p < 1


def lut(table: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Look up an int8 input in a 255-entry table indexed by x + 127."""
    return table[x.astype(np.int32) + INT8_MAX]


def log2_fixed(s: np.ndarray) -> np.ndarray:
    """log2(s) * 256 for int32 s >= 1: leading-one position plus an 8-bit mantissa table."""
    s = s.astype(np.int64)
    e = np.zeros(s.shape, dtype=np.int64)
    for k in (16, 8, 4, 2, 1):
        big = (s >> (e + k)) > 0
        e = e + np.where(big, k, 0)
    mant = np.where(e >= 8, s >> np.maximum(e - 8, 0), s << np.maximum(8 - e, 0)) & 255
    return (e * 256 + LOG2_MANTISSA[mant]).astype(np.int32)


def log_likelihood(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """log2 p(target) in 1/256 bit (int32, <= 0) from int8 logits in 1/16 bit.

    log-sum-exp via EXP2_TABLE relative to the row max: each term <= 2^16 and there are at
    fewer than MAX_VOCAB of them, so the int32 sum cannot overflow; it is >= 2^16 (the max's term).
    """
    z = logits.astype(np.int32)
    m = z.max(axis=1)
    total = EXP2_TABLE[m[:, None] - z].sum(axis=1, dtype=np.int32)
    lse = log2_fixed(total) - EXP2_FRAC_BITS * 256  # >= 0
    target = np.take_along_axis(z, targets.astype(np.intp)[:, None], axis=1)[:, 0]
    return ((target - m) << (LL_FRAC_BITS - LOGIT_FRAC_BITS)) - lse


def norm(x: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """Integer layer norm: x * weight / mean|x|, so mean |output| ~ weight (x16 fixed point).

    |x * weight| <= 127 * 127 and sum |x| <= d * 127: both fit int32 for any d < 2^24.
    """
    x32 = x.astype(np.int32)
    d = x.shape[-1]
    mean_abs = np.maximum(np.abs(x32).sum(axis=-1, keepdims=True) // d, 1)
    return sat8(div_trunc(x32 * weight.astype(np.int32), mean_abs))


def sat_add(*terms: np.ndarray) -> np.ndarray:
    """Saturating sum of int8 terms (accumulated in int32, where it cannot overflow)."""
    total = terms[0].astype(np.int32)
    for t in terms[1:]:
        total = total + t
    return sat8(total)


def token_mix(x: np.ndarray, prev: np.ndarray, mu: np.ndarray) -> np.ndarray:
    """x + (prev - x) * mu / 128: RWKV's learned per-channel token shift (|.| <= 254 * 127)."""
    x32 = x.astype(np.int32)
    return sat8(x32 + (((prev.astype(np.int32) - x32) * mu) >> 7))


def gate(g: np.ndarray, v: np.ndarray) -> np.ndarray:
    """g * v / 128 for a gate g in [0, 128] from SIGMOID_TABLE."""
    return sat8((g * v.astype(np.int32)) >> 7)


def sigmoid_gate(r: np.ndarray, v: np.ndarray) -> np.ndarray:
    """gate(sigmoid(r), v): RWKV's receptance gate, one op so a backend can fuse it."""
    return gate(lut(SIGMOID_TABLE, r), v)


def relu_sq(x: np.ndarray) -> np.ndarray:
    """relu(x)^2 >> 7 as int8 (the table's range is [0, 126]): RWKV's channel-mix activation."""
    return lut(RELU_SQ_TABLE, x).astype(np.int8)


def wkv_step(num: np.ndarray, den: np.ndarray, k: np.ndarray, v: np.ndarray, decay: np.ndarray):
    """One step of the integer WKV recurrence; returns (wkv int8, num, den), states int32.

    num <- num * w / 256 + E v and den <- den * w / 256 + E, with w = 128 + decay in [1, 255]
    and E = WKV_EXP_TABLE[k] << WKV_FRAC_BITS in [2^7, 251 * 2^7]. The 7 fractional bits keep
    den's floor rounding below 1% of E, so wkv = num / den stays a decayed, E-weighted mean
    of v (without them a small E loses den's history while num keeps it). Bounds: |E v| <
    2^22, so by induction |num| <= 2^30 (the decay removes >= |num| / 256 >= 2^22 at that
    bound) and den <= 2^23: both states fit int32; the products with w are taken in int64.
    """
    w = decay.astype(np.int64) + 128
    e = lut(WKV_EXP_TABLE, k).astype(np.int64) << WKV_FRAC_BITS
    num = (((num * w) >> 8) + e * v).astype(np.int32)
    den = (((den * w) >> 8) + e).astype(np.int32)
    return sat8(div_trunc(num, den)), num, den


def token_shift(x: np.ndarray, first: np.ndarray, resets: np.ndarray | None) -> np.ndarray:
    """Each token's previous token over a block of tokens x (T, N, d): first (N, d) before
    x[0], then x[t - 1]; zero where resets (T, N) marks a row's state as cleared at t."""
    prev = np.concatenate([first[None], x[:-1]], axis=0)
    if resets is not None:
        prev[resets] = 0
    return prev


def token_mixes(x: np.ndarray, first: np.ndarray, resets: np.ndarray | None,
                mus: tuple[np.ndarray, ...]) -> tuple[np.ndarray, ...]:
    """token_mix(x, token_shift(x, first, resets), mu) for each mu of mus, over a block of
    tokens x (T, N, d): one op, so that a backend can read x and its shift once for all the
    mixes a layer takes."""
    prev = token_shift(x, first, resets)
    return tuple(token_mix(x, prev, mu) for mu in mus)


def wkv_scan(num: np.ndarray, den: np.ndarray, k: np.ndarray, v: np.ndarray,
             decay: np.ndarray, resets: np.ndarray | None):
    """wkv_step over a block of tokens k, v (T, N, d), states cleared where resets (T, N) is
    set; returns (wkv (T, N, d), num, den) after the last token."""
    out = np.empty(k.shape, dtype=np.int8)
    for t in range(k.shape[0]):
        if resets is not None:
            num, den = np.where(resets[t][:, None], 0, num), np.where(resets[t][:, None], 0, den)
        out[t], num, den = wkv_step(num, den, k[t], v[t], decay)
    return out, num.astype(np.int32), den.astype(np.int32)


def gru_blend(h: np.ndarray, f: np.ndarray, target: np.ndarray) -> np.ndarray:
    """h + (f + 127) / 256 * (target - h): a gated step from h toward target, stays in range."""
    h32 = h.astype(np.int32)
    return (h32 + (((f.astype(np.int32) + 127) * (target.astype(np.int32) - h32)) >> 8)).astype(
        np.int8
    )


def relu(x: np.ndarray) -> np.ndarray:
    return np.maximum(x, 0).astype(np.int8)


def member_vectors(v: np.ndarray, noise: np.ndarray, sigma_shift: int) -> np.ndarray:
    """Every member's copy of a vector parameter v (n,) under its pairs' int8 noise (P, n):
    rows 2p, 2p+1 are sat8(v +- rshift_round(noise_p, sigma_shift))."""
    delta = rshift_round(noise.astype(np.int32), sigma_shift)
    both = np.stack([v + delta, v - delta], axis=1)
    return sat8(both.reshape(-1, v.shape[0]))
