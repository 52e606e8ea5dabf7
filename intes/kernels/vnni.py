"""int8 dot products on AVX-512 VNNI, for the rank-1 projections of the cpu backend.

A perturbed linear layer projects each member's input onto its pair's factor, x_m . b_p, for
both members of every pair: 2 x fan-in multiply-adds per pair per token, the largest part of
ES's own work on the CPU. numba vectorizes that loop in int32 lanes (16 products per
instruction); VNNI's vpdpbusd sums 64 uint8 x int8 products into int32 in one instruction.
LLVM does not form it from a loop, so ``pair_dot`` emits it from IR, with the signed x made
unsigned by x + 128 (xor 0x80) and the 128 sum(b) that adds taken off again (also by vpdpbusd,
against ones): exact, as every partial sum stays far inside int32 (|x| <= 127, |b| <= 127,
fan-in < 2^16).

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


def _splat(vec_type: ir.VectorType, value: int) -> ir.Constant:
    return ir.Constant(vec_type, [ir.Constant(vec_type.element, value)] * vec_type.count)


@intrinsic
def _dot_blocks(typingctx, x0, x1, b, blocks):
    """(sum x0 b, sum x1 b) over the first ``blocks`` 64-element blocks of three int8 C arrays,
    as int32, by vpdpbusd."""
    if not all(isinstance(t, types.Array) and t.ndim == 1 and t.layout == "C"
               and t.dtype == types.int8 for t in (x0, x1, b)):
        return None  # unit stride is what the vector loads assume
    sig = types.UniTuple(types.int32, 2)(x0, x1, b, blocks)

    def codegen(context, builder, signature, args):
        ax0, ax1, ab, nblocks = args
        ptrs = [context.make_array(t)(context, builder, v).data
                for t, v in zip(signature.args[:3], (ax0, ax1, ab), strict=True)]
        ptrs = [builder.bitcast(p, _V8.as_pointer()) for p in ptrs]
        dpbusd = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(_V32, [_V32, _V32, _V32]),
            "llvm.x86.avx512.vpdpbusd.512")
        reduce_add = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(_I32, [_V32]), "llvm.vector.reduce.add.v16i32")
        bias, ones, zero = _splat(_V8, 0x80), builder.bitcast(_splat(_V8, 1), _V32), _splat(_V32, 0)
        count = builder.zext(nblocks, ir.IntType(64)) if nblocks.type.width < 64 else nblocks

        entry = builder.basic_block
        loop = builder.append_basic_block("vnni.loop")
        done = builder.append_basic_block("vnni.done")
        builder.cbranch(builder.icmp_signed(">", count, count.type(0)), loop, done)

        builder.position_at_end(loop)
        i = builder.phi(count.type)
        accs = [builder.phi(_V32) for _ in range(3)]  # x0 b, x1 b, sum b
        i.add_incoming(count.type(0), entry)
        for acc in accs:
            acc.add_incoming(zero, entry)
        vb = builder.bitcast(builder.load(builder.gep(ptrs[2], [i]), align=1), _V32)
        new = []
        for acc, ptr in zip(accs[:2], ptrs[:2], strict=True):
            xu = builder.xor(builder.load(builder.gep(ptr, [i]), align=1), bias)
            new.append(builder.call(dpbusd, [acc, builder.bitcast(xu, _V32), vb]))
        new.append(builder.call(dpbusd, [accs[2], ones, vb]))
        nxt = builder.add(i, count.type(1))
        for acc, value in zip(accs, new, strict=True):
            acc.add_incoming(value, loop)
        i.add_incoming(nxt, loop)
        builder.cbranch(builder.icmp_signed("<", nxt, count), loop, done)

        builder.position_at_end(done)
        sums = []
        for value in new:  # each sum: zero without blocks, else its last update in the loop
            phi = builder.phi(_V32)
            phi.add_incoming(zero, entry)
            phi.add_incoming(value, loop)
            sums.append(phi)
        total = [builder.call(reduce_add, [s]) for s in sums]
        shift = builder.shl(total[2], _I32(7))  # 128 sum(b)
        return context.make_tuple(builder, signature.return_type,
                                  [builder.sub(total[0], shift), builder.sub(total[1], shift)])

    return sig, codegen


@njit(inline="always", cache=True)
def _dot_tail(x0, x1, b, start):
    d0, d1 = np.int32(0), np.int32(0)
    for i in range(start, b.shape[0]):
        bi = np.int32(b[i])
        d0 = np.add(d0, np.multiply(np.int32(x0[i]), bi))
        d1 = np.add(d1, np.multiply(np.int32(x1[i]), bi))
    return d0, d1


@njit(inline="always", cache=True)
def _pair_dot_vnni(x0, x1, b):
    blocks = b.shape[0] // LANES
    d0, d1 = _dot_blocks(x0, x1, b, blocks)
    t0, t1 = _dot_tail(x0, x1, b, blocks * LANES)
    return np.add(d0, t0), np.add(d1, t1)


@njit(inline="always", cache=True)
def pair_dot_loop(x0, x1, b):
    """(x0 . b, x1 . b) in int32, numba's own loop."""
    return _dot_tail(x0, x1, b, 0)


# (x0 . b, x1 . b) in int32 of int8 C-contiguous 1-D arrays of one length
pair_dot = _pair_dot_vnni if HAVE_VNNI else pair_dot_loop
