"""Table lookups and products of quantized tensors: the realized Relax chains are lowered to relayq's
kernels (:mod:`relayq.backend.elementwise`), bit-exact with the chains TVM's default pipeline runs."""
import numpy as np
import pytest
from tvm import relax

from relayq import qmath
from relayq.backend import lower as L

from .kutil import AVX2, GENERIC, cpu_flags, run_module

R = relax.op
TARGETS = [("avx2", AVX2, "x86-avx2", "avx2" in cpu_flags()), ("generic", GENERIC, "generic", True)]


def _lut_module(shape, in_dtype, table, qmin):
    """realize's table lookup: take(table, astype(q, int32) - qmin)."""
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(shape, in_dtype))
    with bb.function("main", [x]):
        with bb.dataflow():
            i = bb.emit(R.astype(x, "int32"))
            if qmin:
                i = bb.emit(R.subtract(i, relax.const(np.int32(qmin))))
            out = bb.emit_output(bb.emit(R.take(relax.const(table), i, axis=0, mode="clip")))
        bb.emit_func_output(out)
    return bb.get()


def _mul_module(a_shape, b_shape, m, s, lo=-127, hi=127):
    """realize's product of two int8 tensors, requantized: astype int32 x2, multiply, * M + R >> S, clip, int8."""
    bb = relax.BlockBuilder()
    a = relax.Var("a", relax.TensorType(a_shape, "int8"))
    b = relax.Var("b", relax.TensorType(b_shape, "int8"))
    with bb.function("main", [a, b]):
        with bb.dataflow():
            p = bb.emit(R.multiply(bb.emit(R.astype(a, "int32")), bb.emit(R.astype(b, "int32"))))
            t = bb.emit(R.multiply(bb.emit(R.astype(p, "int64")), relax.const(np.int64(m), "int64")))
            t = bb.emit(R.add(t, relax.const(np.int64(1 << (s - 1)), "int64")))
            t = bb.emit(R.right_shift(t, relax.const(np.int64(s), "int64")))
            out = bb.emit_output(bb.emit(R.astype(bb.emit(R.clip(t, lo, hi)), "int8")))
        bb.emit_func_output(out)
    return bb.get()


@pytest.mark.parametrize("name,target,kind,ok", TARGETS)
@pytest.mark.parametrize("in_dtype,bits,signed", [("int8", 8, True), ("uint8", 8, False), ("int8", 4, True),
                                                  ("int16", 12, True)])
def test_lut_kernel_is_exact_over_every_code(name, target, kind, ok, in_dtype, bits, signed):
    if not ok:
        pytest.skip(f"no {name} on this CPU")
    lo, hi = qmath.qrange(bits, signed)
    out_dtype = qmath.storage_dtype(bits, signed)
    table = qmath.lut_table(np.tanh, bits, 3.0 / hi, bits, 1.0 / hi, 0, 0, signed, signed).astype(out_dtype)
    codes = np.arange(lo, hi + 1)
    shape = (1, 2, 1, codes.size)
    x = np.broadcast_to(codes, shape).astype(in_dtype)
    mod = _lut_module(shape, in_dtype, table, lo)
    stats = []
    lowered = L.lower_quantized(mod, kind, stats=stats)
    assert [s["kind"] for s in stats] == ["lut"]
    assert L.lowered_kernels(lowered) and "take" not in lowered["main"].script()
    got, _ = run_module(lowered, target, x)
    want, _ = run_module(mod, target, x)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(got, qmath.lut_lookup(x, table, bits, signed).astype(out_dtype))


@pytest.mark.parametrize("name,target,kind,ok", TARGETS)
@pytest.mark.parametrize("a_shape,b_shape", [((1, 16, 7, 9), (1, 16, 1, 1)), ((2, 8, 4, 4), (2, 8, 4, 4)),
                                             ((1, 1, 1, 5), (1, 6, 3, 5))])
def test_multiply_kernel_is_exact_with_broadcasting(name, target, kind, ok, a_shape, b_shape):
    if not ok:
        pytest.skip(f"no {name} on this CPU")
    rng = np.random.RandomState(0)
    a = rng.randint(-127, 128, a_shape).astype(np.int8)
    b = rng.randint(-127, 128, b_shape).astype(np.int8)
    m, s = qmath.quantize_multiplier(0.05 * (1 / 127) / 0.04)
    mod = _mul_module(a_shape, b_shape, m, s, lo=0)
    stats = []
    lowered = L.lower_quantized(mod, kind, stats=stats)
    assert [st["kind"] for st in stats] == ["multiply"]
    got, _ = run_module(lowered, target, a, b)
    want, _ = run_module(mod, target, a, b)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(got, qmath.multiply(a, b, 0.05, 1 / 127, 0.04, 0, 127))
