"""The peer quantizers the benchmarks compare relayq with, at relayq's schemes, on one ONNX file.

* **ONNX Runtime** ``quantize_static`` (QDQ): int8 weights, symmetric; activations either int8 symmetric
  (``ActivationSymmetric``, relayq's default) or uint8 with a zero point (relayq's ``act_symmetric=False``);
  per-tensor or per-channel weights; 4-bit weights through ``QInt4`` (opset 21). Its calibrators: MinMax,
  Entropy, Percentile.
* **NNCF** (``nncf.quantize`` on the OpenVINO model read from the same ONNX file), run by OpenVINO:
  preset ``PERFORMANCE`` (symmetric activations) or ``MIXED`` (asymmetric activations), weights per
  channel (NNCF's default) or per tensor, and the bit widths through ``QuantizationParameters(num_bits=)``
  (OpenVINO FakeQuantize with ``2^bits`` levels). NNCF's own range estimation and fast bias correction
  (its defaults) on the same calibration images.

bench_latency.py uses :func:`ov_compile` and :func:`nncf_quantize` for its OpenVINO rows, bench_accuracy.py
everything here for its peer table.

Example::

    ov_int8 = nncf_quantize("mobilenet_v2.onnx", calib_batches, per_channel=True, symmetric=True)
    top1 = ov_predict(ov_compile(ov_int8), eval_batches)
"""
from __future__ import annotations

import dataclasses
import warnings

import numpy as np


@dataclasses.dataclass(frozen=True)
class PeerScheme:
    """A relayq scheme as the peers spell it."""

    weight_bits: int = 8
    act_bits: int = 8
    per_channel: bool = False
    symmetric: bool = True             # activations: int8 symmetric (relayq's default) or uint8 + zero point


#: relayq scheme label (bench_accuracy.SCHEMES) -> the same scheme for the peers.
MATCHING = {
    "W8A8": PeerScheme(per_channel=False, symmetric=True),
    "W8A8 per-channel": PeerScheme(per_channel=True, symmetric=True),
    "W8A8 asym-act": PeerScheme(per_channel=False, symmetric=False),
    "W8A8 per-channel asym-act": PeerScheme(per_channel=True, symmetric=False),
    "W4A8 per-channel": PeerScheme(weight_bits=4, per_channel=True, symmetric=True),
    "W4A8 per-channel asym-act": PeerScheme(weight_bits=4, per_channel=True, symmetric=False),
    "W8A4": PeerScheme(act_bits=4, per_channel=False, symmetric=True),
}


def openvino_available() -> bool:
    try:
        import nncf  # noqa: F401
        import openvino  # noqa: F401
    except ImportError:
        return False
    return True


def ov_compile(ov_model, threads: int = 2):
    """A latency-mode CPU compile with ``threads`` threads, f32 precision (no bf16 on AVX-512 hosts)."""
    import openvino as ov

    cfg = {"INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": "f32",
           "NUM_STREAMS": 1}
    return ov.Core().compile_model(ov_model, "CPU", cfg)


def read_ov(onnx_path: str):
    import openvino as ov

    return ov.Core().read_model(onnx_path)


def nncf_quantize(onnx_path: str, calib: list, scheme: PeerScheme | None = None):
    """NNCF's quantized OpenVINO model of ``onnx_path`` calibrated on ``calib`` (batches); ``scheme`` None
    is ``nncf.quantize``'s defaults (what a user gets without options)."""
    import nncf
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, QuantizationParameters

    fp32 = read_ov(onnx_path)
    name = fp32.inputs[0].get_any_name()
    kwargs = {}
    if scheme is not None:
        kwargs["preset"] = nncf.QuantizationPreset.PERFORMANCE if scheme.symmetric else nncf.QuantizationPreset.MIXED
        kwargs["advanced_parameters"] = AdvancedQuantizationParameters(
            weights_quantization_params=QuantizationParameters(num_bits=scheme.weight_bits,
                                                               per_channel=scheme.per_channel),
            activations_quantization_params=QuantizationParameters(num_bits=scheme.act_bits))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return nncf.quantize(fp32, nncf.Dataset(list(calib), lambda b: {name: b}),
                             subset_size=sum(len(b) for b in calib), **kwargs)


def ov_predict(compiled, batches: list) -> np.ndarray:
    """Top-1 class of every image of ``batches`` with a compiled OpenVINO model."""
    out = compiled.outputs[0]
    return np.concatenate([compiled(b)[out].argmax(1) for b in batches])


def ort_quantize(model_path: str, cache: str, method: str, scheme: PeerScheme, out: str) -> str:
    """ONNX Runtime's QDQ model at ``scheme`` from a calibration cache (see bench_accuracy.ort_calibrate).

    Raises ValueError for a scheme ONNX Runtime's quantizer does not offer (activations below 8 bits)."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    if scheme.act_bits != 8:
        raise ValueError(f"ONNX Runtime's quantize_static has no {scheme.act_bits}-bit activations")
    weight_type = {8: QuantType.QInt8, 4: QuantType.QInt4}.get(scheme.weight_bits)
    if weight_type is None:
        raise ValueError(f"ONNX Runtime's quantize_static has no {scheme.weight_bits}-bit weights")
    quantize_static(model_path, out, calibration_data_reader=None, calibration_cache_path=cache,
                    quant_format=QuantFormat.QDQ,
                    activation_type=QuantType.QInt8 if scheme.symmetric else QuantType.QUInt8,
                    weight_type=weight_type, per_channel=scheme.per_channel,
                    calibrate_method=getattr(CalibrationMethod, method),
                    extra_options={"ActivationSymmetric": scheme.symmetric, "WeightSymmetric": True})
    return out
