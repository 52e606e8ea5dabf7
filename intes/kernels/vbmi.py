"""256-entry byte tables looked up 64 bytes at a time, on AVX-512 VBMI.

RWKV's receptance gate sat8((sigmoid(r) v) >> 7) reads one table entry per element. numba
compiles that read to a scalar load per element (a gather, which LLVM does not vectorize
profitably): in one-thread profiles the gate took about 5% of an inference pass, and
about 1% with the lookup below. VBMI's vpermi2b picks 64 bytes out of 128 in one
instruction: two of them cover the 256 entries, bit 7 of each index chooses between them
(``_lookup``), and the gate's product and shift run in int16 lanes, 32 per register. The
WKV recurrence's exponent table (entries 1..251) is looked up the same way, for a whole
token block before the recurrence (``lookup_flat``), so the recurrence's loop reads bytes
where it gathered table entries.

``HAVE_VBMI`` says whether this CPU has it (as LLVM sees the host); without it both are
numba's own loops, with the same results.
"""

from __future__ import annotations

import numpy as np
from llvmlite import binding as llvm
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

from intes.intmath import INT8_MAX, SIGMOID_TABLE, WKV_EXP_TABLE
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
