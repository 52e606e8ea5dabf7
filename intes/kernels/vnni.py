"""int8 dot products on AVX-512 VNNI, for the rank-1 projections of the cpu backend.

A perturbed linear layer projects each member's input onto its pair's factor, x_m . b_p, for
both members of every pair: 2 x fan-in multiply-adds per pair per token, the largest part of
ES's own work on the CPU. numba vectorizes that loop in int32 lanes (16 products per
instruction); VNNI's vpdpbusd sums 64 uint8 x int8 products into int32 in one instruction.
LLVM does not form it from a loop, so ``pair_dot`` emits it from IR, with the signed x made
unsigned by x + 128 (xor 0x80) and the 128 sum(b) that adds taken off again (also by vpdpbusd,
against ones): exact, as every partial sum stays far inside int32 (|x| <= 127, |b| <= 127,
fan-in < 2^16). A length that is not a multiple of 64 ends in one block of masked loads (a
scalar tail of 32 cost as much as the whole vector loop at width 96).

numba's on-disk cache keys a kernel on its own source file only: after editing this module,
delete the ``*.nbi``/``*.nbc`` files under ``intes/kernels/__pycache__`` (or touch cpu.py), or
the cpu kernels keep the old inlined code.

``HAVE_VNNI`` says whether this CPU has the instruction (as LLVM sees the host); without it
``pair_dot`` is ``pair_dot_loop``, numba's own loop, with the same results.
"""

from __future__ import annotations

import numpy as np
from llvmlite import binding as llvm
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

LANES = 64  # int8 lanes of one 512-bit register
HAVE_VNNI = bool(llvm.get_host_cpu_features().get("avx512vnni", False))

_I8, _I32 = ir.IntType(8), ir.IntType(32)
_V8, _V32 = ir.VectorType(_I8, LANES), ir.VectorType(_I32, LANES // 4)
_MASK = ir.VectorType(ir.IntType(1), LANES)
_LANE_INDEX = ir.Constant(_V8, [ir.Constant(_I8, i) for i in range(LANES)])


def _splat(vec_type: ir.VectorType, value: int) -> ir.Constant:
    return ir.Constant(vec_type, [ir.Constant(vec_type.element, value)] * vec_type.count)


def _splat_value(builder: ir.IRBuilder, value: ir.Value) -> ir.Value:
    """A vector of LANES copies of an i8 value."""
    one = builder.insert_element(ir.Constant(_V8, ir.Undefined), value, _I32(0))
    return builder.shuffle_vector(one, ir.Constant(_V8, ir.Undefined),
                                  ir.Constant(ir.VectorType(_I32, LANES), [0] * LANES))


@intrinsic
def _dot(typingctx, x0, x1, b, n):
    """(sum x0 b, sum x1 b) over the first n elements of three int8 C arrays, as int32, by
    vpdpbusd: whole 64-element blocks in a loop, the rest as one block of masked loads (the
    lanes past n read as zero and add nothing)."""
    if not all(isinstance(t, types.Array) and t.ndim == 1 and t.layout == "C"
               and t.dtype == types.int8 for t in (x0, x1, b)):
        return None  # unit stride is what the vector loads assume
    sig = types.UniTuple(types.int32, 2)(x0, x1, b, n)

    def codegen(context, builder, signature, args):
        ax0, ax1, ab, length = args
        ptrs = [context.make_array(t)(context, builder, v).data
                for t, v in zip(signature.args[:3], (ax0, ax1, ab), strict=True)]
        ptrs = [builder.bitcast(p, _V8.as_pointer()) for p in ptrs]
        dpbusd = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(_V32, [_V32, _V32, _V32]),
            "llvm.x86.avx512.vpdpbusd.512")
        reduce_add = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(_I32, [_V32]), "llvm.vector.reduce.add.v16i32")
        masked_load = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(_V8, [_V8.as_pointer(), _I32, _MASK, _V8]),
            "llvm.masked.load.v64i8.p0")
        bias, ones = _splat(_V8, 0x80), builder.bitcast(_splat(_V8, 1), _V32)
        zero, zero8 = _splat(_V32, 0), _splat(_V8, 0)
        i64 = ir.IntType(64)
        length = builder.sext(length, i64) if length.type.width < 64 else length
        count = builder.sdiv(length, i64(LANES))

        def accumulate(accs, load):
            """The three sums after one more block: x0 b, x1 b and b (against ones)."""
            vb = builder.bitcast(load(ptrs[2]), _V32)
            new = [builder.call(dpbusd, [acc, builder.bitcast(builder.xor(load(ptr), bias),
                                                              _V32), vb])
                   for acc, ptr in zip(accs[:2], ptrs[:2], strict=True)]
            return [*new, builder.call(dpbusd, [accs[2], ones, vb])]

        entry = builder.basic_block
        loop = builder.append_basic_block("vnni.loop")
        done = builder.append_basic_block("vnni.done")
        builder.cbranch(builder.icmp_signed(">", count, i64(0)), loop, done)

        builder.position_at_end(loop)
        i = builder.phi(i64)
        accs = [builder.phi(_V32) for _ in range(3)]
        i.add_incoming(i64(0), entry)
        for acc in accs:
            acc.add_incoming(zero, entry)
        new = accumulate(accs, lambda ptr: builder.load(builder.gep(ptr, [i]), align=1))
        nxt = builder.add(i, i64(1))
        for acc, value in zip(accs, new, strict=True):
            acc.add_incoming(value, loop)
        i.add_incoming(nxt, loop)
        builder.cbranch(builder.icmp_signed("<", nxt, count), loop, done)

        builder.position_at_end(done)
        sums = []
        for value in new:  # each sum: zero without whole blocks, else its last loop value
            phi = builder.phi(_V32)
            phi.add_incoming(zero, entry)
            phi.add_incoming(value, loop)
            sums.append(phi)
        rest = builder.trunc(builder.sub(length, builder.mul(count, i64(LANES))), _I8)
        mask = builder.icmp_unsigned("<", _LANE_INDEX, _splat_value(builder, rest))
        sums = accumulate(sums, lambda ptr: builder.call(
            masked_load, [builder.gep(ptr, [count]), _I32(1), mask, zero8]))
        total = [builder.call(reduce_add, [s]) for s in sums]
        shift = builder.shl(total[2], _I32(7))  # 128 sum(b)
        return context.make_tuple(builder, signature.return_type,
                                  [builder.sub(total[0], shift), builder.sub(total[1], shift)])

    return sig, codegen


@njit(inline="always", cache=True)
def _pair_dot_vnni(x0, x1, b):
    return _dot(x0, x1, b, b.shape[0])


@njit(inline="always", cache=True)
def pair_dot_loop(x0, x1, b):
    """(x0 . b, x1 . b) in int32, numba's own loop."""
    d0, d1 = np.int32(0), np.int32(0)
    for i in range(b.shape[0]):
        bi = np.int32(b[i])
        d0 = np.add(d0, np.multiply(np.int32(x0[i]), bi))
        d1 = np.add(d1, np.multiply(np.int32(x1[i]), bi))
    return d0, d1


# (x0 . b, x1 . b) in int32 of int8 C-contiguous 1-D arrays of one length
pair_dot = _pair_dot_vnni if HAVE_VNNI else pair_dot_loop
