"""relayq.backend.fast_math: float exp / erf / tanh become vectorizable polynomials on CPU builds, within
a few float32 ulps of the exact functions."""
import numpy as np
import pytest
import tvm
from tvm import relax

from relayq.backend import presets, schedule_rest
from relayq.backend.fast_math import fast_math

from .kutil import cpu_flags

OPS = {"exp": (relax.op.exp, np.exp, (-80.0, 80.0)),
       "erf": (relax.op.erf, None, (-6.0, 6.0)),
       "tanh": (relax.op.tanh, np.tanh, (-12.0, 12.0))}


def _module(op, n):
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((n,), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit_output(bb.emit(OPS[op][0](x)))
        bb.emit_func_output(y)
    return bb.get()


def _erf64(x):
    import math
    return np.array([math.erf(v) for v in x.astype(np.float64)])


@pytest.mark.parametrize("op", sorted(OPS))
def test_fast_math_replaces_the_op(op):
    assert f"R.{op}(" in _module(op, 8).script()
    out = fast_math()(_module(op, 8)).script()
    assert f"R.{op}(" not in out and "call_tir" in out


@pytest.mark.skipif("avx2" not in cpu_flags(), reason="this CPU has no AVX2")
@pytest.mark.parametrize("op", sorted(OPS))
def test_fast_math_accuracy_and_no_libm_calls(op):
    """Against float64 on a dense grid over the float32 range that matters: relative error <= 5e-7 (a few
    ulps) plus 1e-7 absolute near zero; the compiled kernel is vectorized."""
    lo, hi = OPS[op][2]
    x = np.linspace(lo, hi, 20001).astype(np.float32)
    tgt = presets.target_from_preset("x86-avx2")
    ex = tvm.compile(_module(op, x.size), target=tgt, relax_pipeline=presets.relax_pipeline(tgt))
    got = relax.VirtualMachine(ex, tvm.cpu())["main"](tvm.runtime.tensor(x)).numpy().astype(np.float64)
    ref = _erf64(x) if op == "erf" else OPS[op][1](x.astype(np.float64))
    np.testing.assert_allclose(got, ref, rtol=5e-7, atol=1e-7)
    # vectorized: 8-lane ymm arithmetic (TVM's exact lowering of these ops runs one scalar xmm lane at a time)
    assert ex.mod.imports[0].inspect_source("asm").count("ymm") >= 20


def test_pipeline_switch(monkeypatch):
    """FAST_MATH = False keeps the exact ops (TVM's legalization)."""
    tgt = presets.target_from_preset("x86-avx2")
    assert schedule_rest.FAST_MATH
    monkeypatch.setattr(schedule_rest, "FAST_MATH", False)
    ex = tvm.compile(_module("erf", 64), target=tgt, relax_pipeline=presets.relax_pipeline(tgt))
    x = np.linspace(-3, 3, 64).astype(np.float32)
    got = relax.VirtualMachine(ex, tvm.cpu())["main"](tvm.runtime.tensor(x)).numpy()
    np.testing.assert_allclose(got, _erf64(x), rtol=2e-7, atol=1e-7)


def test_polynomial_chain_is_not_inlined_into_itself():
    """fast_math's polynomials read their input several times: inlining each into the next (as a cheap
    producer would be) grew a chain of 40 tanh as 3^40 and never finished compiling. Each stays its own
    block (schedule_rest.EXPENSIVE_NODES), the build is quick and the values right."""
    import time

    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((4, 64), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            y = x
            for i in range(40):
                y = bb.emit(relax.op.tanh(bb.emit(relax.op.add(y, relax.const(np.float32(0.01 * i))))))
            out = bb.emit_output(y)
        bb.emit_func_output(out)
    tgt = presets.target_from_preset("x86-avx2")
    start = time.perf_counter()
    ex = tvm.compile(bb.get(), target=tgt, relax_pipeline=presets.relax_pipeline(tgt))
    assert time.perf_counter() - start < 60
    fused = schedule_rest.fused_and_scheduled(fast_math()(bb.get()), tgt)
    funcs = [f for _, f in fused.functions_items() if isinstance(f, tvm.tirx.PrimFunc)]
    assert funcs and all(schedule_rest.is_scheduled(f) for f in funcs)
    xv = np.random.default_rng(0).standard_normal((4, 64)).astype(np.float32)
    ref = xv.astype(np.float64)
    for i in range(40):
        ref = np.tanh(ref + 0.01 * i)
    got = relax.VirtualMachine(ex, tvm.cpu())["main"](tvm.runtime.tensor(xv)).numpy()
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)
