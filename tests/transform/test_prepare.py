"""prepare: BatchNorm folding (with and without conv bias), clip canonicalization, param binding."""
import numpy as np
import pytest
import tvm
from tvm import relax

import relayq
from relayq.transform import prepare
from relayq.transform.common import bindings, op_name

from helpers import tiny_cnn


def _ops(mod):
    return [op_name(b.value) for b in bindings(mod["main"])]


def _run(mod, *args):
    from relayq.runtime import compile_host
    return compile_host(mod)(*args)[0]


def test_bn_folded_into_biased_conv_and_numerics_kept():
    mod, params = tiny_cnn()
    prepared = prepare(mod, params)
    ops = _ops(prepared)
    assert "relax.nn.batch_norm" not in ops
    assert ops.count("relax.nn.conv2d") == 4
    x = np.random.RandomState(0).randn(2, 3, 8, 8).astype("float32")
    bound = relax.transform.BindParams("main", {k: tvm.runtime.tensor(v) for k, v in params.items()})(mod)
    np.testing.assert_allclose(_run(prepared, x), _run(bound, x), rtol=1e-4, atol=1e-4)


def test_bn_folded_without_bias():
    rng = np.random.RandomState(1)
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 2, 5, 5), "float32"))
    w = rng.randn(3, 2, 3, 3).astype("float32")
    g, be, mu, var = rng.rand(3) + .5, rng.randn(3), rng.randn(3), rng.rand(3) + .5
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit(relax.op.nn.conv2d(x, relax.const(w)))
            y = bb.emit(relax.op.nn.batch_norm(y, *[relax.const(a.astype("float32")) for a in (g, be, mu, var)], axis=1, training=False))
            out = bb.emit_output(relax.TupleGetItem(y, 0))
        bb.emit_func_output(out)
    mod = bb.get()
    prepared = prepare(mod)
    assert _ops(prepared).count("relax.nn.batch_norm") == 0
    xv = rng.randn(1, 2, 5, 5).astype("float32")
    ref = _run(relax.transform.DecomposeOpsForInference()(mod), xv)
    np.testing.assert_allclose(_run(prepared, xv), ref, rtol=1e-4, atol=1e-5)


def test_missing_weight_is_named():
    mod, params = tiny_cnn()
    del params["w1"]
    with pytest.raises(relayq.ModelError, match="w1"):
        prepare(mod, params)


def test_param_shape_mismatch_is_named():
    mod, params = tiny_cnn()
    params["w1"] = params["w1"][:4]
    with pytest.raises(relayq.ModelError, match="w1"):
        prepare(mod, params)


def test_onnx_clip_becomes_one_clip_op():
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper
    w = numpy_helper.from_array(np.random.randn(4, 3, 3, 3).astype("float32"), "W")
    lo = numpy_helper.from_array(np.array(0, "float32"), "lo")
    hi = numpy_helper.from_array(np.array(6, "float32"), "hi")
    g = helper.make_graph([helper.make_node("Conv", ["x", "W"], ["c"], pads=[1, 1, 1, 1]),
                           helper.make_node("Clip", ["c", "lo", "hi"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])], [w, lo, hi])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    mod, params = relayq.frontend.from_onnx(model)
    ops = _ops(prepare(mod, params))
    assert ops == ["relax.nn.conv2d", "relax.clip"]
