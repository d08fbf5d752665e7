"""Scheduled kernels for realized elementwise layers: table lookups and products of two quantized tensors.

* :func:`lut_kernel`: ``out = table[x - qmin]`` (realize's ``take(table, astype(x, int32) - qmin)``)
  over an int8 / uint8 / int16 tensor: one parallel gather from a table of at most
  ``2^16`` entries (256 bytes at 8 bits: it stays in L1).
* :func:`multiply_kernel`: ``out = requant(int32(a) * int32(b))`` with numpy broadcasting (the
  squeeze-excitation gate ``x * s`` with ``s`` of shape ``(N, C, 1, 1)``), requantized by
  :func:`relayq.backend.generic.requant_expr`, so the int32 product never reaches memory.

Both are bit-exact with the Relax chains that :mod:`relayq.transform.realize` emits (the same integer
operations, in the same order). Everything is TE + ``s_tir.Schedule``: no intrinsics.

Example::

    >>> import numpy as np
    >>> k = lut_kernel((1, 8, 4, 4), "int8", np.arange(255, dtype=np.int8) // 2, -127)
    >>> k.out_shape, k.out_dtype
    ((1, 8, 4, 4), 'int8')
"""
from __future__ import annotations

import numpy as np
from tvm import te, tirx

from . import generic
from .generic import Kernel, Requant, requant_expr

# Elements per vector of the product kernel (a multiple of every ISA's lane count).
MUL_VECTOR = 32
# Unroll factor of the table kernel's inner loop (see lut_kernel).
LUT_UNROLL = 8
# Elements per parallel task: large enough that the thread-pool dispatch (a few microseconds) is paid
# back, small enough that a 56x56x64 tensor still splits over every core.
TASK_ELEMENTS = 8192


def _split_parallel(sch, block, size, inner, vectorize: bool = True):
    loop = sch.fuse(*sch.get_loops(block))
    vec = inner if size % inner == 0 else next(v for v in (8, 4, 2, 1) if size % v == 0)
    chunks = size // vec
    per_task = max(1, min(chunks, TASK_ELEMENTS // vec))
    while chunks % per_task:
        per_task -= 1
    outer, mid, ii = sch.split(loop, [None, per_task, vec])
    sch.parallel(outer)
    if vectorize:
        sch.vectorize(ii)
    else:
        sch.unroll(ii)
    return vec


def lut_kernel(shape, in_dtype: str, table, offset: int) -> Kernel:
    """``out[i] = table[int32(x[i]) - offset]``; ``table`` is a constant argument of its own dtype.

    >>> # k = lut_kernel((1, 64, 56, 56), "int8", table_int8_255, -127)
    """
    shape = tuple(int(v) for v in shape)
    table = np.ascontiguousarray(table)
    x = te.placeholder(shape, in_dtype, name="x")
    tab = te.placeholder(table.shape, str(table.dtype), name="table")
    off = tirx.const(int(offset), "int32")
    out = te.compute(shape, lambda *i: tab[x[i].astype("int32") - off], name="out")
    sch = generic.schedule(te.create_prim_func([x, tab, out]), int(np.prod(shape)), generic.PARALLEL_MIN_ELEMENTS)
    loops = sch.get_loops(sch.get_sblock("out"))
    # Parallel over the outer dims (N x C), an inner loop over the rest unrolled by LUT_UNROLL. Measured
    # on (1, 64, 56, 56): splitting the fully fused loop is 4x slower (its index arithmetic no longer
    # simplifies); without the unroll, LLVM vectorizes the byte gather with AVX-512 gathers for
    # cascadelake, 2.6x slower than the unrolled scalar loads (same speed on core-avx2 and generic).
    if len(loops) >= 3:
        sch.parallel(sch.fuse(*loops[:-2]))
        inner = sch.fuse(*loops[-2:])
        n_inner = int(np.prod(shape[-2:]))
    else:
        sch.parallel(loops[0])
        inner, n_inner = (loops[1], int(shape[1])) if len(loops) == 2 else (None, 1)
    unroll = next((u for u in (LUT_UNROLL, 4, 2) if n_inner % u == 0 and n_inner > u), None)
    if inner is not None and unroll is not None:
        sch.unroll(sch.split(inner, [None, unroll])[1])
    return Kernel(sch.mod["main"], [table], shape, str(table.dtype), "qlut", {"entries": int(table.size)})


def lut_fusable(shape, in_dtype: str, table, offset: int) -> Kernel:
    """The table lookup of :func:`lut_kernel` as a plain, unscheduled compute marked injective
    (``op_pattern`` 2), so that TVM's FuseOps merges it with the elementwise ops around it (an LSTM
    cell's slices, lookups, products and adds become one function per step). For small tensors, where
    a kernel call of its own costs more than its work.

    >>> k = lut_fusable((1, 96), "int8", np.arange(256, dtype=np.int8), -128)
    >>> int(k.func.attrs["op_pattern"]), k.info["fusable"]
    (2, True)
    """
    shape = tuple(int(v) for v in shape)
    table = np.ascontiguousarray(table)
    # int64 extents, as TVM's legalized ops use: FuseTIR maps buffers of one Relax var across functions
    x = te.placeholder([tirx.IntImm("int64", v) for v in shape], in_dtype, name="x")
    tab = te.placeholder([tirx.IntImm("int64", v) for v in table.shape], str(table.dtype), name="table")
    off = tirx.const(int(offset), "int32")
    out = te.compute(x.shape, lambda *i: tab[x[i].astype("int32") - off], name="out")
    func = te.create_prim_func([x, tab, out]).with_attr("op_pattern", generic.OP_PATTERN_INJECTIVE)
    return Kernel(func, [table], shape, str(table.dtype), "qlut", {"entries": int(table.size), "fusable": True})


def _bcast_index(in_shape, out_shape):
    """Index function of an input broadcast (numpy rules, aligned right) to ``out_shape``."""
    lead = len(out_shape) - len(in_shape)

    def index(idx):
        return tuple(idx[lead + k] if in_shape[k] != 1 else 0 for k in range(len(in_shape)))

    return index


def _uniform_tail(out_shape, in_shapes) -> int:
    """The first dim of the longest run of trailing dims along which every input is either whole or broadcast."""
    nd = len(out_shape)
    aligned = [(1,) * (nd - len(s)) + tuple(s) for s in in_shapes]

    def uniform(t):
        return all(len({s[k] == out_shape[k] for k in range(t, nd)}) == 1 for s in aligned)

    t = nd
    while t > 0 and uniform(t - 1):
        t -= 1
    return t


def multiply_kernel(a_shape, b_shape, a_dtype: str, b_dtype: str, out_shape, rq: Requant) -> Kernel:
    """``out = clip(((int32(a) * int32(b)) * M + R) >> S)`` as int8, with ``b`` (or ``a``) broadcast.

    >>> # k = multiply_kernel((1, 64, 56, 56), (1, 64, 1, 1), "int8", "int8", (1, 64, 56, 56), rq)
    """
    a_shape, b_shape, out_shape = (tuple(int(v) for v in s) for s in (a_shape, b_shape, out_shape))
    a = te.placeholder(a_shape, a_dtype, name="a")
    b = te.placeholder(b_shape, b_dtype, name="b")
    ia, ib = _bcast_index(a_shape, out_shape), _bcast_index(b_shape, out_shape)
    out = te.compute(out_shape, lambda *i: requant_expr(a[ia(i)].astype("int32") * b[ib(i)].astype("int32"), 0, rq,
                                                        None), name="out")
    sch = generic.schedule(te.create_prim_func([a, b, out]), int(np.prod(out_shape)), generic.PARALLEL_MIN_ELEMENTS)
    blk = sch.get_sblock("out")
    loops = sch.get_loops(blk)
    t = _uniform_tail(out_shape, [a_shape, b_shape])
    inner_size = int(np.prod(out_shape[t:])) if t < len(out_shape) else 1
    if t == 0 or inner_size < 8:
        vec = _split_parallel(sch, blk, int(np.prod(out_shape)), MUL_VECTOR, vectorize=True)
    else:
        # Outer loops (where the broadcast operand changes) run in parallel; along the inner ones each
        # operand is either contiguous or one value, so the inner loop is a plain vector loop.
        outer = sch.fuse(*loops[:t]) if t > 1 else loops[0]
        inner = sch.fuse(*loops[t:]) if len(out_shape) - t > 1 else loops[t]
        vec = MUL_VECTOR if inner_size % MUL_VECTOR == 0 else next(v for v in (16, 8, 4, 2, 1) if inner_size % v == 0)
        _, ii = sch.split(inner, [None, vec])
        sch.parallel(outer)
        sch.vectorize(ii)
    return Kernel(sch.mod["main"], [], out_shape, "int8", "qmul", {"vector": vec, "split_shift": rq.split_shift})
