"""int8 dot products on AVX-512 VNNI, for the rank-1 projections of the cpu backend.

A perturbed linear layer projects each member's input onto its pair's factor, x_m . b_p, for
both members of every pair: 2 x fan-in multiply-adds per pair per token, the largest part of
ES's own work on the CPU. numba vectorizes that loop in int32 lanes (16 products per
instruction); VNNI's vpdpbusd sums 64 uint8 x int8 products into int32 in one instruction.
LLVM does not form it from a loop, so ``_row_dots`` emits it from IR, with the signed x made
unsigned by x + 128 (xor 0x80) and the 128 sum(b) that adds taken off again (also by vpdpbusd,
against ones): exact, as every partial sum stays far inside int32 (|x| <= 127, |b| <= 127,
fan-in < 2^16). A length that is not a multiple of 64 ends in one block of masked loads (a
scalar tail of 32 cost as much as the whole vector loop at width 96).

Several rows against one factor share its loads and its sum, and their R accumulators are
summed by one transposing tree of shuffles (R - 1 + log2(16 / R) shuffle pairs for R rows)
instead of a full horizontal sum each: a token block's copies of a pair (the same b_p for
every copy) go 8 rows at a time (``quad_pair_dot``). Measured per row (2048 x 256, in
cache): 8 at a time 2.7 ns, 2 at a time 3.8 ns, and 4.9 ns before, with a horizontal sum per
row and a masked tail block even where the width needed none.

The fused ES layers project a panel's rows 16 at a time, each pair's two rows against their
own factor (``project_pairs``): the same tree reduces rows of different pairs, and 128 sum(b)
is made once per layer and step (``factor_sums``) instead of by a vpdpbusd against ones in
every call.

numba's on-disk cache keys a kernel on its own source file only: after editing this module,
delete the ``*.nbi``/``*.nbc`` files under ``intes/kernels/__pycache__`` (or touch
cpu_linear.py), or the cpu kernels keep the old inlined code.

``HAVE_VNNI`` says whether this CPU has the instruction (as LLVM sees the host); without it
``pair_dot`` and ``quad_pair_dot`` are numba's own loops, with the same results.
"""

from __future__ import annotations

import numpy as np
from llvmlite import binding as llvm
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

LANES = 64  # int8 lanes of one 512-bit register
WORDS = LANES // 4  # int32 lanes of one 512-bit register
HAVE_VNNI = bool(llvm.get_host_cpu_features().get("avx512vnni", False))

_I8, _I32, _I64 = ir.IntType(8), ir.IntType(32), ir.IntType(64)
_V8, _V32 = ir.VectorType(_I8, LANES), ir.VectorType(_I32, WORDS)
_MASK = ir.VectorType(ir.IntType(1), LANES)
_LANE_INDEX = ir.Constant(_V8, [ir.Constant(_I8, i) for i in range(LANES)])


def _splat(vec_type: ir.VectorType, value: int) -> ir.Constant:
    return ir.Constant(vec_type, [ir.Constant(vec_type.element, value)] * vec_type.count)


def _splat_value(builder: ir.IRBuilder, value: ir.Value) -> ir.Value:
    """A vector of LANES copies of an i8 value."""
    one = builder.insert_element(ir.Constant(_V8, ir.Undefined), value, _I32(0))
    return builder.shuffle_vector(one, ir.Constant(_V8, ir.Undefined),
                                  ir.Constant(ir.VectorType(_I32, LANES), [0] * LANES))


def _shuffle(builder: ir.IRBuilder, a: ir.Value, b: ir.Value, lanes: list[int]) -> ir.Value:
    return builder.shuffle_vector(a, b, ir.Constant(ir.VectorType(_I32, len(lanes)), lanes))


def _sum_rows(builder: ir.IRBuilder, accs: list[ir.Value]) -> ir.Value:
    """One vector whose lane j is the sum of the WORDS lanes of accs[j] (R = len(accs), a
    power of two <= WORDS): pairs of vectors are folded into one, half of each row's lanes
    from either, until one vector is left, which then folds onto itself."""
    width, rows = WORDS, 1  # lanes per row, rows per vector
    while len(accs) > 1:
        half = width // 2
        picks = [[src * WORDS + g * width + i + part for src in (0, 1) for g in range(rows)
                  for i in range(half)] for part in (0, half)]
        accs = [builder.add(*(_shuffle(builder, a, b, pick) for pick in picks))
                for a, b in zip(accs[0::2], accs[1::2], strict=True)]
        width, rows = half, rows * 2
    v = accs[0]
    while width > 1:
        half = width // 2
        picks = [[g * width + i + part for g in range(rows) for i in range(half)]
                 for part in (0, half)]
        v = builder.add(*(_shuffle(builder, v, v, pick) for pick in picks))
        width = half
    return v


def _block_sums(builder: ir.IRBuilder, terms: list, factors: list, length: ir.Value) -> list:
    """Per term (x: a row's <64 x i8> pointer, or an already unsigned <16 x i32> constant;
    f: an index into ``factors``, <64 x i8> pointers), 16 int32 lanes summing to
    (x + 128) . factors[f] over ``length`` bytes, by vpdpbusd: whole 64-byte blocks in a loop
    (each factor block loaded once for all its terms), the rest as one block of masked loads
    (lanes past the length read as zero and add nothing)."""
    dpbusd = cgutils.get_or_insert_function(
        builder.module, ir.FunctionType(_V32, [_V32, _V32, _V32]),
        "llvm.x86.avx512.vpdpbusd.512")
    masked_load = cgutils.get_or_insert_function(
        builder.module, ir.FunctionType(_V8, [_V8.as_pointer(), _I32, _MASK, _V8]),
        "llvm.masked.load.v64i8.p0")
    bias, zero, zero8 = _splat(_V8, 0x80), _splat(_V32, 0), _splat(_V8, 0)
    count = builder.sdiv(length, _I64(LANES))
    rest = builder.trunc(builder.sub(length, builder.mul(count, _I64(LANES))), _I8)

    def accumulate(accs, load):
        """The sums after one more block."""
        blocks = [builder.bitcast(load(f), _V32) for f in factors]
        return [builder.call(dpbusd, [acc, x if x.type == _V32 else
                                      builder.bitcast(builder.xor(load(x), bias), _V32),
                                      blocks[f]])
                for acc, (x, f) in zip(accs, terms, strict=True)]

    def merge(block_values):
        """phi nodes joining each sum's value from (values, block) pairs."""
        phis = []
        for j in range(len(terms)):
            phi = builder.phi(_V32)
            for values, block in block_values:
                phi.add_incoming(values[j], block)
            phis.append(phi)
        return phis

    entry = builder.basic_block
    loop = builder.append_basic_block("vnni.loop")
    blocks_done = builder.append_basic_block("vnni.blocks_done")
    tail = builder.append_basic_block("vnni.tail")
    done = builder.append_basic_block("vnni.done")
    start = [zero] * len(terms)
    builder.cbranch(builder.icmp_signed(">", count, _I64(0)), loop, blocks_done)

    builder.position_at_end(loop)
    i = builder.phi(_I64)
    accs = merge([(start, entry)])
    new = accumulate(accs, lambda ptr: builder.load(builder.gep(ptr, [i]), align=1))
    nxt = builder.add(i, _I64(1))
    i.add_incoming(_I64(0), entry)
    i.add_incoming(nxt, loop)
    for acc, value in zip(accs, new, strict=True):
        acc.add_incoming(value, loop)
    builder.cbranch(builder.icmp_signed("<", nxt, count), loop, blocks_done)

    builder.position_at_end(blocks_done)
    sums = merge([(start, entry), (new, loop)])
    builder.cbranch(builder.icmp_unsigned(">", rest, _I8(0)), tail, done)

    builder.position_at_end(tail)
    mask = builder.icmp_unsigned("<", _LANE_INDEX, _splat_value(builder, rest))
    tail_sums = accumulate(sums, lambda ptr: builder.call(
        masked_load, [builder.gep(ptr, [count]), _I32(1), mask, zero8]))
    builder.branch(done)

    builder.position_at_end(done)
    return merge([(sums, blocks_done), (tail_sums, tail)])


@intrinsic
def _row_dots(typingctx, x, rows, b):
    """(x[rows[0]] . b, x[rows[1]] . b, ...) in int32 for a C-contiguous int8 matrix x, a
    tuple of R row indices (R a power of two <= 16) and an int8 vector b of x's width, by
    vpdpbusd: whole 64-element blocks in a loop, the rest as one block of masked loads (the
    lanes past the width read as zero and add nothing)."""
    if not (isinstance(x, types.Array) and x.ndim == 2 and x.layout == "C"
            and x.dtype == types.int8 and isinstance(b, types.Array) and b.ndim == 1
            and b.layout == "C" and b.dtype == types.int8
            and isinstance(rows, types.UniTuple) and isinstance(rows.dtype, types.Integer)):
        return None  # unit stride is what the vector loads assume
    count_rows = len(rows)
    if count_rows & (count_rows - 1) or not 1 <= count_rows <= WORDS:
        return None
    sig = types.UniTuple(types.int32, count_rows)(x, rows, b)

    def codegen(context, builder, signature, args):
        vx, vrows, vb = args
        ax = context.make_array(signature.args[0])(context, builder, vx)
        ab = context.make_array(signature.args[2])(context, builder, vb)
        stride = cgutils.unpack_tuple(builder, ax.strides, 2)[0]
        length = cgutils.unpack_tuple(builder, ab.shape, 1)[0]
        ptrs = []
        for j in range(count_rows):
            row = builder.extract_value(vrows, j)
            row = builder.sext(row, _I64) if row.type.width < 64 else row
            ptrs.append(builder.bitcast(builder.gep(ax.data, [builder.mul(row, stride)]),
                                        _V8.as_pointer()))
        reduce_add = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(_I32, [_V32]), "llvm.vector.reduce.add.v16i32")
        ones = builder.bitcast(_splat(_V8, 1), _V32)
        terms = [(ptr, 0) for ptr in ptrs] + [(ones, 0)]  # the last sums b, against ones
        sums = _block_sums(builder, terms, [builder.bitcast(ab.data, _V8.as_pointer())], length)
        row_sums = _sum_rows(builder, sums[:-1])
        shift = builder.shl(builder.call(reduce_add, [sums[-1]]), _I32(7))  # 128 sum(b)
        dots = [builder.sub(builder.extract_element(row_sums, _I32(j)), shift)
                for j in range(count_rows)]
        return context.make_tuple(builder, signature.return_type, dots)

    return sig, codegen


@njit(inline="always", cache=True)
def _pair_dot_vnni(x, m0, b):
    return _row_dots(x, (m0, m0 + 1), b)


@njit(inline="always", cache=True)
def _quad_pair_dot_vnni(x, m0, stride, b):
    return _row_dots(x, (m0, m0 + 1, m0 + stride, m0 + stride + 1, m0 + 2 * stride,
                         m0 + 2 * stride + 1, m0 + 3 * stride, m0 + 3 * stride + 1), b)


PAIR_ROWS = (16, 8, 4, 2)  # rows per ``_pair_rows_dots`` call, largest first


@intrinsic
def _pair_rows_dots(typingctx, x, r0, count, bt, pair0, r, bsum, xv, words):
    """The rank-r projections of rows r0 .. r0 + R - 1 (R = ``count``, a literal in
    PAIR_ROWS), whole pairs: row r0 + j against B of pair pair0 + j // 2, as one layer's ES
    epilogue takes them: xv[r, r0 + j] = (((x + 128) . B[:, r] - bsum[r, p]) >> 4), which is
    (x . B[:, r]) >> 4, negated on a pair's odd row, and as the int16 words (xv & 255,
    xv >> 8) of ``_tile_es``'s vpdpwssd if ``words`` (a literal bool).

    bt is (P, rank, in) int8 and bsum (rank, P) int32 holds 128 sum(B[:, r]) per pair
    (``factor_sums``): the x + 128 that vpdpbusd's unsigned operand takes, taken off again.
    A pair's factor block is loaded once for its two rows, and the R rows' sums are reduced
    by one transposing tree (``_sum_rows``), R - 1 + log2(16 / R) shuffle pairs for all of
    them, against 4 per pair (and a sum of b) for ``pair_dot``."""
    arrays_ok = (isinstance(x, types.Array) and x.ndim == 2 and x.layout == "C"
                 and x.dtype == types.int8 and isinstance(bt, types.Array) and bt.ndim == 3
                 and bt.layout == "C" and bt.dtype == types.int8
                 and isinstance(bsum, types.Array) and bsum.ndim == 2 and bsum.layout == "C"
                 and bsum.dtype == types.int32 and isinstance(xv, types.Array)
                 and xv.ndim == 2 and xv.layout == "C" and xv.dtype == types.int32)
    if not (arrays_ok and isinstance(count, types.IntegerLiteral)
            and count.literal_value in PAIR_ROWS and isinstance(words, types.BooleanLiteral)):
        return None
    rows, as_words = count.literal_value, words.literal_value
    sig = types.void(x, r0, count, bt, pair0, r, bsum, xv, words)

    def codegen(context, b, signature, args):
        vx, vr0, _, vbt, vpair0, vr, vbsum, vxv, _ = args
        ax, abt, abs_, axv = (context.make_array(signature.args[i])(context, b, args[i])
                              for i in (0, 3, 6, 7))

        def i64(v):
            return b.sext(v, _I64) if v.type.width < 64 else v

        def byte_pointer(array, offset, typ):
            return b.bitcast(b.gep(b.bitcast(array.data, _I8.as_pointer()), [offset]),
                             typ.as_pointer())

        first, pair0, rank_index = i64(vr0), i64(vpair0), i64(vr)
        x_stride = cgutils.unpack_tuple(b, ax.strides, 2)[0]
        length = cgutils.unpack_tuple(b, ax.shape, 2)[1]
        b_strides = cgutils.unpack_tuple(b, abt.strides, 3)
        factors = [byte_pointer(abt, b.add(b.mul(b.add(pair0, _I64(q)), b_strides[0]),
                                           b.mul(rank_index, b_strides[1])), _V8)
                   for q in range(rows // 2)]
        x_rows = [byte_pointer(ax, b.mul(b.add(first, _I64(j)), x_stride), _V8)
                  for j in range(rows)]
        sums = _block_sums(b, [(x_rows[j], j // 2) for j in range(rows)], factors, length)
        lanes = ir.VectorType(_I32, rows)

        def vector(values):
            return ir.Constant(lanes, [ir.Constant(_I32, v) for v in values])

        summed = _sum_rows(b, sums)
        dots = b.shuffle_vector(summed, summed, vector(range(rows)))
        half_lanes = ir.VectorType(_I32, rows // 2)
        bsum_stride = cgutils.unpack_tuple(b, abs_.strides, 2)[0]
        pair_sums = b.load(byte_pointer(abs_, b.add(b.mul(rank_index, bsum_stride),
                                                    b.mul(pair0, _I64(4))), half_lanes),
                           align=4)
        v = b.ashr(b.sub(dots, b.shuffle_vector(pair_sums, pair_sums,
                                                vector(j // 2 for j in range(rows)))),
                   vector([4] * rows))
        odd = ir.Constant(ir.VectorType(ir.IntType(1), rows), [j % 2 for j in range(rows)])
        v = b.select(odd, b.sub(vector([0] * rows), v), v)
        if as_words:
            v = b.or_(b.and_(v, vector([255] * rows)),
                      b.shl(b.ashr(v, vector([8] * rows)), vector([16] * rows)))
        xv_stride = cgutils.unpack_tuple(b, axv.strides, 2)[0]
        b.store(v, byte_pointer(axv, b.add(b.mul(rank_index, xv_stride), b.mul(first, _I64(4))),
                                lanes), align=4)
        return context.get_dummy_value()

    return sig, codegen


@njit(inline="always", cache=True)
def project_pairs(x, r0, m0, rows, bt, bsum, xv, words):
    """xv[:, r0 .. r0 + rows - 1] = the projections of x's rows r0 ... (members m0 ...,
    whole pairs) as ``_pair_rows_dots`` gives them, for every rank, 16 rows at a time."""
    for r in range(bt.shape[1]):
        j = 0
        while j + 16 <= rows:
            _pair_rows_dots(x, r0 + j, 16, bt, (m0 + j) // 2, r, bsum, xv, words)
            j += 16
        if rows - j >= 8:
            _pair_rows_dots(x, r0 + j, 8, bt, (m0 + j) // 2, r, bsum, xv, words)
            j += 8
        if rows - j >= 4:
            _pair_rows_dots(x, r0 + j, 4, bt, (m0 + j) // 2, r, bsum, xv, words)
            j += 4
        if rows - j >= 2:
            _pair_rows_dots(x, r0 + j, 2, bt, (m0 + j) // 2, r, bsum, xv, words)


@njit(nogil=True, cache=True)
def factor_sums(bt):
    """(rank, P) int32: 128 sum_k B_p[k, r], what ``_pair_rows_dots`` takes off its sums;
    made once per layer and step, as the factors are."""
    out = np.empty((bt.shape[1], bt.shape[0]), dtype=np.int32)
    for p in range(bt.shape[0]):
        for r in range(bt.shape[1]):
            total = np.int32(0)
            for k in range(bt.shape[2]):
                total += np.int32(bt[p, r, k])
            out[r, p] = np.int32(128) * total
    return out


@njit(inline="always", cache=True)
def pair_dot_loop(x, m0, b):
    """(x[m0] . b, x[m0 + 1] . b) in int32, numba's own loop."""
    d0, d1 = np.int32(0), np.int32(0)
    for i in range(b.shape[0]):
        bi = np.int32(b[i])
        d0 = np.add(d0, np.multiply(np.int32(x[m0, i]), bi))
        d1 = np.add(d1, np.multiply(np.int32(x[m0 + 1, i]), bi))
    return d0, d1


@njit(inline="always", cache=True)
def quad_pair_dot_loop(x, m0, stride, b):
    """``pair_dot_loop`` at rows m0, m0 + stride, m0 + 2 stride, m0 + 3 stride."""
    return (pair_dot_loop(x, m0, b) + pair_dot_loop(x, m0 + stride, b)
            + pair_dot_loop(x, m0 + 2 * stride, b) + pair_dot_loop(x, m0 + 3 * stride, b))


# (x[m0] . b, x[m0 + 1] . b) in int32; x a C-contiguous int8 matrix, b an int8 vector
pair_dot = _pair_dot_vnni if HAVE_VNNI else pair_dot_loop
# pair_dot at rows m0, m0 + stride, m0 + 2 stride, m0 + 3 stride: 8 dot products with one b
quad_pair_dot = _quad_pair_dot_vnni if HAVE_VNNI else quad_pair_dot_loop
