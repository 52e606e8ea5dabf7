"""The numpy reference backend: plain integer numpy that defines every op's exact answer.

Bounds (``linear_bound`` is checked for every layer by ``TrainConfig.validate``, and property
tests run all-extreme inputs):
- base product: |x @ W^T| <= in * 127^2.
- correction: |x @ B| >> 4 <= in * 127 * NOISE_MAX / 16; times |A| <= NOISE_MAX over r terms
  before the sigma shift; the base plus the shifted correction is the accumulator, to which
  the rescale (rshift_round) adds 2^(shift - 1).
- update: |sum_p f_p (A_p B_p^T)_ij| <= sum |f_p| * r * NOISE_MAX^2 (ESConfig.validate).
"""

from __future__ import annotations

import numpy as np

from intes.intmath import FRAC_BITS, fan_in_shift, log_likelihood, rshift_round, sat8
from intes.kernels.base import LowRank
from intes.noise import NOISE_MAX


def linear_bound(fan_in: int, rank: int, sigma_shift: int, shift: int | None = None) -> int:
    """Largest |int32 intermediate| of a perturbed linear layer with all-extreme inputs: the
    correction before its sigma shift, and the accumulator with rshift_round's half
    2^(shift - 1) added (``shift``: the layer's rescale, by default the models'
    ``fan_in_shift``)."""
    shift = fan_in_shift(fan_in) if shift is None else shift
    base = fan_in * 127 * 127
    rank_sum = ((fan_in * 127 * NOISE_MAX) >> FRAC_BITS) * NOISE_MAX * rank
    half = (1 << shift) >> 1
    # + 2^sigma - 1: the cpu backend rounds a negated correction up by that before its shift;
    # + 1: the shift floors a negative correction to one past |y| >> sigma_shift
    return max(rank_sum + (1 << sigma_shift) - 1, base + (rank_sum >> sigma_shift) + 1 + half)


def lowrank_correction(x: np.ndarray, noise: LowRank, sigma_shift: int) -> np.ndarray:
    """int32 (..., N, out): each member's ((x_m B_p) >> 4) A_p^T >> sigma_shift, sign by parity,
    for x (..., N, in): members, or blocks of all members (``Backend``)."""
    pairs, cols, rank = noise.b.shape
    xp = x.reshape(-1, pairs, 2, cols).astype(np.int32)
    xb = np.einsum("tpmi,pir->tpmr", xp, noise.b.astype(np.int32)) >> FRAC_BITS
    corr = np.einsum("tpmr,por->tpmo", xb, noise.a.astype(np.int32)) >> sigma_shift
    corr[:, :, 1, :] *= -1
    return corr.reshape(*x.shape[:-1], -1)


def lowrank_sum(noise: LowRank, fitness: np.ndarray) -> np.ndarray:
    """Z = sum_p f_p A_p B_p^T as ONE integer product (A^T diag(f)) B, shape (out, in)."""
    pairs, rows, rank = noise.a.shape
    af = noise.a.astype(np.int32) * fitness.astype(np.int32)[:, None, None]
    a2 = af.transpose(1, 0, 2).reshape(rows, pairs * rank)
    b2 = noise.b.astype(np.int32).transpose(0, 2, 1).reshape(pairs * rank, -1)
    return a2 @ b2


def step_by_sign(w: np.ndarray, z: np.ndarray, threshold: int) -> np.ndarray:
    """Move each weight one step toward sign(z) where |z| > threshold, saturating."""
    move = np.where(np.abs(z) > threshold, np.sign(z), 0)
    return sat8(w.astype(np.int32) + move)


class ReferenceBackend:
    """``Backend`` in plain numpy integer ops: the semantics every other backend matches."""

    name = "reference"

    def prepare(self, w: np.ndarray) -> np.ndarray:
        return w

    def linear(self, x, w, shift, noise, sigma_shift):
        acc = x.astype(np.int32) @ w.T.astype(np.int32)
        if noise is not None:
            acc += lowrank_correction(x, noise, sigma_shift)
        return sat8(rshift_round(acc, shift))

    def embed(self, table, tokens, noise, sigma_shift):
        rows = table[tokens].astype(np.int32)
        if noise is not None:
            pairs, _, rank = noise.a.shape
            tok = tokens.reshape(-1, pairs, 2)
            a_rows = noise.a[np.arange(pairs)[None, :, None], tok]  # (T, P, 2, r)
            corr = np.einsum("tpmr,pdr->tpmd", a_rows.astype(np.int32),
                             noise.b.astype(np.int32)) >> (FRAC_BITS + sigma_shift)
            corr[:, :, 1, :] *= -1
            rows += corr.reshape(rows.shape)
        return sat8(rows)

    def log_likelihood(self, logits, targets):
        flat = log_likelihood(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
        return flat.reshape(targets.shape)

    def update_matrix(self, w, noise, fitness, threshold):
        return step_by_sign(w, lowrank_sum(noise, fitness), threshold)

    def update_vector(self, v, noise, fitness, threshold):
        z = fitness.astype(np.int32) @ noise.astype(np.int32)
        return step_by_sign(v, z, threshold)
