"""Properties of the counter-based integer noise generator (intes.noise)."""

from __future__ import annotations

import numpy as np
from hypothesis import assume, example, given
from hypothesis import strategies as st

from intes import noise as nz
from intes.kernels.base import LowRank
from intes.kernels.cpu import CpuBackend
from intes.kernels.reference import ReferenceBackend, lowrank_correction
from intes.models.base import make_noise
from intes.models.rwkv import RWKV

U32_MAX = 2**32 - 1
seeds = st.integers(0, U32_MAX)
steps = st.integers(0, 2**31)
pair_ids = st.integers(0, 2**20)
tensor_ids = st.integers(0, 4096)
dims = st.integers(1, 24)
ranks = st.integers(1, 16)


def _factors(seed, step, pair, tid, rows=7, cols=9, rank=2):
    a, b = nz.lowrank_factors(seed, step, np.array([pair]), tid, rows, cols, rank)
    return np.concatenate([a.ravel(), b.ravel()])


def _mix32_inverse(y: np.ndarray) -> np.ndarray:
    """Exact inverse of nz.mix32, written independently (xorshift and odd-multiply inverses)."""
    m = np.uint32
    y = np.asarray(y, dtype=m)
    y = y ^ (y >> m(16))
    y = y * m(pow(0x846CA68B, -1, 2**32))
    y = y ^ (y >> m(15)) ^ (y >> m(30))
    y = y * m(pow(0x7FEB352D, -1, 2**32))
    return y ^ (y >> m(16))


@given(seeds, steps, pair_ids, tensor_ids, dims, dims, ranks)
def test_factors_deterministic(seed, step, pair, tid, rows, cols, rank):
    """Same (seed, step, pair, tensor, shape) gives the same bits, as int8 of the right shape."""
    pairs = np.array([pair, pair + 1])
    a1, b1 = nz.lowrank_factors(seed, step, pairs, tid, rows, cols, rank)
    a2, b2 = nz.lowrank_factors(seed, step, pairs.copy(), tid, rows, cols, rank)
    assert a1.dtype == np.int8 and b1.dtype == np.int8
    assert a1.shape == (2, rows, rank) and b1.shape == (2, cols, rank)
    assert np.array_equal(a1, a2) and np.array_equal(b1, b2)
    v1 = nz.vector_noise(seed, step, pairs, tid, rows)
    assert v1.dtype == np.int8 and np.array_equal(v1, nz.vector_noise(seed, step, pairs, tid, rows))


@given(seeds, steps, pair_ids, tensor_ids, dims, dims, ranks)
def test_pair_stream_independent_of_batch(seed, step, pair, tid, rows, cols, rank):
    """A pair's factors do not depend on which other pairs are generated with it."""
    a1, b1 = nz.lowrank_factors(seed, step, np.array([pair]), tid, rows, cols, rank)
    a3, b3 = nz.lowrank_factors(seed, step, np.array([pair + 5, pair, 0]), tid, rows, cols, rank)
    assert np.array_equal(a1[0], a3[1]) and np.array_equal(b1[0], b3[1])


def _streams_differ(one: tuple[int, int, int, int], other: tuple[int, int, int, int]) -> None:
    """Two (seed, step, pair, tensor) coordinates give different keys and different noise."""
    (s1, t1, p1, i1), (s2, t2, p2, i2) = one, other
    k1, k2 = nz.stream_key(s1, t1, np.array([p1]), i1), nz.stream_key(s2, t2, np.array([p2]), i2)
    assert k1[0] != k2[0]
    assert not np.array_equal(_factors(*one), _factors(*other))


@given(seeds, seeds, steps, pair_ids, tensor_ids)
def test_seed_changes_stream(s1, s2, step, pair, tid):
    assume(s1 != s2)
    _streams_differ((s1, step, pair, tid), (s2, step, pair, tid))


@given(seeds, steps, steps, pair_ids, tensor_ids)
def test_step_changes_stream(seed, t1, t2, pair, tid):
    assume(t1 != t2)
    _streams_differ((seed, t1, pair, tid), (seed, t2, pair, tid))


@given(seeds, steps, st.lists(pair_ids, min_size=2, max_size=32, unique=True), tensor_ids)
def test_pair_changes_stream(seed, step, pairs, tid):
    """Distinct pairs get distinct keys (the pair field enters through a bijection)."""
    keys = nz.stream_key(seed, step, np.array(pairs), tid)
    assert len(np.unique(keys)) == len(pairs)
    assert not np.array_equal(_factors(seed, step, pairs[0], tid),
                              _factors(seed, step, pairs[1], tid))


@given(seeds, steps, pair_ids, tensor_ids, tensor_ids)
def test_tensor_id_changes_stream(seed, step, pair, t1, t2):
    assume(t1 != t2)
    _streams_differ((seed, step, pair, t1), (seed, step, pair, t2))


@given(seeds, steps, tensor_ids)
def test_fields_do_not_alias(seed, step, tid):
    """Swapping values between the pair and tensor fields does not reproduce a stream."""
    k_a = nz.stream_key(seed, step, np.array([1]), tid)
    k_b = nz.stream_key(seed, step, np.array([tid]), 1)
    assume(tid != 1)
    assert k_a[0] != k_b[0]


@given(seeds, steps, pair_ids, tensor_ids)
def test_indices_within_a_stream_differ(seed, step, pair, tid):
    """The hashes of one stream at different indices are all distinct (no short cycles)."""
    keys = nz.stream_key(seed, step, np.array([pair]), tid)
    h = nz.hash_u32(keys, 4096)[0]
    assert len(np.unique(h)) == 4096



@given(st.lists(st.integers(0, 2**40), min_size=1, max_size=50))
def test_scalar_mix32_equals_the_array_one(values):
    """mix32_int (the stream key's scalar fields) is mix32 of the value mod 2^32."""
    arr = np.array([v & U32_MAX for v in values], dtype=nz.U32)
    assert [nz.mix32_int(v) for v in values] == nz.mix32(arr).tolist()


@given(seeds, st.integers(0, U32_MAX), st.lists(pair_ids, min_size=1, max_size=9), tensor_ids)
def test_stream_key_is_the_chained_hash_of_its_fields(seed, step, pairs, tid):
    """Each field xors in its salt and is mixed into the key in order, in uint32 arrays
    throughout: the key every checkpoint's noise was drawn with."""
    salts = [nz.U32(s) for s in (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344)]
    k = nz.mix32(np.array([seed], dtype=nz.U32) ^ salts[0])
    k = nz.mix32(k ^ nz.U32(step) ^ salts[1])
    k = nz.mix32(k ^ nz.U32(tid) ^ salts[3])
    want = nz.mix32(k ^ nz.mix32(np.array(pairs, dtype=nz.U32) ^ salts[2]))
    assert np.array_equal(nz.stream_key(seed, step, np.array(pairs), tid), want)


@example(0)  # the extremes: 0 and 1 ...
@example(2**31 - 2**15)  # ... 2^31 ...
@example(2**32 - 2**16)  # ... and 2^32 - 1
@given(st.integers(0, 2**32 - 2**16))
def test_mix32_is_a_bijection(start):
    """mix32 has no collisions on a block of 2^16 inputs and inverts exactly."""
    x = np.arange(start, start + 2**16, dtype=np.uint64).astype(np.uint32)
    y = nz.mix32(x)
    assert y.dtype == np.uint32
    assert len(np.unique(y)) == len(x)
    assert np.array_equal(_mix32_inverse(y), x)


@given(st.lists(st.integers(0, U32_MAX), min_size=1, max_size=64))
def test_gaussian_int8_range(hashes):
    """Every noise value is int8 in [-NOISE_MAX, NOISE_MAX], never -128."""
    v = nz.gaussian_int8(np.array(hashes, dtype=np.uint64).astype(np.uint32))
    assert v.dtype == np.int8
    assert np.all(np.abs(v.astype(np.int32)) <= nz.NOISE_MAX)
    assert nz.NOISE_MAX < 128


def test_gaussian_int8_extremes():
    """All-zero and all-ones bytes map to exactly -NOISE_MAX and +NOISE_MAX; NOISE_MAX is 55."""
    v = nz.gaussian_int8(np.array([0, U32_MAX], dtype=np.uint32))
    assert v.tolist() == [-nz.NOISE_MAX, nz.NOISE_MAX]
    assert nz.NOISE_MAX == 55


def _byte_sum_counts() -> list[int]:
    """Number of uint32 values whose four bytes sum to s, s = 0..1020, by Python-int DP."""
    counts = [1]
    for _ in range(4):
        new = [0] * (len(counts) + 255)
        for s, c in enumerate(counts):
            for b in range(256):
                new[s + b] += c
        counts = new
    return counts


def _value_of_byte_sum(s: int) -> int:
    """The noise value of a hash whose bytes sum to s, evaluated by gaussian_int8 itself."""
    b = [min(255, max(0, s - 255 * i)) for i in range(4)]
    h = b[0] | (b[1] << 8) | (b[2] << 16) | (b[3] << 24)
    return int(nz.gaussian_int8(np.array([h], dtype=np.uint32))[0])


def test_exact_variance_constant():
    """NOISE_VARIANCE_X2_32 equals sum over byte sums of count * value^2 (brute force)."""
    counts = _byte_sum_counts()
    assert sum(counts) == 2**32
    values = [_value_of_byte_sum(s) for s in range(1021)]
    assert sum(c * v * v for c, v in zip(counts, values, strict=True)) == nz.NOISE_VARIANCE_X2_32
    assert sum(c * v for c, v in zip(counts, values, strict=True)) == 0  # symmetric: mean 0
    assert 250 < nz.NOISE_VARIANCE_X2_32 / 2**32 < 262  # ~16^2


@given(st.integers(0, U32_MAX))
def test_value_depends_only_on_byte_sum(h):
    """gaussian_int8 is a function of the byte sum (the documented Irwin-Hall construction)."""
    s = sum((h >> (8 * i)) & 255 for i in range(4))
    assert int(nz.gaussian_int8(np.array([h], dtype=np.uint32))[0]) == _value_of_byte_sum(s)


def test_empirical_moments():
    """Mean ~0 and variance ~NOISE_VARIANCE_X2_32 / 2^32 over 2^20 generated values."""
    a, b = nz.lowrank_factors(12345, 7, np.arange(64), 3, 64, 64, 128)
    v = np.concatenate([a.ravel(), b.ravel()]).astype(np.float64)
    assert v.size == 2**20
    var = nz.NOISE_VARIANCE_X2_32 / 2**32
    se_mean = np.sqrt(var / v.size)
    se_var = var * np.sqrt(2.0 / v.size)
    assert abs(v.mean()) < 6 * se_mean
    assert abs(v.var() - var) < 6 * se_var
    assert v.min() >= -nz.NOISE_MAX and v.max() <= nz.NOISE_MAX


def test_neighbouring_streams_uncorrelated():
    """Noise of adjacent pairs / steps / tensors is uncorrelated (|corr| < 5 / sqrt(n))."""
    n = 1 << 16
    base = nz.vector_noise(1, 2, np.array([3]), 4, n)[0].astype(np.float64)
    neighbours = [(1, 2, 4, 4), (1, 3, 3, 4), (1, 2, 3, 5), (2, 2, 3, 4)]  # seed, step, pair, tid
    for seed, step, pair, tid in neighbours:
        other = nz.vector_noise(seed, step, np.array([pair]), tid, n)
        corr = np.corrcoef(base, other[0].astype(np.float64))[0, 1]
        assert abs(corr) < 5 / np.sqrt(n)


@given(st.integers(0, 10**6), st.integers(1, 64))
def test_effective_step_groups_steps(step, reuse):
    """effective_step is constant within blocks of noise_reuse steps and changes across blocks."""
    e = nz.effective_step(step, reuse)
    block_start = step - step % reuse
    assert nz.effective_step(block_start, reuse) == e
    assert nz.effective_step(block_start + reuse - 1, reuse) == e
    assert nz.effective_step(block_start + reuse, reuse) == e + 1
    assert nz.effective_step(step, 1) == step


@given(seeds, st.integers(0, 1000), st.integers(2, 8))
def test_noise_reuse_in_make_noise(seed, step, reuse):
    """make_noise with noise_reuse k gives identical noise inside a block, fresh noise across."""
    specs = RWKV(vocab_size=8, dim=8, layers=1).specs
    pairs = np.arange(2)
    start = step - step % reuse
    n0 = make_noise(specs, seed, start, pairs, 1, reuse)
    n1 = make_noise(specs, seed, start + reuse - 1, pairs, 1, reuse)
    n2 = make_noise(specs, seed, start + reuse, pairs, 1, reuse)
    for s in specs:
        x0, x1, x2 = n0[s.name], n1[s.name], n2[s.name]
        if s.kind == "vector":
            assert np.array_equal(x0, x1)
            assert not np.array_equal(x0, x2)
        else:
            assert np.array_equal(x0.a, x1.a) and np.array_equal(x0.b, x1.b)
            assert not (np.array_equal(x0.a, x2.a) and np.array_equal(x0.b, x2.b))


@given(seeds, steps, ranks, st.data())
def test_make_noise_of_a_subset_keeps_each_tensors_noise(seed, step, rank, data):
    """make_noise over some of the specs, named by their ids, gives each tensor the noise it
    has in the whole model's (the update makes the vectors' noise this way, in one call), with
    the numpy generator and with the cpu backend's."""
    specs = RWKV(vocab_size=8, dim=8, layers=1).specs
    ids = sorted(data.draw(st.sets(st.integers(0, len(specs) - 1), min_size=1)))
    pairs = np.arange(3)
    for backend in (None, CpuBackend(threads=1)):
        whole = make_noise(specs, seed, step, pairs, rank, 1, backend)
        part = make_noise([specs[i] for i in ids], seed, step, pairs, rank, 1, backend, ids)
        assert list(part) == [specs[i].name for i in ids]
        for name, noise in part.items():
            if isinstance(noise, LowRank):
                assert np.array_equal(noise.a, whole[name].a)
                assert np.array_equal(noise.b, whole[name].b)
            else:
                assert np.array_equal(noise, whole[name])


@given(st.integers(1, 200))
def test_member_signs_alternate(n):
    """member_signs is +1 for even members, -1 for odd members, as int32."""
    s = nz.member_signs(np.arange(n))
    assert s.dtype == np.int32
    assert np.array_equal(s, np.where(np.arange(n) % 2 == 0, 1, -1))


@given(seeds, steps, st.integers(1, 6), st.integers(1, 40), st.integers(1, 12), ranks,
       st.integers(0, 8), st.integers(0, 2**31))
def test_antithetic_correction_negates(seed, step, pairs, cols, rows, rank, sigma, xseed):
    """For identical inputs, member 2p+1's correction is exactly the negation of member 2p's."""
    a, b = nz.lowrank_factors(seed, step, np.arange(pairs), 1, rows, cols, rank)
    noise = LowRank(a, b)
    rng = np.random.default_rng(xseed)
    x1 = rng.integers(-127, 128, (pairs, cols)).astype(np.int8)
    x = np.repeat(x1, 2, axis=0)  # rows 2p and 2p+1 see the same input
    corr = lowrank_correction(x, noise, sigma)
    assert corr.dtype == np.int32 and corr.shape == (2 * pairs, rows)
    assert np.array_equal(corr[1::2], -corr[0::2])


@given(seeds, steps, st.integers(1, 6), st.integers(1, 40), st.integers(1, 12), ranks,
       st.integers(4, 10), st.integers(0, 2**31))
def test_antithetic_linear_outputs(seed, step, pairs, cols, rows, rank, sigma, xseed):
    """linear(shift=0) is sat8(base + correction); unsaturated deltas from base are negatives."""
    a, b = nz.lowrank_factors(seed, step, np.arange(pairs), 1, rows, cols, rank)
    noise = LowRank(a, b)
    rng = np.random.default_rng(xseed)
    x = np.repeat(rng.integers(-6, 7, (pairs, cols)), 2, axis=0).astype(np.int8)
    w = rng.integers(-6, 7, (rows, cols)).astype(np.int8)
    be = ReferenceBackend()
    y = be.linear(x, w, 0, noise, sigma).astype(np.int64)
    base = be.linear(x, w, 0, None, sigma).astype(np.int64)
    base64 = x.astype(np.int64) @ w.T.astype(np.int64)
    corr = lowrank_correction(x, noise, sigma).astype(np.int64)
    assert np.array_equal(base, np.clip(base64, -127, 127))
    assert np.array_equal(y, np.clip(base64 + corr, -127, 127))
    ok = np.abs(base64 + corr) < 127
    ok = ok[0::2] & ok[1::2] & (np.abs(base64[0::2]) < 127)
    assert np.array_equal((y - base)[0::2][ok], -(y - base)[1::2][ok])


@given(st.integers(0, 2**40), st.integers(0, 2**40),
       st.lists(st.integers(0, 2**33), min_size=1, max_size=8))
def test_key_prefixes_match_key_prefix(seed, step, tids):
    """The vectorized prefixes are key_prefix's, tensor by tensor (ids and fields wrap mod
    2^32 alike)."""
    got = nz.key_prefixes(seed, step, tids)
    assert got.dtype == nz.U32
    assert [int(v) for v in got] == [nz.key_prefix(seed, step, t) for t in tids]


@given(st.integers(0, 2**40), st.integers(0, 2**40), st.integers(0, 2**33),
       st.lists(st.integers(0, 2**33), min_size=1, max_size=8))
def test_tensor_keys_match_stream_key(seed, step, pair, tids):
    """One pair's keys for several tensors are stream_key's, tensor by tensor."""
    got = nz.tensor_keys(seed, step, pair, tids)
    assert got.dtype == nz.U32
    assert [int(v) for v in got] == [int(nz.stream_key(seed, step, np.array([pair]), t)[0])
                                     for t in tids]
