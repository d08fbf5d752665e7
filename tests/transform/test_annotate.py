"""annotate: where the markers go, which ops stay float, QConfig skips."""
import warnings

import numpy as np
import pytest
from tvm import relax

import relayq
from relayq.transform import annotate, prepare
from relayq.transform.annotate import layers, points

from helpers import tiny_cnn


def test_markers_on_weights_inputs_and_outputs():
    mod, params = tiny_cnn()
    ann = annotate(prepare(mod, params))
    names = [p[0] for p in points(ann)]
    assert [n for n in names if n.endswith(":w")] == ["conv2d_0:w", "conv2d_1:w", "conv2d_2:w", "conv2d_3:w", "dense_0:w"]
    assert "conv2d_0:in0" in names                    # the graph input is quantized once
    assert "dense_0:out" not in names                 # logits leave from the int32 accumulator
    assert {"conv2d_0:out", "add_0:out", "concat_0:out"} <= set(names)
    assert layers(ann)["avg_pool2d_0"] == "avg_pool2d"
    assert "relayq.simulated_quantize" in ann.script()


def test_float_ops_are_named_in_a_warning():
    mod, params = tiny_cnn()
    prepared = prepare(mod, params)
    f = prepared["main"]
    bb = relax.BlockBuilder()
    with bb.function("main", list(f.params)):
        with bb.dataflow():
            y = bb.emit(relax.op.nn.softmax(relax.op.sigmoid(f.body)))
            out = bb.emit_output(y)
        bb.emit_func_output(out)
    with pytest.warns(relayq.FloatFallbackWarning, match=r"sigmoid.*softmax|softmax.*sigmoid"):
        annotate(relax.transform.Normalize()(bb.get()))


def test_skip_layers_keeps_them_float():
    mod, params = tiny_cnn()
    cfg = relayq.QConfig(skip_layers=("conv2d_[12]",), skip_ops=("dense",))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ann = annotate(prepare(mod, params), cfg)
    names = {p[0] for p in points(ann)}
    assert "conv2d_1:w" not in names and "conv2d_2:w" not in names and "dense_0:w" not in names
    assert "conv2d_0:w" in names and "conv2d_3:w" in names


def test_nothing_quantizable_returns_float_model():
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((2, 5), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            out = bb.emit_output(relax.op.nn.softmax(relax.op.tanh(x)))
        bb.emit_func_output(out)
    data = [np.random.randn(2, 5).astype("float32")]
    with pytest.warns(relayq.NothingQuantizedWarning):
        q = relayq.quantize_model(bb.get(), {}, data, "naive", relayq.QConfig(show_progress=False))
    assert not q.quantized
    y = relayq.build(q)(data[0])
    e = np.exp(np.tanh(data[0]))
    np.testing.assert_allclose(y, e / e.sum(1, keepdims=True), rtol=1e-5)
