"""The base product X @ W^T on AVX2 CPUs without VNNI: int16 pairs by vpmaddwd.

Without a dot-product instruction, int8 GEMMs are slow: oneDNN's (``torch._int_mm``) ran at
4% of float32 BLAS on an AVX2-only Zen 3, and vpmaddubsw (uint8 x int8) saturates its int16
pair sums unless the operands are shifted or split. vpmaddwd multiplies int16 pairs and adds
each pair into an int32 lane, exactly for any int16 values: 16 products per instruction
against the float32 FMA's 8, and CPUs with two vector multipliers issue two per cycle. The
int8 values widen to int16 once per panel of rows, in L1.

The kernel is the register tile: ``TILE_ROWS`` x 16 int32 accumulators (6 x 2 ymm
registers); each step broadcasts one int32 (a row's x at k = 2p, 2p + 1) against 2 registers
of W. Every partial sum is bounded by K 127 127 and stays inside int32 for any fan-in below
133,000.

W is packed once per step (``pack``): per 16-column block and per pair of k, one 64-byte
line holding both k's values of each of the 16 columns, widened to int16 (vpmaddwd's
layout). Columns past the width and an odd fan-in's last k are zero.

numba's on-disk cache keys a kernel on its own source file only: after editing the intrinsic
here, delete the ``*.nbi``/``*.nbc`` files under ``intes/kernels/__pycache__``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from llvmlite import binding as llvm
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

HAVE_AVX2 = bool(llvm.get_host_cpu_features().get("avx2", False))
TILE_ROWS = 6
LANES = 8  # int32 lanes of one 256-bit register
_VECS = 2
BLOCK_COLS = _VECS * LANES
PANEL_ROWS = 8 * TILE_ROWS  # rows widened together; a block's lines stay in L1 across them

_I1, _I8, _I32, _I64 = ir.IntType(1), ir.IntType(8), ir.IntType(32), ir.IntType(64)
_V32 = ir.VectorType(_I32, LANES)
_V16 = ir.VectorType(ir.IntType(16), 2 * LANES)


@dataclass(frozen=True)
class Avx2Weight:
    """W (out, in) packed for the tile: ``packed`` (blocks, ceil(in / 2), 32) int16."""

    packed: np.ndarray
    out_dim: int
    fan_in: int

    @property
    def shape(self) -> tuple[int, int]:
        return self.out_dim, self.fan_in


@njit(nogil=True, cache=True)
def _pack_pairs(w, packed):
    """packed[block, p, 2 c + b] = W[16 block + c, 2 p + b], zero past W's edges. Any
    strides."""
    out_dim, fan_in = w.shape
    packed[:] = 0
    for block in range(packed.shape[0]):
        for c in range(min(BLOCK_COLS, out_dim - block * BLOCK_COLS)):
            o = block * BLOCK_COLS + c
            for k in range(fan_in):
                packed[block, k // 2, 2 * c + k % 2] = w[o, k]


def pack(w: np.ndarray) -> Avx2Weight:
    """The packed form of an int8 (or int16) matrix W (out, in), any strides."""
    out_dim, fan_in = w.shape
    packed = np.empty((-(-out_dim // BLOCK_COLS), -(-fan_in // 2), 2 * BLOCK_COLS),
                      dtype=np.int16)
    _pack_pairs(w, packed)
    return Avx2Weight(packed, out_dim, fan_in)


def _is_array(t, ndim: int, dtype) -> bool:
    return (isinstance(t, types.Array) and t.ndim == ndim and t.layout == "C"
            and t.dtype == dtype)


@intrinsic
def _tile(typingctx, x, rows, packed, block, out, out_row):
    """out[out_row + j, 16 block ...] = x[rows[j]] @ W^T for the block's columns inside out's
    width, for the R = len(rows) rows of the tuple; x (M, 2 P) int16, P = packed.shape[1]."""
    if not (_is_array(x, 2, types.int16) and _is_array(packed, 3, types.int16)
            and _is_array(out, 2, types.int32) and isinstance(rows, types.UniTuple)
            and isinstance(rows.dtype, types.Integer) and 1 <= len(rows) <= TILE_ROWS):
        return None
    sig = types.void(x, rows, packed, block, out, out_row)
    count = len(rows)

    def codegen(context, b, signature, args):
        vx, vrows, vpacked, vblock, vout, vout_row = args
        ax, ap, ao = (context.make_array(signature.args[i])(context, b, args[i])
                      for i in (0, 2, 4))

        def i64(v):
            return b.sext(v, _I64) if v.type.width < 64 else v

        def byte_pointer(array, offset, typ):
            return b.bitcast(b.gep(b.bitcast(array.data, _I8.as_pointer()), [offset]),
                             typ.as_pointer())

        def splat(v):
            one = b.insert_element(ir.Constant(_V32, ir.Undefined), v, _I32(0))
            return b.shuffle_vector(one, ir.Constant(_V32, ir.Undefined),
                                    ir.Constant(_V32, [0] * LANES))

        block = i64(vblock)
        x_stride = cgutils.unpack_tuple(b, ax.strides, 2)[0]
        pairs = cgutils.unpack_tuple(b, ap.shape, 3)[1]
        block_bytes = cgutils.unpack_tuple(b, ap.strides, 3)[0]
        madd = cgutils.get_or_insert_function(
            b.module, ir.FunctionType(_V32, [_V16, _V16]), "llvm.x86.avx2.pmadd.wd")
        x_rows = [byte_pointer(ax, b.mul(i64(b.extract_value(vrows, j)), x_stride), _I32)
                  for j in range(count)]
        lines = byte_pointer(ap, b.mul(block, block_bytes), _V16)
        zero = ir.Constant(_V32, [ir.Constant(_I32, 0)] * LANES)

        entry = b.basic_block
        loop = b.append_basic_block("tile.loop")
        done = b.append_basic_block("tile.done")
        b.cbranch(b.icmp_signed(">", pairs, _I64(0)), loop, done)
        b.position_at_end(loop)
        p = b.phi(_I64)
        accs = [[b.phi(_V32) for _ in range(_VECS)] for _ in range(count)]
        w = [b.load(b.gep(lines, [b.add(b.mul(p, _I64(_VECS)), _I64(c))]), align=2)
             for c in range(_VECS)]
        new = []
        for j in range(count):
            xs = b.bitcast(splat(b.load(b.gep(x_rows[j], [p]), align=2)), _V16)
            new.append([b.add(accs[j][c], b.call(madd, [xs, w[c]])) for c in range(_VECS)])
        nxt = b.add(p, _I64(1))
        p.add_incoming(_I64(0), entry)
        p.add_incoming(nxt, loop)
        for j in range(count):
            for c in range(_VECS):
                accs[j][c].add_incoming(zero, entry)
                accs[j][c].add_incoming(new[j][c], loop)
        b.cbranch(b.icmp_signed("<", nxt, pairs), loop, done)

        b.position_at_end(done)
        sums = []
        for j in range(count):
            sums.append([])
            for c in range(_VECS):
                phi = b.phi(_V32)
                phi.add_incoming(zero, entry)
                phi.add_incoming(new[j][c], loop)
                sums[j].append(phi)
        out_stride = cgutils.unpack_tuple(b, ao.strides, 2)[0]
        width = cgutils.unpack_tuple(b, ao.shape, 2)[1]
        first = b.mul(block, _I64(BLOCK_COLS))
        store = cgutils.get_or_insert_function(
            b.module, ir.FunctionType(ir.VoidType(), [_V32, _V32.as_pointer(), _I32,
                                                      ir.VectorType(_I1, LANES)]),
            "llvm.masked.store.v8i32.p0")
        lanes = ir.Constant(_V32, [ir.Constant(_I32, i) for i in range(LANES)])

        def emit(masked: bool) -> None:
            for j in range(count):
                row = b.add(i64(vout_row), _I64(j))
                for c in range(_VECS):
                    col = b.add(first, _I64(LANES * c))
                    pointer = byte_pointer(ao, b.add(b.mul(row, out_stride),
                                                     b.mul(col, _I64(4))), _V32)
                    if masked:
                        mask = b.icmp_signed("<", lanes, splat(b.trunc(b.sub(width, col), _I32)))
                        b.call(store, [sums[j][c], pointer, _I32(4), mask])
                    else:
                        b.store(sums[j][c], pointer, align=4)

        inside = b.icmp_signed("<=", b.add(first, _I64(BLOCK_COLS)), width)
        with b.if_else(inside) as (whole, part):
            with whole:
                emit(False)
            with part:
                emit(True)
        return context.get_dummy_value()

    return sig, codegen


@njit(inline="always", cache=True)
def _tiles(x, r0, rows, packed, block, out, o0):
    """out[o0 + j] = x[r0 + j] @ W^T in the block's columns for j < rows: whole tiles, then
    one tile of the remaining 1-5 rows."""
    j = 0
    while j + TILE_ROWS <= rows:
        r = r0 + j
        _tile(x, (r, r + 1, r + 2, r + 3, r + 4, r + 5), packed, block, out, o0 + j)
        j += TILE_ROWS
    r, left = r0 + j, rows - j
    if left == 1:
        _tile(x, (r,), packed, block, out, o0 + j)
    elif left == 2:
        _tile(x, (r, r + 1), packed, block, out, o0 + j)
    elif left == 3:
        _tile(x, (r, r + 1, r + 2), packed, block, out, o0 + j)
    elif left == 4:
        _tile(x, (r, r + 1, r + 2, r + 3), packed, block, out, o0 + j)
    elif left == 5:
        _tile(x, (r, r + 1, r + 2, r + 3, r + 4), packed, block, out, o0 + j)


@njit(nogil=True, cache=True)
def _product(x, packed, panel, out):
    """out = x @ W^T: each panel of rows widened to int16 (``panel``, (PANEL_ROWS, 2 P),
    its last column zero for an odd fan-in), then block by block."""
    fan_in = x.shape[1]
    panel[:, fan_in:] = 0
    for r0 in range(0, x.shape[0], PANEL_ROWS):
        rows = min(PANEL_ROWS, x.shape[0] - r0)
        for j in range(rows):
            for k in range(fan_in):
                panel[j, k] = x[r0 + j, k]
        for block in range(packed.shape[0]):
            _tiles(panel, 0, rows, packed, block, out, r0)


def product_into(x: np.ndarray, w: Avx2Weight, panel: np.ndarray, out: np.ndarray) -> None:
    """out (rows, out) = the exact int32 x @ W^T of int8 x (rows, in), C-contiguous;
    ``panel`` is int16 scratch of shape (PANEL_ROWS, 2 packed.shape[1])."""
    if x.shape[1] != w.fan_in:
        raise ValueError(f"x has {x.shape[1]} columns, W {w.fan_in}")
    _product(x, w.packed, panel, out)


def avx2_unavailable() -> str | None:
    """None where the AVX2 GEMM runs, else one line saying why not."""
    return None if HAVE_AVX2 else "this CPU has no AVX2 (vpmaddwd on 256-bit registers)"
