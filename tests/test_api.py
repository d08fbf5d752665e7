"""The public API: errors that name the culprit, build / export / load, the stages kept in the result."""
import warnings

import numpy as np
import pytest

import relayq

from helpers import tiny_cnn

CFG = relayq.QConfig(show_progress=False)


@pytest.fixture
def model():
    return tiny_cnn(0)


def _data(n=3):
    rng = np.random.RandomState(2)
    return [rng.randn(2, 3, 8, 8).astype("float32") for _ in range(n)]


def test_empty_dataset(model):
    with pytest.raises(relayq.DatasetError, match="empty"):
        relayq.quantize_model(*model, [], "naive", CFG)


def test_wrong_shape_names_the_input(model):
    with pytest.raises(relayq.DatasetError, match="'data'.*shape"):
        relayq.quantize_model(*model, [np.zeros((2, 3, 9, 9), "float32")], "naive", CFG)


def test_wrong_input_name(model):
    with pytest.raises(relayq.DatasetError, match="image"):
        relayq.quantize_model(*model, [{"image": np.zeros((2, 3, 8, 8), "float32")}], "naive", CFG)


def test_wrong_dtype(model):
    with pytest.raises(relayq.DatasetError, match="dtype"):
        relayq.quantize_model(*model, [np.zeros((2, 3, 8, 8), "int32")], "naive", CFG)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nan_or_inf_in_data(model, bad):
    d = _data()
    d[1][0, 0, 0, 0] = bad
    with pytest.raises(relayq.DatasetError, match="NaN or Inf"):
        relayq.quantize_model(*model, d, "naive", CFG)


def test_unknown_calibration(model):
    with pytest.raises(relayq.ConfigError, match="entropyy"):
        relayq.quantize_model(*model, _data(), "entropyy", CFG)


def test_missing_weight(model):
    mod, params = model
    params = dict(params)
    params.pop("fc")
    with pytest.raises(relayq.ModelError, match="fc"):
        relayq.quantize_model(mod, params, _data(), "naive", CFG)


def test_bad_model_type():
    with pytest.raises(relayq.ModelError):
        relayq.quantize_model(42, {}, _data(), "naive", CFG)


def test_errors_are_relayq_errors():
    assert issubclass(relayq.DatasetError, relayq.RelayqError)
    assert issubclass(relayq.ConfigError, relayq.RelayqError)
    with pytest.raises(relayq.ConfigError):
        relayq.QConfig(weight_bits=1)
    with pytest.raises(relayq.ConfigError):
        relayq.build(object())


def test_result_keeps_every_stage_and_thresholds(model):
    q = relayq.quantize_model(*model, _data(), "naive", CFG)
    for m in (q.prepared, q.annotated, q.simulated, q.realized):
        assert "main" in [gv.name_hint for gv in m.get_global_vars()]
    names = [t[0] for t in q.thresholds]
    assert "conv2d_0:in0" in names and all(t[1] in ("naive", "max") for t in q.thresholds)
    act = [t for t in q.thresholds if t[1] == "naive"]
    # naive = max |x| over the dataset for the graph input
    assert act[0][2] == pytest.approx(max(np.abs(d).max() for d in _data()), rel=1e-6)
    assert "conv2d_0:w" in q.params and q.params["conv2d_0:w"].dtype == np.int8
    assert "relayq quantized model" in q.summary()


def test_export_and_load_round_trip(model, tmp_path):
    q = relayq.quantize_model(*model, _data(), "naive", CFG)
    lib = relayq.build(q)
    x = _data(1)[0]
    y = lib(x)
    path = lib.export(str(tmp_path / "m.so"))
    lib2 = relayq.load(path)
    np.testing.assert_array_equal(lib2(x), y)
    np.testing.assert_array_equal(lib2(data=x), y)
    assert lib2.batch == x.shape[0]
    np.testing.assert_array_equal(lib2(x[:1]), y[:1])     # another batch size: split / padded (see CompiledModel)
    with pytest.raises(relayq.DatasetError, match="'data'"):
        lib2(np.zeros((x.shape[0], 3, 9, 8), "float32"))


def test_simulated_module_equals_realized(model):
    """The fake-quantized (float) module computes the realized integer model's outputs bit for bit."""
    q = relayq.quantize_model(*model, _data(), "naive", CFG)
    from relayq.runtime import compile_host
    from relayq.transform.common import bindings, dtype_of, op_name
    layer_ops = [b for b in bindings(q.simulated["main"]) if b.var.name in q.layers
                 and op_name(b.value) in ("relax.nn.conv2d", "relax.matmul")]
    assert len(layer_ops) == 5 and all(dtype_of(b.var) == "float64" for b in layer_ops)   # conv/dense run in float
    x = _data(1)[0]
    sim = compile_host(q.simulated)(x)[0]
    real = relayq.build(q)(x)
    np.testing.assert_array_equal(sim, real)


def test_onnx_model_through_quantize_model(tmp_path):
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper
    rng = np.random.RandomState(0)
    inits = [numpy_helper.from_array(rng.randn(8, 3, 3, 3).astype("float32") * 0.3, "W"),
             numpy_helper.from_array(rng.randn(8).astype("float32") * 0.1, "B"),
             numpy_helper.from_array((rng.rand(8) + .5).astype("float32"), "g"),
             numpy_helper.from_array(rng.randn(8).astype("float32") * .1, "be"),
             numpy_helper.from_array(rng.randn(8).astype("float32") * .1, "mu"),
             numpy_helper.from_array((rng.rand(8) + .5).astype("float32"), "var"),
             numpy_helper.from_array(np.array(0, "float32"), "lo"), numpy_helper.from_array(np.array(6, "float32"), "hi"),
             numpy_helper.from_array(rng.randn(5, 8).astype("float32") * 0.3, "FW"),
             numpy_helper.from_array(rng.randn(5).astype("float32") * 0.1, "FB")]
    nodes = [helper.make_node("Conv", ["x", "W", "B"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("BatchNormalization", ["c", "g", "be", "mu", "var"], ["bn"]),
             helper.make_node("Clip", ["bn", "lo", "hi"], ["r"]),
             helper.make_node("GlobalAveragePool", ["r"], ["p"]),
             helper.make_node("Flatten", ["p"], ["f"]),
             helper.make_node("Gemm", ["f", "FW", "FB"], ["y"], transB=1)]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 8, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 5])], inits)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    path = str(tmp_path / "m.onnx")
    onnx.save(model, path)
    data = [rng.randn(2, 3, 8, 8).astype("float32") for _ in range(3)]
    for src in (model, path):
        q = relayq.quantize_model(src, None, data, "kl", CFG)
        assert set(q.layers.values()) >= {"conv2d", "dense", "global_avg_pool"}
        ref = relayq.build(q.prepared)(data[0])
        got = relayq.build(q)(data[0])
        assert np.abs(got - ref).max() < 0.05 * np.abs(ref).max()
