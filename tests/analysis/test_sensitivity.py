"""relayq.analysis.sensitivity: variants re-quantized from kept statistics equal a fresh quantization,
and the per-layer numbers find the layer that was made bad on purpose."""
import warnings

import numpy as np
import pytest
import tvm

import relayq
from relayq.analysis.sensitivity import Variants, output_cosine, sensitivity, with_weight_bits
from helpers import tiny_cnn


def _data(n, seed):
    rng = np.random.RandomState(seed)
    return [rng.randn(2, 3, 8, 8).astype("float32") for _ in range(n)]


@pytest.fixture(scope="module")
def tiny():
    mod, params = tiny_cnn()
    calib = _data(4, 0)
    cfg = relayq.QConfig(show_progress=False, check_accuracy=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = relayq.quantize_model(mod, params, calib, "kl", cfg)
    return mod, params, calib, cfg, q


@pytest.mark.parametrize("change", [("skip", "conv2d_1"), ("skip", "add_0"), ("bits", "conv2d_3"), ("bits", "dense_0")])
def test_variant_equals_fresh_quantization(tiny, change):
    """Skipping a layer / lowering its weights from the kept statistics gives exactly the points and the
    integer graph of quantize_model run again on the calibration data with that config."""
    mod, params, calib, cfg, q = tiny
    kind, layer = change
    new_cfg = cfg.replace(skip_layers=(layer,)) if kind == "skip" else with_weight_bits(cfg, {layer: 4})
    annotated, qpoints, realized = Variants(q).make(new_cfg)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fresh = relayq.quantize_model(mod, params, calib, "kl", new_cfg)
    assert sorted(qpoints) == sorted(fresh.qpoints)
    for name, p in fresh.qpoints.items():
        np.testing.assert_allclose(np.asarray(qpoints[name].scale), np.asarray(p.scale), rtol=0, atol=0, err_msg=name)
        assert qpoints[name].bits == p.bits
        if p.bias_corr is not None:
            np.testing.assert_allclose(qpoints[name].bias_corr, p.bias_corr, rtol=1e-12, err_msg=name)
    tvm.ir.assert_structural_equal(realized, fresh.realized, map_free_vars=True)


def test_sensitivity_finds_the_bad_layer():
    """With conv2d_1 at 2-bit weights, its output has the lowest SQNR and keeping it float gains the most."""
    mod, params = tiny_cnn()
    cfg = relayq.QConfig(show_progress=False, check_accuracy=False,
                         layer_overrides={"conv2d_1": relayq.LayerConfig(weight_bits=2)})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = relayq.quantize_model(mod, params, _data(4, 0), "kl", cfg)
    evaluation = _data(8, 1)
    varied = ["conv2d_0", "conv2d_1", "dense_0"]
    res = sensitivity(q, evaluation, metric=output_cosine, layers=varied, show_progress=False)
    assert [r.layer for r in res.rows] == list(q.layers)
    assert all((r.metric is not None) == (r.layer in varied) for r in res.rows)
    # The base metric is the realized model's cosine with the float model, measured here independently.
    lib, fp = relayq.build(q), relayq.build(mod, params=params)
    ref = np.concatenate([fp(x) for x in evaluation])
    got = np.concatenate([lib(x) for x in evaluation])
    assert res.base_metric == pytest.approx(float(np.dot(ref.ravel(), got.ravel()) /
                                                  (np.linalg.norm(ref) * np.linalg.norm(got))), abs=1e-6)
    best = max(res.rows, key=lambda r: r.delta if r.delta is not None else -1)
    assert best.layer == "conv2d_1" and best.delta > 0
    assert res["conv2d_1"].sqnr_db < res["conv2d_0"].sqnr_db
    assert res.ranking()[0].layer == "conv2d_1"
    table = res.table()
    assert "conv2d_1" in table and "delta" in table


def test_sensitivity_bits_leaves_weightless_layers_out(tiny):
    *_, q = tiny
    res = sensitivity(q, _data(2, 3), bits=2, layers=["conv2d_0", "add_0"], show_progress=False)
    assert res["add_0"].metric is None and res["conv2d_0"].metric is not None
    assert res["conv2d_0"].delta == pytest.approx(res["conv2d_0"].metric - res.base_metric)
    assert res.change == "w2"
    with pytest.raises(relayq.ConfigError, match="conv2d_99"):
        sensitivity(q, _data(1, 3), layers=["conv2d_99"], show_progress=False)


def test_a_layer_that_cannot_be_rederived_is_reported_not_crashed_on():
    """Keeping a transformer FFN's first dense float gives the GELU table after it an input point on a tensor
    calibration never observed: that one layer is reported as not measured (a warning naming it, a note in
    its row), the others are measured; before, the whole analysis raised ConfigError."""
    torch = pytest.importorskip("torch")
    from relayq.testing import torchvision_zoo as tz

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.ln = torch.nn.Linear(16, 32), torch.nn.Linear(32, 16), torch.nn.LayerNorm(16)

        def forward(self, x):
            return self.ln(x + self.b(torch.nn.functional.gelu(self.a(x))))

    torch.manual_seed(0)
    x = np.random.RandomState(0).randn(1, 4, 16).astype("float32")
    mod, params = relayq.frontend.from_onnx(tz.onnx_export(Net().eval(), x))
    data = [np.random.RandomState(i).randn(1, 4, 16).astype("float32") for i in range(6)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = relayq.quantize_model(mod, params, data, "kl", relayq.QConfig(show_progress=False))
    with pytest.warns(relayq.CalibrationWarning, match=r"not measured \(dense_0\)"):
        res = relayq.analysis.sensitivity(q, data, show_progress=False)
    rows = {r.layer: r for r in res.rows}
    assert rows["dense_0"].metric is None and "not measured" in rows["dense_0"].note
    assert rows["dense_1"].metric is not None and rows["elementwise_0"].metric is not None
