"""256-entry byte tables looked up 64 bytes at a time, on AVX-512 VBMI.

RWKV's receptance gate sat8((sigmoid(r) v) >> 7) reads one table entry per element. numba
compiles that read to a scalar load per element (a gather, which LLVM does not vectorize
profitably): in one-thread profiles the gate took about 5% of an inference pass, and
about 1% with the lookup below. VBMI's vpermi2b picks 64 bytes out of 128 in one
instruction: two of them cover the 256 entries, bit 7 of each index chooses between them
(``_lookup``), and the gate's product and shift run in int16 lanes, 32 per register. The
WKV recurrence's exponent table (entries 1..251) is looked up the same way, for a whole
token block before the recurrence (``lookup_flat``), so the recurrence's loop reads bytes
where it gathered table entries. The log-likelihood's sum of EXP2_TABLE[max - z] over a
row of logits reads the table's two bytes the same way and sums them with vpsadbw
(``exp2_sum``).

``HAVE_VBMI`` says whether this CPU has it (as LLVM sees the host); without it these are
numba's own loops, with the same results.
"""

from __future__ import annotations

import numpy as np
from llvmlite import binding as llvm
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

from intes.intmath import EXP2_TABLE, INT8_MAX, SIGMOID_TABLE, WKV_EXP_TABLE
from intes.kernels.vnni import _splat

LANES = 64
HAVE_VBMI = bool(llvm.get_host_cpu_features().get("avx512vbmi", False))

_I8, _I16, _I64 = ir.IntType(8), ir.IntType(16), ir.IntType(64)
_V8 = ir.VectorType(_I8, LANES)
_V16 = ir.VectorType(_I16, LANES)


def byte_table(table: np.ndarray) -> np.ndarray:
    """An int8-indexed table of 255 entries (x + 127 for x in -127..127) as 256 uint8 bytes.
    The last byte, which x = -128 reads (outside the int8 convention), repeats the last
    entry, as numpy's index -1 does in the reference."""
    if len(table) != 255 or table.min() < 0 or table.max() > 255:
        raise ValueError("a byte table holds 255 entries in 0..255")
    return np.append(table, table[-1]).astype(np.uint8)


GATE_TABLE = byte_table(SIGMOID_TABLE)  # sigmoid in 0..128: |g v| <= 128 * 127 < 2^15
assert SIGMOID_TABLE.max() <= 128
WKV_EXP_BYTES = byte_table(WKV_EXP_TABLE)


def _lookup(builder: ir.IRBuilder, table: ir.Value, index: ir.Value) -> ir.Value:
    """table[index] for 64 byte indices, table a pointer to 256 bytes (as 4 x 64)."""
    permute = cgutils.get_or_insert_function(
        builder.module, ir.FunctionType(_V8, [_V8, _V8, _V8]),
        "llvm.x86.avx512.vpermi2var.qi.512")
    quarters = [builder.load(builder.gep(table, [ir.Constant(_I64, q)]), align=1)
                for q in range(4)]
    low = builder.call(permute, [quarters[0], index, quarters[1]])  # entries 0..127
    high = builder.call(permute, [quarters[2], index, quarters[3]])  # entries 128..255
    upper = builder.icmp_signed("<", index, _splat(_V8, 0))  # bit 7 set
    return builder.select(upper, high, low)


@intrinsic
def _gate64(typingctx, r, v, out, i, table):
    """out[i : i + 64] = sat8((table[r + 127] v) >> 7) for int8 r, v, out (1-D, C) and a
    uint8 table of 256 entries: int16 products, exact for entries up to 128. Within the int8
    convention the result needs no saturation; v = -128 outside it does, as in the
    reference."""
    arrays = (r, v, out)
    if not (all(isinstance(a, types.Array) and a.ndim == 1 and a.layout == "C"
                and a.dtype == types.int8 for a in arrays)
            and isinstance(table, types.Array) and table.ndim == 1 and table.layout == "C"
            and table.dtype == types.uint8):
        return None
    sig = types.void(r, v, out, i, table)

    def codegen(context, builder, signature, args):
        vr, vv, vout, vi, vtable = args
        ar, av, aout, atable = (context.make_array(signature.args[k])(context, builder, args[k])
                                for k in (0, 1, 2, 4))
        start = builder.sext(vi, _I64) if vi.type.width < 64 else vi

        def block(array):
            return builder.bitcast(builder.gep(array.data, [start]), _V8.as_pointer())

        index = builder.add(builder.load(block(ar), align=1), _splat(_V8, INT8_MAX))
        gate = _lookup(builder, builder.bitcast(atable.data, _V8.as_pointer()), index)
        product = builder.mul(builder.zext(gate, _V16),
                              builder.sext(builder.load(block(av), align=1), _V16))
        shifted = builder.ashr(product, _splat(_V16, 7))
        low, high = _splat(_V16, -INT8_MAX), _splat(_V16, INT8_MAX)
        shifted = builder.select(builder.icmp_signed("<", shifted, low), low, shifted)
        shifted = builder.select(builder.icmp_signed(">", shifted, high), high, shifted)
        result = builder.trunc(shifted, _V8)
        builder.store(result, block(aout), align=1)
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def _lookup64(typingctx, x, out, i, table):
    """out[i : i + 64] = table[x + 127] for int8 x, uint8 out (1-D, C) and 256 table bytes."""
    if not (isinstance(x, types.Array) and x.ndim == 1 and x.layout == "C"
            and x.dtype == types.int8 and isinstance(out, types.Array) and out.ndim == 1
            and out.layout == "C" and out.dtype == types.uint8
            and isinstance(table, types.Array) and table.ndim == 1 and table.layout == "C"
            and table.dtype == types.uint8):
        return None
    sig = types.void(x, out, i, table)

    def codegen(context, builder, signature, args):
        ax, aout, atable = (context.make_array(signature.args[k])(context, builder, args[k])
                            for k in (0, 1, 3))
        start = builder.sext(args[2], _I64) if args[2].type.width < 64 else args[2]

        def block(array):
            return builder.bitcast(builder.gep(array.data, [start]), _V8.as_pointer())

        index = builder.add(builder.load(block(ax), align=1), _splat(_V8, INT8_MAX))
        value = _lookup(builder, builder.bitcast(atable.data, _V8.as_pointer()), index)
        builder.store(value, block(aout), align=1)
        return context.get_dummy_value()

    return sig, codegen


@njit(inline="always", cache=True)
def _lookup_one(x, table):
    return table[np.int32(x) + INT8_MAX]


@njit(nogil=True, cache=True)
def _lookup_vbmi(x, out, table):
    n = x.shape[0]
    i = 0
    while i + LANES <= n:
        _lookup64(x, out, i, table)
        i += LANES
    for j in range(i, n):
        out[j] = _lookup_one(x[j], table)


@njit(nogil=True, cache=True)
def _lookup_loop(x, out, table):
    for j in range(x.shape[0]):
        out[j] = _lookup_one(x[j], table)


_lookup_bytes = _lookup_vbmi if HAVE_VBMI else _lookup_loop


def lookup_flat(x: np.ndarray, table: np.ndarray) -> np.ndarray:
    """uint8 table[x + 127] for an int8 array x of any shape (``byte_table``'s 256 bytes)."""
    out = np.empty(x.shape, dtype=np.uint8)
    _lookup_bytes(np.ascontiguousarray(x).reshape(-1), out.reshape(-1), table)
    return out


@njit(inline="always", cache=True)
def _gate_one(r, v, table):
    g = (np.int32(table[np.int32(r) + INT8_MAX]) * np.int32(v)) >> 7
    return np.int8(min(max(g, -INT8_MAX), INT8_MAX))


@njit(nogil=True, cache=True)
def _gate_vbmi(r, v, out, table):
    n = v.shape[0]
    i = 0
    while i + LANES <= n:
        _gate64(r, v, out, i, table)
        i += LANES
    for j in range(i, n):
        out[j] = _gate_one(r[j], v[j], table)


@njit(nogil=True, cache=True)
def _gate_loop(r, v, out, table):
    for j in range(v.shape[0]):
        out[j] = _gate_one(r[j], v[j], table)


_gate = _gate_vbmi if HAVE_VBMI else _gate_loop


def sigmoid_gate_flat(r: np.ndarray, v: np.ndarray, out: np.ndarray) -> None:
    """out = sat8((sigmoid(r) v) >> 7) elementwise over 1-D C-contiguous int8 arrays."""
    _gate(r, v, out, GATE_TABLE)


def _exp2_bytes(shift: int) -> np.ndarray:
    """Byte ``shift // 8`` of EXP2_TABLE[i] for i = 1..254 (entry 0, 2^16, is counted apart:
    the others are below 2^16), as 256 uint8 indexed by i."""
    table = np.zeros(256, dtype=np.uint8)
    table[1:len(EXP2_TABLE)] = (EXP2_TABLE[1:] >> shift) & 0xFF
    return table


EXP2_LOW, EXP2_HIGH = _exp2_bytes(0), _exp2_bytes(8)
assert EXP2_TABLE[0] == 1 << 16 and EXP2_TABLE[1:].max() < 1 << 16


@intrinsic
def _exp2_sum64(typingctx, z, row, col, top, low, high):
    """sum of EXP2_TABLE[top - z[row, col + j]] for j < 64 (int64), z an int8 (rows, vocab)
    C array with top - z in 0..254: the table's low and high bytes looked up (``_lookup``)
    and summed by vpsadbw, plus 2^16 for each j where z = top."""
    tables = (low, high)
    if not (isinstance(z, types.Array) and z.ndim == 2 and z.layout == "C"
            and z.dtype == types.int8
            and all(isinstance(t, types.Array) and t.ndim == 1 and t.layout == "C"
                    and t.dtype == types.uint8 for t in tables)):
        return None
    sig = types.int64(z, row, col, top, low, high)

    def codegen(context, builder, signature, args):
        b = builder
        az, alow, ahigh = (context.make_array(signature.args[k])(context, b, args[k])
                           for k in (0, 4, 5))

        def i64(v):
            return b.sext(v, _I64) if v.type.width < 64 else v

        stride = cgutils.unpack_tuple(b, az.strides, 2)[0]
        offset = b.add(b.mul(i64(args[1]), stride), i64(args[2]))
        zv = b.load(b.bitcast(b.gep(az.data, [offset]), _V8.as_pointer()), align=1)
        top = b.trunc(args[3], _I8) if args[3].type.width > 8 else args[3]
        one = b.insert_element(ir.Constant(_V8, ir.Undefined), top, ir.Constant(_I64, 0))
        tops = b.shuffle_vector(one, ir.Constant(_V8, ir.Undefined),
                                ir.Constant(ir.VectorType(ir.IntType(32), LANES), [0] * LANES))
        index = b.sub(tops, zv)  # 0..254, bit 7 read by _lookup as the upper half
        v64 = ir.VectorType(_I64, 8)
        sad = cgutils.get_or_insert_function(
            b.module, ir.FunctionType(v64, [_V8, _V8]), "llvm.x86.avx512.psad.bw.512")
        reduce = cgutils.get_or_insert_function(
            b.module, ir.FunctionType(_I64, [v64]), "llvm.vector.reduce.add.v8i64")
        zero = ir.Constant(_V8, [0] * LANES)
        sums = [b.call(reduce, [b.call(sad, [_lookup(b, b.bitcast(a.data, _V8.as_pointer()),
                                                     index), zero])])
                for a in (alow, ahigh)]
        tops_hit = b.bitcast(b.icmp_unsigned("==", index, zero), _I64)
        popcount = cgutils.get_or_insert_function(
            b.module, ir.FunctionType(_I64, [_I64]), "llvm.ctpop.i64")
        count = b.call(popcount, [tops_hit])
        total = b.add(sums[0], b.shl(sums[1], ir.Constant(_I64, 8)))
        return b.add(total, b.shl(count, ir.Constant(_I64, 16)))

    return sig, codegen


@njit(inline="always", cache=True)
def _exp2_sum_vbmi(z, m, top):
    total = np.int64(0)
    j = 0
    while j + LANES <= z.shape[1]:
        total += _exp2_sum64(z, m, j, top, EXP2_LOW, EXP2_HIGH)
        j += LANES
    for k in range(j, z.shape[1]):
        total += EXP2_TABLE[top - z[m, k]]
    return np.int32(total)


@njit(inline="always", cache=True)
def _exp2_sum_loop(z, m, top):
    total = np.int32(0)
    for k in range(z.shape[1]):
        total = np.add(total, EXP2_TABLE[top - z[m, k]])
    return total


# sum over row m of int8 logits z of EXP2_TABLE[top - z] (int32; top is the row's max)
exp2_sum = _exp2_sum_vbmi if HAVE_VBMI else _exp2_sum_loop
