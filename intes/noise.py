"""Counter-based integer noise: the only source of randomness in intes.

Every random number is a pure function of (seed, step, pair, tensor_id, index), computed with
uint32 multiply, xor, shift and add only, so numpy, numba, Triton and CuPy reproduce the same
bits and no noise ever needs to be stored: an update is rebuilt from seeds and fitness alone.

Distribution of one noise value (``gaussian_int8``): the four bytes of a hash are summed
(Irwin-Hall, n=4, an approximate Gaussian), centred and scaled by 111/1024, giving integers in
[-55, 55] with standard deviation ~16.0, i.e. N(0, 1) in the x16 fixed point of the weights.
The tails are clipped at ~3.4 sigma by construction; the exact variance times 2^32 is
``NOISE_VARIANCE_X2_32``.
"""

from __future__ import annotations

import numpy as np

U32 = np.uint32
GOLDEN = 0x9E3779B9  # 2^32 / phi: spreads consecutive counters
_FIELD_SALTS = (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344)  # seed, step, pair, tensor

NOISE_SCALE_NUM = 111  # (byte_sum - 510) * 111 >> 10 has std ~16
NOISE_SCALE_SHIFT = 10
NOISE_MAX = ((1020 - 510) * NOISE_SCALE_NUM + (1 << (NOISE_SCALE_SHIFT - 1))) >> NOISE_SCALE_SHIFT


def mix32(x: np.ndarray) -> np.ndarray:
    """Bijective avalanche of uint32 values (lowbias32-style finalizer)."""
    x = np.asarray(x, dtype=U32)
    x = x ^ (x >> U32(16))
    x = x * U32(0x7FEB352D)
    x = x ^ (x >> U32(15))
    x = x * U32(0x846CA68B)
    return x ^ (x >> U32(16))


def mix32_int(x: int) -> int:
    """mix32 of one value in Python integers (no array overhead for the scalar fields)."""
    x &= 0xFFFFFFFF
    x ^= x >> 16
    x = (x * 0x7FEB352D) & 0xFFFFFFFF
    x ^= x >> 15
    x = (x * 0x846CA68B) & 0xFFFFFFFF
    return x ^ (x >> 16)


def _step_key(seed: int, step: int) -> int:
    """The part of every stream key fixed by (seed, step)."""
    return mix32_int(mix32_int((seed & 0xFFFFFFFF) ^ _FIELD_SALTS[0]) ^ (step & 0xFFFFFFFF)
                     ^ _FIELD_SALTS[1])


def key_prefix(seed: int, step: int, tensor_id: int) -> int:
    """The part of every pair's stream key fixed by (seed, step, tensor)."""
    return mix32_int(_step_key(seed, step) ^ (tensor_id & 0xFFFFFFFF) ^ _FIELD_SALTS[3])


def key_prefixes(seed: int, step: int, tensor_ids: list[int]) -> np.ndarray:
    """``key_prefix`` of several tensors (uint32), the same bits: the (seed, step) part made
    once, one mix per tensor (in Python ints: for a step's few dozen tensors cheaper than
    numpy's per-call cost)."""
    k = _step_key(seed, step)
    return np.array([mix32_int(k ^ (int(t) & 0xFFFFFFFF) ^ _FIELD_SALTS[3])
                     for t in tensor_ids], dtype=U32)


PAIR_SALT = _FIELD_SALTS[2]


def stream_key(seed: int, step: int, pairs: np.ndarray, tensor_id: int) -> np.ndarray:
    """One uint32 key per pair for (seed, step, tensor): the start of that pair's noise stream."""
    pairs = np.asarray(pairs, dtype=np.int64).astype(U32)
    return mix32(U32(key_prefix(seed, step, tensor_id)) ^ mix32(pairs ^ U32(PAIR_SALT)))


def tensor_keys(seed: int, step: int, pair: int, tensor_ids: list[int]) -> np.ndarray:
    """``stream_key`` of one pair for several tensors (uint32, one per tensor), the same bits:
    the (seed, step) part and the pair's mix made once."""
    pair_mix = U32(mix32_int((pair & 0xFFFFFFFF) ^ PAIR_SALT))
    return mix32(key_prefixes(seed, step, tensor_ids) ^ pair_mix)


def hash_u32(keys: np.ndarray, n: int) -> np.ndarray:
    """(len(keys), n) uint32: value i of each key's stream."""
    idx = mix32(np.arange(n, dtype=U32) * U32(GOLDEN) + U32(1))
    return mix32(np.asarray(keys, dtype=U32)[:, None] ^ idx[None, :])


def gaussian_int8(h: np.ndarray) -> np.ndarray:
    """Map uint32 hashes to approximately N(0, 16^2) int8 values in [-55, 55]."""
    h = np.asarray(h, dtype=U32)
    s = (h & U32(255)) + ((h >> U32(8)) & U32(255)) + ((h >> U32(16)) & U32(255)) + (h >> U32(24))
    centred = s.astype(np.int32) - 510
    rounded = (centred * NOISE_SCALE_NUM + (1 << (NOISE_SCALE_SHIFT - 1))) >> NOISE_SCALE_SHIFT
    return rounded.astype(np.int8)


def _byte_sum_distribution() -> np.ndarray:
    one = np.ones(256, dtype=np.int64)
    dist = one
    for _ in range(3):
        dist = np.convolve(dist, one)
    return dist  # counts of s = 0..1020, summing to 2^32


def _noise_variance() -> int:
    """Exact variance of gaussian_int8 times 2^32, as an integer (the distribution is symmetric)."""
    s = np.arange(1021, dtype=np.int64)
    v = ((s - 510) * NOISE_SCALE_NUM + (1 << (NOISE_SCALE_SHIFT - 1))) >> NOISE_SCALE_SHIFT
    return int(np.sum(_byte_sum_distribution() * v * v))


NOISE_VARIANCE_X2_32 = _noise_variance()  # E[v^2] * 2^32; E[v^2] ~ 256


def effective_step(step: int, noise_reuse: int) -> int:
    """The step index that enters the hash: noise is redrawn every ``noise_reuse`` steps."""
    return step // max(1, noise_reuse)


def lowrank_factors(
    seed: int, step: int, pairs: np.ndarray, tensor_id: int, rows: int, cols: int, rank: int
) -> tuple[np.ndarray, np.ndarray]:
    """Per-pair int8 factors A (P, rows, rank) and B (P, cols, rank); perturbation = A @ B^T."""
    keys = stream_key(seed, step, pairs, tensor_id)
    vals = gaussian_int8(hash_u32(keys, (rows + cols) * rank))
    a = vals[:, : rows * rank].reshape(len(keys), rows, rank)
    b = vals[:, rows * rank :].reshape(len(keys), cols, rank)
    return a, b


def vector_noise(seed: int, step: int, pairs: np.ndarray, tensor_id: int, size: int) -> np.ndarray:
    """Per-pair full-rank int8 noise (P, size) for vector parameters."""
    keys = stream_key(seed, step, pairs, tensor_id)
    return gaussian_int8(hash_u32(keys, size))


def member_signs(members: np.ndarray) -> np.ndarray:
    """Antithetic sign of each member: +1 for 2p, -1 for 2p+1 (int32)."""
    return (1 - 2 * (np.asarray(members) & 1)).astype(np.int32)
