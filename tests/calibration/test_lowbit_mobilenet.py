"""The issue's accuracy bars on MobileNetV2 (real weights, 120 photos): slow, minutes on 2 cores.

Agreement = top-1 of the compiled integer model equal to FP32's (ONNX Runtime) on the 100 calibration
photos and the 20 labelled photos; the 20 labelled ones are never seen by calibration or AdaRound.
"""
import os
import sys
import warnings

import numpy as np
import pytest

import relayq
from relayq.analysis.reference import reference_run

HERE = os.path.dirname(os.path.abspath(__file__))


def _protocol():
    from relayq.testing import data, zoo

    if not (zoo.has_mobilenet_weights() and data.has_calibration_photos() and data.has_imagenet_samples()):
        pytest.skip("needs the offline MobileNetV2 weights and photos (requirements-models.txt)")
    pytest.importorskip("torch")
    sys.path.insert(0, os.path.join(HERE, "..", "..", "benchmarks"))
    from bench_accuracy import mobilenet_photos_and_fp32

    return mobilenet_photos_and_fp32()


@pytest.mark.slow
def test_mobilenet_v2_w4a8_per_channel_adaround_meets_93_percent():
    """W4A8 per-channel, every layer at 4 bits (first and last included), MSE weight scales, AdaRound on
    the partly quantized model's inputs: >= 93% agreement (measured 95.8%; 16 minutes under load)."""
    import torch

    torch.set_num_threads(1)
    photos, labelled, labels, everything, calib, fp32 = _protocol()
    from relayq.testing import zoo

    cfg = relayq.QConfig(weight_bits=4, per_channel=True, weight_method="mse", adaround=True,
                         adaround_iterations=300, adaround_samples=2048, show_progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = relayq.quantize_model(zoo.mobilenet_v2(batch=1), None, calib, "kl", cfg)
    assert all(p.bits == 4 for p in q.qpoints.values() if p.role == "weight")
    assert sum(p.codes is not None for p in q.qpoints.values() if p.role == "weight") >= 50
    lib = relayq.build(q)
    pred = np.array([int(lib(everything[i:i + 1]).argmax()) for i in range(len(everything))])
    assert (pred == fp32).mean() >= 0.93
    np.testing.assert_array_equal(lib(everything[:1]), reference_run(q.annotated, q.qpoints, everything[:1]))


@pytest.mark.slow
def test_mobilenet_v2_w8a8_per_tensor_cle_meets_98_percent():
    """W8A8 per-tensor symmetric with CLE (ReLU6 -> ReLU, high-bias absorption) and empirical bias
    correction, kl activations: >= 98% agreement (measured 98.3% with one torch thread, held-out 20: 100%;
    35 s at load 1.6)."""
    import torch

    # The empirical bias correction runs the torch twin; bench_lowbit.py's protocol uses one torch thread.
    # The result sits one photo above the bar: with 2 torch threads (another summation order) it was 97.5%.
    torch.set_num_threads(1)
    photos, labelled, labels, everything, calib, fp32 = _protocol()
    from relayq.testing import zoo

    cfg = relayq.QConfig(cross_layer_equalization=True, cle_replace_relu6=True, high_bias_absorption=True,
                         empirical_bias_correction=True, show_progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mod, params = relayq.frontend.from_onnx(zoo.mobilenet_v2(batch=1))        # as bench_lowbit.py does
        q = relayq.quantize_model(mod, params, calib, "kl", cfg)
    assert not q.config.per_channel and q.config.weight_bits == 8 and q.config.act_bits == 8
    lib = relayq.build(q)
    pred = np.array([int(lib(everything[i:i + 1]).argmax()) for i in range(len(everything))])
    assert (pred == fp32).mean() >= 0.98
