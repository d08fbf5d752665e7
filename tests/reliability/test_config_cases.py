"""Bad configuration must be a ConfigError (or ModelError for params) naming the field, the value and,
for names, the closest valid ones; good but loose spellings must work (issue 8, items 5 and 9)."""
import math
import warnings

import numpy as np
import pytest

import relayq
from relayq.config import LayerConfig, QConfig, check_layer_names
from relayq.errors import ConfigError, ModelError

from helpers import tiny_cnn

LAYERS = ["conv2d_0", "conv2d_1", "add_0", "conv2d_2", "conv2d_3", "concat_0", "max_pool2d_0", "avg_pool2d_0",
          "dense_0"]


@pytest.fixture(scope="module")
def cnn():
    mod, params = tiny_cnn()
    data = [np.random.RandomState(i).rand(2, 3, 8, 8).astype("float32") for i in range(2)]
    return mod, params, data


def _quantize(cnn, config=None, **kw):
    mod, params, data = cnn
    kw.setdefault("calibration", "naive")
    cfg = {"show_progress": False, **(config or {})}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return relayq.quantize_model(mod, kw.pop("params", params), kw.pop("dataset", data), config=cfg, **kw)


# --- every QConfig field: type and range --------------------------------------------------------------

BAD_FIELDS = [
    ("weight_bits", 1), ("weight_bits", 8.0), ("weight_bits", True), ("act_bits", "8"), ("act_bits", 17),
    ("keep_first_last_bits", 0), ("per_channel", "yes"), ("per_channel", 1), ("act_symmetric", "False"),
    ("power_of_two_scale", None), ("bias_correction", "True"), ("show_progress", 0),
    ("weight_method", "entropy"), ("weight_method", None), ("percentile", None), ("percentile", "high"),
    ("percentile", 0.9999), ("percentile", 101), ("percentile", math.nan), ("percentile", True),
    ("op_overrides", [("conv2d", LayerConfig())]), ("layer_overrides", {"conv2d_0": 4}, "['conv2d_0']", "got 4"),
    ("skip_layers", 3), ("skip_layers", ("conv2d_0", 3), "got 3"), ("skip_ops", {"conv2d": True}),
    ("adaround_batch", 0), ("adaround_batch", 2.5), ("adaround_inputs", "fp32"), ("adaround_inputs", None),
    ("adaround_activation", "yes"), ("empirical_bias_correction", 1),
]


@pytest.mark.parametrize("case", BAD_FIELDS, ids=[f"{c[0]}={c[1]!r}" for c in BAD_FIELDS])
def test_bad_field_value(case):
    field, value, *culprits = case
    with pytest.raises(ConfigError) as e:
        QConfig(**{field: value})
    msg = str(e.value)
    assert field in msg and all(c in msg for c in culprits or [repr(value)]), msg


@pytest.mark.parametrize("field,value,culprit,suggestion", [
    ("op_overrides", {"conv": LayerConfig()}, "'conv'", "'conv2d'"),
    ("skip_ops", ("dense", "max_pool"), "'max_pool'", "'max_pool2d'"),
    ("weight_method", "MSE", "'MSE'", "'mse'"),
    ("adaround_inputs", "Quantized", "'Quantized'", "'quantized'"),
    ("layer_overrides", {"(conv": LayerConfig()}, "'(conv'", "regular expression"),
    ("skip_layers", ("",), "''", "non-empty"),
])
def test_bad_name_suggests(field, value, culprit, suggestion):
    with pytest.raises(ConfigError) as e:
        QConfig(**{field: value})
    msg = str(e.value)
    assert field in msg and culprit in msg and suggestion in msg, msg


@pytest.mark.parametrize("field,value", [("weight_bits", 20), ("act_bits", 0), ("skip", "True"),
                                         ("per_channel", 1)])
def test_bad_layer_config(field, value):
    with pytest.raises(ConfigError, match=field) as e:
        LayerConfig(**{field: value})
    assert repr(value) in str(e.value)


@pytest.mark.parametrize("kwargs,field,expected", [
    ({"skip_layers": "conv2d_1"}, "skip_layers", ("conv2d_1",)),      # one name, not its characters
    ({"skip_ops": "dense"}, "skip_ops", ("dense",)),
    ({"skip_layers": ["conv2d_1", "dense_.*"]}, "skip_layers", ("conv2d_1", "dense_.*")),
    ({"per_channel": np.bool_(True)}, "per_channel", True),
    ({"percentile": 99}, "percentile", 99.0),
    ({"percentile": np.float32(99.5)}, "percentile", 99.5),
])
def test_loose_but_clear_values_are_normalized(kwargs, field, expected):
    value = getattr(QConfig(**kwargs), field)
    assert value == expected and type(value) is type(expected)


# --- dict configs -------------------------------------------------------------------------------------

@pytest.mark.parametrize("d,culprit,suggestion", [
    ({"weight_bit": 4}, "'weight_bit'", "'weight_bits'"),
    ({"skip_layer": ("conv2d_0",)}, "'skip_layer'", "'skip_layers'"),
    ({"act_symetric": False}, "'act_symetric'", "'act_symmetric'"),
    ({"layer_overrides": {"conv2d_0": {"weight_bit": 4}}}, "'weight_bit'", "'weight_bits'"),
])
def test_dict_config_unknown_key(d, culprit, suggestion):
    with pytest.raises(ConfigError) as e:
        QConfig.from_dict(d)
    assert culprit in str(e.value) and suggestion in str(e.value), str(e.value)


def test_dict_config_nested_overrides_become_layer_configs():
    cfg = QConfig.from_dict({"layer_overrides": {"conv2d_0": {"weight_bits": 4}}, "op_overrides": {"dense": {"skip": True}}})
    assert cfg.layer("conv2d_0", "conv2d").weight_bits == 4 and cfg.layer("dense_0", "dense").skip


def test_replace_unknown_field():
    with pytest.raises(ConfigError, match="'per_chanel'.*'per_channel'"):
        QConfig().replace(per_chanel=True)


def test_quantize_model_dict_config_typo(cnn):
    with pytest.raises(ConfigError, match="'bias_corection'.*'bias_correction'"):
        _quantize(cnn, {"bias_corection": False})


@pytest.mark.parametrize("config", [42, "per_channel", [("per_channel", True)]])
def test_config_of_wrong_type(cnn, config):
    mod, params, data = cnn
    with pytest.raises(ConfigError) as e:
        relayq.quantize_model(mod, params, data, "naive", config)
    assert "config" in str(e.value) and type(config).__name__ in str(e.value)


# --- calibration= and shapes= -------------------------------------------------------------------------

@pytest.mark.parametrize("calibration,culprit", [(None, "None"), (3, "3"), ("KL", "'KL'"), ("entropy", "'entropy'"),
                                                 ("", "''")])
def test_bad_calibration(cnn, calibration, culprit):
    with pytest.raises(ConfigError) as e:
        _quantize(cnn, calibration=calibration)
    assert culprit in str(e.value) and "naive" in str(e.value)
    if calibration == "KL":
        assert "did you mean 'kl'" in str(e.value)


@pytest.mark.parametrize("shapes,culprit", [
    ([(2, 3, 8, 8)], "list"), ({"data": (2, -3, 8, 8)}, "-3"), ({"data": "2,3,8,8"}, "'2,3,8,8'"),
    ({"data": (2, 3.0, 8, 8)}, "3.0"), ({"dat": (2, 3, 8, 8)}, "'dat'"), ({"data": (4, 3, 8, 8)}, "(2, 3, 8, 8)"),
])
def test_bad_shapes(cnn, shapes, culprit):
    with pytest.raises(ConfigError) as e:
        _quantize(cnn, shapes=shapes)
    assert "shapes" in str(e.value) and culprit in str(e.value), str(e.value)


# --- layer names that match no layer ------------------------------------------------------------------

@pytest.mark.parametrize("config,field,culprit,closest", [
    ({"skip_layers": ("conv2d_9",)}, "skip_layers", "'conv2d_9'", "'conv2d_3'"),
    ({"skip_layers": "conv2d_7"}, "skip_layers", "'conv2d_7'", "'conv2d_3'"),
    ({"layer_overrides": {"dense_1": LayerConfig(weight_bits=4)}}, "layer_overrides", "'dense_1'", "'dense_0'"),
    ({"layer_overrides": {"fc_.*": LayerConfig(skip=True)}}, "layer_overrides", "'fc_.*'", "'conv2d_0'"),
    ({"skip_layers": ("conv2d_0", "maxpool_0")}, "skip_layers", "'maxpool_0'", "'max_pool2d_0'"),
])
def test_layer_name_matches_nothing(cnn, config, field, culprit, closest):
    with pytest.raises(ConfigError) as e:
        _quantize(cnn, config)
    msg = str(e.value)
    assert field in msg and culprit in msg and closest in msg, msg


@pytest.mark.parametrize("config,absent", [
    ({"skip_layers": "conv2d_1"}, {"conv2d_1"}),
    ({"skip_layers": ("conv2d_[12]",)}, {"conv2d_1", "conv2d_2"}),
    # an override of a skipped layer names an existing layer: no error
    ({"skip_layers": ("dense_0",), "layer_overrides": {"dense_0": LayerConfig(weight_bits=4)}}, {"dense_0"}),
    ({"skip_ops": ("dense",), "layer_overrides": {"dense_0": LayerConfig(weight_bits=4)}}, {"dense_0"}),
])
def test_existing_layer_names_work(cnn, config, absent):
    q = _quantize(cnn, config)
    assert not absent & set(q.layers) and set(q.layers) >= set(LAYERS) - absent - {"max_pool2d_0", "avg_pool2d_0"}


def test_check_layer_names_accepts_aliases():
    cfg = QConfig(skip_layers=("/features/0/Conv",), layer_overrides={"/classifier/.*": LayerConfig(weight_bits=4)})
    check_layer_names(cfg, ["conv2d_0", "dense_0", "/features/0/Conv", "/classifier/Gemm"])
    with pytest.raises(ConfigError, match="'/features/0/Conv'.*'/features/1/Conv'"):
        check_layer_names(cfg, ["conv2d_0", "/features/1/Conv", "/classifier/Gemm"])


# --- params overrides ---------------------------------------------------------------------------------

def test_params_unknown_key(cnn):
    mod, params, data = cnn
    with pytest.raises(ModelError) as e:
        _quantize(cnn, params={**params, "w9": params["w1"]})
    assert "'w9'" in str(e.value) and "'w1'" in str(e.value)


@pytest.mark.parametrize("missing", ["w1", "g", "fcb"])
def test_params_missing_weight(cnn, missing):
    mod, params, data = cnn
    with pytest.raises(ModelError, match=f"'{missing}'.*missing"):
        _quantize(cnn, params={k: v for k, v in params.items() if k != missing})


def test_params_of_wrong_type(cnn):
    mod, params, data = cnn
    with pytest.raises(ModelError, match="params.*list"):
        _quantize(cnn, params=list(params.values()))


def _onnx_conv():
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.RandomState(0)
    w = (rng.randn(3, 2, 3, 3) * 0.3).astype("float32")
    b = (rng.randn(3) * 0.1).astype("float32")
    node = helper.make_node("Conv", ["input", "onnx::Conv_21", "conv.bias"], ["y"], pads=[1, 1, 1, 1])
    relu = helper.make_node("Relu", ["y"], ["out"])
    graph = helper.make_graph(
        [node, relu], "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 2, 4, 4])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 3, 4, 4])],
        [numpy_helper.from_array(w, "onnx::Conv_21"), numpy_helper.from_array(b, "conv.bias")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    return model, w


@pytest.mark.parametrize("key", ["onnx::Conv_21", "Conv_21"])
def test_onnx_params_override_by_initializer_or_param_name(key):
    model, w = _onnx_conv()
    data = [np.random.RandomState(1).rand(1, 2, 4, 4).astype("float32")]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = relayq.quantize_model(model, {key: w * 2}, data, "naive", {"show_progress": False})
    assert float(np.max(q.qpoints["conv2d_0:w"].threshold)) == pytest.approx(2 * float(np.abs(w).max()), rel=1e-5)


def test_onnx_params_override_unknown():
    model, w = _onnx_conv()
    with pytest.raises(ModelError) as e:
        relayq.quantize_model(model, {"onnx::Conv_22": w}, [np.zeros((1, 2, 4, 4), "float32")], "naive",
                              {"show_progress": False})
    assert "'onnx::Conv_22'" in str(e.value) and "'Conv_21'" in str(e.value)
