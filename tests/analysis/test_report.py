"""QuantizedModel.report: an HTML page with the SQNR chart, histograms with thresholds, the sensitivity table."""
import base64
import re
import sys
import warnings

import numpy as np
import pytest

import relayq
from relayq.analysis.report import MissingPlotPackageError
from helpers import tiny_cnn


@pytest.fixture(scope="module")
def qmodel():
    mod, params = tiny_cnn()
    rng = np.random.RandomState(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return relayq.quantize_model(mod, params, [rng.randn(2, 3, 8, 8).astype("float32") for _ in range(3)], "kl",
                                     relayq.QConfig(show_progress=False, weight_bits=4))


def test_report_html_and_pngs(qmodel, tmp_path):
    pytest.importorskip("matplotlib")
    rng = np.random.RandomState(1)
    sens = qmodel.sensitivity([rng.randn(2, 3, 8, 8).astype("float32") for _ in range(2)], show_progress=False,
                              layers=["conv2d_0"])
    path = qmodel.report(str(tmp_path / "r.html"))
    page = open(path).read()
    images = re.findall(r"data:image/png;base64,([A-Za-z0-9+/=]+)", page)
    assert len(images) == 3                                   # SQNR, histograms, sensitivity deltas
    for img in images:
        assert base64.b64decode(img)[:8] == b"\x89PNG\r\n\x1a\n"
    for name in ("sqnr", "histograms", "sensitivity"):
        assert (tmp_path / "r_files" / f"{name}.png").stat().st_size > 5000
    # Every layer is a row of the sensitivity table, with the measured deltas.
    for row in sens.rows:
        assert f"<td>{row.layer}</td>" in page
    assert f"{sens['conv2d_0'].delta:+.4f}" in page
    assert "top-1 agreement" in page or "output cosine" in page


def test_report_without_sensitivity_uses_the_check(qmodel, tmp_path):
    pytest.importorskip("matplotlib")
    qmodel._sensitivity = None                    # as if sensitivity was never run
    page = open(qmodel.report(str(tmp_path / "r.html"))).read()
    assert page.count("data:image/png;base64,") == 2       # no sensitivity chart
    assert "own quantization" in page and "Sensitivity table" not in page


def test_report_names_missing_matplotlib(qmodel, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(MissingPlotPackageError, match="matplotlib"):
        qmodel.report(str(tmp_path / "r.html"))


def test_report_of_a_loaded_artefact(qmodel, tmp_path):
    """A model read back from .rqz (what `relayq report model.rqz -o` renders) has no float model: the
    page says so and lists the points."""
    pytest.importorskip("matplotlib")
    qmodel.save(str(tmp_path / "m.rqz"))
    loaded = relayq.load_quantized(str(tmp_path / "m.rqz"))
    page = open(loaded.report(str(tmp_path / "r.html"))).read()
    assert "read from an artefact" in page and "data:image/png" not in page
    for name in qmodel.qpoints:
        assert f"<td>{name}</td>" in page
