"""Model inputs that used to escape as raw exceptions: each is a relayq error naming the culprit, or a right result.

Every error case asserts the exact error class and that the message names the file, node, op or input at
fault. The result cases import (and where it matters quantize and build) and compare with ONNX Runtime.
"""
import json
import warnings

import numpy as np
import pytest

import relayq
from relayq.errors import FrontendError, ModelError, UnsupportedOpError

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

SHAPE = (2, 3, 6, 6)
RNG = np.random.RandomState(0)
W = (RNG.randn(4, 3, 3, 3) * 0.3).astype("float32")
B = (RNG.randn(4) * 0.1).astype("float32")
#: INT8 against FP32 on these tiny random nets: cosine similarity of the outputs.
MIN_COSINE = 0.99


def _model(nodes, inits=(), opset=17, x_shape=SHAPE, y="y", y_shape=None, inputs=None):
    """A model with input ``x`` and output ``y`` (unknown output shape unless given)."""
    ins = inputs or [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x_shape))]
    out = [helper.make_tensor_value_info(y, TensorProto.FLOAT, y_shape)]
    g = helper.make_graph(nodes, "g", ins, out, list(inits))
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])


def _conv(out="c"):
    inits = [numpy_helper.from_array(W, "w"), numpy_helper.from_array(B, "b")]
    return [helper.make_node("Conv", ["x", "w", "b"], [out], name="conv", pads=[1, 1, 1, 1])], inits


def _scalar(name, v):
    return numpy_helper.from_array(np.array(v, "float32"), name)


def _clip_model(lo, hi, opset=17):
    """conv -> Clip with the bounds given (None: absent), as inputs (opset >= 11) or attributes (opset 6)."""
    nodes, inits = _conv()
    if opset < 11:
        attrs = {k: v for k, v in (("min", lo), ("max", hi)) if v is not None}
        nodes.append(helper.make_node("Clip", ["c"], ["y"], name="clip", **attrs))
    else:
        ins = ["c", "lo" if lo is not None else "", "hi" if hi is not None else ""]
        while ins[-1] == "":
            ins.pop()
        inits += [_scalar(n, v) for n, v in (("lo", lo), ("hi", hi)) if v is not None]
        nodes.append(helper.make_node("Clip", ins, ["y"], name="clip"))
    return _model(nodes, inits, opset=opset, y_shape=[2, 4, 6, 6])


def _relu_net(opset):
    nodes, inits = _conv()
    nodes += [helper.make_node("Relu", ["c"], ["r"], name="relu"),
              helper.make_node("MaxPool", ["r"], ["y"], name="pool", kernel_shape=[2, 2], strides=[2, 2])]
    return _model(nodes, inits, opset=opset)


def _save(tmp_path, model, name="model.onnx"):
    path = tmp_path / name
    onnx.save(model, str(path))
    return str(path)


def _data(n=3, shape=SHAPE):
    rng = np.random.RandomState(1)
    return [rng.randn(*shape).astype("float32") for _ in range(n)]


def _ort(model, x):
    ort = pytest.importorskip("onnxruntime", reason="ONNX Runtime is the float reference")
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})[0]


def _cosine(a, b):
    a, b = a.ravel().astype("float64"), b.ravel().astype("float64")
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-12))


# ------------------------------------------------------------------------------------------ error cases
# Each case: (id, make(tmp_path) -> callable raising, exact error class, substrings the message must name).

def _quantize(sym, **kw):
    return lambda: relayq.quantize_model(sym, dataset=_data(2), **kw)


def _missing(tmp):
    return _quantize(str(tmp / "nothere.onnx")), ["nothere.onnx"]


def _missing_no_ext(tmp):
    return lambda: relayq.frontend.from_onnx(str(tmp / "nothere")), ["nothere"]


def _directory(tmp):
    d = tmp / "model_dir.onnx"
    d.mkdir()
    return _quantize(str(d)), ["model_dir.onnx", "directory"]


def _directory_from_onnx(tmp):
    d = tmp / "adir"
    d.mkdir()
    return lambda: relayq.frontend.from_onnx(d), ["adir", "directory"]


def _zero_bytes(tmp):
    p = tmp / "empty.onnx"
    p.write_bytes(b"")
    return _quantize(str(p)), ["empty.onnx", "empty"]


def _zero_bytes_from_onnx(tmp):
    p = tmp / "empty2.onnx"
    p.write_bytes(b"")
    return lambda: relayq.frontend.from_onnx(str(p)), ["empty2.onnx"]


def _truncated(tmp):
    data = _relu_net(17).SerializeToString()
    p = tmp / "cut.onnx"
    p.write_bytes(data[:len(data) // 2])
    return _quantize(str(p)), ["cut.onnx"]


def _garbage(tmp):
    p = tmp / "noise.onnx"
    p.write_bytes(bytes([0xFF, 0xFE]) + np.random.RandomState(3).bytes(200))
    return _quantize(str(p)), ["noise.onnx"]


def _garbage_protobuf_like(tmp):
    # Starts like a protobuf (field 1, varint) but is not a model.
    p = tmp / "fake.bin"
    p.write_bytes(b"\x08\x07" + b"\x00" * 30)
    return _quantize(str(p)), ["fake.bin"]


def _tflite(tmp):
    p = tmp / "model.tflite"
    p.write_bytes(b"\x1c\x00\x00\x00TFL3" + b"\x00" * 64)
    return _quantize(str(p)), ["model.tflite", "TFLite"]


def _json_garbage(tmp):
    p = tmp / "net-symbol.json"
    p.write_text('{"nodes": [1, 2,')
    return _quantize(str(p), shapes={"data": (1, 3, 8, 8)}), ["net-symbol.json"]


def _json_not_symbol(tmp):
    p = tmp / "config.json"
    p.write_text(json.dumps({"lr": 0.1}))
    return _quantize(str(p)), ["config.json", "MXNet"]


def _mxnet_params_missing(tmp):
    sym = {"nodes": [{"op": "null", "name": "data", "inputs": []},
                     {"op": "null", "name": "fc_weight", "inputs": []},
                     {"op": "FullyConnected", "name": "fc", "attrs": {"num_hidden": "4", "no_bias": "True"},
                      "inputs": [[0, 0, 0], [1, 0, 0]]}],
           "arg_nodes": [0, 1], "heads": [[2, 0, 0]]}
    p = tmp / "fc-symbol.json"
    p.write_text(json.dumps(sym))
    missing = str(tmp / "fc-0000.params")
    return (lambda: relayq.quantize_model(str(p), missing, dataset=[np.zeros((1, 8), "float32")],
                                          shapes={"data": (1, 8)})), ["fc-0000.params"]


def _unknown_ops(tmp):
    nodes, inits = _conv()
    nodes += [helper.make_node("FooOp", ["c"], ["f1"], name="foo_a"),
              helper.make_node("FooOp", ["f1"], ["f2"], name="foo_b"),
              helper.make_node("BarOp", ["f2"], ["y"], name="bar_a")]
    p = _save(tmp, _model(nodes, inits), "ops.onnx")
    return lambda: relayq.frontend.from_onnx(p), ["ops.onnx", "FooOp x2", "BarOp x1", "foo_a", "foo_b", "bar_a"]


def _custom_domain_op(tmp):
    nodes, inits = _conv()
    nodes.append(helper.make_node("Mystery", ["c"], ["y"], name="myst", domain="com.example"))
    m = _model(nodes, inits)
    m.opset_import.append(helper.make_opsetid("com.example", 1))
    return lambda: relayq.frontend.from_onnx(m), ["com.example.Mystery x1", "myst"]


def _dynamic_dims(tmp):
    nodes, inits = _conv()
    nodes.append(helper.make_node("Relu", ["c"], ["y"], name="relu"))
    m = _model(nodes, inits, x_shape=["N", 3, 6, 6])
    p = _save(tmp, m, "dyn.onnx")
    return lambda: relayq.frontend.from_onnx(p), ["'x'", "dyn.onnx", "shapes="]


def _shape_for_unknown_input(tmp):
    p = _save(tmp, _relu_net(17), "net.onnx")
    return lambda: relayq.frontend.from_onnx(p, shapes={"images": (1, 3, 6, 6)}), ["'images'", "net.onnx"]


def _shape_wrong_rank(tmp):
    p = _save(tmp, _relu_net(17), "net.onnx")
    return lambda: relayq.frontend.from_onnx(p, shapes={"x": (3, 6, 6)}), ["'x'", "rank 3", "rank 4"]


def _clip_runtime_bounds(tmp):
    # The upper bound is computed from the data: it cannot be folded, and relayq needs constant bounds.
    nodes, inits = _conv()
    nodes += [helper.make_node("ReduceMax", ["x"], ["m"], name="rmax", keepdims=0),
              helper.make_node("Clip", ["c", "", "m"], ["y"], name="clip_dyn")]
    return lambda: relayq.frontend.from_onnx(_model(nodes, inits)), ["'clip_dyn'", "Clip"]


def _converter_cannot_import(tmp):
    # Conv is in TVM's table, but not over 4 spatial dims: the converter's NotImplementedError names the node.
    w = numpy_helper.from_array(np.ones((1, 1, 1, 1, 1, 1), "float32"), "w6")
    m = _model([helper.make_node("Conv", ["x", "w6"], ["y"], name="conv4d")], [w], x_shape=[1, 1, 2, 2, 2, 2],
               y_shape=[1, 1, 2, 2, 2, 2])
    return lambda: relayq.frontend.from_onnx(m), ["'conv4d'", "(Conv)", "Ndim"]


def _not_a_model_object(tmp):
    return _quantize(3.5), ["float"]


def _empty_modelproto(tmp):
    return lambda: relayq.frontend.from_onnx(onnx.ModelProto()), ["not an ONNX model"]


ERROR_CASES = [
    ("missing_file", _missing, FrontendError),
    ("missing_file_no_extension", _missing_no_ext, FrontendError),
    ("directory", _directory, FrontendError),
    ("directory_from_onnx", _directory_from_onnx, FrontendError),
    ("zero_byte_onnx", _zero_bytes, FrontendError),
    ("zero_byte_from_onnx", _zero_bytes_from_onnx, FrontendError),
    ("truncated_protobuf", _truncated, FrontendError),
    ("garbage_content", _garbage, FrontendError),
    ("garbage_protobuf_like", _garbage_protobuf_like, FrontendError),
    ("tflite_flatbuffer", _tflite, FrontendError),
    ("mxnet_json_garbage", _json_garbage, FrontendError),
    ("json_not_a_symbol", _json_not_symbol, FrontendError),
    ("mxnet_params_file_missing", _mxnet_params_missing, FrontendError),
    ("unknown_ops_all_named_with_counts", _unknown_ops, UnsupportedOpError),
    ("custom_domain_op", _custom_domain_op, UnsupportedOpError),
    ("dynamic_dims_without_shapes", _dynamic_dims, FrontendError),
    ("shapes_names_nonexistent_input", _shape_for_unknown_input, FrontendError),
    ("shapes_wrong_rank", _shape_wrong_rank, FrontendError),
    ("clip_bounds_computed_at_run_time", _clip_runtime_bounds, FrontendError),
    ("converter_cannot_import_node", _converter_cannot_import, UnsupportedOpError),
    ("not_a_model_object", _not_a_model_object, ModelError),
    ("modelproto_without_graph", _empty_modelproto, FrontendError),
]


@pytest.mark.parametrize("make, cls", [c[1:] for c in ERROR_CASES], ids=[c[0] for c in ERROR_CASES])
def test_bad_input_raises_relayq_error_naming_the_culprit(tmp_path, make, cls):
    call, names = make(tmp_path)
    with pytest.raises(relayq.RelayqError) as info:
        call()
    assert type(info.value) is cls, f"{type(info.value).__name__}: {info.value}"
    for name in names:
        assert name in str(info.value), f"{name!r} not in: {info.value}"


# ------------------------------------------------------------------------------------------ result cases

@pytest.mark.parametrize("name", ["model.bin", "model", "weights.json"])
def test_onnx_content_under_any_file_name(tmp_path, name):
    m = _relu_net(17)
    path = _save(tmp_path, m, name)
    x = _data(1)[0]
    mod, params = relayq.frontend.from_onnx(path)
    np.testing.assert_allclose(relayq.build(mod, params=params)(x), _ort(m, x), rtol=1e-4, atol=1e-5)
    if name == "model.bin":     # and through quantize_model, which sniffs the format
        q = relayq.quantize_model(path, dataset=_data(2))
        assert _cosine(relayq.build(q)(x), _ort(m, x)) > MIN_COSINE


def test_keep_initializers_as_inputs(tmp_path):
    m = _relu_net(17)
    for init in m.graph.initializer:        # what torch's keep_initializers_as_inputs=True writes
        m.graph.input.append(helper.make_tensor_value_info(init.name, init.data_type, list(init.dims)))
    x = _data(1)[0]
    mod, params = relayq.frontend.from_onnx(_save(tmp_path, m))
    assert set(params) == {"w", "b"}
    assert [p.name for p in mod["main"].params] == ["x", "w", "b"]
    np.testing.assert_allclose(relayq.build(mod, params=params)(x), _ort(m, x), rtol=1e-4, atol=1e-5)


CLIP_CASES = [("only_max", None, 0.5, 17), ("only_min", -0.25, None, 17), ("both", 0.0, 6.0, 11),
              ("attrs_opset6", 0.0, 0.5, 6), ("attr_only_max_opset6", None, 0.5, 6)]


@pytest.mark.parametrize("lo, hi, opset", [c[1:] for c in CLIP_CASES], ids=[c[0] for c in CLIP_CASES])
def test_clip_with_missing_bounds_quantizes_and_builds(tmp_path, lo, hi, opset):
    m = _clip_model(lo, hi, opset)
    x = _data(1)[0]
    ref = _ort(m, x)
    mod, params = relayq.frontend.from_onnx(m)
    np.testing.assert_allclose(relayq.build(mod, params=params)(x), ref, rtol=1e-4, atol=1e-5)
    q = relayq.quantize_model(mod, params, dataset=_data(3))
    y = relayq.build(q)(x)
    assert _cosine(y, ref) > MIN_COSINE
    if hi is not None:          # the bounds hold in the integer model
        assert y.max() <= hi + 1e-6
    if lo is not None:
        assert y.min() >= lo - 1e-6


@pytest.mark.parametrize("opset", [9, 11, 13, 17])
def test_opset_versions(opset):
    m = _relu_net(opset)
    x = _data(1)[0]
    mod, params = relayq.frontend.from_onnx(m)
    np.testing.assert_allclose(relayq.build(mod, params=params)(x), _ort(m, x), rtol=1e-4, atol=1e-5)


def test_model_with_no_nodes_output_is_input():
    m = _model([], y="x", y_shape=list(SHAPE))
    x = _data(1)[0]
    mod, params = relayq.frontend.from_onnx(m)
    assert params == {}
    np.testing.assert_array_equal(relayq.build(mod, params=params)(x), x)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        q = relayq.quantize_model(m, dataset=_data(2))
    assert any(issubclass(w.category, relayq.NothingQuantizedWarning) for w in caught)
    np.testing.assert_array_equal(relayq.build(q)(x), x)


def test_output_that_is_also_an_input():
    nodes, inits = _conv()
    nodes.append(helper.make_node("Relu", ["c"], ["y"], name="relu"))
    m = _model(nodes, inits)
    m.graph.output.append(helper.make_tensor_value_info("x", TensorProto.FLOAT, list(SHAPE)))
    x = _data(1)[0]
    mod, params = relayq.frontend.from_onnx(m)
    y, same = relayq.build(mod, params=params)(x)
    np.testing.assert_array_equal(same, x)
    np.testing.assert_allclose(y, _ort(m, x), rtol=1e-4, atol=1e-5)


def test_constant_nodes_as_clip_bounds():
    nodes, inits = _conv()
    nodes += [helper.make_node("Constant", [], ["lo"], name="k_lo", value=_scalar("v0", 0.0)),
              helper.make_node("Constant", [], ["hi"], name="k_hi", value=_scalar("v6", 6.0)),
              helper.make_node("Clip", ["c", "lo", "hi"], ["y"], name="relu6")]
    m = _model(nodes, inits)
    mod, params = relayq.frontend.from_onnx(m)
    clips = [c for c in str(mod).splitlines() if "R.clip(" in c]
    assert len(clips) == 1 and "call_tir" not in str(mod)      # one visible clip op, as for initializers
    x = _data(1)[0]
    np.testing.assert_allclose(relayq.build(mod, params=params)(x), _ort(m, x), rtol=1e-4, atol=1e-5)
