"""Properties of the integer primitives (intes.intmath): exactness, ranges and int32 bounds."""

from __future__ import annotations

import decimal
import math
import subprocess
import sys
from fractions import Fraction

import mpmath
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from intes import intmath as im

I8 = st.integers(-127, 127)
I32_MIN, I32_MAX = -(2**31), 2**31 - 1
seeds = st.integers(0, 2**32 - 1)
FEW = settings(max_examples=max(5, settings.default.max_examples // 2))


def int8_arrays(shape):
    return hnp.arrays(np.int8, shape, elements=I8)


def _rng(seed):
    return np.random.default_rng(seed)


def _extreme(rng, shape, lo=-127, hi=127):
    """Arrays of only the extreme values lo and hi (the worst case for every bound)."""
    return np.where(rng.integers(0, 2, shape) == 1, hi, lo).astype(np.int8)


# ---- saturation, shifts, division ------------------------------------------------------------

@given(hnp.arrays(np.int64, st.integers(0, 50), elements=st.integers(-(2**62), 2**62)))
def test_sat8_range_and_identity(x):
    """sat8 gives int8 in [-127, 127], equal to x where x is already in range."""
    y = im.sat8(x)
    assert y.dtype == np.int8
    assert np.all((y >= -127) & (y <= 127))
    assert np.array_equal(y, np.clip(x, -127, 127))


@given(st.integers(0, 24), st.lists(st.integers(I32_MIN, I32_MAX), min_size=1, max_size=40))
def test_rshift_round_is_floor_half_up(shift, xs):
    """rshift_round(x, s) == floor(x / 2^s + 1/2) (exact, Python ints) on int32 input."""
    half = (1 << (shift - 1)) if shift else 0
    xs = [min(x, I32_MAX - half) for x in xs]  # the caller's documented headroom
    got = im.rshift_round(np.array(xs, dtype=np.int32), shift)
    assert got.dtype == np.int32
    want = [math.floor(Fraction(x, 2**shift) + Fraction(1, 2)) for x in xs]
    assert got.tolist() == want


@given(st.lists(st.tuples(st.integers(I32_MIN + 1, I32_MAX), st.integers(1, I32_MAX)),
                min_size=1, max_size=40))
def test_div_trunc_rounds_toward_zero(pairs):
    """div_trunc(a, b) == trunc(a / b) exactly, keeps the dtype, and is odd in a."""
    a = np.array([p[0] for p in pairs], dtype=np.int32)
    b = np.array([p[1] for p in pairs], dtype=np.int32)
    got = im.div_trunc(a, b)
    assert got.dtype == np.int32
    assert got.tolist() == [math.trunc(Fraction(int(x), int(y))) for x, y in pairs]
    assert np.array_equal(im.div_trunc(-a, b), -got)


@given(st.integers(1, 2**20))
def test_fan_in_shift_is_smallest_power_of_two_sqrt(fan_in):
    """fan_in_shift = 4 + smallest k with 4^k >= fan_in (rescale by 16 * 2^k >= 16 sqrt(n))."""
    k = im.fan_in_shift(fan_in) - im.FRAC_BITS
    assert k >= 0 and 4**k >= fan_in
    assert k == 0 or 4 ** (k - 1) < fan_in


# ---- lookup tables against independent mpmath references ---------------------------------------

def _round_half_up(v) -> int:
    """Nearest integer of an mpmath value; ties cannot occur for these transcendental values."""
    fl = mpmath.floor(v)
    assert v == fl or abs(v - fl - mpmath.mpf(1) / 2) > mpmath.mpf(10) ** -30
    return int(mpmath.floor(v + mpmath.mpf(1) / 2))


def test_luts_match_independent_references():
    """Every LUT entry equals the same function computed independently with mpmath (50 digits)."""
    with mpmath.workdps(50):
        exp2 = [_round_half_up(mpmath.power(2, 16 - mpmath.mpf(d) / 16)) for d in range(255)]
        log2m = [_round_half_up(256 * mpmath.log(1 + mpmath.mpf(m) / 256, 2)) for m in range(256)]
        sig = [_round_half_up(128 / (1 + mpmath.exp(-mpmath.mpf(x) / 16)))
               for x in range(-127, 128)]
        wkv = [max(1, _round_half_up(mpmath.power(2, mpmath.mpf(k) / 32 + 4)))
               for k in range(-127, 128)]
    relu_sq = [(x * x) // 128 if x > 0 else 0 for x in range(-127, 128)]
    for table, want in ((im.EXP2_TABLE, exp2), (im.LOG2_MANTISSA, log2m),
                        (im.SIGMOID_TABLE, sig), (im.WKV_EXP_TABLE, wkv),
                        (im.RELU_SQ_TABLE, relu_sq)):
        assert table.dtype == np.int32
        assert table.tolist() == want
    # documented ranges
    assert im.EXP2_TABLE[0] == 2**16 and im.EXP2_TABLE.min() >= 1
    assert im.SIGMOID_TABLE.min() >= 0 and im.SIGMOID_TABLE.max() <= 128
    assert im.WKV_EXP_TABLE.min() == 1 and im.WKV_EXP_TABLE.max() == 251
    assert 251 * 127 < 2**15
    assert im.RELU_SQ_TABLE.min() == 0 and im.RELU_SQ_TABLE.max() == 126


@given(st.fractions(Fraction(1, 2), Fraction(1) - Fraction(1, 2**20)))
def test_normal_quantile_matches_mpmath(p):
    """normal_quantile(p) is the normal distribution's p-quantile to 40 digits (the update's
    thresholds take their z from it)."""
    with mpmath.workdps(60):
        want = mpmath.sqrt(2) * mpmath.erfinv(2 * mpmath.mpf(p.numerator) / p.denominator - 1)
        assert abs(mpmath.mpf(str(im.normal_quantile(p))) - want) < mpmath.mpf(10) ** -40


def test_normal_quantile_ignores_the_callers_decimal_context():
    """A caller's precision, rounding, exponent range and traps (its context, per thread) do
    not reach the digits: the update's thresholds are the same in any program."""
    ps = [Fraction(1, 2), Fraction(5, 8), 1 - Fraction(1, 37), 1 - Fraction(1, 2**17)]
    want = [im.normal_quantile(p) for p in ps]
    hostile = decimal.Context(prec=5, rounding=decimal.ROUND_FLOOR, Emax=60, Emin=-60,
                              traps=[decimal.Inexact, decimal.Rounded])
    with decimal.localcontext(hostile):
        assert [im.normal_quantile(p) for p in ps] == want


@pytest.mark.parametrize("p", [Fraction(0), Fraction(1, 3), Fraction(1), Fraction(3, 2)])
def test_normal_quantile_refuses_p_outside_its_range(p):
    with pytest.raises(ValueError, match="p must be in"):
        im.normal_quantile(p)


def test_importing_intes_leaves_the_decimal_context_alone():
    """Tables and thresholds use local decimal contexts: a user's precision is not changed."""
    code = ("import decimal; before = decimal.getcontext().prec; import intes.es, intes.intmath; "
            "assert decimal.getcontext().prec == before == 28, decimal.getcontext().prec")
    subprocess.run([sys.executable, "-c", code], check=True)


@given(int8_arrays(st.integers(0, 64)))
def test_lut_indexes_by_value(x):
    """lut(table, x) == table[x + 127] for every int8 x in range."""
    table = np.arange(255, dtype=np.int32) * 3 - 7
    assert np.array_equal(im.lut(table, x), table[x.astype(np.int64) + 127])


# ---- log2 and log-likelihood -------------------------------------------------------------------

LOG2_LO, LOG2_HI = -2.0, 0.5  # error of log2_fixed in 1/256 bit: mantissa truncation + rounding


def _check_log2(s: np.ndarray):
    got = im.log2_fixed(s)
    assert got.dtype == np.int32
    err = got.astype(np.float64) - 256 * np.log2(s.astype(np.float64))
    assert np.all(err >= LOG2_LO) and np.all(err <= LOG2_HI + 1e-9), err


@given(st.lists(st.integers(1, I32_MAX), min_size=1, max_size=64))
def test_log2_fixed_close_to_log2(values):
    """log2_fixed(s) is 256 log2(s) within [-2, +0.5] (1/256 bit) for any int32 s >= 1."""
    _check_log2(np.array(values, dtype=np.int32))


def test_log2_fixed_ranges_and_extremes():
    """Same bound for all s in 1..2^17, around every power of two, and at 1 and 2^31-1."""
    _check_log2(np.arange(1, 2**17, dtype=np.int32))
    p = np.array([2**k + d for k in range(31) for d in (-1, 0, 1) if 1 <= 2**k + d < 2**31],
                 dtype=np.int32)
    _check_log2(p)
    _check_log2(np.array([1, I32_MAX], dtype=np.int32))
    assert im.log2_fixed(np.array([1], dtype=np.int32))[0] == 0
    powers = np.array([2**k for k in range(31)], dtype=np.int32)
    assert im.log2_fixed(powers).tolist() == [256 * k for k in range(31)]


@given(st.lists(st.integers(1, I32_MAX), min_size=2, max_size=64))
def test_log2_fixed_monotone(values):
    """log2_fixed is non-decreasing."""
    s = np.sort(np.array(values, dtype=np.int32))
    assert np.all(np.diff(im.log2_fixed(s).astype(np.int64)) >= 0)


def _float_log2_softmax(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64) / 16
    m = z.max(axis=1, keepdims=True)
    lse = m[:, 0] + np.log2(np.exp2(z - m).sum(axis=1))
    return np.take_along_axis(z, targets[:, None], axis=1)[:, 0] - lse


def _worst_case_bound(vocab: int) -> float:
    """Error bound in bits: each of vocab-1 table terms rounds by <= 1/2 against a sum >= 2^16,
    plus log2_fixed's error."""
    rel = 0.5 * (vocab - 1) / 2**im.EXP2_FRAC_BITS
    return -math.log2(1 - rel) + max(-LOG2_LO, LOG2_HI) / 256


@given(st.integers(2, 4096), st.integers(0, 254), st.integers(-127, 127), st.data())
def test_log_likelihood_adversarial_logits(vocab, gap, top, data):
    """Even for adversarial logits (all others equal, at any gap) the error stays in its bound."""
    others = max(top - gap, -127)
    logits = np.full((2, vocab), others, dtype=np.int8)
    logits[:, 0] = top
    targets = np.array([0, data.draw(st.integers(0, vocab - 1))])
    ll = im.log_likelihood(logits, targets)
    assert np.all(ll <= 0)
    err = ll / 2**im.LL_FRAC_BITS - _float_log2_softmax(logits, targets)
    assert np.all(np.abs(err) <= _worst_case_bound(vocab)), err


@st.composite
def _logits(draw) -> tuple[np.ndarray, bool]:
    """(rows, vocab) int8 logits, and whether they are uniform random: each value picked by
    hypothesis (vocabularies up to 300: ties, runs, extremes), or uniform over [-127, 127]
    from a seed (vocabularies up to 4096)."""
    rows = draw(st.integers(1, 6))
    if draw(st.booleans()):
        return draw(int8_arrays((rows, draw(st.integers(2, 300))))), False
    vocab = draw(st.integers(2, 4096))
    return _rng(draw(seeds)).integers(-127, 128, (rows, vocab)).astype(np.int8), True


@given(_logits(), st.data())
def test_log_likelihood_any_int8_logits(drawn, data):
    """Any int8 logits: int32 of shape (rows,), <= 0, the argmax scores highest, error within
    the worst-case bound; on uniform random logits also within 0.02 bits of float log-softmax,
    tighter than that bound past a vocabulary of ~1200 (random roundings mostly cancel)."""
    logits, uniform = drawn
    rows, vocab = logits.shape
    targets = np.array(data.draw(st.lists(st.integers(0, vocab - 1), min_size=rows,
                                          max_size=rows)))
    ll = im.log_likelihood(logits, targets)
    assert ll.dtype == np.int32 and ll.shape == (rows,) and np.all(ll <= 0)
    best = im.log_likelihood(logits, logits.argmax(axis=1))
    assert np.all(best >= ll)
    err = np.abs(ll / 2**im.LL_FRAC_BITS - _float_log2_softmax(logits, targets))
    assert np.all(err <= _worst_case_bound(vocab)), err
    assert not uniform or np.all(err <= 0.02), err


def test_log_likelihood_uniform_logits():
    """Uniform logits give exactly -log2(V) for powers of two V."""
    for k in (1, 4, 8, 12, 14):
        v = 2**k
        ll = im.log_likelihood(np.full((1, v), 5, dtype=np.int8), np.array([v - 1]))
        assert ll.tolist() == [-256 * k]


def _largest_valid_vocab() -> int:
    from intes.engine import ModelConfig
    from intes.errors import ConfigError

    for vocab in range(2**16, 2**14, -1):
        try:
            ModelConfig(kind="rwkv", vocab_size=vocab, dim=8, layers=1).validate()
        except ConfigError:
            continue
        return vocab
    raise AssertionError("no vocab size in 2^14..2^16 is accepted")


@pytest.mark.parametrize("value", [127, -127])
def test_log_likelihood_at_largest_valid_vocab(value):
    """At the largest vocab ModelConfig accepts, tied logits (e.g. all saturated) must not
    overflow the int32 softmax sum: log2 p = -log2(V) within the error bound."""
    vocab = _largest_valid_vocab()
    ll = im.log_likelihood(np.full((1, vocab), value, dtype=np.int8), np.array([vocab - 1]))
    assert ll.dtype == np.int32 and ll[0] <= 0
    assert abs(ll[0] / 256 + math.log2(vocab)) <= _worst_case_bound(vocab), (vocab, ll)


# ---- elementwise ops under extreme inputs ------------------------------------------------------

@given(seeds, st.integers(1, 4096), st.integers(1, 4), st.booleans(),
       st.sampled_from(["extreme", "uniform", "small", "sparse"]))
def test_norm_range_and_exact(seed, d, rows, row_weights, regime):
    """norm gives int8 in range equal to an int64 recomputation, for extreme, uniform, tiny and
    sparse x (mean |x| < 1 included) and extreme weights."""
    rng = _rng(seed)
    shape = (rows, d)
    if regime == "extreme":
        x = _extreme(rng, shape)
    elif regime == "uniform":
        x = rng.integers(-127, 128, shape).astype(np.int8)
    elif regime == "small":
        x = rng.integers(-2, 3, shape).astype(np.int8)
    else:
        x = (rng.integers(-127, 128, shape) * (rng.random(shape) < 0.05)).astype(np.int8)
    w = _extreme(rng, (rows if row_weights else 1, d))
    y = im.norm(x, w)
    assert y.dtype == np.int8 and np.all(np.abs(y.astype(np.int32)) <= 127)
    x64, w64 = x.astype(np.int64), w.astype(np.int64)
    mean_abs = np.maximum(np.abs(x64).sum(axis=-1, keepdims=True) // d, 1)
    prod = x64 * w64
    want = np.clip(np.sign(prod) * (np.abs(prod) // mean_abs), -127, 127)
    assert np.array_equal(y.astype(np.int64), want)


def test_norm_of_zero_is_zero():
    """An all-zero row normalizes to zero (no division by zero)."""
    assert not im.norm(np.zeros((2, 16), np.int8), np.full(16, 127, np.int8)).any()


def _token_mix_int64(x: np.ndarray, prev: np.ndarray, mu: np.ndarray) -> np.ndarray:
    """token_mix computed in int64 with an explicit clip: the independent reference."""
    x64 = x.astype(np.int64)
    return np.clip(x64 + (((prev.astype(np.int64) - x64) * mu) >> 7), -127, 127)


@given(int8_arrays(st.integers(1, 64)), st.data())
def test_token_mix_range_and_between(x, data):
    """token_mix stays in [-127, 127]; for mu in [0, 127] the result lies between x and prev."""
    n = len(x)
    prev = data.draw(int8_arrays(n))
    mu = data.draw(int8_arrays(n))
    y = im.token_mix(x, prev, mu)
    assert y.dtype == np.int8 and np.all(np.abs(y.astype(np.int32)) <= 127)
    x64, p64 = x.astype(np.int64), prev.astype(np.int64)
    assert np.array_equal(y, _token_mix_int64(x, prev, mu))
    pos = mu >= 0
    lo, hi = np.minimum(x64, p64), np.maximum(x64, p64)
    assert np.all((y[pos] >= lo[pos]) & (y[pos] <= hi[pos]))
    assert np.array_equal(im.token_mix(x, prev, np.zeros_like(mu)), x)


@given(seeds, st.integers(1, 256))
def test_token_mix_extremes(seed, n):
    """All +-127 x, prev and mu: in range and equal to the int64 computation."""
    rng = _rng(seed)
    x, prev, mu = _extreme(rng, n), _extreme(rng, n), _extreme(rng, n)
    assert np.array_equal(im.token_mix(x, prev, mu), _token_mix_int64(x, prev, mu))


@given(int8_arrays(st.integers(1, 64)), st.data())
def test_fused_rwkv_activations(x, data):
    """relu_sq is int8 (max(x, 0)^2) >> 7; sigmoid_gate is the gate of the sigmoid table."""
    y = im.relu_sq(x)
    assert y.dtype == np.int8
    assert np.array_equal(y, (np.maximum(x.astype(np.int64), 0) ** 2) >> 7)
    r = data.draw(int8_arrays(st.just(len(x))))
    g = im.SIGMOID_TABLE[r.astype(np.int64) + 127]
    assert np.array_equal(im.sigmoid_gate(r, x), ((g * x.astype(np.int64)) >> 7).astype(np.int8))


@given(int8_arrays(st.integers(1, 255)))
def test_gate_range(v):
    """gate(sigmoid(r), v) is int8 with |out| <= |v| for every gate value in the table."""
    g = np.resize(im.SIGMOID_TABLE, len(v))
    y = im.gate(g, v)
    assert y.dtype == np.int8
    assert np.all(np.abs(y.astype(np.int32)) <= np.abs(v.astype(np.int32)))
    assert np.array_equal(y, ((g.astype(np.int64) * v) >> 7).astype(np.int8))
    full = np.full(len(v), 128, dtype=np.int32)
    assert np.array_equal(im.gate(full, v), v)


@given(int8_arrays(st.integers(1, 64)), st.data())
def test_gru_blend_between_h_and_target(h, data):
    """gru_blend stays in [-127, 127] and between h and target for any gate f in [-127, 127]."""
    n = len(h)
    f = data.draw(int8_arrays(n))
    target = data.draw(int8_arrays(n))
    y = im.gru_blend(h, f, target)
    assert y.dtype == np.int8
    h64, t64 = h.astype(np.int64), target.astype(np.int64)
    want = h64 + (((f.astype(np.int64) + 127) * (t64 - h64)) >> 8)
    assert np.array_equal(y.astype(np.int64), want)
    assert np.all((y >= np.minimum(h64, t64)) & (y <= np.maximum(h64, t64)))


def test_gru_blend_extremes():
    """Every extreme combination of h, f, target in {-127, 0, 127}: exact and in range."""
    vals = np.array([-127, 0, 127], dtype=np.int8)
    h, f, t = (a.ravel() for a in np.meshgrid(vals, vals, vals, indexing="ij"))
    y = im.gru_blend(h, f, t).astype(np.int64)
    want = h.astype(np.int64) + (((f.astype(np.int64) + 127) * (t.astype(np.int64) - h)) >> 8)
    assert np.array_equal(y, want) and np.all(np.abs(y) <= 127)


@given(st.lists(int8_arrays(st.just(8)), min_size=1, max_size=6))
def test_sat_add_exact(terms):
    """sat_add is the saturated exact sum."""
    want = np.clip(sum(t.astype(np.int64) for t in terms), -127, 127)
    assert np.array_equal(im.sat_add(*terms).astype(np.int64), want)


# ---- the WKV recurrence ------------------------------------------------------------------------

NUM_BOUND, DEN_BOUND = 2**30, 2**23


def _wkv_int64(num, den, k, v, decay):
    w = decay.astype(np.int64) + 128
    e = im.WKV_EXP_TABLE[k.astype(np.int64) + 127].astype(np.int64) << im.WKV_FRAC_BITS
    num = ((num.astype(np.int64) * w) >> 8) + e * v.astype(np.int64)
    den = ((den.astype(np.int64) * w) >> 8) + e
    q = np.sign(num) * (np.abs(num) // den)
    return np.clip(q, -127, 127), num, den


def _check_wkv_step(num, den, k, v, decay):
    out, num2, den2 = im.wkv_step(num, den, k, v, decay)
    want_out, want_num, want_den = _wkv_int64(num, den, k, v, decay)
    assert out.dtype == np.int8 and num2.dtype == np.int32 and den2.dtype == np.int32
    assert np.array_equal(num2, want_num) and np.array_equal(den2, want_den)  # no overflow
    assert np.array_equal(out, want_out)
    assert np.all(np.abs(num2.astype(np.int64)) <= NUM_BOUND)
    assert np.all((den2 >= 1) & (den2 <= DEN_BOUND))
    return out, num2, den2


@given(seeds, st.integers(1, 64))
def test_wkv_step_keeps_bounds_inductively(seed, n):
    """From any state within the documented bounds (incl. the bounds themselves) one step stays
    within them, for extreme k, v and decay."""
    rng = _rng(seed)
    num = rng.integers(-NUM_BOUND, NUM_BOUND + 1, n).astype(np.int32)
    num[: n // 2] = np.where(rng.integers(0, 2, n // 2) == 1, NUM_BOUND, -NUM_BOUND)
    den = rng.integers(0, DEN_BOUND + 1, n).astype(np.int32)
    den[: n // 3] = DEN_BOUND
    k = _extreme(rng, n) if seed % 3 else rng.integers(-127, 128, n).astype(np.int8)
    v = _extreme(rng, n)
    decay = _extreme(rng, n) if seed % 2 else rng.integers(-127, 128, n).astype(np.int8)
    _check_wkv_step(num, den, k, v, decay)


@pytest.mark.parametrize("decay", [127, -127, 0, 126])
@pytest.mark.parametrize("pattern", ["plus", "minus", "alternate", "random_sign"])
def test_wkv_long_recurrence_worst_case(decay, pattern):
    """700 steps with k = 127 and v = +-127 (worst case): every step within bounds and exact."""
    n, steps = 8, 700
    rng = _rng(abs(decay) * 7 + len(pattern))
    num = np.zeros(n, np.int32)
    den = np.zeros(n, np.int32)
    k = np.full(n, 127, np.int8)
    dec = np.full(n, decay, np.int8)
    peak = 0
    for t in range(steps):
        if pattern == "plus":
            v = np.full(n, 127, np.int8)
        elif pattern == "minus":
            v = np.full(n, -127, np.int8)
        elif pattern == "alternate":
            v = np.full(n, 127 if t % 2 else -127, np.int8)
        else:
            v = _extreme(rng, n)
        out, num, den = _check_wkv_step(num, den, k, v, dec)
        peak = max(peak, int(np.abs(num.astype(np.int64)).max()))
        if pattern in ("plus", "minus"):
            assert np.all(out == v)  # the mean of a constant is that constant
    if decay == 127 and pattern in ("plus", "minus"):
        assert peak > NUM_BOUND * 0.85  # the test really approached the bound


def _wkv_grid(ks, vs, decays):
    k, v, d = (a.ravel().astype(np.int8) for a in np.meshgrid(ks, vs, decays, indexing="ij"))
    return k, v, d


def test_wkv_mean_of_a_constant_is_that_constant():
    """Fed a constant v (constant k, decay), the WKV output stays v (+-1) for 300 steps, over a
    grid of k, v and decay including the extremes."""
    k, v, decay = _wkv_grid(np.r_[-127:128:6, 127], [-127, -100, -34, -1, 0, 1, 34, 100, 127],
                            [-127, -64, -1, 0, 1, 64, 126, 127])
    num, den = np.zeros(len(k), np.int32), np.zeros(len(k), np.int32)
    worst = np.zeros(len(k), np.int64)
    for _ in range(300):
        out, num, den = _check_wkv_step(num, den, k, v, decay)
        worst = np.maximum(worst, np.abs(out.astype(np.int64) - v))
    bad = np.flatnonzero(worst > 1)
    assert bad.size == 0, [(int(k[i]), int(v[i]), int(decay[i]), int(worst[i])) for i in bad[:8]]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_wkv_is_a_weighted_mean(seed):
    """With random k, v and per-channel decay, the output stays within [min v, max v] seen so
    far (+-2 for rounding), over 300 steps on 256 channels."""
    rng = _rng(seed)
    n = 256
    num, den = np.zeros(n, np.int32), np.zeros(n, np.int32)
    decay = rng.integers(-127, 128, n).astype(np.int8)
    lo, hi = np.full(n, 127), np.full(n, -127)
    for t in range(300):
        k = rng.integers(-127, 128, n).astype(np.int8)
        v = rng.integers(-127, 128, n).astype(np.int8)
        lo, hi = np.minimum(lo, v), np.maximum(hi, v)
        out, num, den = _check_wkv_step(num, den, k, v, decay)
        bad = np.flatnonzero((out < lo - 2) | (out > hi + 2))
        assert bad.size == 0, (t, [(int(out[i]), int(lo[i]), int(hi[i])) for i in bad[:4]])


def test_relu():
    """relu is int8 max(x, 0)."""
    x = np.arange(-127, 128).astype(np.int8)
    y = im.relu(x)
    assert y.dtype == np.int8 and np.array_equal(y, np.maximum(x, 0))


# ---- reference backend: int32 accumulators never overflow --------------------------------------

def _linear_int64(x, w, shift, a, b, sigma):
    """ReferenceBackend.linear recomputed in int64 (same floor/round semantics)."""
    x64 = x.astype(np.int64)
    acc = x64 @ w.T.astype(np.int64)
    if a is not None:
        pairs = a.shape[0]
        xp = x64.reshape(pairs, 2, -1)
        xb = np.einsum("pmi,pir->pmr", xp, b.astype(np.int64)) >> im.FRAC_BITS
        corr = np.einsum("pmr,por->pmo", xb, a.astype(np.int64)) >> sigma
        corr[:, 1, :] *= -1
        acc = acc + corr.reshape(2 * pairs, -1)
    return np.clip((acc + ((1 << shift) >> 1)) >> shift, -127, 127)


def _extreme_noise(rng, shape, mode):
    from intes.noise import NOISE_MAX

    if mode == "same":
        return np.full(shape, NOISE_MAX, np.int8)
    return _extreme(rng, shape, -NOISE_MAX, NOISE_MAX)


@FEW
@given(seeds, st.integers(1, 3), st.sampled_from([1, 7, 64, 1000, 1024, 4095, 4096]),
       st.integers(1, 4), st.integers(1, 16), st.integers(0, 12), st.sampled_from(["same", "mix"]))
def test_linear_extreme_inputs_no_overflow(seed, pairs, fan_in, out, rank, sigma, mode):
    """linear with all +-127 x and w and +-NOISE_MAX factors equals its int64 recomputation."""
    from intes.kernels.base import LowRank
    from intes.kernels.reference import ReferenceBackend

    rng = _rng(seed)
    if mode == "same":
        x = np.full((2 * pairs, fan_in), 127, np.int8)
        w = np.full((out, fan_in), 127 if seed % 2 else -127, np.int8)
    else:
        x, w = _extreme(rng, (2 * pairs, fan_in)), _extreme(rng, (out, fan_in))
    a = _extreme_noise(rng, (pairs, out, rank), mode)
    b = _extreme_noise(rng, (pairs, fan_in, rank), mode)
    shift = im.fan_in_shift(fan_in)
    be = ReferenceBackend()
    y = be.linear(x, be.prepare(w), shift, LowRank(a, b), sigma)
    assert y.dtype == np.int8
    assert np.array_equal(y.astype(np.int64), _linear_int64(x, w, shift, a, b, sigma))
    y0 = be.linear(x, be.prepare(w), shift, None, sigma)
    assert np.array_equal(y0.astype(np.int64), _linear_int64(x, w, shift, None, None, sigma))


def test_linear_worst_case_at_4096():
    """The single worst case at fan-in 4096, rank 16, sigma_shift 0 (all signs aligned)."""
    from intes.kernels.base import LowRank
    from intes.kernels.reference import ReferenceBackend, lowrank_correction

    x = np.full((2, 4096), 127, np.int8)
    w = np.full((1, 4096), 127, np.int8)
    a = np.full((1, 1, 16), 55, np.int8)
    b = np.full((1, 4096, 16), 55, np.int8)
    corr = lowrank_correction(x, LowRank(a, b), 0)
    assert corr[0, 0] == ((4096 * 127 * 55) >> 4) * 55 * 16 and corr[1, 0] == -corr[0, 0]
    for shift in (0, im.fan_in_shift(4096), 20):
        y = ReferenceBackend().linear(x, w, shift, LowRank(a, b), 0)
        assert np.array_equal(y.astype(np.int64), _linear_int64(x, w, shift, a, b, 0))
    assert y.tolist() == [[127], [-127]]  # base + corr > 0 for 2p, base - corr < 0 for 2p+1


def test_linear_no_overflow_at_largest_valid_config():
    """The largest fan-in any valid model has (the 4x MLP input at dim 4096) with the largest
    rank a run accepts there must not overflow int32 for extreme inputs (``linear_bound``);
    one rank more is refused by the run's validation."""
    from intes.engine import ModelConfig, TrainConfig
    from intes.errors import ConfigError
    from intes.es import ESConfig
    from intes.kernels.base import LowRank
    from intes.kernels.reference import ReferenceBackend
    from intes.models.rwkv import RWKV

    model = ModelConfig(kind="rwkv", vocab_size=256, dim=4096, layers=1)
    accepted = []
    for rank in range(1, 17):
        try:
            TrainConfig(model=model, es=ESConfig(population=2, group_size=2, rank=rank,
                                                  sigma_shift=0)).validate()
            accepted.append(rank)
        except ConfigError:
            pass
    assert accepted and accepted == list(range(1, max(accepted) + 1)) and max(accepted) < 16
    rank = max(accepted)
    fan_in = max(s.shape[-1] for s in RWKV(vocab_size=256, dim=4096, layers=1).specs
                 if s.kind == "matrix")
    assert fan_in == 16384
    x = np.full((2, fan_in), 127, np.int8)
    w = np.full((1, fan_in), 127, np.int8)
    a = np.full((1, 1, rank), 55, np.int8)
    b = np.full((1, fan_in, rank), 55, np.int8)
    shift = im.fan_in_shift(fan_in)
    y = ReferenceBackend().linear(x, w, shift, LowRank(a, b), 0)
    assert np.array_equal(y.astype(np.int64), _linear_int64(x, w, shift, a, b, 0))


@FEW
@given(seeds, st.integers(1, 3), st.integers(1, 50), st.sampled_from([1, 8, 512, 4096]),
       st.integers(1, 16), st.integers(0, 12), st.sampled_from(["same", "mix"]))
def test_embed_extreme_inputs_no_overflow(seed, pairs, vocab, d, rank, sigma, mode):
    """embed with a +-127 table and +-NOISE_MAX factors equals its int64 recomputation, and its
    correction is antithetic for members reading the same token."""
    from intes.kernels.base import LowRank
    from intes.kernels.reference import ReferenceBackend

    rng = _rng(seed)
    table = _extreme(rng, (vocab, d))
    tokens = np.repeat(rng.integers(0, vocab, pairs), 2)
    a = _extreme_noise(rng, (pairs, vocab, rank), mode)
    b = _extreme_noise(rng, (pairs, d, rank), mode)
    be = ReferenceBackend()
    y = be.embed(table, tokens, LowRank(a, b), sigma)
    assert y.dtype == np.int8
    rows = table[tokens].astype(np.int64)
    corr = np.stack([a[p].astype(np.int64)[tokens[2 * p]] @ b[p].astype(np.int64).T
                     for p in range(pairs)]) >> (im.FRAC_BITS + sigma)
    want = rows.reshape(pairs, 2, d) + np.stack([corr, -corr], axis=1)
    assert np.array_equal(y.astype(np.int64), np.clip(want.reshape(2 * pairs, d), -127, 127))
    assert np.array_equal(be.embed(table, tokens, None, sigma), table[tokens])
