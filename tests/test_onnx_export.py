"""QuantizedModel.export_onnx: ONNX Runtime runs the QDQ model and agrees with relayq's integer model."""
import warnings

import numpy as np
import pytest

import relayq
from onnx_nets import hardswish_net

ort = pytest.importorskip("onnxruntime")

#: MobileNetV2 W8A8 per-channel, ONNX Runtime on the QDQ export vs relayq on the 120 photos: measured
#: 96.7 % top-1 agreement and 0.9916 mean logit cosine (benchmarks/results/lowbit.json, qdq_export).
AGREEMENT_MBV2 = 0.95
MEAN_COSINE_MBV2 = 0.985
onnx = pytest.importorskip("onnx")
pytest.importorskip("torch", reason="the small ONNX net is exported by torch")


@pytest.fixture(scope="module")
def net():
    model, _ = hardswish_net(hardswish=False)
    rng = np.random.RandomState(0)
    calib = [rng.randn(1, 3, 8, 8).astype("float32") for _ in range(6)]
    evaluation = [rng.randn(1, 3, 8, 8).astype("float32") for _ in range(24)]
    return model, calib, evaluation


def _quantize(model, calib, method, params=None, **config):
    """``quantize_model`` without progress output, its warnings ignored."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return relayq.quantize_model(model, params, calib, method, relayq.QConfig(show_progress=False, **config))


@pytest.mark.parametrize("config, weight_type, act_type", [
    (dict(), "INT8", "INT8"),
    (dict(per_channel=True, weight_bits=4), "INT4", "INT8"),
    (dict(act_symmetric=False), "INT8", "UINT8"),
    (dict(weight_bits=6, act_bits=6), "INT8", "INT8"),       # 6-bit codes in int8, activations clipped
])
def test_ort_agrees_with_relayq(net, tmp_path, config, weight_type, act_type):
    model, calib, evaluation = net
    q = _quantize(model, calib, "kl", **config)
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


@pytest.mark.parametrize("hardswish, config", [
    (False, dict()),
    (False, dict(act_symmetric=False, per_channel=True, weight_bits=4)),
    (False, dict(weight_bits=6, act_bits=6)),
    (True, dict(act_symmetric=False)),                # HardSwish as an integer table: Gather
])
def test_exact_export_computes_relayqs_codes_bit_for_bit(tmp_path, hardswish, config):
    model, _ = hardswish_net(hardswish=hardswish)
    rng = np.random.RandomState(0)
    calib = [rng.randn(1, 3, 8, 8).astype("float32") for _ in range(6)]
    evaluation = [rng.randn(1, 3, 8, 8).astype("float32") * 2 for _ in range(16)]
    q = _quantize(model, calib, "kl", **config)
    path = q.export_onnx(str(tmp_path / "int.onnx"), exact=True)
    ops = [n.op_type for n in onnx.load(path).graph.node]
    assert ops.count("ConvInteger") == 2 and ops.count("MatMulInteger") == 1 and "Conv" not in ops
    assert ops.count("Gather") == (1 if hardswish else 0)
    sess = ort.InferenceSession(path)
    assert [i.name for i in sess.get_inputs()] == ["input"]
    lib = relayq.build(q)
    for x in evaluation:
        np.testing.assert_array_equal(sess.run(None, {"input": x})[0], lib(x))


def test_exact_export_needs_no_onnx_source(net, tmp_path):
    """A model imported as a Relax module (no ONNX kept) exports too; inputs keep the Relax names."""
    model, calib, evaluation = net
    mod, params = relayq.frontend.from_onnx(model)
    q = _quantize(mod, calib, "naive", params, check_accuracy=False)
    sess = ort.InferenceSession(q.export_onnx(str(tmp_path / "int.onnx"), exact=True))
    name = sess.get_inputs()[0].name
    np.testing.assert_array_equal(sess.run(None, {name: evaluation[0]})[0], relayq.build(q)(evaluation[0]))


def test_exact_export_names_an_op_it_cannot_write(net, tmp_path, monkeypatch):
    from relayq import onnx_exact

    model, calib, _ = net
    q = _quantize(model, calib, "naive", check_accuracy=False)
    monkeypatch.delitem(onnx_exact.CONVERTERS, "relax.right_shift")
    with pytest.raises(relayq.RelayqError, match=r"binding \w+ is relax.right_shift"):
        q.export_onnx(str(tmp_path / "int.onnx"), exact=True)


def test_export_needs_the_onnx_model(net, tmp_path):
    model, calib, _ = net
    mod, params = relayq.frontend.from_onnx(model)
    q = _quantize(mod, calib, "naive", params, check_accuracy=False)
    with pytest.raises(relayq.RelayqError, match="onnx_model="):
        q.export_onnx(str(tmp_path / "a.onnx"))
    path = q.export_onnx(str(tmp_path / "b.onnx"), onnx_model=model)        # given explicitly, it works
    assert ort.InferenceSession(path).run(None, {"input": calib[0]})[0].shape == (1, 10)

    changed = _quantize(model, calib, "naive", check_accuracy=False, cross_layer_equalization=True,
                        cle_replace_relu6=True)
    with pytest.raises(relayq.RelayqError, match="cle_replace_relu6"):     # its float graph is not the ONNX one
        changed.export_onnx(str(tmp_path / "c.onnx"))


@pytest.fixture(scope="module")
def mobilenet_w8a8(tmp_path_factory):
    """MobileNetV2 (real weights) W8A8 per-channel (kl, the 100 photos), its compiled model and the 120 photos."""
    from relayq.testing import data, zoo

    if not (zoo.has_mobilenet_weights() and data.has_calibration_photos() and data.has_imagenet_samples()):
        pytest.skip("needs the offline MobileNetV2 weights and photos (requirements-models.txt)")
    photos = data.calibration_photos(100)
    images = np.concatenate([photos, data.imagenet_labelled()[0]])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = relayq.quantize_model(zoo.mobilenet_v2(batch=1), None, [photos[i:i + 1] for i in range(100)], "kl",
                                  relayq.QConfig(per_channel=True, show_progress=False))
    lib = relayq.build(q)
    ref = np.concatenate([lib(images[i:i + 1]) for i in range(len(images))])
    return q, images, ref, tmp_path_factory.mktemp("mbv2")


def _ort_outputs(path, images):
    sess = ort.InferenceSession(path)
    return np.concatenate([sess.run(None, {"input": images[i:i + 1]})[0] for i in range(len(images))])


def _cosines(a, b):
    return [float(np.dot(x, y) / (np.linalg.norm(x) * np.linalg.norm(y))) for x, y in zip(a, b)]


@pytest.mark.slow
def test_mobilenet_v2_exact_export_meets_the_issue_bar(mobilenet_w8a8):
    """Issue 10's bar for the export: ONNX Runtime vs relayq's realized model on the 120 photos, W8A8:
    top-1 agreement >= 99 % and cosine >= 0.999. The exact export meets it with identical outputs."""
    q, images, ref, tmp = mobilenet_w8a8
    got = _ort_outputs(q.export_onnx(str(tmp / "mbv2_int.onnx"), exact=True), images)
    assert (got.argmax(1) == ref.argmax(1)).mean() >= 0.99
    assert min(_cosines(got, ref)) >= 0.999
    np.testing.assert_array_equal(got, ref)


@pytest.mark.slow
def test_mobilenet_v2_qdq_in_onnx_runtime(mobilenet_w8a8):
    """The QDQ export of the same model: ONNX Runtime runs relayq's scales with its own float32
    requantization. Each layer fed relayq's codes gives relayq's codes but for ~1e-5 of them, yet the
    network amplifies any differing code (relayq's own model with one random flip in 1e7 codes already
    loses 0.3 % cosine, benchmarks/bench_qdq.py): close, not the issue's bar (use exact=True for that)."""
    q, images, ref, tmp = mobilenet_w8a8
    got = _ort_outputs(q.export_onnx(str(tmp / "mbv2_qdq.onnx")), images)
    assert (got.argmax(1) == ref.argmax(1)).mean() >= AGREEMENT_MBV2
    assert np.mean(_cosines(got, ref)) >= MEAN_COSINE_MBV2
