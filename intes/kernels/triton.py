"""Triton kernels of the cuda backend: the fused perturbed int8 linear layer and the update GEMM.

Both run the int8 x int8 -> int32 products on tensor cores (``tl.dot``) and return exactly the
bits of ``intes.kernels.reference``:

- ``linear``: one shared base product X W^T over all member rows plus each row's correction
  ((x_m B_p) >> 4) A_p^T >> sigma_shift (negated for odd rows), rescaled by ``shift`` with
  round-half-up and saturated to [-127, 127] in the epilogue. A tile holds BLOCK_P *pairs*:
  even and odd rows are two dots against the same W tile, so each pair's A values are made
  once per tile. The factors are either loaded (``DeviceNoise.a``/``.b``) or hashed inside
  the kernel from per-pair stream keys (``DeviceNoise.keys``) with the same uint32 hash as
  ``intes.noise`` (``mix32`` / ``noise_value`` below): no factor ever touches memory.
  x_m B_p (N x r, int32) is a separate small kernel: fusing it would redo it per output tile.
- ``update_matrix``: Z = sum_p f_p A_p B_p^T as one (out x P r) @ (P r x in) int8 GEMM with
  the step W +- 1 where |Z| > threshold (saturating) fused into the epilogue. f_p A_p must be
  int8 for the tensor cores, so f is split into bits, Z = sum_t 2^t sum_p s_p bit_t(|f_p|) A_p
  B_p^T: one exact int8 product per bit of max |f| (one for sign fitness), combined by Horner.

Exactness needs no int32 overflow, which the bounds of intes.kernels.reference and
intes.es.ESConfig exclude: tensor cores may saturate an int32 sum (mma.sync .satfinite) where
numpy would wrap. Every kernel is a pure function of its inputs (outputs never alias inputs),
as autotuning requires. Under ``TRITON_INTERPRET=1`` (CPU tests) one small config is used.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from intes import noise as nz
from intes.intmath import FRAC_BITS

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

NOISE_NONE, NOISE_HASHED, NOISE_LOADED = 0, 1, 2

_GOLDEN = tl.constexpr(nz.GOLDEN)
_SCALE_NUM = tl.constexpr(nz.NOISE_SCALE_NUM)
_SCALE_SHIFT = tl.constexpr(nz.NOISE_SCALE_SHIFT)
_SCALE_HALF = tl.constexpr(1 << (nz.NOISE_SCALE_SHIFT - 1))
_FRAC_BITS = tl.constexpr(FRAC_BITS)


@dataclass(frozen=True)
class DeviceNoise:
    """One tensor's per-pair rank-r noise on the device, as the kernels here consume it.

    Either ``keys`` (P,) int32 holding the bits of the uint32 stream keys
    (``intes.noise.stream_key``), and the kernels hash the factors themselves, or int8 factors
    ``a`` (P, out, r) and ``b`` (P, in, r) that they load (any pair stride, inner dims dense).
    """

    rank: int
    keys: torch.Tensor | None = None
    a: torch.Tensor | None = None
    b: torch.Tensor | None = None

    @property
    def pairs(self) -> int:
        return len(self.keys) if self.keys is not None else self.a.shape[0]


# ---------------------------------------------------------------- the hash, bit for bit


@triton.jit
def mix32(x):
    """intes.noise.mix32 on uint32 tensors: xor-shifts and wrapping multiplies only."""
    x = x ^ (x >> 16)
    x = x * 0x7FEB352D
    x = x ^ (x >> 15)
    x = x * 0x846CA68B
    return x ^ (x >> 16)


@triton.jit
def gaussian(h):
    """intes.noise.gaussian_int8 of uint32 hashes, as int32 in [-NOISE_MAX, NOISE_MAX]."""
    s = (h & 255) + ((h >> 8) & 255) + ((h >> 16) & 255) + (h >> 24)
    centred = s.to(tl.int32) - 510
    return (centred * _SCALE_NUM + _SCALE_HALF) >> _SCALE_SHIFT


@triton.jit
def noise_value(key, idx):
    """Value idx of the stream of key (both uint32, broadcast): intes.noise.hash_u32 + gaussian.

    Pass idx with a unit axis where it repeats, so its own mix is made once per column.
    """
    return gaussian(mix32(key ^ mix32(idx * _GOLDEN + 1)))


@triton.jit
def _pair_noise(keys_ptr, fac_ptr, fac_stride, pairs, pmask, idx, imask, idx_base,
                HASHED: tl.constexpr):
    """int32 (pairs, idx) tile of each pair's factor values at flat in-factor indices.

    Hashed: stream index idx_base + idx (A's values precede B's in a pair's stream).
    Loaded: fac_ptr[pair * fac_stride + idx].
    """
    if HASHED:
        key = tl.load(keys_ptr + pairs, mask=pmask, other=0).to(tl.uint32, bitcast=True)
        val = noise_value(key[:, None], (idx + idx_base).to(tl.uint32)[None, :])
    else:
        ptrs = fac_ptr + pairs.to(tl.int64)[:, None] * fac_stride + idx[None, :]
        val = tl.load(ptrs, mask=pmask[:, None] & imask[None, :], other=0).to(tl.int32)
    return val


# ---------------------------------------------------------------- perturbed linear


def _configs(space: list[tuple[int, ...]], names: tuple[str, ...]) -> list[triton.Config]:
    """Autotune configs from (block sizes..., warps, stages) tuples.

    INTES_TRITON_AUTOTUNE=0 keeps the first config alone: a test run on a GPU then compiles
    each kernel variant once, not once per config.
    """
    if os.environ.get("INTES_TRITON_AUTOTUNE") == "0":
        space = space[:1]
    return [triton.Config(dict(zip(names, c[:-2], strict=True)), num_warps=c[-2],
                          num_stages=c[-1]) for c in space]


# H100-sized tiles: BLOCK_P pairs = 2 BLOCK_P rows. The interpreter gets one small config
# (it would otherwise time every config, and is slow enough already).
_LINEAR_SPACE = [(16, 32, 32, 4, 1)] if INTERPRET else [
    (64, 128, 128, 8, 3), (64, 64, 128, 4, 4), (32, 128, 128, 4, 4),
    (128, 128, 64, 8, 3), (16, 64, 128, 4, 4),
]
_XB_SPACE = [(16, 32, 4, 1)] if INTERPRET else [(32, 128, 4, 3), (64, 128, 8, 3), (32, 256, 4, 3)]
_UPDATE_SPACE = [(32, 32, 32, 4, 1)] if INTERPRET else [
    (128, 128, 64, 8, 3), (128, 128, 128, 8, 3), (64, 128, 64, 4, 4), (64, 64, 64, 4, 4),
]


@triton.autotune(configs=_configs(_XB_SPACE, ("BLOCK_P", "BLOCK_K")),
                 key=["rows", "n_in", "RANK", "HASHED"])
@triton.jit
def _xb_kernel(x_ptr, keys_ptr, b_ptr, xb_ptr, rows, n_in, n_out, stride_x, b_stride,
               RANK: tl.constexpr, HASHED: tl.constexpr,
               BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr):
    """xb[m, j] = (sum_k x[m, k] B_p[k, j]) >> 4 for both rows m of each pair p (int32)."""
    pairs = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    even = 2 * pairs
    odd = even + 1
    pmask = even < rows
    for j in tl.static_range(RANK):
        acc_e = tl.zeros((BLOCK_P,), dtype=tl.int32)
        acc_o = tl.zeros((BLOCK_P,), dtype=tl.int32)
        for k0 in range(0, n_in, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            kmask = ks < n_in
            b = _pair_noise(keys_ptr, b_ptr, b_stride, pairs, pmask, ks * RANK + j, kmask,
                            n_out * RANK, HASHED)
            xe = _load_rows(x_ptr, even, ks, rows, n_in, stride_x).to(tl.int32)
            xo = _load_rows(x_ptr, odd, ks, rows, n_in, stride_x).to(tl.int32)
            acc_e += tl.sum(xe * b, axis=1)
            acc_o += tl.sum(xo * b, axis=1)
        tl.store(xb_ptr + even * RANK + j, acc_e >> _FRAC_BITS, mask=even < rows)
        tl.store(xb_ptr + odd * RANK + j, acc_o >> _FRAC_BITS, mask=odd < rows)


@triton.jit
def _load_rows(ptr, rows_idx, cols, rows, n_cols, stride):
    """A (rows_idx, cols) tile of a row-major int8 matrix, zero outside it (int64 offsets)."""
    ptrs = ptr + rows_idx.to(tl.int64)[:, None] * stride + cols[None, :]
    return tl.load(ptrs, mask=(rows_idx < rows)[:, None] & (cols < n_cols)[None, :], other=0)


@triton.jit
def _corrections(xb_ptr, keys_ptr, a_ptr, a_stride, pairs, outs, rows, n_out, sigma_shift,
                 RANK: tl.constexpr, HASHED: tl.constexpr):
    """(xb_m . A_p[o]) >> sigma_shift for the even and the odd row m of each pair p.

    One A tile per j serves both rows. |xb| <= in * 127 * 55 / 16 and |A| <= 55: the bound
    of intes.kernels.reference holds. Returns two int32 (pairs, outs) tiles, both un-negated.
    """
    even = 2 * pairs
    odd = even + 1
    s_e = tl.zeros((pairs.shape[0], outs.shape[0]), dtype=tl.int32)
    s_o = tl.zeros((pairs.shape[0], outs.shape[0]), dtype=tl.int32)
    for j in tl.static_range(RANK):
        a = _pair_noise(keys_ptr, a_ptr, a_stride, pairs, even < rows, outs * RANK + j,
                        outs < n_out, 0, HASHED)
        s_e += tl.load(xb_ptr + even * RANK + j, mask=even < rows, other=0)[:, None] * a
        s_o += tl.load(xb_ptr + odd * RANK + j, mask=odd < rows, other=0)[:, None] * a
    return s_e >> sigma_shift, s_o >> sigma_shift


@triton.jit
def _store_rescaled(out_ptr, rows_idx, outs, acc, rows, n_out, stride_out, shift):
    """sat8(rshift_round(acc, shift)) into rows rows_idx, columns outs.

    (1 << shift) >> 1 is rshift_round's 2^(shift-1) for shift > 0 and 0 for shift = 0, so
    one expression covers both (shift is a runtime value: no recompile per layer width).
    """
    acc = (acc + ((1 << shift) >> 1)) >> shift
    y = tl.minimum(tl.maximum(acc, -127), 127).to(tl.int8)
    ptrs = out_ptr + rows_idx.to(tl.int64)[:, None] * stride_out + outs[None, :]
    tl.store(ptrs, y, mask=(rows_idx < rows)[:, None] & (outs < n_out)[None, :])


@triton.autotune(configs=_configs(_LINEAR_SPACE, ("BLOCK_P", "BLOCK_O", "BLOCK_K")),
                 key=["rows", "n_out", "n_in", "NOISE", "RANK"])
@triton.jit
def _linear_kernel(x_ptr, w_ptr, out_ptr, xb_ptr, keys_ptr, a_ptr,
                   rows, n_out, n_in, stride_x, stride_w, stride_out, a_stride, shift,
                   sigma_shift, RANK: tl.constexpr, NOISE: tl.constexpr,
                   BLOCK_P: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_K: tl.constexpr):
    """out = sat8(rshift_round(x W^T + correction, shift)) for BLOCK_P row pairs x BLOCK_O outs.

    |x W^T| <= in * 127^2 < 2^31 for in <= 2^17 (intes.kernels.reference).
    """
    pairs = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    outs = tl.program_id(1) * BLOCK_O + tl.arange(0, BLOCK_O)
    even = 2 * pairs
    odd = even + 1
    acc_e = tl.zeros((BLOCK_P, BLOCK_O), dtype=tl.int32)
    acc_o = tl.zeros((BLOCK_P, BLOCK_O), dtype=tl.int32)
    for k0 in range(0, n_in, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        wt = tl.trans(_load_rows(w_ptr, outs, ks, n_out, n_in, stride_w))
        acc_e = tl.dot(_load_rows(x_ptr, even, ks, rows, n_in, stride_x), wt, acc_e,
                       out_dtype=tl.int32)
        acc_o = tl.dot(_load_rows(x_ptr, odd, ks, rows, n_in, stride_x), wt, acc_o,
                       out_dtype=tl.int32)
    if NOISE != 0:
        c_e, c_o = _corrections(xb_ptr, keys_ptr, a_ptr, a_stride, pairs, outs, rows, n_out,
                                sigma_shift, RANK, NOISE == 1)
        acc_e += c_e
        acc_o -= c_o  # the antithetic member: -(s >> sigma), as the reference negates
    _store_rescaled(out_ptr, even, outs, acc_e, rows, n_out, stride_out, shift)
    _store_rescaled(out_ptr, odd, outs, acc_o, rows, n_out, stride_out, shift)


def _factor_view(t: torch.Tensor, rank: int) -> torch.Tensor:
    """A (P, n, r) int8 factor whose inner (n, r) block is dense, as the kernels index it."""
    if t.stride(2) != 1 or t.stride(1) != rank:
        t = t.contiguous()
    return t


def linear(x: torch.Tensor, w: torch.Tensor, shift: int, noise: DeviceNoise | None,
           sigma_shift: int) -> torch.Tensor:
    """int8 (N, out) = sat8(rshift_round(x W^T + each row's low-rank correction, shift)).

    x (N, in) int8 with rows pair-major (N = 2P when noise is given); w (out, in) int8.
    """
    if not (0 <= shift < 31 and 0 <= sigma_shift < 32):
        raise ValueError(f"shifts out of range: shift {shift}, sigma shift {sigma_shift}")
    x, w = x.contiguous(), w.contiguous()
    rows, n_in = x.shape
    n_out = w.shape[0]
    out = torch.empty((rows, n_out), dtype=torch.int8, device=x.device)
    mode, rank, xb, keys, a = NOISE_NONE, 1, x, x, x  # unused pointers when noise is None
    if noise is not None:
        if rows != 2 * noise.pairs:
            raise ValueError(f"{rows} rows for {noise.pairs} noise pairs: need 2 rows a pair")
        rank = noise.rank
        xb = member_projection(x, noise, n_out)
        if noise.keys is not None:
            mode, keys = NOISE_HASHED, noise.keys
        else:
            mode, a = NOISE_LOADED, _factor_view(noise.a, rank)

    def grid(meta: dict) -> tuple[int, int]:
        pair_blocks = triton.cdiv(triton.cdiv(rows, 2), meta["BLOCK_P"])
        return pair_blocks, triton.cdiv(n_out, meta["BLOCK_O"])

    _linear_kernel[grid](x, w, out, xb, keys, a, rows, n_out, n_in, x.stride(0), w.stride(0),
                         out.stride(0), a.stride(0), shift, sigma_shift, RANK=rank, NOISE=mode)
    return out


def member_projection(x: torch.Tensor, noise: DeviceNoise, n_out: int) -> torch.Tensor:
    """int32 (N, r): (x_m B_p) >> 4 for every row m of pair p; n_out places B in the stream."""
    rows, n_in = x.shape
    xb = torch.empty((rows, noise.rank), dtype=torch.int32, device=x.device)
    hashed = noise.keys is not None
    keys = noise.keys if hashed else xb
    b = x if hashed else _factor_view(noise.b, noise.rank)

    def grid(meta: dict) -> tuple[int]:
        return (triton.cdiv(triton.cdiv(rows, 2), meta["BLOCK_P"]),)

    _xb_kernel[grid](x, keys, b, xb, rows, n_in, n_out, x.stride(0), b.stride(0),
                     RANK=noise.rank, HASHED=hashed)
    return xb


# ---------------------------------------------------------------- seed-reconstructed update


@triton.autotune(configs=_configs(_UPDATE_SPACE, ("BLOCK_O", "BLOCK_I", "BLOCK_Q")),
                 key=["n_out", "n_in", "depth", "RANK"])
@triton.jit
def _update_kernel(w_ptr, out_ptr, a_ptr, b_ptr, f_ptr, n_out, n_in, depth, a_stride, b_stride,
                   threshold, digits, RANK: tl.constexpr,
                   BLOCK_O: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_Q: tl.constexpr):
    """W' = sat8(W + sign(Z) where |Z| > threshold), Z = sum_p f_p A_p B_p^T, for one tile.

    The contraction runs over q = p * RANK + j (depth = P * RANK). Pass t (high bit first)
    adds sum_q s_q bit_t(|f_q|) A[q, o] B[q, i], an exact int8 tensor-core product; the running
    Z doubles before each pass. |Z| <= sum_p |f_p| r NOISE_MAX^2 < 2^31 (intes.es.ESConfig).
    """
    outs = tl.program_id(0) * BLOCK_O + tl.arange(0, BLOCK_O)
    ins = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
    omask = outs < n_out
    imask = ins < n_in
    z = tl.zeros((BLOCK_O, BLOCK_I), dtype=tl.int32)
    for t in range(digits):
        bit = digits - 1 - t
        z = z * 2
        for q0 in range(0, depth, BLOCK_Q):
            qs = q0 + tl.arange(0, BLOCK_Q)
            qmask = qs < depth
            p = (qs // RANK).to(tl.int64)
            j = qs % RANK
            f = tl.load(f_ptr + p, mask=qmask, other=0)
            g = ((tl.abs(f) >> bit) & 1) * tl.where(f < 0, -1, 1)
            a = tl.load(a_ptr + p[None, :] * a_stride + outs[:, None] * RANK + j[None, :],
                        mask=omask[:, None] & qmask[None, :], other=0)
            b = tl.load(b_ptr + p[:, None] * b_stride + ins[None, :] * RANK + j[:, None],
                        mask=qmask[:, None] & imask[None, :], other=0)
            z = tl.dot((a.to(tl.int32) * g[None, :]).to(tl.int8), b, z, out_dtype=tl.int32)
    wptrs = outs.to(tl.int64)[:, None] * n_in + ins[None, :]
    mask = omask[:, None] & imask[None, :]
    w = tl.load(w_ptr + wptrs, mask=mask, other=0).to(tl.int32)
    sign = tl.where(z > 0, 1, tl.where(z < 0, -1, 0))
    move = tl.where(tl.abs(z) > threshold, sign, 0)
    tl.store(out_ptr + wptrs, tl.minimum(tl.maximum(w + move, -127), 127).to(tl.int8), mask=mask)


def update_matrix(w: torch.Tensor, a: torch.Tensor, b: torch.Tensor, fitness: torch.Tensor,
                  threshold: int) -> torch.Tensor:
    """New int8 W (out, in): +-1 where |sum_p f_p A_p B_p^T| > threshold, saturated.

    a (P, out, r), b (P, in, r) int8 factors; fitness (P,) int32.
    """
    w = w.contiguous()
    n_out, n_in = w.shape
    pairs, _, rank = a.shape
    a, b = _factor_view(a, rank), _factor_view(b, rank)
    fitness = fitness.to(torch.int32).contiguous()
    digits = int(fitness.abs().max().item()).bit_length() if pairs else 0
    out = torch.empty_like(w)

    def grid(meta: dict) -> tuple[int, int]:
        return triton.cdiv(n_out, meta["BLOCK_O"]), triton.cdiv(n_in, meta["BLOCK_I"])

    _update_kernel[grid](w, out, a, b, fitness, n_out, n_in, pairs * rank, a.stride(0),
                         b.stride(0), threshold, digits, RANK=rank)
    return out
