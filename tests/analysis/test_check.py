"""The accuracy check after calibration: collapses warn and name the culprits, 8-bit models do not."""
import warnings

import numpy as np
import pytest

import relayq
from relayq.analysis import check
from relayq.analysis.reference import reference_run
from relayq.runtime import compile_host

from multi_nets import calib_data, multi_output_net


def _quantize(weight_bits, act_bits, outputs=("logits",), n_batches=8, **cfg):
    config = relayq.QConfig(show_progress=False, weight_bits=weight_bits, act_bits=act_bits, **cfg)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        q = relayq.quantize_model(*multi_output_net(outputs), calib_data(n_batches), "kl", config)
    return q, [w for w in caught if issubclass(w.category, relayq.AccuracyCollapseWarning)]


def test_w8a8_passes_quietly_and_reports():
    q, collapse = _quantize(8, 8)
    assert collapse == []
    acc = q.accuracy
    assert not acc["collapsed"] and acc["cosine"] > 0.99 and acc["top1_agreement"] == 1.0
    assert (acc["batches"], acc["samples"]) == (check.CHECK_BATCHES, 2 * check.CHECK_BATCHES)
    assert set(acc["sqnr_db"]) == set(q.qpoints)                     # every point, weights included
    assert min(acc["sqnr_db"].values()) > 25.0                        # 8 bits: ~6 dB per bit
    assert "check: output cosine" in q.summary()


@pytest.mark.parametrize("bits,culprit", [((2, 2), ":w"), ((8, 2), ":out")])
def test_low_bit_collapse_warns_naming_the_worst_points(bits, culprit):
    q, collapse = _quantize(*bits)
    assert len(collapse) == 1
    msg = str(collapse[0].message)
    acc = q.accuracy
    assert acc["collapsed"] and acc["cosine"] < check.MIN_COSINE
    worst = [name for name, _ in acc["worst_points"]]
    assert len(worst) == check.WORST_POINTS and all(name in msg for name in worst)
    # W2A2: the 2-bit weights are the noisiest points; W8A2: the 2-bit activations.
    assert culprit in worst[0]
    assert acc["sqnr_db"][worst[0]] == min(acc["sqnr_db"].values())


def test_the_check_measures_the_quantized_model_on_the_last_batches():
    """The cosine the check reports is that of the integer model against float on the last batches."""
    q, _ = _quantize(8, 2)
    data = calib_data(8)[-check.CHECK_BATCHES:]
    sim = relayq.build(q)
    fp = compile_host(q.prepared)
    s = np.concatenate([sim(x).ravel() for x in data])
    f = np.concatenate([fp(x)[0].ravel() for x in data])
    assert q.accuracy["cosine"] == pytest.approx(check.cosine(f, s), abs=1e-5)


def test_check_can_be_turned_off():
    q, collapse = _quantize(2, 2, check_accuracy=False)
    assert q.accuracy is None and collapse == []
    assert "check:" not in q.summary()


def test_build_reuses_the_checked_executable_and_matches_the_reference():
    q, _ = _quantize(8, 8, outputs=("a", "logits"))
    lib = relayq.build(q)
    assert q._host_build[0] is q.realized and lib.executable is q._host_build[1]
    x = calib_data(1, seed=5)[0]
    for a, b in zip(lib(x), reference_run(q.annotated, q.qpoints, x)):
        np.testing.assert_array_equal(a, b)


def test_collapsed_rules():
    assert check.collapsed({"cosine": 0.94, "top1_agreement": 1.0, "samples": 100})
    assert not check.collapsed({"cosine": 0.96, "top1_agreement": 1.0, "samples": 100})
    assert check.collapsed({"cosine": 0.99, "top1_agreement": 0.5, "samples": check.MIN_TOP1_SAMPLES})
    # Too few samples for top-1 to decide: only the cosine counts.
    assert not check.collapsed({"cosine": 0.99, "top1_agreement": 0.5, "samples": check.MIN_TOP1_SAMPLES - 1})
    assert not check.collapsed({"cosine": None, "top1_agreement": None, "samples": 0})


def test_metrics():
    x = np.array([3.0, -4.0])
    assert check.cosine(x, 2 * x) == pytest.approx(1.0) and check.cosine(x, -x) == pytest.approx(-1.0)
    assert check.cosine(np.zeros(3), np.zeros(3)) == 1.0 and check.cosine(np.zeros(2), x) == 0.0
    assert check.sqnr_db(x, x) == float("inf")
    assert check.sqnr_db(x, x + np.array([0.5, 0.0])) == pytest.approx(10 * np.log10(25 / 0.25))
