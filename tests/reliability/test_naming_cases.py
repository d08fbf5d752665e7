"""Every error and warning that names a layer or point also names it in the user's terms.

Each case builds a small ONNX (or torch) model, provokes one failure, and checks the exact class and
that the message carries relayq's name *and* the source model's node / initializer / module name.
"""
import warnings

import numpy as np
import pytest

import relayq
from relayq.calibration.methods import Calibrator
from relayq.transform.annotate import layers

from onnx_nets import batches, hardswish_net, set_initializer

pytest.importorskip("torch")
CFG = relayq.QConfig(show_progress=False)
C0, C1, FC = "/features/features.0/Conv", "/features/features.2/Conv", "/fc/Gemm"
HS = "/features/features.1/HardSwish"


def _conv0():
    return ["conv2d_0", f'ONNX node "{C0}"', 'weight "features.0.weight"']


def _conv1():
    return ["conv2d_1", f'ONNX node "{C1}"', 'weight "features.2.weight"']


def _dense():
    return ["dense_0", f'ONNX node "{FC}"', 'weight "fc.weight"']


class _NanThreshold(Calibrator):
    def observe(self, name, value):
        pass

    def threshold(self, name, bits, signed=True):
        return float("nan") if name == "conv2d_1:in0" else 1.0


class _Broken(Calibrator):
    def observe(self, name, value):
        pass

    def threshold(self, name, bits, signed=True):
        if name == "conv2d_1:in0":
            raise KeyError("no histogram")
        return 1.0


def _poke(init, value, where=0):
    def fn(a):
        a = a.copy().reshape(-1)
        a[where] = value
        return a
    return lambda m: set_initializer(m, init, lambda a: fn(a).reshape(a.shape))


def _scale(init, factor):
    return lambda m: set_initializer(m, init, lambda a: a * factor)


def _chain(*fns):
    def run(m):
        for f in fns:
            m = f(m)
        return m
    return run


LC16 = relayq.LayerConfig(weight_bits=16, act_bits=16)

# id: (model edit, config changes, calibration, expected class, expected substrings)
CASES = {
    "nan-first-conv-weight": (_poke("features.0.weight", np.nan), {}, "naive", relayq.DatasetError,
                              _conv0() + ["NaN"]),
    "nan-second-conv-weight": (_poke("features.2.weight", np.nan, 7), {}, "naive", relayq.DatasetError,
                               _conv1() + ["conv2d_1:w"]),
    "nan-gemm-weight": (_poke("fc.weight", np.nan, 100), {}, "naive", relayq.DatasetError, _dense() + ["dense_0:w"]),
    "inf-conv-weight": (_poke("features.0.weight", np.inf), {}, "naive", relayq.DatasetError, _conv0() + ["Inf"]),
    "neg-inf-gemm-weight": (_poke("fc.weight", -np.inf), {}, "naive", relayq.DatasetError, _dense()),
    "hardswish-fallback": (None, {"skip_ops": ("elementwise",)}, None, relayq.FloatFallbackWarning,
                           [f'HardSwish "{HS}" (4 ops: add, clip, divide, multiply)']),
    "skip-by-onnx-node": (None, {"skip_layers": (C1,)}, None, relayq.FloatFallbackWarning, [f'Conv "{C1}"']),
    "skip-by-initializer": (None, {"skip_layers": ("features.2.weight",)}, None, relayq.FloatFallbackWarning,
                            [f'Conv "{C1}"']),
    "skip-by-node-regex": (None, {"skip_layers": ("/features/.*/Conv",)}, None, relayq.FloatFallbackWarning,
                           [f'Conv "{C0}"', f'Conv "{C1}"']),
    "skip-by-relayq-name": (None, {"skip_layers": ("dense_0",)}, None, relayq.FloatFallbackWarning,
                            [f'Gemm "{FC}" (2 ops: add, matmul)']),
    "skip-op-type": (None, {"skip_ops": ("conv2d",)}, None, relayq.FloatFallbackWarning,
                     [f'Conv "{C0}"', f'Conv "{C1}"']),
    "overflow-override-by-node": (None, {"layer_overrides": {C1: LC16}}, "naive", relayq.OverflowRiskError,
                                  _conv1() + ["overflows int32"]),
    "overflow-override-by-initializer": (None, {"layer_overrides": {"fc.weight": LC16}}, "naive",
                                         relayq.OverflowRiskError, _dense() + ["overflows int32"]),
    "bias-clamp-gemm": (_chain(_poke("fc.bias", 5000.0, 2), _scale("fc.weight", 1e-4)), {}, "naive",
                        relayq.BiasClampWarning, _dense() + ['bias "fc.bias"', "clamped 1 of 10", "channel 2"]),
    "bias-clamp-conv": (_chain(_poke("features.2.bias", -3000.0, 4), _scale("features.2.weight", 1e-3)), {},
                        "naive", relayq.BiasClampWarning, _conv1() + ['bias "features.2.bias"', "channel 4"]),
    # (HardSwish kept float, so that conv2d_1 reads a float input and has its own input point conv2d_1:in0)
    "calibrator-nan-threshold": (None, {"skip_ops": ("elementwise",)}, _NanThreshold(), relayq.ConfigError,
                                 _conv1() + ["conv2d_1:in0", "non-finite threshold"]),
    "calibrator-raises": (None, {"skip_ops": ("elementwise",)}, _Broken(), relayq.ConfigError,
                          _conv1() + ["KeyError", "no histogram"]),
}


@pytest.fixture(scope="module")
def net():
    return hardswish_net()[0]


@pytest.mark.parametrize("case", list(CASES))
def test_message_names_the_culprit_in_the_users_terms(net, case):
    edit, changes, calibration, cls, expected = CASES[case]
    model = edit(net) if edit else net
    config = CFG.replace(**changes)
    if issubclass(cls, Warning):
        with warnings.catch_warnings(record=True) as rec:
            warnings.simplefilter("always")
            if calibration is None:
                mod, params = relayq.frontend.from_onnx(model)
                relayq.transform.annotate(relayq.transform.prepare(mod, params), config)
            else:
                relayq.quantize_model(model, None, batches(), calibration, config)
        hits = [str(w.message) for w in rec if issubclass(w.category, cls)]
        assert len(hits) == 1, [str(w.message) for w in rec]
        msg = hits[0]
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with pytest.raises(cls) as e:
                relayq.quantize_model(model, None, batches(), calibration or "naive", config)
        assert type(e.value) is cls
        msg = str(e.value)
    for s in expected:
        assert s in msg, (s, msg)


# ------------------------------------------------------------------ torch: module paths
@pytest.fixture(scope="module")
def torch_net():
    return hardswish_net()[1]


def _from_torch(net):
    import torch

    return relayq.frontend.from_torch(net, (torch.zeros(1, 3, 8, 8),))


def test_torch_nan_weight_names_module_path(torch_net):
    mod, params = _from_torch(torch_net)
    params = dict(params)
    key = next(k for k in params if k.endswith("features_2_weight"))
    params[key] = params[key].copy()
    params[key].reshape(-1)[3] = np.nan
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(relayq.DatasetError) as e:
            relayq.quantize_model(mod, params, batches(), "naive", CFG)
    assert 'conv2d_1:w' in str(e.value) and 'torch module "features.2"' in str(e.value)
    assert 'weight "features.2.weight"' in str(e.value)


def test_torch_skip_by_module_path(torch_net):
    mod, params = _from_torch(torch_net)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        annotated = relayq.transform.annotate(relayq.transform.prepare(mod, params),
                                              CFG.replace(skip_layers=("features.2",)))
    assert sorted(layers(annotated)) == ["conv2d_0", "dense_0", "elementwise_0"]     # elementwise_0: HardSwish
    msgs = [str(w.message) for w in rec if issubclass(w.category, relayq.FloatFallbackWarning)]
    assert any('Conv2d "features.2"' in m for m in msgs), msgs
