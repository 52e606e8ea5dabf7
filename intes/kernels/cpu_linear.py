"""The CPU backend's linear-layer kernels: the epilogues that turn a GEMM engine's exact
product into int8 (plain, or with each member's low-rank correction), the VNNI engine's fused
layers (product and epilogue in registers), EGG's recurrence over fused layers, the
perturbed embedding and the update's step. Bit-identical to ``intes.kernels.reference``.

Rows are the N = 2P members, or T stacked copies of them (a token block: row t N + m is
member m). Noise factors are used factor-major, at (P, r, out) and bt (P, r, in), so inner
loops are unit stride and vectorize; ``CpuNoise`` generates them in that layout (see
``intes.kernels.cpu_noise._factors``).
"""

from __future__ import annotations

import numpy as np
from numba import njit

from intes.kernels.cpu_scalar import (
    _FRAC,
    _HI,
    _S8,
    I16,
    I32,
    _after,
    _rescale,
    _row,
    _sat8,
    _sat8_16,
    kernel,
)
from intes.kernels.vnni import pair_dot, project_pairs, quad_pair_dot
from intes.kernels.vnni_gemm import (
    BLOCK_COLS,
    PANEL_ROWS,
    level_panel,
    odd_low,
    panel_product,
    prefetch_factor_rows,
    prefetch_rows,
    tiles_es,
    tiles_rescale,
)

# ---------------------------------------------------------------------------------------------
# linear layer epilogues: exact base (rows, out) -> int8 (rows, out)
#
# ``acc`` is the base product as int32 or as float32 holding exact integers (one float32
# K-chunk, see intes.kernels.gemm); I32() converts either exactly. The ES kernels go row by
# row (streaming the large acc buffer in order); one layer's factors for a slice of the
# population, P (in + out) bytes, stay in L2 across the copies of a token block.


@kernel
def _linear_plain(acc, half, shift, out):
    """Inference epilogue: sat8(rshift_round(x @ W^T, shift))."""
    for m in range(out.shape[0]):
        for o in range(out.shape[1]):
            out[m, o] = _rescale(I32(acc[m, o]), half, shift)


@njit(inline="always", cache=True)
def _project(x, m0, p, bt, xb):
    """xb[s, r] = (x_{m0+s} . B_p[:, r]) >> 4 for both members (rows m0, m0 + 1) of pair p,
    in int32 like the reference's einsum; B_p is read once for the pair."""
    for r in range(bt.shape[1]):
        xb[0, r], xb[1, r] = _project1(x, m0, p, bt, r)


@njit(inline="always", cache=True)
def _project1(x, m0, p, bt, r):
    """(x_{m0} . B_p[:, r]) >> 4 and (x_{m0+1} . B_p[:, r]) >> 4 (``pair_dot``: VNNI where
    the CPU has it)."""
    d0, d1 = pair_dot(x, m0, bt[p, r])
    return np.right_shift(d0, _FRAC), np.right_shift(d1, _FRAC)


@kernel
def _project_rank1(x, bt, xb):
    """xb[m] = (x_m . B_p) >> 4 for every row (rank 1), before the base product: x was just
    written by the op that made it and is still in cache (after the GEMM it is not), and the
    pairs' dot products are independent, so the CPU overlaps them. A token block's copies
    of a pair share B_p: four copies go in one call, 8 rows against one load of the factor."""
    members = 2 * bt.shape[0]
    first = 0
    while first + 4 * members <= x.shape[0]:
        for p in range(bt.shape[0]):
            m0 = first + 2 * p
            d = quad_pair_dot(x, m0, members, bt[p, 0])
            for c in range(4):
                m = m0 + c * members
                xb[m] = np.right_shift(d[2 * c], _FRAC)
                xb[m + 1] = np.right_shift(d[2 * c + 1], _FRAC)
        first += 4 * members
    while first < x.shape[0]:
        for p in range(bt.shape[0]):
            m0 = first + 2 * p
            xb[m0], xb[m0 + 1] = _project1(x, m0, p, bt, 0)
        first += members


@kernel
def _correct_rank1(acc, xb, at, sigma_shift, half, shift, out):
    """ES epilogue for rank 1: acc + sign * ((xb_m * A_p) >> sigma_shift), rescaled, in one
    pass per row. With the projection the extra work over inference is 2 (in + out)
    multiply-adds per pair of rows.

    One loop for both signs, the sign folded into the row's factor: -(y >> s) is
    ((-y) + 2^s - 1) >> s (floor of the negation is minus the ceiling), so an odd row uses
    -xb_m and adds 2^s - 1 before the shift; |xb_m A_p| + 2^s - 1 < 2^31 by
    ``linear_bound``. Against a pair's two rows in two sign-specialized loops this measured
    10-30% faster where acc streams from memory (a token block's rows), 5% slower where it
    sits in L2 (one token's).
    """
    members = 2 * at.shape[0]
    odd_bias = np.subtract(np.left_shift(I32(1), sigma_shift), I32(1))
    for m in range(out.shape[0]):
        p = (m % members) // 2
        if m % 2 == 0:
            x, bias = xb[m], I32(0)
        else:
            x, bias = np.negative(xb[m]), odd_bias
        for o in range(out.shape[1]):
            c = np.right_shift(np.add(np.multiply(x, I32(at[p, 0, o])), bias), sigma_shift)
            out[m, o] = _rescale(np.add(I32(acc[m, o]), c), half, shift)


@kernel
def _linear_lowrank(acc, x, at, bt, sigma_shift, half, shift, out):
    """ES epilogue for any rank: acc + sign * ((sum_r xb_m[r] A_p[:, r]) >> sigma_shift)."""
    pairs, rank, width = at.shape
    xb = np.empty((2, rank), dtype=np.int32)
    corr = np.empty(width, dtype=np.int32)
    for t in range(out.shape[0] // (2 * pairs)):
        for p in range(pairs):
            m0 = t * 2 * pairs + 2 * p
            _project(x, m0, p, bt, xb)
            for s in range(2):
                m = m0 + s
                corr[:] = 0
                for r in range(rank):
                    for o in range(width):
                        corr[o] = np.add(corr[o], np.multiply(xb[s, r], I32(at[p, r, o])))
                for o in range(width):
                    c = np.right_shift(corr[o], sigma_shift)
                    v = np.add(I32(acc[m, o]), c) if s == 0 else np.subtract(I32(acc[m, o]), c)
                    out[m, o] = _rescale(v, half, shift)


# ---------------------------------------------------------------------------------------------
# fused linear layers (the VNNI GEMM): each tile's epilogue applied in its registers


@kernel
def _fused_plain(x, packed, comp, tail, half, shift, out, act):
    """Inference: sat8(rshift_round(x @ W^T, shift)), then what ``act`` names, if not None:
    an activation (``cpu.EPILOGUES``) or a residual add (``_after``). Each tile is rescaled in
    registers right after its sums (``_tile_rescale``), panel by panel; with a fan-in tail
    the panel's sums go through a buffer first."""
    acc = np.empty((PANEL_ROWS, packed.shape[0] * BLOCK_COLS), dtype=np.int32)
    for r0 in range(0, x.shape[0], PANEL_ROWS):
        rows = min(PANEL_ROWS, x.shape[0] - r0)
        prefetch_rows(x, r0 + PANEL_ROWS, PANEL_ROWS, out)  # the next panel's
        if tail.shape[1] == 0:
            for block in range(packed.shape[0]):
                tiles_rescale(x, r0, rows, packed, comp, block, half, shift, out, act)
            continue
        panel_product(x, r0, rows, packed, comp, tail, acc)
        for j in range(rows):
            for o in range(out.shape[1]):
                out[r0 + j, o] = _after(_rescale(acc[j, o], half, shift), act, r0 + j, o)


@njit(inline="always", cache=True)
def _es_panel(x, r0, m0, rows, at, bt, bsum, xv, words, out):
    """Start the ES panel of rows r0 .. r0 + rows - 1 (members m0 ... of one copy of a token
    block, whole pairs): the next panel's rows and pairs prefetched, and xv[r, r0 + j] = the
    projections of its rows (odd rows negated), as the tiles' int16 words if ``words``, else
    as values (``project_pairs``, 16 rows at a time; bsum is ``factor_sums(bt)``).

    Panels go pair-major (``_es_panels``), so the next panel is the same members' in the next
    copy, or the next members' in the first copy."""
    members = 2 * at.shape[0]
    nxt = r0 + members if r0 + members < x.shape[0] else m0 + rows
    prefetch_rows(x, nxt, PANEL_ROWS, out)
    if nxt < members:  # new pairs
        prefetch_factor_rows(at, nxt // 2, PANEL_ROWS // 2)
        prefetch_factor_rows(bt, nxt // 2, PANEL_ROWS // 2)
    project_pairs(x, r0, m0, rows, bt, bsum, xv, words)


@njit(inline="always", cache=True)
def _es_panels(x, at):
    """The ES panels' (first row, first member, rows): up to PANEL_ROWS consecutive rows of
    one copy of a token block (whole pairs), pair-major: a chunk of pairs in every copy,
    then the next chunk. A chunk's factors, PANEL_ROWS / 2 (in + out) bytes per rank, stay
    in L1 and L2 across its copies; copy-major they were read once per copy, and ES layers
    ran 2-4% slower.

    A panel holds one copy's rows: panels that took a chunk of pairs across all copies, to
    share each pair's factors among its copies' rows, measured slower even with plain
    tiles, as a pair's copies lie N rows apart, a multiple of 4 KB at the usual sizes, so
    they fall into the same L1 sets, which with the W block's lines fill every way."""
    members = 2 * at.shape[0]
    panels = []
    for m0 in range(0, members, PANEL_ROWS):
        for r0 in range(m0, x.shape[0], members):
            panels.append((r0, m0, min(PANEL_ROWS, members - m0)))
    return panels


@kernel
def _fused_rank1(x, packed, comp, at, bt, bsum, sigma_shift, half, shift, out, act):
    """ES at rank 1, the same bits as ``_correct_rank1``, panel by panel (``_es_panels``):
    first the panel's projections (``project_pairs``, 16 rows per call), then its
    product block by block, each tile corrected and rescaled in registers (``_tile_es``,
    the two shifts merged), then what ``act`` names (``_fused_plain``). Only where
    ``merged_rescale_fits`` and the fan-in has no tail.

    A kernel of its own, not a branch of ``_fused_lowrank``: with both tile kinds inlined in
    one function the rank-1 path ran 3-5% slower."""
    total, low = np.add(sigma_shift, shift), odd_low(sigma_shift)
    xv = np.empty((1, x.shape[0]), dtype=np.int32)
    for r0, m0, rows in _es_panels(x, at):
        _es_panel(x, r0, m0, rows, at, bt, bsum, xv, True, out)
        for block in range(packed.shape[0]):
            tiles_es(x, r0, rows, packed, comp, block, at, m0 // 2, xv[0], half, sigma_shift,
                     low, total, out, act)


@kernel
def _fused_lowrank(x, packed, comp, at, bt, bsum, sigma_shift, half, shift, out, act):
    """``_fused_rank1`` at any rank: each tile sums the rank's corrections before the merged
    shift. The same bits as ``_linear_lowrank``."""
    total, low = np.add(sigma_shift, shift), odd_low(sigma_shift)
    xv = np.empty((at.shape[1], x.shape[0]), dtype=np.int32)
    for r0, m0, rows in _es_panels(x, at):
        _es_panel(x, r0, m0, rows, at, bt, bsum, xv, True, out)
        for block in range(packed.shape[0]):
            tiles_es(x, r0, rows, packed, comp, block, at, m0 // 2, xv, half, sigma_shift,
                     low, total, out, act)


@kernel
def _fused_buffered(x, packed, comp, tail, at, bt, bsum, sigma_shift, half, shift, out, act):
    """ES at any rank where the merged shift could overflow or the fan-in has a tail: each
    panel's int32 product through a buffer, then the unmerged epilogue of
    ``_linear_lowrank``."""
    rank = at.shape[1]
    odd_bias = np.subtract(np.left_shift(I32(1), sigma_shift), I32(1))
    acc = np.empty((PANEL_ROWS, packed.shape[0] * BLOCK_COLS), dtype=np.int32)
    xv = np.empty((rank, x.shape[0]), dtype=np.int32)
    for r0, m0, rows in _es_panels(x, at):
        _es_panel(x, r0, m0, rows, at, bt, bsum, xv, False, out)
        panel_product(x, r0, rows, packed, comp, tail, acc)
        for j in range(rows):
            m, p = r0 + j, (m0 + j) // 2
            bias = I32(0) if j % 2 == 0 else odd_bias
            for o in range(out.shape[1]):
                v = bias
                for r in range(rank):
                    v = np.add(v, np.multiply(xv[r, m], I32(at[p, r, o])))
                out[m, o] = _after(_rescale(np.add(acc[j, o], np.right_shift(v, sigma_shift)),
                                            half, shift), act, m, o)


# ---------------------------------------------------------------------------------------------
# EGG's recurrence: two fused layers and the gates per token, in one call


@njit(inline="always", cache=True)
def _gru_gate(fx, uf, bf, h, f, gated):
    """EGG's gate for one token: f = sat8(fx + uf + bf) and the gated state ((f + 127) h)
    >> 8 (``gru_blend`` from zero) that the candidate's recurrent product reads."""
    for m in range(h.shape[0]):
        br = _row(m, bf.shape[0])
        for j in range(h.shape[1]):
            fm = _sat8(np.add(np.add(I32(fx[m, j]), I32(uf[m, j])), I32(bf[br, j])))
            f[m, j] = fm
            gated[m, j] = np.int8(np.right_shift(np.multiply(np.add(I32(fm), _HI),
                                                             I32(h[m, j])), _S8))


@njit(inline="always", cache=True)
def _gru_step(hx, uh, bh, f, h, hs):
    """EGG's state step for one token: h = gru_blend(h, f, sat8(hx + uh + bh)), in place,
    copied to hs."""
    for m in range(h.shape[0]):
        br = _row(m, bh.shape[0])
        for j in range(h.shape[1]):
            cand = _sat8(np.add(np.add(I32(hx[m, j]), I32(uh[m, j])), I32(bh[br, j])))
            h32 = I32(h[m, j])
            gap = np.multiply(np.add(I32(f[m, j]), _HI), np.subtract(I32(cand), h32))
            h[m, j] = hs[m, j] = np.int8(np.add(h32, np.right_shift(gap, _S8)))


@njit(inline="always", cache=True)
def _clear_reset_rows(h, resets, has_resets, t):
    if has_resets:
        for m in range(h.shape[0]):
            if resets[t, m]:
                h[m, :] = 0


@kernel
def _gru_scan_plain(fx, hx, h0, resets, has_resets, wf, half_f, shift_f, wh, half_h, shift_h,
                    bf, bh, hs):
    """EGG's recurrence over a token block (``intes.models.egg.gru_scan``) in one call, its
    recurrent products by ``_fused_plain`` (wf, wh: its weight arguments): the Python loop's
    eight calls per token, a few microseconds each, become none. (Chunks of rows, each
    through all T tokens with its state in L2, measured no faster on a Zen 4.)"""
    h, uf, uh = h0.copy(), np.empty_like(h0), np.empty_like(h0)
    f, gated = np.empty_like(h0), np.empty_like(h0)
    for t in range(fx.shape[0]):
        _clear_reset_rows(h, resets, has_resets, t)
        _fused_plain(h, *wf, half_f, shift_f, uf, None)
        _gru_gate(fx[t], uf, bf, h, f, gated)
        _fused_plain(gated, *wh, half_h, shift_h, uh, None)
        _gru_step(hx[t], uh, bh, f, h, hs[t])


@kernel
def _gru_scan_es(fx, hx, h0, resets, has_resets, wf, half_f, shift_f, wh, half_h, shift_h,
                 bf, bh, hs, lowrank):
    """``_gru_scan_plain`` for an ES step: the recurrent products by ``_fused_rank1``, or
    by ``_fused_lowrank`` if ``lowrank`` (wf, wh: an ES plan's arguments for either)."""
    h, uf, uh = h0.copy(), np.empty_like(h0), np.empty_like(h0)
    f, gated = np.empty_like(h0), np.empty_like(h0)
    for t in range(fx.shape[0]):
        _clear_reset_rows(h, resets, has_resets, t)
        if lowrank:
            _fused_lowrank(h, *wf, half_f, shift_f, uf, None)
        else:
            _fused_rank1(h, *wf, half_f, shift_f, uf, None)
        _gru_gate(fx[t], uf, bf, h, f, gated)
        if lowrank:
            _fused_lowrank(gated, *wh, half_h, shift_h, uh, None)
        else:
            _fused_rank1(gated, *wh, half_h, shift_h, uh, None)
        _gru_step(hx[t], uh, bh, f, h, hs[t])


# ---------------------------------------------------------------------------------------------
# embedding and update (rows as in the linear layers)


@kernel
def _embed_plain(table, tokens, out):
    """Inference embedding: the rows of the table, saturated to [-127, 127]."""
    for m in range(out.shape[0]):
        tok = tokens[m]
        for j in range(out.shape[1]):
            out[m, j] = _sat8(I32(table[tok, j]))


@kernel
def _embed_rank1(table, tokens, at, bt, shift, out):
    """_embed_lowrank at rank 1, one pass per row: table[tok] +- ((A_p[tok] B_p) >> shift),
    in int16 lanes (|A B| <= 128 * 128).

    Each row's A_p[tok] is one byte of a different cache line of A (P x vocab), so it is
    gathered for all rows first, in a loop of independent loads whose misses the CPU
    overlaps; read inside the row loop, each miss stalled a row's whole pass (2x slower
    measured, where the caches hold the forward's dirty activations)."""
    members = 2 * at.shape[0]
    a_rows = np.empty(out.shape[0], dtype=np.int16)
    for m in range(out.shape[0]):
        a_rows[m] = at[(m % members) // 2, 0, tokens[m]]
    shift16 = I16(min(shift, 15))  # |a b| < 2^15: any shift past 15 floors it to 0 or -1 too
    for m in range(out.shape[0]):
        p, tok, ar = (m % members) // 2, tokens[m], a_rows[m]
        for j in range(out.shape[1]):
            c = np.right_shift(np.multiply(ar, I16(bt[p, 0, j])), shift16)
            row = I16(table[tok, j])
            out[m, j] = _sat8_16(np.add(row, c) if m % 2 == 0 else np.subtract(row, c))


@kernel
def _embed_lowrank(table, tokens, at, bt, shift, out):
    """table[tok] + (A_p[tok] B_p^T >> shift), negated for odd rows, saturated."""
    pairs, rank, dim = bt.shape
    corr = np.empty(dim, dtype=np.int32)
    for m in range(out.shape[0]):
        p, tok = (m % (2 * pairs)) // 2, tokens[m]
        corr[:] = 0
        for r in range(rank):
            ar = I32(at[p, r, tok])
            for j in range(dim):
                corr[j] = np.add(corr[j], np.multiply(ar, I32(bt[p, r, j])))
        for j in range(dim):
            c = np.right_shift(corr[j], shift)
            row = I32(table[tok, j])
            out[m, j] = _sat8(np.add(row, c) if m % 2 == 0 else np.subtract(row, c))


@njit(inline="always", cache=True)
def _stepped(w, z, threshold):
    """reference.step_by_sign for one weight: w +- 1 where |z| > threshold, saturated."""
    move = 0
    if abs(z) > threshold:
        move = 1 if z > 0 else (-1 if z < 0 else 0)
    return _sat8(np.int32(w) + move)


@kernel
def _step_by_sign(w, z, threshold, out):
    """reference.step_by_sign on flat arrays."""
    for i in range(w.shape[0]):
        out[i] = _stepped(w[i], z[i], threshold)


@kernel
def _fused_update(x, packed, comp, levels, w, threshold, out):
    """``_step_by_sign`` of Z = x @ B (the VNNI engine's update operands, pairs grouped by
    |f|: ``_tile_levels``), panel by panel: Z is never stored, each panel's moves are made
    while it is in cache."""
    acc = np.empty((PANEL_ROWS, packed.shape[0] * BLOCK_COLS), dtype=np.int32)
    for o0 in range(0, w.shape[0], PANEL_ROWS):
        count = min(PANEL_ROWS, w.shape[0] - o0)
        level_panel(x, o0, count, packed, comp, levels, acc)
        for j in range(count):
            for i in range(w.shape[1]):
                out[o0 + j, i] = _stepped(w[o0 + j, i], acc[j, i], threshold)


def step_by_sign(w: np.ndarray, z: np.ndarray, threshold: int) -> np.ndarray:
    """``reference.step_by_sign`` by the flat numba kernel ``_step_by_sign``."""
    out = np.empty(w.size, dtype=np.int8)
    _step_by_sign(np.ascontiguousarray(w).ravel(), np.ascontiguousarray(z).ravel(),
                  threshold, out)
    return out.reshape(w.shape)
