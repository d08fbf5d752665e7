"""Cross-layer equalization and AdaRound on MobileNetV2 (real torchvision weights, 120 photos).

Rows (calibration ``kl`` for activations, bias correction on, as relayq's defaults):

* W8A8 per-tensor, without and with ``cross_layer_equalization`` (+ ``cle_replace_relu6`` and
  ``high_bias_absorption``, the white paper's recipe: MobileNetV2 uses ReLU6 everywhere);
* W4A8 per-channel, without and with ``adaround`` (``--iterations`` per layer, ``--samples`` samples).

Metric: top-1 agreement of the compiled integer model with FP32 (ONNX Runtime on the float model) on
the 120 shipped photos, as in ``bench_accuracy.py``; calibration on the 100 ai-benchmark photos.

    PYTHONPATH=python python3 benchmarks/bench_lowbit.py [--iterations 1000 --samples 1024]

Writes ``benchmarks/results/lowbit.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "python"))
sys.path.insert(0, HERE)
import relayq  # noqa: E402


def cpu() -> dict:
    info = open("/proc/cpuinfo").read()
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "?")
    return {"model_name": name, "avx512_vnni": "avx512_vnni" in info, "cores": os.cpu_count()}


def _torch() -> bool:
    from relayq.calibration.adaround import torch_available
    return torch_available()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--iterations", type=int, default=1000)
    ap.add_argument("--samples", type=int, default=1024)
    ap.add_argument("--method", default="kl", help="activation calibration method(s), comma separated")
    ap.add_argument("--only", default=None, help="run only the rows whose label contains this text")
    ap.add_argument("--extra", default="{}", help="QConfig fields (JSON) added to every row, e.g. '{\"weight_method\": \"mse\"}'")
    ap.add_argument("--json", default=os.path.join(HERE, "results", "lowbit.json"))
    ap.add_argument("--torch-threads", type=int, default=1,
                    help="torch threads for AdaRound (1 is fastest for these small problems on a shared box)")
    args = ap.parse_args()
    from bench_accuracy import MOBILENET_BATCH_ORT, ort_predict
    from relayq.testing import data, zoo

    try:
        import torch
        torch.set_num_threads(args.torch_threads)
    except ImportError:
        pass
    photos = data.calibration_photos(100)
    labelled, labels = data.imagenet_labelled()
    everything = np.concatenate([photos, labelled])
    calib = [photos[i:i + 1] for i in range(len(photos))]
    import tempfile

    import onnx
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "mbv2.onnx")
        onnx.save(zoo.mobilenet_v2(batch=MOBILENET_BATCH_ORT), path)
        fp32 = ort_predict(path, [everything[i:i + MOBILENET_BATCH_ORT]
                                  for i in range(0, len(everything), MOBILENET_BATCH_ORT)])
    mod, params = relayq.frontend.from_onnx(zoo.mobilenet_v2(batch=1))
    cle = dict(cross_layer_equalization=True, cle_replace_relu6=True, high_bias_absorption=True)
    ada = dict(adaround=True, adaround_iterations=args.iterations, adaround_samples=args.samples)
    schemes = [
        ("W8A8 per-tensor", {}),
        ("W8A8 per-tensor + CLE (ReLU6->ReLU, bias absorption)", cle),
        ("W8A8 per-tensor + CLE (ReLU6 kept: identity chains only)", dict(cross_layer_equalization=True)),
        ("W4A8 per-channel", dict(weight_bits=4, per_channel=True)),
        ("W4A8 per-channel + AdaRound", dict(weight_bits=4, per_channel=True, **ada)),
    ]
    if args.only:
        schemes = [(label, f) for label, f in schemes if args.only in label]
    rows = []
    for (label, fields), method in [(sc, m) for sc in schemes for m in args.method.split(",")]:
        t0 = time.perf_counter()
        fields = {**fields, **json.loads(args.extra)}
        cfg = relayq.QConfig(show_progress=True, **fields)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            q = relayq.quantize_model(mod, params, calib, method, cfg)
            lib = relayq.build(q)
        quantize_s = time.perf_counter() - t0
        pred = np.array([int(lib(everything[i:i + 1]).argmax()) for i in range(len(everything))])
        row = {"scheme": label, "config": fields, "method": method,
               "agreement": float((pred == fp32).mean()), "top1_labelled20": float((pred[-20:] == labels).mean()),
               "quantize_and_build_seconds": round(quantize_s, 1)}
        rows.append(row)
        print(f"{label:58s} {method:10s} agreement {row['agreement'] * 100:5.1f}%  top-1(20) {row['top1_labelled20'] * 100:3.0f}%"
              f"  ({row['quantize_and_build_seconds']} s)", flush=True)
    res = {"model": "MobileNetV2 (torchvision ImageNet weights)", "cpu": cpu(), "args": vars(args),
           "fp32_top1_labelled20": float((fp32[-20:] == labels).mean()), "rows": rows,
           "adaround_backend": "torch" if _torch() else "numpy"}
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(res, f, indent=1)
    print(json.dumps(res["cpu"]))


if __name__ == "__main__":
    main()
