"""The portable artefact: weights stored at their bit width, the loaded model bit-identical."""
import warnings
import zipfile

import numpy as np
import pytest

import relayq
from relayq import qmath

from helpers import tiny_cnn


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 7, 8, 12, 16])
def test_pack_codes_round_trip(bits):
    lo, hi = qmath.qrange(bits)
    q = np.random.RandomState(bits).randint(lo, hi + 1, size=1001)
    packed = qmath.pack_codes(q, bits)
    assert packed.nbytes == (1001 * bits + 7) // 8
    np.testing.assert_array_equal(qmath.unpack_codes(packed, bits, q.size), q)
    with pytest.raises(relayq.ConfigError):
        qmath.pack_codes(np.array([hi + 1]), bits)


@pytest.mark.parametrize("wbits", [2, 4, 8])
def test_saved_model_is_smaller_and_identical(tmp_path, wbits):
    mod, params = tiny_cnn(0)
    rng = np.random.RandomState(1)
    data = [rng.randn(2, 3, 8, 8).astype("float32") for _ in range(2)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = relayq.quantize_model(mod, params, data, "naive",
                                  relayq.QConfig(show_progress=False, weight_bits=wbits, per_channel=True))
    path = str(tmp_path / "m.rqz")
    rep = q.save(path)
    n_weights = sum(v.size for k, v in q.params.items() if k.endswith(":w"))
    assert rep["int8_weights"] == n_weights
    assert rep["packed_weights"] <= sum((v.size * wbits + 7) // 8 for k, v in q.params.items() if k.endswith(":w"))
    with zipfile.ZipFile(path) as z:
        stored = sum(z.getinfo(n).file_size for n in z.namelist() if n.endswith(".bin"))
    assert stored == rep["packed_weights"]
    if wbits <= 4:
        assert rep["packed_weights"] * (8 // wbits) <= rep["int8_weights"] + 8 * len(q.params)
    q2 = relayq.load_quantized(path)
    x = rng.randn(2, 3, 8, 8).astype("float32")
    np.testing.assert_array_equal(relayq.build(q2)(x), relayq.build(q)(x))
    assert q2.qpoints.keys() == q.qpoints.keys()


def test_load_rejects_garbage(tmp_path):
    p = tmp_path / "bad.rqz"
    p.write_bytes(b"not a zip")
    with pytest.raises(relayq.ModelError, match="not a relayq artefact"):
        relayq.load_quantized(str(p))
    with pytest.raises(relayq.ModelError, match="no relayq artefact"):
        relayq.load_quantized(str(tmp_path / "missing.rqz"))
