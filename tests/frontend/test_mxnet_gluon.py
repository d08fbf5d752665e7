"""Gluon model-zoo networks through relayq's MXNet reader, the way a Gluon user exports them.

Fixtures (``fixtures/gluon/``, written by ``fixtures/make_gluon_fixtures.py`` in MXNet's own venv): the
``net.export`` symbol JSON of each architecture of ``mxnet.gluon.model_zoo.vision``, its BatchNorm running
statistics measured on photos, two photos and MXNet's own output for them. The weights are regenerated
from a seed (``fixtures/gluon_weights.py``) so the files stay small. No MXNet is needed here.

Each network: the float import equals MXNet's output (relative error <= 1e-4), and
``quantize_model(symbol, params, dataset, calibration)`` gives an INT8 model that quantizes every conv and
dense layer and stays close to the float one on photos calibration never saw.
"""
import json
import os
import sys

import numpy as np
import pytest

import relayq
from relayq.testing import data
from relayq.testing.zoo_eval import cosines, rel_err
from relayq.transform.annotate import float_ops

FIX = os.path.join(os.path.dirname(__file__), "fixtures")
sys.path.insert(0, FIX)
from gluon_weights import seeded_weights  # noqa: E402

GLUON = os.path.join(FIX, "gluon")
#: network -> (input side, bound on the mean INT8-vs-FP32 cosine over 6 photos calibration never saw).
#: Measured with W8A8 per-channel, naive, 8 calibration photos (Intel Xeon, 2026-12-03): resnet18_v1 0.9998,
#: squeezenet1.1 0.9997, mobilenetv2_1.0 0.9968, mobilenet1.0 0.9991, resnet50_v1 0.9998, densenet121 0.9997,
#: inceptionv3 0.9996, vgg11_bn 0.9995 (float error against MXNet 2.5e-7 .. 4.4e-6); the bounds sit a
#: little below so that another CPU's rounding cannot flip them, and far above a broken model (< 0.9).
NETWORKS = {
    "resnet18_v1": (224, 0.995),
    "mobilenetv2_1.0": (224, 0.99),
    "squeezenet1.1": (224, 0.995),
    "mobilenet1.0": (224, 0.99),
    "resnet50_v1": (224, 0.995),
    "densenet121": (224, 0.995),
    "inceptionv3": (299, 0.995),
    "vgg11_bn": (224, 0.995),
}
#: The default suite runs these (small, fast to build); the rest are marked slow.
FAST = ("squeezenet1.1",)


def _params(name):
    with np.load(os.path.join(GLUON, f"{name}.npz")) as z:
        params = seeded_weights(json.loads(str(z["shapes"])))
        params.update({k[len("stat:"):]: z[k] for k in z.files if k.startswith("stat:")})
        return params, z["x"].astype("float32"), z["y"]


def _cases():
    return [pytest.param(n, marks=() if n in FAST else pytest.mark.slow) for n in NETWORKS]


def _photos(n, size, offset):
    x = data.calibration_photos(offset + n)[offset:]
    if size != x.shape[-1]:
        from relayq.testing.torchvision_zoo import photos
        x = photos(n, size, offset)
    return x


@pytest.mark.parametrize("name", _cases())
def test_gluon_float_import_and_int8(name):
    size, bound = NETWORKS[name]
    symbol = os.path.join(GLUON, f"{name}-symbol.json")
    params, x, want = _params(name)

    mod, fparams = relayq.frontend.from_mxnet(symbol, params, shapes={"data": (1, 3, size, size)})
    float_lib = relayq.build(mod, params=fparams)
    for i in range(len(x)):
        assert rel_err(float_lib(x[i:i + 1]), want[i:i + 1]) <= 1e-4, name

    calib = _photos(8, size, 20)
    evals = _photos(6, size, 40)
    qmodel = relayq.quantize_model(symbol, params, [calib[i:i + 1] for i in range(len(calib))], "naive",
                                   relayq.QConfig(per_channel=True, show_progress=False),
                                   shapes={"data": (1, 3, size, size)})
    kinds = list(qmodel.layers.values())
    assert kinds.count("conv2d") + kinds.count("dense") >= 3
    left = float_ops(qmodel.prepared, qmodel.config)
    assert not left, f"{name} left ops in float: {dict(left)}"
    lib = relayq.build(qmodel)
    got = [lib(evals[i:i + 1]) for i in range(len(evals))]
    ref = [float_lib(evals[i:i + 1]) for i in range(len(evals))]
    cos = cosines(got, ref)
    assert cos.mean() >= bound, (name, cos)
