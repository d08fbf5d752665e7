"""Tensor intrinsics of relayq's integer kernels (x86 AVX2, AVX-512 VNNI, AArch64 sdot, CUDA DP4A).

Every intrinsic computes a small int8 dot-product block ``C[i] += sum_k A[k] * B[i, k]`` (A is one
group of ``k`` input values broadcast to every lane ``i``, B holds ``lanes x k`` weights, C the int32
accumulators of ``lanes`` output channels).

Exactness scheme (mandatory: every kernel must equal :func:`relayq.qmath.requantize` bit for bit)
----------------------------------------------------------------------------------------------------
* ``vpmaddubsw`` (AVX2, :data:`AVX2_U8S8`) multiplies unsigned by signed bytes and **saturates each
  pair sum to int16**. The kernels first make the codes unsigned (``x + offset``, ``offset = -lo`` for
  codes that may be negative, taken back through the bias as ``offset * sum(W)``) and use it only when
  ``(hi + offset) * P <= 32767``, ``P`` the largest same-sign pair of weights
  (:func:`relayq.backend.x86.select_path`). Codes in ``[0, 127]`` (a fused ReLU, 7-bit activations)
  with any int8 weights: ``127 * 254 = 32258``; any 8-bit codes with weights of at most 7 bits:
  ``255 * 126 = 32130``. Both never saturate, so the result is exact.
* Signed int8 codes in ``[-127, 127]`` with int8 weights take :data:`AVX2_S8S8_SIGN` (and its row form
  :data:`AVX2_S8S8_SIGN_ROWS`): ``vpsignb`` moves each weight's sign onto its input
  (``w * x == |w| * (sign(w) x)``) and ``vpmaddubsw`` multiplies ``|w|`` (unsigned, at most 128) by the
  signed result, whose magnitude is at most 127: a pair sum is at most ``256 * 127 = 32512``, never
  saturated. (An input code of -128 would negate to itself, hence the range.)
* Otherwise the kernels use :data:`AVX2_S8S8`: both operands are sign- (or zero-) extended to int16
  (once: the input by the kernel's packing stage, the weight in numpy) and multiplied by
  ``vpmaddwd`` (int16 x int16 -> int32 pair sums), which is exact for any 8-bit input and for int16
  codes and weights (pair sum <= 2 * 32767^2 < 2^31). It is the path of 9..16-bit codes.
* ``vpdpbusd`` (VNNI, :data:`VNNI_U8S8`) sums four u8 x s8 products straight into int32 with no
  intermediate saturation, so it is exact for the full uint8 range. Possibly negative inputs are
  shifted to uint8 by ``+128`` (padding with 128) and ``128 * sum(W)`` is subtracted through the
  bias, which is again exact (see :mod:`relayq.backend.x86`).
* ``sdot`` (AArch64 +dotprod, :data:`ARM_SDOT`) sums four s8 x s8 products into int32 with no
  intermediate saturation: exact for any int8 input, no offset needed.
* DP4A (CUDA) has signed x signed and unsigned x signed forms that accumulate exactly into int32.

Registration is idempotent: :func:`register_all` (run on import) skips names already registered, so
re-imports and module reloads do not raise.

Note: this module never imports the ``tvm.s_tir.tensor_intrin`` package (its ``__init__`` parses
hundreds of CUDA intrinsics and takes ~40 s). TVM's DP4A intrinsics are loaded from the single leaf
file ``dot_product_common.py`` (~0.5 s) by :func:`dp4a_intrinsics`.

Example::

    >>> from relayq.backend import intrin
    >>> intrin.AVX2_U8S8, intrin.LANES[intrin.AVX2_U8S8], intrin.KPACK[intrin.AVX2_U8S8]
    ('relayq_dot_8x4_u8s8s32_avx2', 8, 4)
"""
from __future__ import annotations

import importlib.util
import os
import sys

import tvm
from tvm import s_tir
from tvm.script import tirx as T

# Names of the intrinsics (prefixed so that they never clash with TVM's or anybody else's).
AVX2_U8S8 = "relayq_dot_8x4_u8s8s32_avx2"
# The same dot product with the operands' roles swapped (weights broadcast, 8 output columns of uint8 input
# in the lanes): the stride-1 conv kernel whose tile runs along the output row (``x86._conv2d_int8_rows``).
AVX2_U8S8_ROWS = "relayq_dot_8x4_s8u8s32_rows_avx2"
AVX2_S8S8 = "relayq_dot_8x2_i16_s8s8s32_avx2"
# Exact s8 x s8 on bytes: vpsignb puts the weight's sign on the input, vpmaddubsw multiplies by |w|.
AVX2_S8S8_SIGN = "relayq_dot_8x4_s8s8s32_sign_avx2"
AVX2_S8S8_SIGN_ROWS = "relayq_dot_8x4_s8s8s32_sign_rows_avx2"
# The first s8 x s8 form: int8 operands sign-extended inside every call (kept registered; slower).
AVX2_S8S8_BYTES = "relayq_dot_8x2_s8s8s32_avx2"
VNNI_U8S8 = "relayq_dot_16x4_u8s8s32_vnni"
ARM_SDOT = "relayq_dot_4x4_s8s8s32_sdot"

# Output lanes of one intrinsic call: a ymm register holds 8 int32, a zmm register 16.
LANES = {AVX2_U8S8: 8, AVX2_U8S8_ROWS: 8, AVX2_S8S8: 8, AVX2_S8S8_BYTES: 8, AVX2_S8S8_SIGN: 8,
         AVX2_S8S8_SIGN_ROWS: 8, VNNI_U8S8: 16, ARM_SDOT: 4}
# Input values reduced per lane by one call: pmaddubsw+pmaddwd and vpdpbusd sum 4 bytes per int32
# lane; the exact s8s8 path sign-extends to int16 and vpmaddwd sums 2 of them.
KPACK = {AVX2_U8S8: 4, AVX2_U8S8_ROWS: 4, AVX2_S8S8: 2, AVX2_S8S8_BYTES: 2, AVX2_S8S8_SIGN: 4,
         AVX2_S8S8_SIGN_ROWS: 4, VNNI_U8S8: 4, ARM_SDOT: 4}
# dtype of the activation / weight operand each intrinsic expects. The exact s8 x s8 AVX2 path keeps
# int8 values in int16 storage (sign-extended once, by the packing stage and in numpy), so that the
# inner loop is one 32-bit broadcast, one vpmaddwd and one add per 16 products.
A_DTYPE = {AVX2_U8S8: "uint8", AVX2_U8S8_ROWS: "uint8", AVX2_S8S8: "int16", AVX2_S8S8_BYTES: "int8",
           AVX2_S8S8_SIGN: "int8", AVX2_S8S8_SIGN_ROWS: "int8", VNNI_U8S8: "uint8", ARM_SDOT: "int8"}
W_DTYPE = {AVX2_U8S8: "int8", AVX2_U8S8_ROWS: "int8", AVX2_S8S8: "int16", AVX2_S8S8_BYTES: "int8",
           AVX2_S8S8_SIGN: "int8", AVX2_S8S8_SIGN_ROWS: "int8", VNNI_U8S8: "int8", ARM_SDOT: "int8"}


def _dot_desc(lanes: int, kp: int, a_dtype: str, b_dtype: str):
    """The description every dot-product intrinsic here implements: ``C[i] += sum_k A[k] * B[i, k]`` over
    ``lanes`` int32 outputs and ``kp`` products each (``A`` the broadcast operand, ``B`` the lanes' own),
    in the operand dtypes the intrinsic reads."""

    @T.prim_func(s_tir=True)
    def desc(A: T.Buffer((kp,), a_dtype, offset_factor=1), B: T.Buffer((lanes, kp), b_dtype, offset_factor=1),
             C: T.Buffer((lanes,), "int32", offset_factor=1)) -> None:
        with T.sblock("root"):
            T.reads(C[0:lanes], A[0:kp], B[0:lanes, 0:kp])
            T.writes(C[0:lanes])
            for i in T.serial(0, lanes):
                for k in T.serial(0, kp):
                    with T.sblock("update"):
                        vi, vk = T.axis.remap("SR", [i, k])
                        C[vi] = C[vi] + T.cast(A[vk], "int32") * T.cast(B[vi, vk], "int32")

    return desc


# ----------------------------------------------------------------------------- AVX2 u8 x s8
@T.prim_func(s_tir=True)
def _u8s8_8x4_avx2(A: T.Buffer((4,), "uint8", offset_factor=1),
                   B: T.Buffer((8, 4), "int8", offset_factor=1),
                   C: T.Buffer((8,), "int32", offset_factor=1)) -> None:
    with T.sblock("root"):
        T.reads(C[0:8], A[0:4], B[0:8, 0:4])
        T.writes(C[0:8])
        a_i32 = T.reinterpret(A.vload([0], "uint8x4"), dtype="int32")
        a_u8x32 = T.reinterpret(T.broadcast(a_i32, 8), dtype="uint8x32")
        # vpmaddubsw: 16 int16 pair sums (exact only for A <= 127, see the module docstring)
        pairs = T.call_llvm_pure_intrin(T.llvm_lookup_intrinsic_id("llvm.x86.avx2.pmadd.ub.sw"),
                                        a_u8x32, B.vload([0, 0], dtype="int8x32"), dtype="int16x16")
        # vpmaddwd with ones: add neighbouring pairs into 8 int32 lanes
        C[T.ramp(T.int32(0), 1, 8)] += T.call_llvm_pure_intrin(
            T.llvm_lookup_intrinsic_id("llvm.x86.avx2.pmadd.wd"), pairs, T.int16x16(1), dtype="int32x8")


# ----------------------------------------------------------------------------- AVX2 s8 weights x u8 rows
@T.prim_func(s_tir=True)
def _s8u8_rows_avx2(A: T.Buffer((4,), "int8", offset_factor=1),
                    B: T.Buffer((8, 4), "uint8", offset_factor=1),
                    C: T.Buffer((8,), "int32", offset_factor=1)) -> None:
    with T.sblock("root"):
        T.reads(C[0:8], A[0:4], B[0:8, 0:4])
        T.writes(C[0:8])
        # the same vpmaddubsw + vpmaddwd as the u8s8 form with the roles swapped: the 4 weights of one
        # output channel broadcast, the lanes 8 output columns of uint8 input
        a_i32 = T.reinterpret(A.vload([0], "int8x4"), dtype="int32")
        a_s8x32 = T.reinterpret(T.broadcast(a_i32, 8), dtype="int8x32")
        pairs = T.call_llvm_pure_intrin(T.llvm_lookup_intrinsic_id("llvm.x86.avx2.pmadd.ub.sw"),
                                        B.vload([0, 0], dtype="uint8x32"), a_s8x32, dtype="int16x16")
        C[T.ramp(T.int32(0), 1, 8)] += T.call_llvm_pure_intrin(
            T.llvm_lookup_intrinsic_id("llvm.x86.avx2.pmadd.wd"), pairs, T.int16x16(1), dtype="int32x8")


# ----------------------------------------------------------------------------- AVX2 s8 x s8 by sign moves
def _sign_dot(x, w):
    """``sum`` of 4 int8 products per int32 lane: ``|w| * (sign(w) x)`` on ``vpmaddubsw`` (exact for
    ``x`` in [-127, 127], see the module docstring), then ``vpmaddwd`` with ones."""
    psign = T.llvm_lookup_intrinsic_id("llvm.x86.avx2.psign.b")
    signed_x = T.call_llvm_pure_intrin(psign, x, w, dtype="int8x32")
    abs_w = T.reinterpret(T.call_llvm_pure_intrin(psign, w, w, dtype="int8x32"), dtype="uint8x32")
    pairs = T.call_llvm_pure_intrin(T.llvm_lookup_intrinsic_id("llvm.x86.avx2.pmadd.ub.sw"), abs_w, signed_x,
                                    dtype="int16x16")
    return T.call_llvm_pure_intrin(T.llvm_lookup_intrinsic_id("llvm.x86.avx2.pmadd.wd"), pairs, T.int16x16(1),
                                   dtype="int32x8")


@T.prim_func(s_tir=True)
def _s8s8_sign_8x4_avx2(A: T.Buffer((4,), "int8", offset_factor=1),
                        B: T.Buffer((8, 4), "int8", offset_factor=1),
                        C: T.Buffer((8,), "int32", offset_factor=1)) -> None:
    with T.sblock("root"):
        T.reads(C[0:8], A[0:4], B[0:8, 0:4])
        T.writes(C[0:8])
        # A: 4 input codes broadcast; B: 8 output channels' 4 weights
        a = T.reinterpret(T.broadcast(T.reinterpret(A.vload([0], "int8x4"), dtype="int32"), 8), dtype="int8x32")
        C[T.ramp(T.int32(0), 1, 8)] += _sign_dot(a, B.vload([0, 0], dtype="int8x32"))


@T.prim_func(s_tir=True)
def _s8s8_sign_rows_avx2(A: T.Buffer((4,), "int8", offset_factor=1),
                         B: T.Buffer((8, 4), "int8", offset_factor=1),
                         C: T.Buffer((8,), "int32", offset_factor=1)) -> None:
    with T.sblock("root"):
        T.reads(C[0:8], A[0:4], B[0:8, 0:4])
        T.writes(C[0:8])
        # A: one output channel's 4 weights broadcast; B: 8 output columns' 4 input codes
        a = T.reinterpret(T.broadcast(T.reinterpret(A.vload([0], "int8x4"), dtype="int32"), 8), dtype="int8x32")
        C[T.ramp(T.int32(0), 1, 8)] += _sign_dot(B.vload([0, 0], dtype="int8x32"), a)


# ----------------------------------------------------------------------------- AVX2 s8 x s8 (exact)
@T.prim_func(s_tir=True)
def _s8s8_8x2_avx2(A: T.Buffer((2,), "int8", offset_factor=1),
                   B: T.Buffer((8, 2), "int8", offset_factor=1),
                   C: T.Buffer((8,), "int32", offset_factor=1)) -> None:
    with T.sblock("root"):
        T.reads(C[0:8], A[0:2], B[0:8, 0:2])
        T.writes(C[0:8])
        a_pair = T.reinterpret(T.Cast("int16x2", A.vload([0], "int8x2")), dtype="int32")
        a_i16 = T.reinterpret(T.broadcast(a_pair, 8), dtype="int16x16")
        b_i16 = T.Cast("int16x16", B.vload([0, 0], dtype="int8x16"))
        C[T.ramp(T.int32(0), 1, 8)] += T.call_llvm_pure_intrin(
            T.llvm_lookup_intrinsic_id("llvm.x86.avx2.pmadd.wd"), a_i16, b_i16, dtype="int32x8")


# ----------------------------------------------------------------------------- AVX2 s8 x s8 in int16
@T.prim_func(s_tir=True)
def _i16_8x2_avx2(A: T.Buffer((2,), "int16", offset_factor=1),
                  B: T.Buffer((8, 2), "int16", offset_factor=1),
                  C: T.Buffer((8,), "int32", offset_factor=1)) -> None:
    with T.sblock("root"):
        T.reads(C[0:8], A[0:2], B[0:8, 0:2])
        T.writes(C[0:8])
        a_pair = T.reinterpret(A.vload([0], "int16x2"), dtype="int32")
        a_i16 = T.reinterpret(T.broadcast(a_pair, 8), dtype="int16x16")
        # vpmaddwd: int16 x int16 pair sums in int32 (exact for int8-range values: |sum| <= 2 * 128^2)
        C[T.ramp(T.int32(0), 1, 8)] += T.call_llvm_pure_intrin(
            T.llvm_lookup_intrinsic_id("llvm.x86.avx2.pmadd.wd"), a_i16, B.vload([0, 0], dtype="int16x16"),
            dtype="int32x8")


# ----------------------------------------------------------------------------- AVX-512 VNNI
@T.prim_func(s_tir=True)
def _u8s8_16x4_vnni(A: T.Buffer((4,), "uint8", offset_factor=1),
                    B: T.Buffer((16, 4), "int8", offset_factor=1),
                    C: T.Buffer((16,), "int32", offset_factor=1)) -> None:
    with T.sblock("root"):
        T.reads(C[0:16], A[0:4], B[0:16, 0:4])
        T.writes(C[0:16])
        a_i32 = T.reinterpret(A.vload([0], "uint8x4"), dtype="int32")
        # LLVM 22 declares vpdpbusd.512 on <64 x i8> operands (TVM's stock impl passes <16 x i32>).
        a_u8x64 = T.reinterpret(T.broadcast(a_i32, 16), dtype="uint8x64")
        C[T.ramp(T.int32(0), 1, 16)] = T.call_llvm_pure_intrin(
            T.llvm_lookup_intrinsic_id("llvm.x86.avx512.vpdpbusd.512"),
            C.vload([0], dtype="int32x16"), a_u8x64, B.vload([0, 0], dtype="int8x64"), dtype="int32x16")


# ----------------------------------------------------------------------------- AArch64 sdot
@T.prim_func(s_tir=True)
def _s8s8_4x4_sdot(A: T.Buffer((4,), "int8", offset_factor=1),
                   B: T.Buffer((4, 4), "int8", offset_factor=1),
                   C: T.Buffer((4,), "int32", offset_factor=1)) -> None:
    with T.sblock("root"):
        T.reads(C[0:4], A[0:4], B[0:4, 0:4])
        T.writes(C[0:4])
        # sdot sums four s8 x s8 products into each int32 lane with no intermediate saturation: exact.
        a_i32 = T.reinterpret(A.vload([0], "int8x4"), dtype="int32")
        a_s8x16 = T.reinterpret(T.broadcast(a_i32, 4), dtype="int8x16")
        C[T.ramp(T.int32(0), 1, 4)] = T.call_llvm_pure_intrin(
            T.llvm_lookup_intrinsic_id("llvm.aarch64.neon.sdot.v4i32.v16i8"),
            C.vload([0], dtype="int32x4"), B.vload([0, 0], dtype="int8x16"), a_s8x16, dtype="int32x4")


_TABLE = {
    AVX2_U8S8: (_dot_desc(8, 4, "uint8", "int8"), _u8s8_8x4_avx2),
    AVX2_U8S8_ROWS: (_dot_desc(8, 4, "int8", "uint8"), _s8u8_rows_avx2),
    AVX2_S8S8: (_dot_desc(8, 2, "int16", "int16"), _i16_8x2_avx2),
    AVX2_S8S8_BYTES: (_dot_desc(8, 2, "int8", "int8"), _s8s8_8x2_avx2),
    AVX2_S8S8_SIGN: (_dot_desc(8, 4, "int8", "int8"), _s8s8_sign_8x4_avx2),
    AVX2_S8S8_SIGN_ROWS: (_dot_desc(8, 4, "int8", "int8"), _s8s8_sign_rows_avx2),
    VNNI_U8S8: (_dot_desc(16, 4, "uint8", "int8"), _u8s8_16x4_vnni),
    ARM_SDOT: (_dot_desc(4, 4, "int8", "int8"), _s8s8_4x4_sdot),
}


def register_all() -> list:
    """Register relayq's CPU intrinsics with ``tvm.s_tir.TensorIntrin`` (idempotent).

    Returns the names registered by this call (empty when they already were).

    >>> register_all()      # already done on import
    []
    """
    done = []
    for name, (desc, impl) in _TABLE.items():
        if s_tir.TensorIntrin.get(name, allow_missing=True) is None:
            s_tir.TensorIntrin.register(name, desc, impl)
            done.append(name)
    return done


_DP4A_MODULE = "tvm.s_tir.tensor_intrin.dot_product_common"


def dp4a_intrinsics() -> dict:
    """TVM's shipped DP4A intrinsic names, loading only the leaf module that registers them.

    ``import tvm.s_tir.tensor_intrin.dot_product_common`` would run the package ``__init__`` (which
    parses every CUDA intrinsic, ~40 s); this loads the single file (~0.5 s) under its real module
    name so that a later full import of the package reuses it instead of registering twice.
    Returns ``{"s8s8": name, "u8s8": name}``.

    >>> dp4a_intrinsics()["s8s8"]
    'dp4a_s8s8s32'
    """
    mod = sys.modules.get(_DP4A_MODULE)
    if mod is None:
        if s_tir.TensorIntrin.get("dp4a_s8s8s32", allow_missing=True) is not None:
            return {"s8s8": "dp4a_s8s8s32", "u8s8": "dp4a_u8s8s32"}
        path = os.path.join(os.path.dirname(s_tir.__file__), "tensor_intrin", "dot_product_common.py")
        spec = importlib.util.spec_from_file_location(_DP4A_MODULE, path)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[_DP4A_MODULE] = mod
        try:
            spec.loader.exec_module(mod)
        except Exception:
            del sys.modules[_DP4A_MODULE]
            raise
    return {"s8s8": mod.DP4A_S8S8S32_INTRIN, "u8s8": mod.DP4A_U8S8S32_INTRIN}


register_all()
