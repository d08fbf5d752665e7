"""CUDA DP4A kernels: fused int8 dense and conv2d (implicit GEMM) + bias + requant + clip + cast.

Both use TVM's shipped ``dp4a_s8s8s32`` intrinsic (``__dp4a``: four int8 x int8 products summed
into int32, exact for any sign), loaded through :func:`relayq.backend.intrin.dp4a_intrinsics`
(the leaf module only). Operand tiles are staged in shared memory, the int32 accumulators stay in
registers ("local") and go through the requantization straight to the int8 output.

* dense ``(M, K) x (K, N)``: the input is padded/packed to ``[M', K'/4, 4]``, the weight packed in
  numpy to ``[N', K'/4, 4]``; thread block = ``DENSE_TY x DENSE_TX`` threads, each computing a
  ``DENSE_YI x DENSE_XI`` register tile.
* conv2d (groups=1): implicit GEMM over an NCHW4c copy of the padded input (no im2col matrix);
  the weight is packed to ``[O', C'/4, KH, KW, 4]``. A thread block computes
  ``CONV_TW * CONV_WI`` output columns of one output row for ``CONV_TO * CONV_OI`` channels.

Nothing here runs without a GPU; the tests compile for ``sm_61``+ and check ``dp4a`` in the PTX.

Example::

    >>> # k = dense_int8((4, 256), w_kn, b, rq)
    >>> # lib = tvm.compile(tvm.IRModule({"main": k.finalize("qdense")}), target=cuda_target)
"""
from __future__ import annotations

import numpy as np
from tvm import s_tir, te, tirx

from . import intrin
from .generic import Kernel, Requant, conv_out_hw, requant_expr

# dp4a reduces 4 int8 values per instruction.
KPACK = 4
# Dense thread-block tile: TY x TX threads, each YI x XI outputs (a 32 x 64 block tile).
DENSE_TY, DENSE_YI, DENSE_TX, DENSE_XI = 8, 4, 16, 4
# K blocks (of 4) staged in shared memory per iteration: 8 -> 32 int8 values of K.
DENSE_KB = 8
# Conv thread-block tile: TW x TO threads; each computes WI output columns x OI output channels.
CONV_TW, CONV_WI, CONV_TO, CONV_OI = 8, 2, 8, 4
# Input channel blocks (of 4) staged in shared memory per iteration.
CONV_CB = 4


def _ceil(a, b):
    return -(-a // b) * b


def _coop_fetch(sch, block, loop, threads):
    """cache_read into shared at ``loop``, copied cooperatively by all threads of the block."""
    sh = sch.cache_read(block[0], block[1], "shared")
    sch.compute_at(sh, loop, preserve_unit_loops=True)
    loops = sch.get_loops(sh)
    n_inner = len(sch.get(sh).iter_vars)
    fused = sch.fuse(*loops[-n_inner:])
    ty, tx = threads
    _, fy, fx = sch.split(fused, [None, ty, tx])
    sch.bind(fy, "threadIdx.y")
    sch.bind(fx, "threadIdx.x")
    return sh


def dense_int8(x_shape, weight_kn, bias, rq: Requant) -> Kernel:
    """Fused int8 dense for CUDA with DP4A (exact for signed inputs).

    >>> # k = dense_int8((1, 512), w_kn, b, rq)
    """
    name = intrin.dp4a_intrinsics()["s8s8"]
    weight_kn = np.asarray(weight_kn, np.int8)
    m, k = (int(v) for v in x_shape)
    n = weight_kn.shape[1]
    mp, np_, kp = _ceil(m, DENSE_TY * DENSE_YI), _ceil(n, DENSE_TX * DENSE_XI), _ceil(k, KPACK * DENSE_KB)
    A = te.placeholder((m, k), "int8", name="x")
    Wk = te.placeholder((np_, kp // KPACK, KPACK), "int8", name="w")
    B = te.placeholder((np_,), "int32", name="bias")
    tbl = te.placeholder((3, np_), "int64", name="rq") if rq.per_channel else None
    Ap = te.compute((mp, kp // KPACK, KPACK), lambda i, kb, ki: tirx.if_then_else(
        tirx.all(i < m, kb * KPACK + ki < k), A[tirx.min(i, m - 1), tirx.min(kb * KPACK + ki, k - 1)],
        tirx.const(0, "int8")), name="pack")
    rkb = te.reduce_axis((0, kp // KPACK), "kb")
    rki = te.reduce_axis((0, KPACK), "ki")
    acc = te.compute((mp, np_), lambda i, j: te.sum(
        Ap[i, rkb, rki].astype("int32") * Wk[j, rkb, rki].astype("int32"), axis=[rkb, rki]), name="acc")
    out = te.compute((m, n), lambda i, j: requant_expr(acc[i, j] + B[j], j, rq, tbl), name="out")
    args = [A, Wk, B] + ([tbl] if tbl is not None else []) + [out]
    sch = s_tir.Schedule(te.create_prim_func(args))

    pk = sch.get_sblock("pack")
    f = sch.fuse(*sch.get_loops(pk))
    bx, tx = sch.split(f, [None, 256])
    sch.bind(bx, "blockIdx.x")
    sch.bind(tx, "threadIdx.x")

    blk = sch.get_sblock("acc")
    i, j, kb, ki = sch.get_loops(blk)
    by, ty, yi = sch.split(i, [None, DENSE_TY, DENSE_YI])
    bx, tx, xi = sch.split(j, [None, DENSE_TX, DENSE_XI])
    ko, kin = sch.split(kb, [None, DENSE_KB])
    sch.reorder(by, bx, ty, tx, ko, kin, yi, xi, ki)
    sch.bind(by, "blockIdx.y")
    sch.bind(bx, "blockIdx.x")
    sch.bind(ty, "threadIdx.y")
    sch.bind(tx, "threadIdx.x")
    sch.set_scope(blk, 0, "local")
    for idx in (0, 1):
        _coop_fetch(sch, (blk, idx), ko, (DENSE_TY, DENSE_TX))
    outb = sch.get_sblock("out")
    sch.reverse_compute_at(outb, tx)
    init = sch.decompose_reduction(blk, ko)
    del init
    sch.tensorize(ki, name)

    wpad = np.zeros((kp, np_), np.int8)
    wpad[:k, :n] = weight_kn
    wk = np.ascontiguousarray(wpad.T.reshape(np_, kp // KPACK, KPACK))
    bpad = np.zeros(np_, np.int32)
    bpad[:n] = np.asarray(bias, np.int32).reshape(-1)
    consts = [wk, bpad] + ([rq.table(np_)] if tbl is not None else [])
    return Kernel(sch.mod["main"], consts, (m, n), "int8", "qdense_dp4a", {"intrin": name})


def conv2d_int8(x_shape, weight, bias, rq: Requant, strides, padding, dilation) -> Kernel:
    """Fused int8 conv2d (groups=1) for CUDA as an implicit GEMM with DP4A.

    >>> # k = conv2d_int8((1, 64, 56, 56), w_oihw, b, rq, (1, 1), (1, 1, 1, 1), (1, 1))
    """
    name = intrin.dp4a_intrinsics()["s8s8"]
    weight = np.asarray(weight, np.int8)
    n, c, h, w = (int(v) for v in x_shape)
    o, _, kh, kw = weight.shape
    oh, ow = conv_out_hw(h, w, kh, kw, strides, padding, dilation)
    op, cp, owp = _ceil(o, CONV_TO * CONV_OI), _ceil(c, KPACK * CONV_CB), _ceil(ow, CONV_TW * CONV_WI)
    sh, sw = strides
    dh, dw = dilation
    pt, pl = padding[0], padding[1]
    hp = max(h + padding[0] + padding[2], (oh - 1) * sh + (kh - 1) * dh + 1)
    wp = max(w + padding[1] + padding[3], (owp - 1) * sw + (kw - 1) * dw + 1)
    X = te.placeholder((n, c, h, w), "int8", name="x")
    Wk = te.placeholder((op, cp // KPACK, kh, kw, KPACK), "int8", name="w")
    B = te.placeholder((op,), "int32", name="bias")
    tbl = te.placeholder((3, op), "int64", name="rq") if rq.per_channel else None

    def pack(b, cb, i, j, ci):
        ch = cb * KPACK + ci
        ok = tirx.all(ch < c, i >= pt, i < pt + h, j >= pl, j < pl + w)
        return tirx.if_then_else(ok, X[b, tirx.min(ch, c - 1), i - pt, j - pl], tirx.const(0, "int8"))

    Xp = te.compute((n, cp // KPACK, hp, wp, KPACK), pack, name="pack")
    rcb = te.reduce_axis((0, cp // KPACK), "cb")
    ry = te.reduce_axis((0, kh), "kh")
    rx = te.reduce_axis((0, kw), "kw")
    rci = te.reduce_axis((0, KPACK), "ci")
    acc = te.compute((n, op, oh, owp), lambda b, oc, i, j: te.sum(
        Xp[b, rcb, i * sh + ry * dh, j * sw + rx * dw, rci].astype("int32")
        * Wk[oc, rcb, ry, rx, rci].astype("int32"), axis=[rcb, ry, rx, rci]), name="acc")
    out = te.compute((n, o, oh, ow), lambda b, oc, i, j: requant_expr(acc[b, oc, i, j] + B[oc], oc, rq, tbl),
                     name="out")
    args = [X, Wk, B] + ([tbl] if tbl is not None else []) + [out]
    sch = s_tir.Schedule(te.create_prim_func(args))

    pk = sch.get_sblock("pack")
    f = sch.fuse(*sch.get_loops(pk))
    bx, tx = sch.split(f, [None, 256])
    sch.bind(bx, "blockIdx.x")
    sch.bind(tx, "threadIdx.x")

    blk = sch.get_sblock("acc")
    b_, oc, i, j, cb, ry_, rx_, ci = sch.get_loops(blk)
    bo, to, oi = sch.split(oc, [None, CONV_TO, CONV_OI])
    bw, tw, wi = sch.split(j, [None, CONV_TW, CONV_WI])
    cbo, cbi = sch.split(cb, [None, CONV_CB])
    sch.reorder(bo, b_, i, bw, tw, to, cbo, ry_, rx_, cbi, wi, oi, ci)
    sch.bind(bo, "blockIdx.x")
    sch.bind(sch.fuse(b_, i, bw), "blockIdx.y")
    sch.bind(tw, "threadIdx.y")
    sch.bind(to, "threadIdx.x")
    sch.set_scope(blk, 0, "local")
    for idx in (0, 1):
        _coop_fetch(sch, (blk, idx), cbo, (CONV_TW, CONV_TO))
    outb = sch.get_sblock("out")
    sch.reverse_compute_at(outb, to)
    sch.decompose_reduction(blk, cbo)
    sch.tensorize(ci, name)

    wpad = np.zeros((op, cp, kh, kw), np.int8)
    wpad[:o, :c] = weight
    wk = np.ascontiguousarray(wpad.reshape(op, cp // KPACK, KPACK, kh, kw).transpose(0, 1, 3, 4, 2))
    bpad = np.zeros(op, np.int32)
    bpad[:o] = np.asarray(bias, np.int32).reshape(-1)
    consts = [wk, bpad] + ([rq.table(op)] if tbl is not None else [])
    return Kernel(sch.mod["main"], consts, (n, o, oh, ow), "int8", "qconv2d_dp4a", {"intrin": name})
