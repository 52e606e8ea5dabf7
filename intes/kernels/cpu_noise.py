"""``intes.noise``'s generators compiled: the same bits, every tensor of a population slice
in one kernel call (``CpuNoise``), factors laid out factor-major for the linear kernels."""

from __future__ import annotations

import functools

import numpy as np
from numba import njit

from intes import noise as nz
from intes.kernels.base import LowRank
from intes.kernels.cpu_scalar import kernel

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
