"""Bad and tricky calibration inputs: each raises or warns with the exact class, naming the culprit
point (and calibrator), or gives the right result.

Calibrator answers are checked through ``act_qpoint`` (no compilation); data cases run ``observe`` /
``quantize_model`` on the small multi-output net of ``tests/multi_nets.py``.
"""
import warnings

import numpy as np
import pytest

import relayq
from relayq.calibration.methods import Calibrator, HistogramCalibrator
from relayq.runtime import compile_host
from relayq.transform import annotate, prepare
from relayq.transform.calibrate import act_qpoint, observe, weight_qpoint

from multi_nets import INPUT_SHAPE, VALUES, calib_data, multi_output_net

CFG = relayq.QConfig(show_progress=False, check_accuracy=False)
ASYM = CFG.replace(act_symmetric=False)
POINT = "conv2d_1:out"


class Fixed(Calibrator):
    """Answers ``value`` for POINT and a sane threshold elsewhere."""

    name = "fixed"

    def __init__(self, value=None, rng=None, fail=None):
        self.value, self.rng, self.fail = value, rng, fail

    def observe(self, name, x):
        if self.fail == "observe" and name == POINT:
            raise ZeroDivisionError("division by zero in my observer")

    def threshold(self, name, bits, signed=True):
        if self.fail == "threshold" and name == POINT:
            raise KeyError("missing statistics")
        return self.value if name == POINT else 1.0

    def range(self, name, bits):
        if self.fail == "range" and name == POINT:
            raise ValueError("no range yet")
        return self.rng if name == POINT else (-1.0, 1.0)


class Recorder(Calibrator):
    """Keeps every value observed, per point."""

    name = "recorder"

    def __init__(self):
        self.seen = {}

    def observe(self, name, x):
        self.seen.setdefault(name, []).append(np.array(x))

    def threshold(self, name, bits, signed=True):
        return float(max(np.abs(v).max() for v in self.seen[name]))


def _annotated(outputs=("logits",)):
    return annotate(prepare(*multi_output_net(outputs)), CFG)


def _assert_names(err_or_warning, *names):
    msg = str(err_or_warning.value if hasattr(err_or_warning, "value") else err_or_warning.message)
    for n in names:
        assert n in msg, (n, msg)


# ----------------------------------------------------------------- a calibrator's bad answers
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf"), -1.0, -1e-30, np.float32("nan"),
                                   None, "abc", np.array([1.0, 2.0]), [0.5]],
                         ids=["nan", "inf", "-inf", "negative", "tiny-negative", "np-nan", "None", "str", "array",
                              "list"])
def test_bad_threshold_names_point_and_calibrator(value):
    with pytest.raises(relayq.ConfigError) as e:
        act_qpoint(POINT, Fixed(value), "fixed", 8, CFG)
    _assert_names(e, POINT, "'fixed' (Fixed)")


@pytest.mark.parametrize("rng", [(float("nan"), 1.0), (0.0, float("inf")), (2.0, 1.0), None, (1.0,), (0, 1, 2),
                                 ("lo", "hi")],
                         ids=["nan-lo", "inf-hi", "lo>hi", "None", "one-value", "three-values", "strings"])
def test_bad_range_names_point_and_calibrator(rng):
    with pytest.raises(relayq.ConfigError) as e:
        act_qpoint(POINT, Fixed(rng=rng), "fixed", 8, ASYM)
    _assert_names(e, POINT, "'fixed' (Fixed)")


@pytest.mark.parametrize("where,cause", [("threshold", KeyError), ("range", ValueError)])
def test_calibrator_raising_is_reraised_naming_the_point(where, cause):
    with pytest.raises(relayq.ConfigError) as e:
        act_qpoint(POINT, Fixed(1.0, (-1.0, 1.0), fail=where), "fixed", 8, CFG if where == "threshold" else ASYM)
    _assert_names(e, POINT, "'fixed' (Fixed)", f"{where}()", cause.__name__)
    assert isinstance(e.value.__cause__, cause)


def test_calibrator_raising_in_observe_through_quantize_model():
    with pytest.raises(relayq.ConfigError) as e:
        relayq.quantize_model(*multi_output_net(), calib_data(2), Fixed(1.0, fail="observe"), CFG)
    _assert_names(e, POINT, "'fixed' (Fixed)", "observe()", "ZeroDivisionError")
    assert isinstance(e.value.__cause__, ZeroDivisionError)


@pytest.mark.parametrize("value,scale", [(np.float32(2.54), 2.54 / 127), (127, 1.0), (0.0, 1.0)],
                         ids=["np-float32", "int", "zero-on-zero-data"])
def test_good_thresholds_are_accepted(value, scale):
    with warnings.catch_warnings():
        warnings.simplefilter("error")          # an all-zero point with threshold 0 is fine: no warning here
        p = act_qpoint(POINT, Fixed(value), "fixed", 8, CFG, seen=(0.0, 0.0) if value == 0.0 else (0.0, 3.0))
    assert p.scale == pytest.approx(scale, rel=1e-6) and p.threshold == pytest.approx(float(value))


def test_zero_threshold_for_nonzero_data_warns():
    with pytest.warns(relayq.CalibrationWarning) as w:
        p = act_qpoint(POINT, Fixed(0.0), "fixed", 8, CFG, seen=(-0.5, 3.0))
    _assert_names(w[0], POINT, "'fixed' (Fixed)")
    assert p.scale == 1.0


def test_builtin_calibrator_error_on_unobserved_point_names_it():
    with pytest.raises(relayq.ConfigError) as e:
        act_qpoint(POINT, HistogramCalibrator("kl"), "kl", 8, CFG)
    _assert_names(e, POINT)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_weight_nan_or_inf_names_the_weight(bad):
    w = np.ones((4, 3, 3, 3), "float32")
    w[1, 2, 0, 0] = bad
    with pytest.raises(relayq.DatasetError) as e:
        weight_qpoint("conv2d_7:w", w, 8, -1, "max")
    _assert_names(e, "conv2d_7:w")


# ----------------------------------------------------------------- degenerate data
def _observe_warnings(dataset, outputs=("logits",), params=None):
    annotated = _annotated(outputs) if params is None else annotate(prepare(multi_output_net(outputs)[0], params), CFG)
    ranges = {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        observe(annotated, dataset, HistogramCalibrator("naive"), show_progress=False, ranges=ranges)
    return [w for w in caught if issubclass(w.category, relayq.CalibrationWarning)], ranges


def test_all_zero_data_warns_naming_the_input_point():
    caught, ranges = _observe_warnings([np.zeros(INPUT_SHAPE, "float32")] * 3)
    assert len(caught) == 1
    _assert_names(caught[0], "conv2d_0:in0", "all zero", "3 batch")
    assert ranges["conv2d_0:in0"] == (0.0, 0.0)


def test_constant_data_warns_with_the_value():
    caught, _ = _observe_warnings([np.full(INPUT_SHAPE, 0.25, "float32")] * 2)
    assert len(caught) == 1
    _assert_names(caught[0], "conv2d_0:in0 (always 0.25)")


def test_dead_relu_warns_naming_the_layer_output():
    from multi_nets import net_params
    params = net_params()
    params["ba"] = np.full(8, -100.0, "float32")            # conv_a's ReLU never fires
    caught, ranges = _observe_warnings(calib_data(2), params=params)
    assert len(caught) == 1
    _assert_names(caught[0], "conv2d_0:out", "all zero")
    assert "conv2d_0:in0" not in str(caught[0].message)
    assert ranges["conv2d_0:out"] == (0.0, 0.0)


def test_one_zero_batch_among_real_ones_is_not_degenerate():
    caught, _ = _observe_warnings([np.zeros(INPUT_SHAPE, "float32")] + calib_data(2))
    assert caught == []


def test_all_zero_data_end_to_end_scale_and_warning():
    with pytest.warns(relayq.CalibrationWarning) as w:
        q = relayq.quantize_model(*multi_output_net(), [np.zeros(INPUT_SHAPE, "float32")] * 2, "kl", CFG)
    assert any("conv2d_0:in0" in str(x.message) for x in w if issubclass(x.category, relayq.CalibrationWarning))
    assert q.qpoints["conv2d_0:in0"].threshold == 0.0 and q.qpoints["conv2d_0:in0"].scale == 1.0


# ----------------------------------------------------------------- multi-output models: taps line up
@pytest.mark.parametrize("outputs", [("logits", "a"), ("a", "side", "logits"), ("logits", "x"), ("x", "b"),
                                     ("side", "a", "x")])
def test_every_point_observes_its_own_tensor(outputs):
    """Each point sees exactly the float tensor it reads, whatever the model returns."""
    data = calib_data(2)
    rec = Recorder()
    names = observe(_annotated(outputs), data, rec, show_progress=False)
    reads = {"conv2d_0:in0": "x", "conv2d_0:out": "a", "conv2d_1:out": "b"}
    fp = {v: compile_host(prepare(*multi_output_net((v,)))) for v in set(reads[n] for n in names)}
    for name in names:
        assert [v.shape for v in rec.seen[name]] == [VALUES[reads[name]]] * len(data), name
        for x, seen in zip(data, rec.seen[name]):
            np.testing.assert_allclose(seen, fp[reads[name]](x)[0], rtol=1e-5, atol=1e-5, err_msg=name)


# ----------------------------------------------------------------- datasets
def _gen(n):
    yield from calib_data(n)


_REF = {}


@pytest.mark.parametrize("kind", ["one-batch-list", "generator", "tuple-batches", "dict-batches"])
def test_dataset_forms_give_the_same_thresholds(kind):
    if "ref" not in _REF:
        _REF["ref"] = relayq.quantize_model(*multi_output_net(), calib_data(3), "naive", CFG).qpoints
    ref = _REF["ref"]
    if kind == "one-batch-list":
        data, ref = calib_data(1), relayq.quantize_model(*multi_output_net(), calib_data(1)[0], "naive", CFG).qpoints
    elif kind == "generator":
        data = _gen(3)
    elif kind == "tuple-batches":
        data = [(x,) for x in calib_data(3)]
    else:
        data = [{"data": x} for x in calib_data(3)]
    q = relayq.quantize_model(*multi_output_net(), data, "naive", CFG)
    assert {k: p.threshold for k, p in q.qpoints.items() if p.role == "act"} == \
        {k: p.threshold for k, p in ref.items() if p.role == "act"}


def test_single_batch_dataset_is_checked_on_that_batch():
    q = relayq.quantize_model(*multi_output_net(), _gen(1), "naive", CFG.replace(check_accuracy=True))
    assert (q.accuracy["batches"], q.accuracy["samples"]) == (1, INPUT_SHAPE[0])
    assert q.accuracy["cosine"] > 0.99 and not q.accuracy["collapsed"]


def test_empty_generator_is_a_dataset_error():
    with pytest.raises(relayq.DatasetError, match="empty"):
        relayq.quantize_model(*multi_output_net(), _gen(0), "naive", CFG)
