"""requant_expr: the split-shift form (S >= 32) and the plain int64 form agree with qmath bit for bit."""
import numpy as np
import pytest
import tvm
from tvm import te

from relayq import qmath
from relayq.backend.generic import Requant, requant_expr

from .kutil import AVX2, cpu_flags

TARGET = AVX2 if "avx2" in cpu_flags() else "llvm"


def _run(rq, acc, per_channel):
    o, n = acc.shape
    A = te.placeholder((o, n), "int32", name="a")
    tbl = te.placeholder((3, o), "int64", name="t") if per_channel else None
    B = te.compute((o, n), lambda c, i: requant_expr(A[c, i], c, rq, tbl), name="b")
    sch = tvm.s_tir.Schedule(te.create_prim_func([A] + ([tbl] if tbl is not None else []) + [B]))
    sch.vectorize(sch.get_loops(sch.get_sblock("b"))[-1])             # the vector form LLVM sees
    lib = tvm.compile(sch.mod, target=TARGET)
    out = tvm.runtime.tensor(np.zeros((o, n), np.int8))
    args = [tvm.runtime.tensor(acc)] + ([tvm.runtime.tensor(rq.table(o))] if per_channel else []) + [out]
    lib["main"](*args)
    return out.numpy()


@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("reals", [(3e-4, 2e-2), (0.3, 0.9), (1.5, 40.0)])
def test_requant_forms_exact(per_channel, reals):
    rng = np.random.default_rng(3)
    o = 4 if per_channel else 1
    m, s = qmath.quantize_multipliers(rng.uniform(*reals, o))
    rq = Requant.from_arrays(m, np.left_shift(np.int64(1), np.asarray(s) - 1), s, -127, 127)
    if reals[0] < 0.01:
        assert rq.split_shift
    if reals[0] > 1:
        assert not rq.split_shift
    acc = np.concatenate([rng.integers(-2**31, 2**31, (o, 48)), rng.integers(-3000, 3000, (o, 16)),
                          np.array([[-2**31, 2**31 - 1, 0, -1, 1, 255, -255, 2**20]] * o)], axis=1).astype(np.int32)
    ref = qmath.requantize(acc.astype(np.int64), rq.multiplier if per_channel else int(rq.multiplier),
                           rq.shift if per_channel else int(rq.shift), -127, 127, axis=0 if per_channel else None)
    np.testing.assert_array_equal(_run(rq, acc, per_channel), ref.astype(np.int8))
