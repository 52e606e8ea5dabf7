"""The base product X @ W^T as an AVX-512 VNNI GEMM of our own, so each layer's epilogue fuses.

A GEMM library returns the int32 product and the epilogue (ES correction, rescale to int8)
must read it back: at a token block's 2048 rows that is 2-8 MB per layer, streamed out of L2
and in again, and the projection x . b_p streams x once more. Here each register tile's
accumulators are corrected, rescaled and stored as int8 right where they are made
(``_tile_rescale``, ``_tile_es``), panel by panel, and no int32 product
reaches memory; an activation that follows the layer (relu, or relu^2 by its table) or a
residual add is applied there too (``store_tile``). ``_tile`` stores the int32 sums
instead, for a fan-in tail and the bare product, and ``_tile_levels`` makes the update's Z
with the pairs grouped by |f|.

The kernel is the classic register tile: ``TILE_ROWS`` x 64 int32 accumulators (6 x 4
zmm registers), each step one 4-byte broadcast of every row's x against 4 registers of W,
by vpdpbusd (64 uint8 x int8 products summed into 16 int32 lanes per instruction). x is made
unsigned by xor 0x80 (x + 128); the 128 sum_k w_ok that adds is taken off by starting each
accumulator at -128 sum_k w_ok (``VnniWeight.comp``), so the tile holds the exact int32
product. Every partial sum is bounded by K (127 + 128) 127 and stays inside int32 for any
fan-in below 66,000.

W is packed once per step (``pack``): per 64-column block and per 4 consecutive k, one
64-byte line holding those 4 bytes of each of the 64 columns (vpdpbusd's layout). Columns
past the width are zero, and a fan-in that is not a multiple of 4 leaves its last 1-3
columns to a scalar pass (``VnniWeight.tail``). A last block of at most 32 columns (width
96: one block in two) runs a tile of 2 registers per row instead of 4, half the work; the
tile helpers pick it per block, and every other block runs the 4-register tile.

The bare product runs at about the rate of oneDNN's int8 GEMM (``intes bench`` reports both,
``vnni_gemm_gops`` and ``int8_gemm_gops``); what the fusion saves is the memory passes.

numba's on-disk cache keys a kernel on its own source file only: after editing an
intrinsic here, delete the ``*.nbi``/``*.nbc`` files under ``intes/kernels/__pycache__``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

from intes.intmath import FRAC_BITS
from intes.kernels.vnni import HAVE_VNNI
from intes.noise import NOISE_MAX

TILE_ROWS = 6
BLOCK_COLS = 64  # columns per packed block: 4 registers of 16 int32 lanes
PANEL_ROWS = 8 * TILE_ROWS  # rows made together, a block's W lines in L1 (even: whole pairs)
_VECS = BLOCK_COLS // 16

_I32, _I64 = ir.IntType(32), ir.IntType(64)
_V32 = ir.VectorType(_I32, 16)
_V8x64 = ir.VectorType(ir.IntType(8), 64)
_BIAS = ir.Constant(_I32, 0x80808080 - (1 << 32))  # xor 0x80 in each byte: x + 128 as uint8


def _indices(values) -> ir.Constant:
    """A shufflevector mask."""
    values = list(values)
    return ir.Constant(ir.VectorType(_I32, len(values)), [ir.Constant(_I32, v) for v in values])


@dataclass(frozen=True)
class VnniWeight:
    """W (out, in) packed for the tile (see the module docstring), made once per step.

    ``packed`` (blocks, in // 4, 256) int8; ``comp`` (blocks, 64) int32, -128 sum_k W[o, k]
    over the packed k; ``tail`` (out, in % 4) int8, the columns the packed lines leave out.
    """

    w: np.ndarray
    packed: np.ndarray
    comp: np.ndarray
    tail: np.ndarray

    @property
    def shape(self) -> tuple[int, int]:
        return self.w.shape


@njit(nogil=True, cache=True)
def _pack_words(w, words, packed, comp):
    """packed[block, g, c] = words[64 block + c, g] (W's 4 consecutive k of a column as one
    int32 word, zero past the width) and comp the blocks' -128 column sums over those k: a
    transpose of words, one per 4 weights, where byte stores ran 4x as many."""
    out_dim = words.shape[0]
    packed[:] = 0
    comp[:] = 0
    for block in range(packed.shape[0]):
        for c in range(min(BLOCK_COLS, out_dim - block * BLOCK_COLS)):
            o = block * BLOCK_COLS + c
            for g in range(words.shape[1]):
                packed[block, g, c] = words[o, g]
            total = np.int32(0)
            for k in range(4 * words.shape[1]):
                total += np.int32(w[o, k])
            comp[block, c] = np.int32(-128) * total


def pack(w: np.ndarray) -> VnniWeight:
    """The packed form of an int8 matrix W (out, in) (see the module docstring)."""
    out_dim, fan_in = w.shape
    blocks, groups = -(-out_dim // BLOCK_COLS), fan_in // 4
    packed = np.empty((blocks, groups, BLOCK_COLS), dtype=np.int32)
    comp = np.empty((blocks, BLOCK_COLS), dtype=np.int32)
    words = np.ascontiguousarray(w[:, :groups * 4]).view(np.int32)
    _pack_words(w, words, packed, comp)
    return VnniWeight(w, packed.view(np.int8).reshape(blocks, groups, 4 * BLOCK_COLS), comp,
                      np.ascontiguousarray(w[:, groups * 4:]))


def _is_array(t, ndims: tuple[int, ...], dtype) -> bool:
    return (isinstance(t, types.Array) and t.ndim in ndims and t.layout == "C"
            and t.dtype == dtype)


def _tile_typing_ok(x, rows, packed, comp, x_ndim: int = 2) -> bool:
    """x (M, K), or grouped (G, M, 4) with ``x_ndim`` 3 (``_tile_levels``)."""
    return (_is_array(x, (x_ndim,), types.int8) and _is_array(packed, (3,), types.int8)
            and _is_array(comp, (2,), types.int32) and isinstance(rows, types.UniTuple)
            and isinstance(rows.dtype, types.Integer) and 1 <= len(rows) <= TILE_ROWS)


def _after_ok(act) -> bool:
    """What follows an epilogue's rescale (``store_tile``): None, a 1-D uint8 activation
    table, or a 2-D int8 residual."""
    return (isinstance(act, types.NoneType) or _is_array(act, (1,), types.uint8)
            or _is_array(act, (2,), types.int8))


class _Emit:
    """IR helpers shared by the tile intrinsics."""

    def __init__(self, context, builder, vecs: int = _VECS) -> None:
        self.context, self.builder = context, builder
        self.vecs = vecs  # the tile's vectors per row: 4 (64 columns), or 2 for a narrow block

    def i64(self, v):
        return self.builder.sext(v, _I64) if v.type.width < 64 else v

    def i32(self, v):
        return self.builder.trunc(v, _I32) if v.type.width > 32 else v

    def splat(self, v):
        b = self.builder
        one = b.insert_element(ir.Constant(_V32, ir.Undefined), self.i32(v), _I32(0))
        return b.shuffle_vector(one, ir.Constant(_V32, ir.Undefined),
                                ir.Constant(ir.VectorType(_I32, 16), [0] * 16))

    def array(self, typ, value):
        return self.context.make_array(typ)(self.context, self.builder, value)

    def after(self, typ, value):
        """What follows the rescale (``_after_ok``) as store_tile takes it: None,
        ("table", a pointer to its two 64-byte halves, its length) or ("residual", the
        array)."""
        if isinstance(typ, types.NoneType):
            return None
        array = self.array(typ, value)
        if typ.ndim == 2:
            return "residual", array
        return ("table", self.builder.bitcast(array.data, _V8x64.as_pointer()),
                cgutils.unpack_tuple(self.builder, array.shape, 1)[0])

    def row_pointer(self, array, index, element_bytes: int, vector):
        """Pointer to array[index, 0] (a 2-D C array) as a ``vector`` pointer."""
        stride = cgutils.unpack_tuple(self.builder, array.strides, 2)[0]
        offset = self.builder.sdiv(self.builder.mul(self.i64(index), stride), _I64(element_bytes))
        return self.builder.bitcast(self.builder.gep(array.data, [offset]), vector.as_pointer())

    def function(self, name: str, ret, params):
        return cgutils.get_or_insert_function(self.builder.module, ir.FunctionType(ret, params),
                                              name)

    def sums(self, xt, count, vx, vrows, ap, ac, block, offset=None):
        """The tile's int32 sums, [row][vector], for the ``count`` rows of the tuple vrows,
        plus ``offset`` (a vector, folded into the accumulators' start) if given."""
        b = self.builder
        ax = self.array(xt, vx)
        x_stride = cgutils.unpack_tuple(b, ax.strides, 2)[0]  # a row's groups: consecutive words
        groups = cgutils.unpack_tuple(b, ap.shape, 3)[1]
        block_bytes = cgutils.unpack_tuple(b, ap.strides, 3)[0]
        x_rows = [b.bitcast(b.gep(ax.data, [b.mul(self.i64(b.extract_value(vrows, j)),
                                                  x_stride)]), _I32.as_pointer())
                  for j in range(count)]
        lines = b.bitcast(b.gep(ap.data, [b.mul(block, block_bytes)]), _V32.as_pointer())
        comp_row = b.bitcast(b.gep(ac.data, [b.mul(block, _I64(BLOCK_COLS))]),
                             _V32.as_pointer())
        start = [b.load(b.gep(comp_row, [_I64(c)]), align=4) for c in range(self.vecs)]
        if offset is not None:
            start = [b.add(v, offset) for v in start]
        return self.k_loop(x_rows, _I64(1), lines, groups, [start] * count)

    def k_loop(self, x_rows, x_step, lines, groups, start):
        """The register tile's loop: start[j][c] + sum over g < groups of (x_rows[j][g x_step]
        as x + 128) . lines[4 g + c] by vpdpbusd, [row][vector], in the block where the loop
        ends (``groups`` may be 0)."""
        b = self.builder
        count = len(x_rows)
        dpbusd = self.function("llvm.x86.avx512.vpdpbusd.512", _V32, [_V32, _V32, _V32])
        entry = b.basic_block
        loop = b.append_basic_block("tile.loop")
        done = b.append_basic_block("tile.done")
        b.cbranch(b.icmp_signed(">", groups, _I64(0)), loop, done)

        b.position_at_end(loop)
        g = b.phi(_I64)
        accs = [[b.phi(_V32) for _ in range(self.vecs)] for _ in range(count)]
        w = [b.load(b.gep(lines, [b.add(b.mul(g, _I64(_VECS)), _I64(c))]), align=1)
             for c in range(self.vecs)]
        new = []
        for j in range(count):
            word = b.xor(b.load(b.gep(x_rows[j], [b.mul(g, x_step)]), align=1), _BIAS)
            xs = self.splat(word)
            new.append([b.call(dpbusd, [accs[j][c], xs, w[c]]) for c in range(self.vecs)])
        nxt = b.add(g, _I64(1))
        g.add_incoming(_I64(0), entry)
        g.add_incoming(nxt, loop)
        for j in range(count):
            for c in range(self.vecs):
                accs[j][c].add_incoming(start[j][c], entry)
                accs[j][c].add_incoming(new[j][c], loop)
        b.cbranch(b.icmp_signed("<", nxt, groups), loop, done)

        b.position_at_end(done)
        results = [[b.phi(_V32) for _ in range(self.vecs)] for _ in range(count)]
        for j in range(count):
            for c in range(self.vecs):
                results[j][c].add_incoming(start[j][c], entry)
                results[j][c].add_incoming(new[j][c], loop)
        return results

    def factor_words(self, at, pair, r, block, c, masked, width):
        """The int16 pairs (a, 256 a) of a = at[pair, r, 64 block + 16 c ...] (int8, C array),
        one int32 lane each: a sign-extended to bytes (a, s, s, s), then one in-lane byte
        shuffle (vpshufb) to (a, s, 0, a). Their vpdpwssd against a row's xv word is a xv.
        ``masked`` loads only the lanes inside ``width`` (a last, partial block). Words made
        ahead once per chunk of pairs and read from memory (4x the bytes) measured no faster
        on a Zen 4: the tile's two instructions cost less than the wider loads."""
        b = self.builder
        strides = cgutils.unpack_tuple(b, at.strides, 3)
        col = b.add(b.mul(block, _I64(BLOCK_COLS)), _I64(16 * c))
        offset = b.add(b.add(b.mul(self.i64(pair), strides[0]), b.mul(self.i64(r), strides[1])),
                       col)
        v8 = ir.VectorType(ir.IntType(8), 16)
        pointer = b.bitcast(b.gep(at.data, [offset]), v8.as_pointer())
        if masked:
            load = self.function("llvm.masked.load.v16i8.p0", v8,
                                 [v8.as_pointer(), _I32, ir.VectorType(ir.IntType(1), 16), v8])
            lanes = ir.Constant(_V32, [ir.Constant(_I32, i) for i in range(16)])
            mask = b.icmp_signed("<", lanes, self.splat(b.sub(width, col)))
            a8 = b.call(load, [pointer, _I32(1), mask, ir.Constant(v8, [0] * 16)])
        else:
            a8 = b.load(pointer, align=1)
        bytes64 = ir.VectorType(ir.IntType(8), 64)
        a = b.bitcast(b.sext(a8, _V32), bytes64)
        pick = ir.Constant(ir.VectorType(_I32, 64), [
            v for lane in range(16) for v in (4 * lane, 4 * lane + 1, 64, 4 * lane)])
        return b.bitcast(b.shuffle_vector(a, ir.Constant(bytes64, [0] * 64), pick), _V32)

    def store_tile(self, count, row_of, out, block, value_of, act=None):
        """out[row_of(j), 64 block + 16 c ...] = act(value_of(j, c, masked)) for the tile's
        rows and vectors, value_of emitting the int32 vector (rows in order, vectors in order
        within a row). One branch per tile on whether the block lies inside out's width:
        plain stores, or (a last, partial block, ``masked``) stores masked to the width.

        Without ``act`` (None) act is sat8: vpmaxsd against -127, then vpmovsdb, whose
        signed saturation gives the 127 side. With a table (``after``) the clamp is at
        0, relu(sat8); then, for a table of 128 entries (length 0: none, relu alone),
        table[value] is read for each row's clamped bytes, values in [0, 127], by vpermi2b:
        an activation such as relu^2 applied in registers instead of in a pass of its own.
        The length is tested once per tile. With a residual r (out's shape) it is
        sat8(r + sat8(value)), the residual add of the layer's output: the value clamped to
        [-127, 127], r's bytes loaded and sign-extended, added, then sat8."""
        b = self.builder
        width = cgutils.unpack_tuple(b, out.shape, 2)[1]
        first = b.mul(block, _I64(BLOCK_COLS))
        v8 = ir.VectorType(ir.IntType(8), 16)
        table = act is not None and act[0] == "table"
        lo = ir.Constant(_V32, [ir.Constant(_I32, 0 if table else -127)] * 16)
        hi = ir.Constant(_V32, [ir.Constant(_I32, 127)] * 16)
        load = self.function("llvm.masked.load.v16i8.p0", v8,
                             [v8.as_pointer(), _I32, ir.VectorType(ir.IntType(1), 16), v8])
        pack = self.function("llvm.x86.avx512.mask.pmovs.db.512", v8,
                             [_V32, v8, ir.IntType(16)])
        store = self.function("llvm.masked.store.v16i8.p0", ir.VoidType(),
                              [v8, v8.as_pointer(), _I32, ir.VectorType(ir.IntType(1), 16)])
        lanes = ir.Constant(_V32, [ir.Constant(_I32, i) for i in range(16)])

        def look(value):
            """table[value] for 16 or 64 bytes, by one vpermi2b."""
            halves = [b.load(b.gep(act[1], [_I64(h)]), align=1) for h in range(2)]
            permute = self.function("llvm.x86.avx512.vpermi2var.qi.512", _V8x64,
                                    [_V8x64, _V8x64, _V8x64])
            n = value.type.count
            if n < 64:
                value = b.shuffle_vector(value, ir.Constant(value.type, ir.Undefined),
                                         _indices([i % (2 * n) for i in range(64)]))
            picked = b.call(permute, [halves[0], value, halves[1]])
            if n < 64:
                picked = b.shuffle_vector(picked, ir.Constant(_V8x64, ir.Undefined),
                                          _indices(range(n)))
            return picked

        def residual(j, c, masked, value):
            """sat8(value) + the residual's 16 bytes at row j, vector c, in int32."""
            value = b.select(b.icmp_signed("<", value, hi), value, hi)
            value = b.select(b.icmp_signed("<", value, lo), lo, value)
            col = b.add(first, _I64(16 * c))
            base = self.row_pointer(act[1], row_of(j), 1, ir.IntType(8))
            pointer = b.bitcast(b.gep(base, [col]), v8.as_pointer())
            if masked:
                mask = b.icmp_signed("<", lanes, self.splat(b.sub(width, col)))
                r8 = b.call(load, [pointer, _I32(1), mask, ir.Constant(v8, [0] * 16)])
            else:
                r8 = b.load(pointer, align=1)
            return b.add(value, b.sext(r8, _V32))

        def emit(masked: bool, lookup: bool) -> None:
            whole_rows = lookup and not masked and self.vecs == _VECS
            for j in range(count):
                base = self.row_pointer(out, row_of(j), 1, ir.IntType(8))
                row = []
                for c in range(self.vecs):
                    value = value_of(j, c, masked)
                    if act is not None and act[0] == "residual":
                        value = residual(j, c, masked, value)
                    value = b.select(b.icmp_signed("<", value, lo), lo, value)
                    value = b.call(pack, [value, ir.Constant(v8, ir.Undefined),
                                          ir.Constant(ir.IntType(16), -1)])
                    if whole_rows:  # stored below, the row's 64 bytes at once
                        row.append(value)
                        continue
                    if lookup:
                        value = look(value)
                    col = b.add(first, _I64(16 * c))
                    pointer = b.bitcast(b.gep(base, [col]), v8.as_pointer())
                    if masked:
                        mask = b.icmp_signed("<", lanes, self.splat(b.sub(width, col)))
                        b.call(store, [value, pointer, _I32(1), mask])
                    else:
                        b.store(value, pointer, align=1)
                if whole_rows:  # one lookup and one store for the row's 64 bytes
                    low, high = (b.shuffle_vector(row[i], row[i + 1], _indices(range(32)))
                                 for i in (0, 2))
                    value = look(b.shuffle_vector(low, high, _indices(range(64))))
                    pointer = b.bitcast(b.gep(base, [first]), _V8x64.as_pointer())
                    b.store(value, pointer, align=1)

        def emit_both(masked: bool) -> None:
            if not table:
                emit(masked, False)
                return
            with b.if_else(b.icmp_signed(">", act[2], _I64(0))) as (lookup, clamp):
                with lookup:
                    emit(masked, True)
                with clamp:
                    emit(masked, False)

        inside = b.icmp_signed("<=", b.add(first, _I64(16 * self.vecs)), width)
        with b.if_else(inside) as (whole, part):
            with whole:
                emit_both(False)
            with part:
                emit_both(True)


@intrinsic
def _tile(typingctx, x, rows, packed, comp, block, acc, acc_row):
    """acc[acc_row + j, 64 block : 64 block + 64] = x[rows[j], :4G] @ W^T for the block's 64
    columns (G = packed.shape[1] groups of 4), for the R = len(rows) rows of the tuple."""
    if not (_tile_typing_ok(x, rows, packed, comp) and _is_array(acc, (2,), types.int32)):
        return None
    sig = types.void(x, rows, packed, comp, block, acc, acc_row)

    def codegen(context, builder, signature, args):
        vx, vrows, vpacked, vcomp, vblock, vacc, vacc_row = args
        e = _Emit(context, builder)
        ap, ac, aa = (e.array(signature.args[i], args[i]) for i in (2, 3, 5))
        block = e.i64(vblock)
        sums = e.sums(signature.args[0], len(signature.args[1]), vx, vrows, ap, ac, block)
        col = builder.mul(block, _I64(_VECS))
        for j, row_sums in enumerate(sums):
            out = e.row_pointer(aa, builder.add(e.i64(vacc_row), _I64(j)), 4, _V32)
            for c, value in enumerate(row_sums):
                builder.store(value, builder.gep(out, [builder.add(col, _I64(c))]), align=4)
        return context.get_dummy_value()

    return sig, codegen


def _vector_count(vecs) -> int | None:
    """A tile's vectors per row from its literal ``vecs`` argument: 4 (the block's 64
    columns), or 2 (a last block of at most 32 columns, half the K loop's work)."""
    if isinstance(vecs, types.IntegerLiteral) and vecs.literal_value in (_VECS, _VECS // 2):
        return vecs.literal_value
    return None


@intrinsic
def _tile_rescale(typingctx, x, rows, packed, comp, block, half, shift, out, act, vecs):
    """out[rows[j], 64 block ...] = act((x @ W^T + half) >> shift) for the block's first
    16 ``vecs`` columns (those inside out's width): the inference epilogue applied to the
    tile's registers, ``half`` folded into the accumulators' start; act is sat8, then
    what an ``act`` argument names (an activation or a residual, ``store_tile``)."""
    count_vecs = _vector_count(vecs)
    if not (count_vecs and _tile_typing_ok(x, rows, packed, comp)
            and _is_array(out, (2,), types.int8) and _after_ok(act)):
        return None
    sig = types.void(x, rows, packed, comp, block, half, shift, out, act, vecs)

    def codegen(context, builder, signature, args):
        vx, vrows, vpacked, vcomp, vblock, vhalf, vshift, vout, vact, _ = args
        e = _Emit(context, builder, count_vecs)
        ap, ac, ao = (e.array(signature.args[i], args[i]) for i in (2, 3, 7))
        block, count = e.i64(vblock), len(signature.args[1])
        sums = e.sums(signature.args[0], count, vx, vrows, ap, ac, block, e.splat(vhalf))
        shifts = e.splat(vshift)
        e.store_tile(count, lambda j: builder.extract_value(vrows, j), ao, block,
                     lambda j, c, masked: builder.ashr(sums[j][c], shifts),
                     e.after(signature.args[8], vact))
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def _tile_es(typingctx, x, rows, packed, comp, block, at, pair0, xb, half, shift, odd_low,
             total, out, act, vecs):
    """The ES epilogue applied to the tile's registers, for the block's first 16 ``vecs``
    columns: out[rows[j], 64 block ...] = act((((sums + half) << shift) + bias +
    sum_r a_r xv_r) >> total) (see ``merged_rescale_fits``; act as in ``_tile_rescale``).

    ``half`` is folded into the accumulators' start; bias is 0 on a pair's even row and
    2^shift - 1 on its odd row (whose xv come negated), one funnel shift (vpshldvd) against
    ``odd_low`` = bias << (32 - shift); a_r xv_r is one vpdpwssd of the row's xv word
    against ``factor_words`` of at[pair, r], shared by the pair's two rows. Rows 2i and
    2i + 1 of the tuple are pair pair0 + i's.

    xb holds the rows' xv as int16 words (xv & 255, xv >> 8) (``project_pairs``): 1-D at
    rank 1, xb[rows[j]]; 2-D above it (R = at.shape[1]), xb[r, rows[j]], read by a loop over
    the rank that takes a pair's two rows together against each factor."""
    count_vecs = _vector_count(vecs)
    if not (count_vecs and _tile_typing_ok(x, rows, packed, comp)
            and _is_array(out, (2,), types.int8) and _is_array(at, (3,), types.int8)
            and _is_array(xb, (1, 2), types.int32) and len(rows) % 2 == 0
            and _after_ok(act)):
        return None
    sig = types.void(x, rows, packed, comp, block, at, pair0, xb, half, shift, odd_low, total,
                     out, act, vecs)

    def codegen(context, builder, signature, args):
        (vx, vrows, vpacked, vcomp, vblock, vat, vpair0, vxb, vhalf, vshift, vodd_low, vtotal,
         vout, vact, _) = args
        b = builder
        e = _Emit(context, b, count_vecs)
        ap, ac, aa, axb, ao = (e.array(signature.args[i], args[i]) for i in (2, 3, 5, 7, 12))
        block, count = e.i64(vblock), len(signature.args[1])
        sums = e.sums(signature.args[0], count, vx, vrows, ap, ac, block, e.splat(vhalf))
        shifts, totals, odd_lows = e.splat(vshift), e.splat(vtotal), e.splat(vodd_low)
        zeros = ir.Constant(_V32, [ir.Constant(_I32, 0)] * 16)
        dpwssd = e.function("llvm.x86.avx512.vpdpwssd.512", _V32, [_V32, _V32, _V32])
        fshl = e.function("llvm.fshl.v16i32", _V32, [_V32, _V32, _V32])
        width = cgutils.unpack_tuple(b, ao.shape, 2)[1]

        def scaled(j, c):
            return b.call(fshl, [sums[j][c], odd_lows if j % 2 else zeros, shifts])

        def pair_of(j):
            return b.add(e.i64(vpair0), _I64(j // 2))

        state = {}

        def rank1_value(j, c, masked):
            if c == 0:
                row = e.i64(b.extract_value(vrows, j))
                state["words"] = e.splat(b.load(b.gep(axb.data, [row])))
            if j % 2 == 0:  # a pair's two rows share the factor
                state[c] = e.factor_words(aa, pair_of(j), _I64(0), block, c, masked, width)
            return b.ashr(b.call(dpwssd, [scaled(j, c), state[c], state["words"]]), totals)

        def lowrank_value(j, c, masked):
            if j % 2:  # made with its pair's even row
                return state[c]
            if "slots" not in state:
                state["slots"] = [cgutils.alloca_once(b, _V32) for _ in range(2)]
            slots = state["slots"]
            rank = cgutils.unpack_tuple(b, aa.shape, 3)[1]
            line_words = b.sdiv(cgutils.unpack_tuple(b, axb.strides, 2)[0], _I64(4))
            rows = [e.i64(b.extract_value(vrows, j + s)) for s in range(2)]
            for s in range(2):
                b.store(scaled(j + s, c), slots[s])
            with cgutils.for_range(b, rank) as loop:
                f = e.factor_words(aa, pair_of(j), loop.index, block, c, masked, width)
                line = b.mul(loop.index, line_words)
                for s in range(2):
                    words = e.splat(b.load(b.gep(axb.data, [b.add(line, rows[s])])))
                    b.store(b.call(dpwssd, [b.load(slots[s]), f, words]), slots[s])
            state[c] = b.ashr(b.load(slots[1]), totals)
            return b.ashr(b.load(slots[0]), totals)

        value_of = rank1_value if signature.args[7].ndim == 1 else lowrank_value
        e.store_tile(count, lambda j: b.extract_value(vrows, j), ao, block, value_of,
                     e.after(signature.args[13], vact))
        return context.get_dummy_value()

    return sig, codegen


@njit(inline="always", cache=True)
def odd_low(sigma_shift):
    """The odd row's bias 2^s - 1 placed in the top s bits, for ``_tile_es``'s funnel
    shift (0 at s = 0)."""
    if sigma_shift == 0:
        return np.int32(0)
    bias = np.subtract(np.left_shift(np.int32(1), sigma_shift), np.int32(1))
    return np.left_shift(bias, np.subtract(np.int32(32), sigma_shift))


@functools.lru_cache(maxsize=256)
def merged_rescale_fits(fan_in: int, sigma_shift: int, shift: int, rank: int = 1) -> bool:
    """Whether the fused ES tiles' merged sum stays inside int32 for any int8 inputs and
    rank-``rank`` noise, and every xv >> 8 inside int16 (its vpdpwssd word is the pair
    (xv & 255, xv >> 8)).

    The ES epilogue sat8(rshift_round(acc + ((sum_r xv_r a_r + bias) >> s), shift)) is
    floor(((acc + half) 2^s + bias + sum_r xv_r a_r) / 2^(s + shift)): the two floors merge
    into one wherever that sum does not overflow."""
    xv = (fan_in * 127 * NOISE_MAX) >> FRAC_BITS
    total = (fan_in * 127 * 127 << sigma_shift) + rank * xv * NOISE_MAX + (1 << sigma_shift) + (
        (1 << (sigma_shift + shift - 1)) if shift > 0 else 0)
    return total < 2**31 and (xv >> 8) < 2**15


@intrinsic
def _prefetch(typingctx, array, row, column, write):
    """Prefetch the cache line of array[row, column] (a 2-D C array) into L1, for writing
    if ``write`` (a literal bool)."""
    if not (isinstance(array, types.Array) and array.ndim == 2 and array.layout == "C"
            and isinstance(write, types.BooleanLiteral)):
        return None
    rw = int(write.literal_value)
    sig = types.void(array, row, column, write)

    def codegen(context, builder, signature, args):
        e = _Emit(context, builder)
        a = e.array(signature.args[0], args[0])
        base = e.row_pointer(a, args[1], 1, ir.IntType(8))
        pointer = builder.gep(builder.bitcast(base, ir.IntType(8).as_pointer()), [e.i64(args[2])])
        fn = e.function("llvm.prefetch.p0", ir.VoidType(),
                        [ir.IntType(8).as_pointer(), _I32, _I32, _I32])
        builder.call(fn, [pointer, _I32(rw), _I32(3), _I32(1)])
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def _prefetch_factor(typingctx, f, p, k):
    """Prefetch the cache line of f[p, 0, k] (a 3-D C array) into L1 for reading."""
    if not (isinstance(f, types.Array) and f.ndim == 3 and f.layout == "C"):
        return None
    sig = types.void(f, p, k)

    def codegen(context, builder, signature, args):
        e = _Emit(context, builder)
        a = e.array(signature.args[0], args[0])
        stride = cgutils.unpack_tuple(builder, a.strides, 3)[0]
        offset = builder.add(builder.mul(e.i64(args[1]), stride), e.i64(args[2]))
        pointer = builder.gep(builder.bitcast(a.data, ir.IntType(8).as_pointer()), [offset])
        fn = e.function("llvm.prefetch.p0", ir.VoidType(),
                        [ir.IntType(8).as_pointer(), _I32, _I32, _I32])
        builder.call(fn, [pointer, _I32(0), _I32(3), _I32(1)])
        return context.get_dummy_value()

    return sig, codegen


@njit(inline="always", cache=True)
def prefetch_rows(x, r0, rows, out):
    """Prefetch x's rows r0 .. r0 + rows - 1 for reading and out's for writing: a panel's
    first touch of memory, issued a panel ahead so that it overlaps the product."""
    for r in range(r0, min(r0 + rows, x.shape[0])):
        for k in range(0, x.shape[1], 64):
            _prefetch(x, r, k, False)
        for o in range(0, out.shape[1], 64):
            _prefetch(out, r, o, True)


@njit(inline="always", cache=True)
def prefetch_factor_rows(f, p0, count):
    """Prefetch rows p0 .. p0 + count - 1 of a (P, 1, n) factor for reading (the next
    panel's pairs: a step's factors for every layer do not stay in L2 between calls)."""
    for p in range(p0, min(p0 + count, f.shape[0])):
        for k in range(0, f.shape[2], 64):
            _prefetch_factor(f, p, k)


@njit(inline="always", cache=True)
def tiles(x, r0, rows, packed, comp, block, acc, a0):
    """acc[a0 : a0 + rows, block] for x rows r0 .. r0 + rows - 1: whole tiles, then the
    rest."""
    j = 0
    while j + TILE_ROWS <= rows:
        m = r0 + j
        _tile(x, (m, m + 1, m + 2, m + 3, m + 4, m + 5), packed, comp, block, acc, a0 + j)
        j += TILE_ROWS
    left, m, a = rows - j, r0 + j, a0 + j
    if left == 1:
        _tile(x, (m,), packed, comp, block, acc, a)
    elif left == 2:
        _tile(x, (m, m + 1), packed, comp, block, acc, a)
    elif left == 3:
        _tile(x, (m, m + 1, m + 2), packed, comp, block, acc, a)
    elif left == 4:
        _tile(x, (m, m + 1, m + 2, m + 3), packed, comp, block, acc, a)
    elif left == 5:
        _tile(x, (m, m + 1, m + 2, m + 3, m + 4), packed, comp, block, acc, a)


@njit(inline="always", cache=True)
def tiles_rescale(x, r0, rows, packed, comp, block, half, shift, out, act):
    """``_tile_rescale`` over x rows r0 .. r0 + rows - 1, 2 vectors per row for a last
    block of at most 32 columns, else 4."""
    if out.shape[1] - block * BLOCK_COLS <= BLOCK_COLS // 2:
        _rescale_rows(x, r0, rows, packed, comp, block, half, shift, out, act, 2)
    else:
        _rescale_rows(x, r0, rows, packed, comp, block, half, shift, out, act, 4)


@njit(inline="always", cache=True)
def _rescale_rows(x, r0, rows, packed, comp, block, half, shift, out, act, vecs):
    """``tiles_rescale`` at a literal ``vecs``: whole tiles, then the rest."""
    j = 0
    while j + TILE_ROWS <= rows:
        m = r0 + j
        _tile_rescale(x, (m, m + 1, m + 2, m + 3, m + 4, m + 5), packed, comp, block, half,
                      shift, out, act, vecs)
        j += TILE_ROWS
    left, m = rows - j, r0 + j
    if left == 1:
        _tile_rescale(x, (m,), packed, comp, block, half, shift, out, act, vecs)
    elif left == 2:
        _tile_rescale(x, (m, m + 1), packed, comp, block, half, shift, out, act, vecs)
    elif left == 3:
        _tile_rescale(x, (m, m + 1, m + 2), packed, comp, block, half, shift, out, act,
                      vecs)
    elif left == 4:
        _tile_rescale(x, (m, m + 1, m + 2, m + 3), packed, comp, block, half, shift, out, act,
                      vecs)
    elif left == 5:
        _tile_rescale(x, (m, m + 1, m + 2, m + 3, m + 4), packed, comp, block, half, shift,
                      out, act, vecs)


@njit(inline="always", cache=True)
def tiles_es(x, r0, rows, packed, comp, block, at, pair0, xb, half, shift, low, total, out,
             act):
    """``_tile_es`` over x rows r0 .. r0 + rows - 1, whole pairs (r0 and rows even) from
    pair pair0 on, 2 vectors per row for a last block of at most 32 columns, else 4."""
    if out.shape[1] - block * BLOCK_COLS <= BLOCK_COLS // 2:
        _es_rows(x, r0, rows, packed, comp, block, at, pair0, xb, half, shift, low, total, out,
                 act, 2)
    else:
        _es_rows(x, r0, rows, packed, comp, block, at, pair0, xb, half, shift, low, total, out,
                 act, 4)


@njit(inline="always", cache=True)
def _es_rows(x, r0, rows, packed, comp, block, at, pair0, xb, half, shift, low, total, out,
             act, vecs):
    """``tiles_es`` at a literal ``vecs``: whole tiles, then the rest (2 or 4 rows)."""
    j = 0
    while j + TILE_ROWS <= rows:
        m = r0 + j
        _tile_es(x, (m, m + 1, m + 2, m + 3, m + 4, m + 5), packed, comp, block, at,
                 pair0 + j // 2, xb, half, shift, low, total, out, act, vecs)
        j += TILE_ROWS
    left, m, p = rows - j, r0 + j, pair0 + j // 2
    if left == 2:
        _tile_es(x, (m, m + 1), packed, comp, block, at, p, xb, half, shift, low, total, out,
                 act, vecs)
    elif left == 4:
        _tile_es(x, (m, m + 1, m + 2, m + 3), packed, comp, block, at, p, xb, half, shift, low,
                 total, out, act, vecs)


@njit(inline="always", cache=True)
def add_tail(x, r0, rows, tail, acc, a0):
    """acc[a0 + j] += the products of the fan-in's last in % 4 columns (scalar; rare)."""
    first = x.shape[1] - tail.shape[1]
    for j in range(rows):
        for o in range(tail.shape[0]):
            s = np.int32(0)
            for k in range(tail.shape[1]):
                s += np.int32(x[r0 + j, first + k]) * np.int32(tail[o, k])
            acc[a0 + j, o] = np.add(acc[a0 + j, o], s)


@njit(inline="always", cache=True)
def panel_blocks(x, r0, rows, packed, comp, acc):
    """acc[:rows, :out] = x[r0 : r0 + rows, :4G] @ W^T exactly, in int32 (acc at least
    (rows, 64 blocks) wide). Block by block, so a block's packed lines (fan-in x 64 bytes)
    stay in L1 across the panel's tiles."""
    for block in range(packed.shape[0]):
        tiles(x, r0, rows, packed, comp, block, acc, 0)


@njit(inline="always", cache=True)
def panel_product(x, r0, rows, packed, comp, tail, acc):
    """``panel_blocks`` and the fan-in's last in % 4 columns: the whole x[r0 : r0 + rows] @
    W^T of a (M, K) x."""
    panel_blocks(x, r0, rows, packed, comp, acc)
    if tail.shape[1] > 0:
        add_tail(x, r0, rows, tail, acc, 0)


@njit(nogil=True, cache=True)
def _product(x, packed, comp, tail, out):
    """out = x @ W^T, panel by panel."""
    acc = np.empty((PANEL_ROWS, packed.shape[0] * BLOCK_COLS), dtype=np.int32)
    for r0 in range(0, x.shape[0], PANEL_ROWS):
        rows = min(PANEL_ROWS, x.shape[0] - r0)
        panel_product(x, r0, rows, packed, comp, tail, acc)
        for j in range(rows):
            for o in range(out.shape[1]):
                out[r0 + j, o] = acc[j, o]


def product(x: np.ndarray, w: VnniWeight) -> np.ndarray:
    """The exact int32 product x @ W^T of int8 x (rows, in) (C-contiguous)."""
    if x.shape[1] != w.shape[1]:
        raise ValueError(f"x has {x.shape[1]} columns, W {w.shape[1]}")
    out = np.empty((x.shape[0], w.shape[0]), dtype=np.int32)
    _product(np.ascontiguousarray(x, dtype=np.int8), w.packed, w.comp, w.tail, out)
    return out


@intrinsic
def _tile_levels(typingctx, x, rows, packed, comp, block, levels, acc, acc_row):
    """acc[acc_row + j, 64 block ...] = comp[block] + sum_l v_l R_l[j], for the rows of the
    tuple, where R_l = x[g, rows[j]] @ W^T over the groups g of level l, levels[l] = (its
    end group, v_l): a level starts where the previous one ends and holds at least one
    group. x is grouped (G, M, 4) like the update's V^T.

    Z = sum_l v_l R_l is the update's sum_p f_p a_p b_p^T with the pairs grouped by |f_p|
    (the sign in a), so each pair's term is one int8 product, whatever |f|. R_l runs in
    the registers of a full tile (6 x 64); Z lives in acc's rows (L1), which take v_l R_l
    once per level. Every sum wraps mod 2^32 (vpdpbusd, vpmulld), like the reference's
    int32 product, in any order."""
    if not (_tile_typing_ok(x, rows, packed, comp, 3)
            and _is_array(levels, (2,), types.int32) and _is_array(acc, (2,), types.int32)):
        return None
    sig = types.void(x, rows, packed, comp, block, levels, acc, acc_row)
    count = len(rows)

    def codegen(context, b, signature, args):
        vx, vrows, _, _, vblock, _, _, vacc_row = args
        e = _Emit(context, b)
        ax, ap, ac, al, aa = (e.array(signature.args[i], args[i]) for i in (0, 2, 3, 5, 6))
        block = e.i64(vblock)
        x_strides = cgutils.unpack_tuple(b, ax.strides, 3)
        x_step = b.sdiv(x_strides[0], _I64(4))  # words from one group to the next
        x_rows = [b.bitcast(b.gep(ax.data, [b.mul(e.i64(b.extract_value(vrows, j)),
                                                  x_strides[1])]), _I32.as_pointer())
                  for j in range(count)]
        block_bytes = cgutils.unpack_tuple(b, ap.strides, 3)[0]
        lines = b.bitcast(b.gep(ap.data, [b.mul(block, block_bytes)]), _V32.as_pointer())
        comp_row = b.bitcast(b.gep(ac.data, [b.mul(block, _I64(BLOCK_COLS))]),
                             _V32.as_pointer())
        col = b.mul(block, _I64(_VECS))
        z_at = [[b.gep(e.row_pointer(aa, b.add(e.i64(vacc_row), _I64(j)), 4, _V32),
                       [b.add(col, _I64(c))]) for c in range(_VECS)] for j in range(count)]
        level_count = cgutils.unpack_tuple(b, al.shape, 2)[0]
        zero = ir.Constant(_V32, [ir.Constant(_I32, 0)] * 16)
        for c in range(_VECS):
            start = b.load(b.gep(comp_row, [_I64(c)]), align=4)
            for j in range(count):
                b.store(start, z_at[j][c], align=4)

        entry = b.basic_block
        level = b.append_basic_block("levels.level")
        done = b.append_basic_block("levels.done")
        b.cbranch(b.icmp_signed(">", level_count, _I64(0)), level, done)

        b.position_at_end(level)
        lv, g0 = b.phi(_I64), b.phi(_I64)
        row = b.gep(al.data, [b.mul(lv, _I64(2))])
        g1 = e.i64(b.load(row))
        v = e.splat(b.load(b.gep(row, [_I64(1)])))
        level_lines = b.gep(lines, [b.mul(g0, _I64(_VECS))])
        level_rows = [b.gep(x_rows[j], [b.mul(g0, x_step)]) for j in range(count)]
        rs = e.k_loop(level_rows, x_step, level_lines, b.sub(g1, g0), [[zero] * _VECS] * count)
        for j in range(count):
            for c in range(_VECS):
                z = b.load(z_at[j][c], align=4)
                b.store(b.add(z, b.mul(rs[j][c], v)), z_at[j][c], align=4)
        level_end = b.basic_block
        lv_next = b.add(lv, _I64(1))
        lv.add_incoming(_I64(0), entry)
        lv.add_incoming(lv_next, level_end)
        g0.add_incoming(_I64(0), entry)
        g0.add_incoming(g1, level_end)
        b.cbranch(b.icmp_signed("<", lv_next, level_count), level, done)
        b.position_at_end(done)
        return context.get_dummy_value()

    return sig, codegen


@njit(inline="always", cache=True)
def level_panel(x, o0, count, packed, comp, levels, acc):
    """acc[:count, :64 blocks] = rows o0 .. o0 + count - 1 of the update's Z (see
    ``_tile_levels``), block by block so that a block's lines stay in L1 across the rows."""
    for block in range(packed.shape[0]):
        j = 0
        while j + TILE_ROWS <= count:
            m = o0 + j
            _tile_levels(x, (m, m + 1, m + 2, m + 3, m + 4, m + 5), packed, comp, block, levels,
                         acc, j)
            j += TILE_ROWS
        left, m = count - j, o0 + j
        if left == 1:
            _tile_levels(x, (m,), packed, comp, block, levels, acc, j)
        elif left == 2:
            _tile_levels(x, (m, m + 1), packed, comp, block, levels, acc, j)
        elif left == 3:
            _tile_levels(x, (m, m + 1, m + 2), packed, comp, block, levels, acc, j)
        elif left == 4:
            _tile_levels(x, (m, m + 1, m + 2, m + 3), packed, comp, block, levels, acc, j)
        elif left == 5:
            _tile_levels(x, (m, m + 1, m + 2, m + 3, m + 4), packed, comp, block, levels, acc,
                         j)


@njit(nogil=True, cache=True)
def _level_sum(x, packed, comp, levels, out):
    """out = the update's Z (``_tile_levels``), panel by panel."""
    acc = np.empty((PANEL_ROWS, packed.shape[0] * BLOCK_COLS), dtype=np.int32)
    for o0 in range(0, out.shape[0], PANEL_ROWS):
        count = min(PANEL_ROWS, out.shape[0] - o0)
        level_panel(x, o0, count, packed, comp, levels, acc)
        for j in range(count):
            for i in range(out.shape[1]):
                out[o0 + j, i] = acc[j, i]


def level_sum(x: np.ndarray, w: VnniWeight, levels: np.ndarray) -> np.ndarray:
    """int32 Z (rows, out) of a grouped x (G, rows, 4) against W packed with G groups, no
    tail and ``comp`` weighted by level (see ``_tile_levels``)."""
    if w.packed.shape[1] != x.shape[0] or w.tail.shape[1]:
        raise ValueError(f"W packs {w.packed.shape[1]} groups (+{w.tail.shape[1]}), "
                         f"x {x.shape[0]}")
    out = np.empty((x.shape[1], w.shape[0]), dtype=np.int32)
    _level_sum(x, w.packed, w.comp, levels, out)
    return out


def vnni_unavailable() -> str | None:
    """None where the VNNI GEMM runs, else one line saying why not."""
    return None if HAVE_VNNI else "this CPU has no AVX-512 VNNI (vpdpbusd)"
