"""Vectorizable ``exp``, ``erf`` and ``tanh`` for CPU builds.

LLVM lowers TIR's ``exp`` / ``erf`` / ``tanh`` to calls of the C library's scalar functions, one element at
a time, so the elementwise kernels that hold them do not vectorize: a ViT-B/16 block's GELU (``erf`` over
17 x 3072 values) took 0.82 ms, 1.6 ms of the FP32 network's 48 ms per block. TOPI's ``fast_exp``,
``fast_erf`` and ``fast_tanh`` compute the same functions with range reduction and polynomials in plain
arithmetic, which vectorizes (measured, one AVX2 kernel of 17 x 3072 values: erf 0.82 -> 0.03 ms, tanh
0.20 -> 0.02 ms, exp 0.096 -> 0.022 ms), with a relative error of at most 3e-7 against float64 (float32's
own rounding is 6e-8; ``tests/backend/test_fast_math.py``). ONNX Runtime's and OpenVINO's CPU kernels use
polynomial approximations of the same kind.

:func:`fast_math` rewrites those three Relax ops (in every Relax function of a module) before
legalization; :func:`relayq.backend.schedule_rest.relax_pipeline` runs it on every CPU build, calibration's
tap model included. Softmax is left alone (its own legalization is as fast). Integer models are not
affected: their nonlinearities are lookup tables computed in numpy.

Example::

    >>> # mod = fast_math()(mod)        # before tvm.compile; relax_pipeline does it on CPU targets
"""
from __future__ import annotations

import tvm
from tvm import relax, topi

#: Relax op -> the TOPI function that computes it with vectorizable arithmetic.
FAST = {"relax.exp": topi.fast_exp, "relax.erf": topi.fast_erf, "relax.tanh": topi.fast_tanh}


@relax.expr_functor.mutator
class _FastMath(relax.PyExprMutator):
    def visit_call_(self, call):
        call = super().visit_call_(call)
        op = getattr(call.op, "name", None)
        if op in FAST and str(call.args[0].ty.dtype) == "float32":
            return self.builder_.call_te(FAST[op], call.args[0], primfunc_name_hint=op.split(".")[1] + "_fast")
        return call

    def run(self, mod: tvm.IRModule) -> tvm.IRModule:
        for gv, func in mod.functions_items():
            if isinstance(func, relax.Function):
                self.builder_.update_func(gv, self.visit_expr(func))
        return self.builder_.get()


def fast_math() -> tvm.transform.Pass:
    """A module pass replacing float32 ``exp``, ``erf`` and ``tanh`` by TOPI's vectorizable forms.

    >>> import numpy as np, tvm
    >>> from tvm import relax
    >>> bb = relax.BlockBuilder(); x = relax.Var("x", relax.TensorType((4,), "float32"))
    >>> with bb.function("main", [x]):
    ...     with bb.dataflow():
    ...         y = bb.emit_output(bb.emit(relax.op.erf(x)))
    ...     _ = bb.emit_func_output(y)
    >>> "relax.erf" in fast_math()(bb.get()).script()
    False
    """
    @tvm.transform.module_pass(opt_level=0, name="RelayqFastMath")
    def _pass(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        return _FastMath(mod).run(mod)

    return _pass
