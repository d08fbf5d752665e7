"""Multi-output models: calibrated exactly like their single-output parts, realized end to end.

The tap module used to put the model's result first and read the taps from ``outputs[1:]``; a model
returning a tuple of k tensors shifted every point by k - 1. These tests compare the thresholds of a
multi-output model with the same graph returning one tensor, and with max |x| of the float tensors.
"""
import numpy as np
import pytest

import relayq
from relayq.analysis.reference import reference_run
from relayq.runtime import compile_host
from relayq.transform import annotate, prepare
from relayq.transform.calibrate import tap_module

from multi_nets import VALUES, calib_data, multi_output_net

CFG = relayq.QConfig(show_progress=False, check_accuracy=False)
#: Output selections: 2 and 3 outputs of different shapes, outputs also read by later layers ("a",
#: "b"), the graph input passed through ("x"), in several orders.
SELECTIONS = [("logits", "a"), ("a", "side", "logits"), ("logits", "x"), ("x", "b"), ("b", "logits", "a")]
_CACHE = {}


def _quantized(outputs, calibration="kl", config=CFG):
    key = (outputs, calibration, repr(config))
    if key not in _CACHE:
        _CACHE[key] = relayq.quantize_model(*multi_output_net(outputs), calib_data(), calibration, config)
    return _CACHE[key]


def _same_point(p, r):
    assert (p.role, p.method, p.bits, p.axis, p.zero_point) == (r.role, r.method, r.bits, r.axis, r.zero_point)
    np.testing.assert_array_equal(np.asarray(p.threshold), np.asarray(r.threshold), err_msg=p.name)
    np.testing.assert_array_equal(np.asarray(p.scale), np.asarray(r.scale), err_msg=p.name)
    if r.bias_corr is None:
        assert p.bias_corr is None
    else:
        np.testing.assert_array_equal(p.bias_corr, r.bias_corr, err_msg=p.name)


@pytest.mark.parametrize("outputs", SELECTIONS)
def test_thresholds_equal_the_single_output_model(outputs):
    """kl thresholds, scales and bias corrections of every point equal those of the one-output graph."""
    single = _quantized(("logits",) if "logits" in outputs else ("b",))     # the deepest output returned
    multi = _quantized(outputs)
    extra = {"conv2d_2:w"} if "side" in outputs else set()       # the side conv exists only when returned
    assert set(multi.qpoints) == set(single.qpoints) | extra
    for name, r in single.qpoints.items():
        _same_point(multi.qpoints[name], r)


def test_naive_thresholds_are_the_max_of_the_float_tensors():
    """An independent check: naive thresholds are max |x| of the tensors each point reads."""
    data = calib_data()
    q = _quantized(("a", "side", "logits"), "naive")
    fp = {v: compile_host(prepare(*multi_output_net((v,)))) for v in ("x", "a", "b")}
    peak = {v: max(float(np.abs(f(x)[0]).max()) for x in data) for v, f in fp.items()}
    assert q.qpoints["conv2d_0:in0"].threshold == pytest.approx(peak["x"], rel=1e-6)
    assert q.qpoints["conv2d_0:out"].threshold == pytest.approx(peak["a"], rel=1e-6)
    assert q.qpoints["conv2d_1:out"].threshold == pytest.approx(peak["b"], rel=1e-6)


def test_tap_module_puts_taps_before_a_tuple_result():
    annotated = annotate(prepare(*multi_output_net(("a", "side", "logits"))), CFG)
    tmod, names = tap_module(annotated)
    outs = compile_host(tmod)(calib_data(1)[0])
    assert len(outs) == len(names) + 3
    assert [o.shape for o in outs[len(names):]] == [VALUES["a"], VALUES["side"], VALUES["logits"]]


@pytest.mark.parametrize("outputs", [("a", "side", "logits"), ("logits", "x")])
def test_realized_multi_output_equals_reference_and_float(outputs):
    q = _quantized(outputs, "naive")
    mod, params = multi_output_net(outputs)
    lib, fp, sim = relayq.build(q), relayq.build(mod, params=params), compile_host(q.simulated)
    x = calib_data(1, seed=9)[0]
    y, yf, ys, yr = lib(x), fp(x), sim(x), reference_run(q.annotated, q.qpoints, x)
    # The logits are those of the one-output integer model, bit for bit.
    np.testing.assert_array_equal(y[outputs.index("logits")], relayq.build(_quantized(("logits",), "naive"))(x))
    assert [a.shape for a in y] == [VALUES[o] for o in outputs]
    for i, name in enumerate(outputs):
        np.testing.assert_array_equal(y[i], yr[i], err_msg=name)       # integer model == numpy reference
        np.testing.assert_array_equal(y[i], ys[i], err_msg=name)       # == the simulated module
        cos = float(np.dot(y[i].ravel(), yf[i].ravel()) / (np.linalg.norm(y[i]) * np.linalg.norm(yf[i])))
        assert cos > 0.99, (name, cos)
    if "x" in outputs:                                                 # the input passed through, untouched
        np.testing.assert_array_equal(y[outputs.index("x")], x)
