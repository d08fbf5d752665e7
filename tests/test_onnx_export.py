"""QuantizedModel.export_onnx: ONNX Runtime runs the QDQ model and agrees with relayq's integer model."""
import warnings

import numpy as np
import pytest

import relayq
from onnx_nets import hardswish_net

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")
pytest.importorskip("torch", reason="the small ONNX net is exported by torch")


@pytest.fixture(scope="module")
def net():
    model, _ = hardswish_net(hardswish=False)
    rng = np.random.RandomState(0)
    calib = [rng.randn(1, 3, 8, 8).astype("float32") for _ in range(6)]
    evaluation = [rng.randn(1, 3, 8, 8).astype("float32") for _ in range(24)]
    return model, calib, evaluation


@pytest.mark.parametrize("config, weight_type, act_type", [
    (dict(), "INT8", "INT8"),
    (dict(per_channel=True, weight_bits=4), "INT4", "INT8"),
    (dict(act_symmetric=False), "INT8", "UINT8"),
    (dict(weight_bits=6, act_bits=6), "INT8", "INT8"),       # 6-bit codes in int8, activations clipped
])
def test_ort_agrees_with_relayq(net, tmp_path, config, weight_type, act_type):
    model, calib, evaluation = net
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = relayq.quantize_model(model, None, calib, "kl", relayq.QConfig(show_progress=False, **config))
    path = q.export_onnx(str(tmp_path / "qdq.onnx"))
    exported = onnx.load(path)
    ops = [n.op_type for n in exported.graph.node]
    # 3 weights + 3 biases dequantized; a Q/DQ pair at the input and after each ReLU (the Gemm's
    # output is relayq's dequantized accumulator: no pair).
    assert ops.count("DequantizeLinear") == 6 + 3 and ops.count("QuantizeLinear") == 3
    inits = {t.name: onnx.TensorProto.DataType.Name(t.data_type) for t in exported.graph.initializer}
    weights = {n.input[0] for n in exported.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits}
    assert {inits[w] for w in weights} == {weight_type, "INT32"}          # weights, and biases in int32
    assert {inits[n.input[2]] for n in exported.graph.node if n.op_type == "QuantizeLinear"} == {act_type}
    assert ops.count("Clip") == (3 if config.get("act_bits") == 6 else 0)
    axes = [a.i for n in exported.graph.node if n.op_type == "DequantizeLinear" for a in n.attribute if a.name == "axis"]
    assert bool(axes) == bool(config.get("per_channel"))
    sess = ort.InferenceSession(path)
    lib = relayq.build(q)
    got = np.concatenate([sess.run(None, {"input": x})[0] for x in evaluation])
    ref = np.concatenate([lib(x) for x in evaluation])
    # Same integers up to float accumulation / round-half-even at a tie: logits within a few 1e-3.
    assert np.abs(got - ref).max() < 5e-3
    assert (got.argmax(1) == ref.argmax(1)).all()


def test_export_needs_the_onnx_model(net, tmp_path):
    model, calib, _ = net
    mod, params = relayq.frontend.from_onnx(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = relayq.quantize_model(mod, params, calib, "naive", relayq.QConfig(show_progress=False, check_accuracy=False))
    with pytest.raises(relayq.RelayqError, match="onnx_model="):
        q.export_onnx(str(tmp_path / "a.onnx"))
    path = q.export_onnx(str(tmp_path / "b.onnx"), onnx_model=model)        # given explicitly, it works
    assert ort.InferenceSession(path).run(None, {"input": calib[0]})[0].shape == (1, 10)
