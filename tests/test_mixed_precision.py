"""relayq.auto_mixed_precision: the widths it returns meet the budget, shrink the model, and reproduce."""
import warnings

import numpy as np
import pytest
import tvm

import relayq
from relayq.analysis.sensitivity import output_cosine
from helpers import tiny_cnn


def _data(n, seed):
    rng = np.random.RandomState(seed)
    return [rng.randn(2, 3, 8, 8).astype("float32") for _ in range(n)]


def _cosine_on(qmodel, mod, params, batches):
    lib, fp = relayq.build(qmodel), relayq.build(mod, params=params)
    return output_cosine(np.concatenate([fp(x) for x in batches]), np.concatenate([lib(x) for x in batches]))


def test_lowers_weights_within_budget():
    mod, params = tiny_cnn()
    calib, heldout = _data(4, 0), _data(6, 1)
    res = relayq.auto_mixed_precision(mod, params, calib, heldout, metric=output_cosine, budget=0.003,
                                      candidates=(4, 8), calibration="kl", ranking="weight_sqnr", refine=1,
                                      config=relayq.QConfig(show_progress=False), show_progress=False)
    lowered = [n for n, w in res.widths.items() if w == 4]
    assert lowered and len(lowered) < len(res.widths)         # the budget allows some, not all
    assert res.metric >= res.target == pytest.approx(res.reference_metric - 0.003)
    assert res.size_bytes < res.widest_size_bytes
    # The returned model is what was measured, and its config quantizes to the same integer model.
    assert _cosine_on(res.qmodel, mod, params, heldout) == pytest.approx(res.metric, abs=1e-6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        again = relayq.quantize_model(mod, params, calib, "kl", res.config)
    tvm.ir.assert_structural_equal(again.realized, res.qmodel.realized, map_free_vars=True)
    assert {n: again.qpoints[f"{n}:w"].bits for n in res.widths} == res.widths


@pytest.mark.slow
def test_float_fallback_is_the_last_resort():
    """Against the float model with a budget W8 cannot meet, the most sensitive layers are kept float."""
    mod, params = tiny_cnn()
    calib, heldout = _data(4, 0), _data(4, 1)
    res = relayq.auto_mixed_precision(mod, params, calib, heldout, metric=output_cosine, budget=2e-5,
                                      candidates=(8,), calibration="kl", baseline="float",
                                      config=relayq.QConfig(show_progress=False), show_progress=False)
    floats = [n for n, w in res.widths.items() if w == "float"]
    assert floats and res.metric >= 1.0 - 2e-5 and res.reference_metric == pytest.approx(1.0)
    assert set(floats) <= set(res.config.skip_layers)
    assert res.size_bytes > res.widest_size_bytes                # float layers cost 4 bytes a weight


def test_bad_arguments():
    mod, params = tiny_cnn()
    with pytest.raises(relayq.ConfigError, match="baseline"):
        relayq.auto_mixed_precision(mod, params, _data(1, 0), _data(1, 1), baseline="fp32")
    with pytest.raises(relayq.ConfigError, match="budget"):
        relayq.auto_mixed_precision(mod, params, _data(1, 0), _data(1, 1), budget=-1)
