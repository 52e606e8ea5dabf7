"""Properties of the ES core (intes.es) and of the reference update reduction."""

from __future__ import annotations

import decimal
from fractions import Fraction

import mpmath
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from intes import es
from intes import noise as nz
from intes.bench import gemm_engines
from intes.errors import ConfigError
from intes.kernels.base import LowRank
from intes.kernels.cpu import CpuBackend
from intes.kernels.reference import ReferenceBackend, lowrank_sum, step_by_sign
from intes.models import build_model
from intes.models.base import init_params, make_noise
from intes.noise import NOISE_MAX, NOISE_VARIANCE_X2_32

seeds = st.integers(0, 2**32 - 1)
I32 = st.integers(-(2**31), 2**31 - 1)
FEW = settings(max_examples=max(5, settings.default.max_examples // 2))


def member_fitness(min_pairs=1, max_pairs=64):
    return st.integers(min_pairs, max_pairs).flatmap(
        lambda p: hnp.arrays(np.int32, 2 * p, elements=I32))


# ---- fitness shaping ---------------------------------------------------------------------------

@given(member_fitness())
def test_sign_shaping(raw):
    """Sign shaping is sign(fitness(2p) - fitness(2p+1)) exactly, as int32."""
    f = es.shape_fitness(raw, "sign")
    assert f.dtype == np.int32 and f.shape == (len(raw) // 2,)
    want = [(a > b) - (a < b) for a, b in zip(raw[0::2].tolist(), raw[1::2].tolist(),
                                               strict=True)]
    assert f.tolist() == want


@given(member_fitness(), st.sampled_from(es.FITNESS_KINDS))
def test_shaping_sign_bound_and_antisymmetry(raw, kind):
    """|f| <= NORMALIZED_MAX, sign(f) agrees with the pair difference, swapping a pair's members
    negates its f, and adding a constant to every member changes nothing."""
    f = es.shape_fitness(raw, kind).astype(np.int64)
    diff = raw[0::2].astype(np.int64) - raw[1::2].astype(np.int64)
    bound = 1 if kind == "sign" else es.NORMALIZED_MAX
    assert np.all(np.abs(f) <= bound)
    assert np.all((f == 0) | (np.sign(f) == np.sign(diff)))
    assert np.all(f[diff == 0] == 0)
    swapped = raw.reshape(-1, 2)[:, ::-1].ravel()
    assert np.array_equal(es.shape_fitness(swapped, kind), -f)
    shifted = (raw.astype(np.int64) // 2 + 12345).astype(np.int32)
    half = (raw.astype(np.int64) // 2).astype(np.int32)
    assert np.array_equal(es.shape_fitness(shifted, kind), es.shape_fitness(half, kind))


@given(member_fitness(min_pairs=2))
def test_normalized_shaping_monotone_in_difference(raw):
    """Normalized shaping is non-decreasing in the pair difference, and the largest |diff| gets
    a non-zero f."""
    f = es.shape_fitness(raw, "normalized").astype(np.int64)
    diff = raw[0::2].astype(np.int64) - raw[1::2].astype(np.int64)
    order = np.argsort(diff, kind="stable")
    assert np.all(np.diff(f[order]) >= 0)
    if np.any(diff != 0):
        assert f[np.argmax(np.abs(diff))] != 0


# ---- alpha schedule and thresholds -------------------------------------------------------------

@given(st.integers(0, 8), st.integers(1, 5000))
def test_alpha_schedule(final_log2, alpha_steps):
    """alpha goes from exactly 1 at step 0 to exactly 2^-k at alpha_steps, monotonically."""
    cfg = es.ESConfig(alpha_final_log2=final_log2, alpha_steps=alpha_steps)
    assert es.alpha(0, cfg) == 1.0
    assert es.alpha(alpha_steps, cfg) == pytest.approx(2.0**-final_log2, rel=1e-12)
    assert es.alpha(10 * alpha_steps, cfg) == es.alpha(alpha_steps, cfg)
    grid = np.unique(np.linspace(0, 2 * alpha_steps, 50).astype(int))
    values = [es.alpha(int(s), cfg) for s in grid]
    assert all(a >= b for a, b in zip(values, values[1:], strict=False))
    assert all(2.0**-final_log2 - 1e-15 <= v <= 1.0 for v in values)


@given(hnp.arrays(np.int32, st.integers(1, 64), elements=st.integers(-15, 15)),
       st.integers(1, 16), st.integers(1, 6), st.integers(1, 3000))
def test_thresholds_grow_as_alpha_decays(fitness, rank, final_log2, alpha_steps):
    """Thresholds are 0 at alpha = 1, non-negative ints, and non-decreasing in step."""
    cfg = es.ESConfig(rank=rank, alpha_final_log2=final_log2, alpha_steps=alpha_steps)
    assert es.thresholds(0, fitness, cfg) == (0, 0)
    prev = (0, 0)
    for s in np.unique(np.linspace(0, 2 * alpha_steps, 30).astype(int)):
        thr = es.thresholds(int(s), fitness, cfg)
        assert all(isinstance(t, int) and t >= 0 for t in thr)
        assert thr[0] >= prev[0] and thr[1] >= prev[1]
        prev = thr
    if np.any(fitness):
        assert prev[0] > 0 and prev[1] > 0


@FEW
@given(hnp.arrays(np.int32, st.integers(1, 64), elements=st.integers(-15, 15)),
       st.integers(1, 16), st.integers(0, 16), st.integers(1, 5000), st.integers(0, 6000))
def test_thresholds_are_the_exact_z_test_floors(fitness, rank, final_log2, alpha_steps, step):
    """Each threshold is floor(z * sigma) for the exact alpha of the schedule, with z and sigma
    computed independently by mpmath at 60 digits: no float rounding reaches the integers."""
    cfg = es.ESConfig(rank=rank, alpha_final_log2=final_log2, alpha_steps=alpha_steps)
    a = es.alpha(step, cfg)
    assert a == Fraction(1) / ((2**final_log2 - 1) * Fraction(min(step, alpha_steps), alpha_steps)
                               + 1)
    sumsq = int(np.sum(fitness.astype(np.int64) ** 2))
    with mpmath.workdps(60):
        z = mpmath.sqrt(2) * mpmath.erfinv(1 - mpmath.mpf(a.numerator) / a.denominator)
        var = mpmath.mpf(NOISE_VARIANCE_X2_32) / 2**32
        expected = (int(mpmath.floor(z * mpmath.sqrt(sumsq * rank) * var)),
                    int(mpmath.floor(z * mpmath.sqrt(sumsq * var))))
    assert es.thresholds(step, fitness, cfg) == expected


def test_thresholds_ignore_the_callers_decimal_context():
    cfg = es.ESConfig(rank=3, alpha_final_log2=6, alpha_steps=50)
    fitness = np.arange(-15, 16, dtype=np.int32)
    want = [es.thresholds(step, fitness, cfg) for step in range(0, 60, 7)]
    hostile = decimal.Context(prec=4, rounding=decimal.ROUND_CEILING, Emax=40, Emin=-40,
                              traps=[decimal.Inexact, decimal.Rounded])
    with decimal.localcontext(hostile):
        assert [es.thresholds(step, fitness, cfg) for step in range(0, 60, 7)] == want


@pytest.mark.parametrize("rank", [1, 4])
def test_threshold_calibration_under_null(rank):
    """With fitness independent of noise, the share of weights that move is ~alpha (z-test)."""
    cfg = es.ESConfig(population=256, rank=rank, alpha_final_log2=4, alpha_steps=100)
    fitness = np.random.default_rng(rank).choice(np.array([-1, 1], np.int32), cfg.pairs)
    pairs = np.arange(cfg.pairs)
    a, b = nz.lowrank_factors(7, 100, pairs, 0, 128, 128, rank)
    z_m = lowrank_sum(LowRank(a, b), fitness)
    z_v = fitness.astype(np.int64) @ nz.vector_noise(7, 100, pairs, 1, 1 << 14)
    thr_m, thr_v = es.thresholds(100, fitness, cfg)
    a = es.alpha(100, cfg)
    assert a == pytest.approx(1 / 16)
    share_m = np.mean(np.abs(z_m) > thr_m)
    share_v = np.mean(np.abs(z_v) > thr_v)
    assert 0.75 * a < share_m < 1.25 * a
    assert 0.85 * a < share_v < 1.15 * a


# ---- config validation -------------------------------------------------------------------------

@given(st.integers(-10, 10_000))
def test_validate_rejects_odd_or_tiny_population(n):
    """Odd or < 2 populations are rejected with a ConfigError."""
    cfg = es.ESConfig(population=n, group_size=2)
    if n >= 2 and n % 2 == 0:
        cfg.validate()
    else:
        with pytest.raises(ConfigError):
            cfg.validate()


@given(st.integers(1, 64).map(lambda k: 2 * k), st.integers(-4, 80))
def test_validate_group_size(n, g):
    """Group size must be even, >= 2 and divide the population."""
    cfg = es.ESConfig(population=n, group_size=g)
    if g >= 2 and g % 2 == 0 and n % g == 0:
        cfg.validate()
    else:
        with pytest.raises(ConfigError):
            cfg.validate()


@pytest.mark.parametrize("field,value", [
    ("rank", 0), ("rank", 17), ("rank", -1), ("sigma_shift", -1), ("sigma_shift", 13),
    ("noise_reuse", 0), ("fitness", "rank"), ("population", 0), ("group_size", 0),
    ("alpha_steps", 0), ("alpha_final_log2", -1), ("alpha_final_log2", 17),
])
def test_validate_rejects_out_of_range(field, value):
    """Each field out of its documented range raises ConfigError."""
    with pytest.raises(ConfigError):
        es.ESConfig(**{field: value}).validate()


@given(st.integers(1, 16), st.sampled_from(es.FITNESS_KINDS), st.integers(1, 4000))
def test_validate_accepts_exactly_the_configs_whose_update_fits_int32(rank, kind, pairs):
    """validate accepts a (population, rank, fitness) iff the worst-case |Z| fits int32."""
    fmax = 1 if kind == "sign" else es.NORMALIZED_MAX
    cfg = es.ESConfig(population=2 * pairs, group_size=2, rank=rank, fitness=kind)
    fits = pairs * fmax * rank * NOISE_MAX**2 <= 2**31 - 1
    if fits:
        cfg.validate()
    else:
        with pytest.raises(ConfigError):
            cfg.validate()


def _largest_valid_pairs(rank: int, kind: str) -> int:
    fmax = 1 if kind == "sign" else es.NORMALIZED_MAX
    pairs = (2**31 - 1) // (fmax * rank * NOISE_MAX**2)
    es.ESConfig(population=2 * pairs, group_size=2, rank=rank, fitness=kind).validate()
    with pytest.raises(ConfigError):
        es.ESConfig(population=2 * pairs + 2, group_size=2, rank=rank, fitness=kind).validate()
    return pairs


UPDATE_BACKENDS = [ReferenceBackend()] + [CpuBackend(threads=1, gemm=g) for g in gemm_engines()]


@pytest.mark.parametrize("backend", UPDATE_BACKENDS,
                         ids=lambda b: getattr(getattr(b, "gemm", None), "name", b.name))
@pytest.mark.parametrize(("rank", "kind", "sign"), [(16, "normalized", 1), (16, "normalized", -1),
                                                    (1, "normalized", 1), (1, "sign", -1)])
def test_update_at_the_validated_limit_does_not_overflow(backend, rank, kind, sign):
    """At the largest population validate accepts, all-extreme noise and fitness give the
    right update on every backend's engine: Z reaches the int32 limit exactly, no engine's
    intermediate (the VNNI engine's x + 128 compensation among them) wraps into a wrong sign."""
    pairs = _largest_valid_pairs(rank, kind)
    fmax = 1 if kind == "sign" else es.NORMALIZED_MAX
    rows, cols = 2, 3
    a = np.full((pairs, rows, rank), NOISE_MAX, np.int8)
    b = np.full((pairs, cols, rank), NOISE_MAX, np.int8)
    b[:, 1] = -NOISE_MAX
    f = np.full(pairs, sign * fmax, np.int32)
    want = sign * pairs * fmax * rank * NOISE_MAX**2
    if isinstance(backend, ReferenceBackend):
        z = lowrank_sum(LowRank(a, b), f)
        assert z.dtype.kind == "i"
        assert z[:, 0].tolist() == [want] * rows and z[:, 1].tolist() == [-want] * rows
    w = np.zeros((rows, cols), np.int8)
    new = backend.update_matrix(w, LowRank(a, b), f, abs(want) - 1)
    assert new.tolist() == [[sign, -sign, sign]] * rows


# ---- the update reduction ----------------------------------------------------------------------

def _explicit_z(a: np.ndarray, b: np.ndarray, f: np.ndarray) -> np.ndarray:
    z = np.zeros((a.shape[1], b.shape[1]), np.int64)
    for p in range(len(f)):
        z += int(f[p]) * (a[p].astype(np.int64) @ b[p].astype(np.int64).T)
    return z


@given(seeds, st.integers(1, 40), st.integers(1, 12), st.integers(1, 12), st.integers(1, 16),
       st.sampled_from(["random", "extreme"]))
def test_lowrank_sum_equals_explicit_sum(seed, pairs, rows, cols, rank, mode):
    """lowrank_sum(A, B, f) == sum_p f_p A_p B_p^T computed pair by pair in int64."""
    rng = np.random.default_rng(seed)
    if mode == "extreme":
        a = np.where(rng.integers(0, 2, (pairs, rows, rank)) == 1, NOISE_MAX, -NOISE_MAX)
        b = np.where(rng.integers(0, 2, (pairs, cols, rank)) == 1, NOISE_MAX, -NOISE_MAX)
        f = rng.choice(np.array([-15, 15]), pairs)
    else:
        a = rng.integers(-NOISE_MAX, NOISE_MAX + 1, (pairs, rows, rank))
        b = rng.integers(-NOISE_MAX, NOISE_MAX + 1, (pairs, cols, rank))
        f = rng.integers(-15, 16, pairs)
    a, b, f = a.astype(np.int8), b.astype(np.int8), f.astype(np.int32)
    z = lowrank_sum(LowRank(a, b), f)
    assert z.shape == (rows, cols)
    assert np.array_equal(z.astype(np.int64), _explicit_z(a, b, f))


@given(hnp.arrays(np.int8, st.integers(1, 30), elements=st.integers(-127, 127)), st.data())
def test_step_by_sign(w, data):
    """Each weight moves by sign(z) exactly where |z| > threshold and saturates at +-127."""
    z = data.draw(hnp.arrays(np.int64, w.shape, elements=st.integers(-(2**31), 2**31 - 1)))
    thr = data.draw(st.integers(0, 2**31 - 1))
    new = step_by_sign(w, z, thr)
    assert new.dtype == np.int8
    move = np.where(np.abs(z) > thr, np.sign(z), 0)
    assert np.array_equal(new.astype(np.int64), np.clip(w.astype(np.int64) + move, -127, 127))


def _explicit_tell(specs, params, seed, step, fitness, cfg):
    """The update from explicitly generated, stored noise, reduced pair by pair in int64."""
    stored = make_noise(specs, seed, step, np.arange(len(fitness)), cfg.rank, cfg.noise_reuse)
    thr_m, thr_v = es.thresholds(step, fitness, cfg)
    out = {}
    for s in specs:
        e = stored[s.name]
        if s.kind == "vector":
            z = sum(int(fitness[p]) * e[p].astype(np.int64) for p in range(len(fitness)))
            thr = thr_v
        else:
            z, thr = _explicit_z(e.a, e.b, fitness), thr_m
        move = np.where(np.abs(z) > thr, np.sign(z), 0)
        out[s.name] = np.clip(params[s.name].astype(np.int64) + move, -127, 127)
    return out


@FEW
@given(seeds, st.sampled_from(["rwkv", "egg"]), st.integers(1, 12), st.integers(1, 8),
       st.integers(0, 3000), st.sampled_from(es.FITNESS_KINDS), st.integers(1, 3), st.data())
def test_tell_from_seeds_equals_update_from_stored_noise(seed, kind, pairs, rank, step, fkind,
                                                        reuse, data):
    """tell() rebuilt from (seed, step, fitness) equals the update from stored noise; every
    weight moves by at most 1 and stays an int8 in [-127, 127]."""
    cfg = es.ESConfig(population=2 * pairs, group_size=2, rank=rank, fitness=fkind,
                      noise_reuse=reuse,
                      alpha_steps=1000)
    cfg.validate()
    model = build_model(kind, vocab_size=16, dim=8, layers=1)
    params = init_params(model.specs, seed)
    if data.draw(st.booleans()):  # push some weights to the rails to exercise saturation
        params = {k: np.where(np.abs(v) > 8, np.sign(v) * 127, v).astype(np.int8)
                  for k, v in params.items()}
    raw = data.draw(hnp.arrays(np.int32, 2 * pairs, elements=st.integers(-10**6, 10**6)))
    fitness = es.shape_fitness(raw, fkind)
    parts = data.draw(st.integers(1, 5))  # tensors in groups: the same weights for any split
    new = es.tell(ReferenceBackend(), model.specs, params, seed, step, fitness, cfg, None, parts)
    want = _explicit_tell(model.specs, params, seed, step, fitness, cfg)
    assert set(new) == set(params)
    for name, v in new.items():
        assert v.dtype == np.int8 and v.shape == params[name].shape
        assert np.array_equal(v.astype(np.int64), want[name]), name
        assert np.all(np.abs(v.astype(np.int64) - params[name]) <= 1)
        assert np.all(np.abs(v.astype(np.int64)) <= 127)
    if not np.any(fitness):
        assert all(np.array_equal(new[k], params[k]) for k in params)


@given(seeds, st.integers(1, 20), st.integers(1, 40))
def test_update_vector_equals_explicit(seed, pairs, n):
    """update_vector moves v by sign(sum_p f_p e_p) where it passes the threshold."""
    rng = np.random.default_rng(seed)
    v = rng.integers(-127, 128, n).astype(np.int8)
    e = rng.integers(-NOISE_MAX, NOISE_MAX + 1, (pairs, n)).astype(np.int8)
    f = rng.integers(-15, 16, pairs).astype(np.int32)
    thr = int(rng.integers(0, 200))
    z = f.astype(np.int64) @ e.astype(np.int64)
    want = np.clip(v.astype(np.int64) + np.where(np.abs(z) > thr, np.sign(z), 0), -127, 127)
    assert np.array_equal(ReferenceBackend().update_vector(v, e, f, thr).astype(np.int64), want)


def test_noise_variance_constant_used_by_thresholds():
    """Thresholds are z * sqrt(sum f^2 * r) * E[v^2] (matrix), z * sqrt(sum f^2 * E[v^2])."""
    cfg = es.ESConfig(alpha_final_log2=4, alpha_steps=10)
    f = np.ones(64, np.int32)
    thr_m, thr_v = es.thresholds(10, f, cfg)
    var = NOISE_VARIANCE_X2_32 / 2**32
    z = 1.8627318674216515  # inv_cdf(1 - 1/32)
    assert thr_v == int(np.floor(z * np.sqrt(64 * var)))
    assert thr_m == int(np.floor(z * np.sqrt(64 * cfg.rank) * var))


@given(st.lists(st.integers(0, 10**6), max_size=40), st.integers(1, 8))
def test_balanced_groups_partition_the_tensors(sizes, parts):
    """Every index exactly once, at most ``parts`` non-empty groups, and no group heavier than
    an even share plus the largest single size (the greedy bound)."""
    groups = es.balanced_groups(sizes, parts)
    assert sorted(i for g in groups for i in g) == list(range(len(sizes)))
    assert len(groups) <= parts and all(groups)
    if sizes:
        share = sum(sizes) / min(parts, len(sizes))
        assert max(sum(sizes[i] for i in g) for g in groups) <= share + max(sizes)
