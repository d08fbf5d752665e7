"""TFLite import: a float32 NHWC flatbuffer written without TensorFlow (``make_tflite.py``).

CONV_2D (ReLU) -> DEPTHWISE_CONV_2D (ReLU6) -> ADD -> RESHAPE -> FULLY_CONNECTED -> SOFTMAX must match
a numpy reference in float, in both layouts; with the default NCHW conversion the convs, the residual
add and the dense layer quantize and the model stays close to FP32 in INT8.
"""
import os
import sys

import numpy as np
import pytest

import relayq
from relayq.errors import FrontendError, UnsupportedOpError

pytest.importorskip("tflite", reason="TVM's TFLite importer needs the tflite package (relayq[tflite])")
sys.path.insert(0, os.path.dirname(__file__))
from make_tflite import INPUT_SHAPE, build_model, reference, small_cnn  # noqa: E402

#: Float import against the float64 numpy reference (measured ~3e-7).
RTOL = 1e-4
MIN_COSINE = 0.99


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    data, weights = small_cnn(seed=0)
    path = tmp_path_factory.mktemp("tflite") / "small.tflite"
    path.write_bytes(data)
    return str(path), data, weights


def _x(seed):
    return np.random.RandomState(seed).rand(*INPUT_SHAPE).astype("float32")


def _rel_err(out, ref):
    return float(np.abs(out - ref).max() / np.abs(ref).max())


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_float_import_matches_numpy(model_file, layout):
    path, data, weights = model_file
    mod, params = relayq.frontend.from_tflite(path, layout=layout)
    assert params == {}
    assert [p.name for p in mod["main"].params] == ["input"]
    text = str(mod)
    assert text.count("R.nn.conv2d(") == 2
    assert (f'data_layout="{layout}"' in text) and "R.nn.softmax" in text
    if layout == "NCHW":
        # One transpose in (NHWC input), one out (before the reshape): the rest cancelled out.
        assert text.count("R.permute_dims(") == 2 and 'data_layout="NHWC"' not in text
    x = _x(3)
    out = relayq.build(mod, params=params)(x)
    assert out.shape == (1, 10)
    assert _rel_err(out, reference(x, weights)) <= RTOL
    # The bytes import the same.
    mod2, _ = relayq.frontend.from_tflite(data, layout=layout)
    assert str(mod2) == text


def test_quantize_model_from_tflite_path(model_file):
    path, _, weights = model_file
    rng = np.random.RandomState(1)
    batches = [rng.rand(*INPUT_SHAPE).astype("float32") for _ in range(4)]
    with pytest.warns(relayq.errors.FloatFallbackWarning, match="softmax"):
        q = relayq.quantize_model(path, dataset=batches)
    assert sorted(q.layers.values()) == ["add", "conv2d", "conv2d", "dense"]
    x = _x(9)
    out, ref = relayq.build(q)(x), reference(x, weights)
    cos = float(out.ravel() @ ref.ravel() / (np.linalg.norm(out) * np.linalg.norm(ref)))
    assert cos > MIN_COSINE


def test_format_is_sniffed_from_content(model_file, tmp_path):
    from relayq.frontend.detect import detect_format

    path, data, _ = model_file
    other = tmp_path / "model.bin"
    other.write_bytes(data)
    assert detect_format(path) == "tflite" and detect_format(str(other)) == "tflite"


def test_unsupported_ops_are_all_named_with_counts(tmp_path):
    import tflite

    B = tflite.BuiltinOperator
    tensors = [("x", [1, 4], None), ("a", [1, 4], None), ("b", [1, 4], None), ("y", [1, 4], None)]
    ops = [(B.SKIP_GRAM, [0], [1], None, None), (B.SKIP_GRAM, [1], [2], None, None),
           (B.LSH_PROJECTION, [2], [3], None, None)]
    names = {getattr(B, k): k for k in dir(B) if not k.startswith("_")}
    unsupported = [c for c in (B.SKIP_GRAM, B.LSH_PROJECTION) if names[c] not in _tvm_tflite_ops()]
    if len(unsupported) < 2:
        pytest.skip("TVM imports these ops now")
    path = tmp_path / "odd.tflite"
    path.write_bytes(build_model(tensors, ops, [0], [3]))
    with pytest.raises(UnsupportedOpError, match=r"2 op type\(s\).*LSH_PROJECTION x1 \('y'\); SKIP_GRAM x2 \('a', 'b'\)"):
        relayq.frontend.from_tflite(str(path))


def _tvm_tflite_ops():
    from tvm import relax
    from tvm.relax.frontend.tflite import tflite_frontend as tf

    data, _ = small_cnn()
    import tflite

    model = tflite.Model.GetRootAs(data, 0)
    return tf.OperatorConverter(model, model.Subgraphs(0), tf.ExprTable(), relax.BlockBuilder()).convert_map


def test_errors_name_the_file_and_the_missing_package(model_file, tmp_path, monkeypatch):
    path, data, _ = model_file
    bad = tmp_path / "trunc.tflite"
    bad.write_bytes(data[:40])
    with pytest.raises(FrontendError, match="trunc.tflite"):
        relayq.frontend.from_tflite(str(bad))
    with pytest.raises(FrontendError, match="not a TFLite flatbuffer"):
        relayq.frontend.from_tflite(b"\x00" * 32)
    with pytest.raises(FrontendError, match="not an input"):
        relayq.frontend.from_tflite(path, shapes={"nope": (1, 2)})
    monkeypatch.setitem(sys.modules, "tflite", None)           # import tflite -> ImportError
    with pytest.raises(FrontendError, match=r"'tflite' package.*relayq\[tflite\]"):
        relayq.frontend.from_tflite(path)
