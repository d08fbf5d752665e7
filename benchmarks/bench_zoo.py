"""The model zoo through relayq, beside ONNX Runtime's INT8 of the same ONNX file.

For each network (torchvision architectures with seeded weights and photo-calibrated BatchNorm, the
test-defined detector / segmenter / LSTM, MobileNetV2 and all-MiniLM-L6-v2 with real weights): export
with ``torch.onnx.export(opset 17)`` and ``torch.export``, import both, check the float import against
torch, quantize the ONNX import (W8A8, per-channel weights, asymmetric uint8 activations:
``zoo_eval.ZOO_CONFIG``, ONNX Runtime's scheme; default calibration), build, run, and compare
INT8 with FP32; then ONNX Runtime's ``quantize_static`` (QDQ, U8 activations, S8 per-channel weights) on
the same file with the same calibration inputs. Prints a table and writes benchmarks/results/zoo.json
(each model's row is written as soon as it is measured, so an interrupted run keeps what it has).

Example::

    python benchmarks/bench_zoo.py --models squeezenet1_1,unet_small
    python benchmarks/bench_zoo.py                     # every model (long: tens of minutes on 2 cores)
    python benchmarks/bench_zoo.py --config '{"act_symmetric": true}' --out /tmp/zoo_s8.json
    python benchmarks/bench_zoo.py --eval 68 --out /tmp/zoo_e68.json   # 68 evaluation photos: less noisy
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

from relayq import QConfig
from relayq.testing import zoo_eval

#: The evaluation set of the standard table; ``--eval`` above it also reports these first ones apart.
STANDARD_EVAL = 16
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "zoo.json")
#: Small networks first: on a shared 2-core machine the run may be cut short.
DEFAULT_ORDER = ("squeezenet1_1", "unet_small", "detector_fpn", "lstm_text", "shufflenet_v2_x1_0", "mobilenet_v2",
                 "mobilenet_v3_small", "resnet18", "mnasnet1_0", "efficientnet_b0", "mobilenet_v3_large",
                 "regnet_y_400mf", "googlenet", "densenet121", "resnet50", "inception_v3", "convnext_tiny",
                 "vit_b_16", "mobilenet_v2_real", "minilm")


def _fmt(v, spec):
    return "-" if v is None else format(v, spec)


def row(r: dict) -> str:
    """One table line for a result of :func:`relayq.testing.zoo_eval.evaluate`."""
    if r.get("failed_stage"):
        return f"{r['model']:<20} {r['size']:>4}  FAILED at {r['failed_stage']}: {r['error']}"
    fm = max(r.get("onnx_float_rel_err", 0.0), r.get("torch_float_rel_err", 0.0))
    left = ", ".join(f"{k} x{n}" for k, n in r.get("float_ops", {}).items()) or "none"
    return (f"{r['model']:<20} {r['size']:>4} {fm:9.1e} {r['quantized_layers']:>4}/{r['all_layers']:<4} "
            f"{_fmt(r.get('int8_top1_agreement'), '6.1%'):>7} {r['int8_cosine_mean']:.4f}/{r['int8_cosine_min']:.4f} "
            f"{_fmt(r.get('ort_top1_agreement'), '6.1%'):>7} {_fmt(r.get('ort_cosine_mean'), '.4f')}/"
            f"{_fmt(r.get('ort_cosine_min'), '.4f')} {r['quantize_s']:7.1f} {r['build_s']:6.1f}  {left}")


def paired_row(r: dict, first: int | None = None) -> str:
    """A line with the metrics on the first ``first`` evaluation inputs (all when None) and the paired top-1
    count: on how many inputs only relayq (only ONNX Runtime) agrees with FP32."""
    s = zoo_eval.summary(r, first)
    n = len(r.get("int8_cosines", []))
    label = f"  first {min(first, n)}" if first else f"  all {n}"
    cos = f"{s['int8_cosine_mean']:.4f}/{s['int8_cosine_min']:.4f}"
    ocos = f"{s['ort_cosine_mean']:.4f}/{s['ort_cosine_min']:.4f}" if "ort_cosine_mean" in s else "-"
    paired = (f"  top-1 only relayq {s['top1_only_int8']}, only ORT {s['top1_only_ort']}" if "top1_only_int8" in s
              else "")
    return (f"{label:<20} {'':>4} {'':>9} {'':>9} {_fmt(s.get('int8_top1_agreement'), '6.1%'):>7} {cos} "
            f"{_fmt(s.get('ort_top1_agreement'), '6.1%'):>7} {ocos}{paired}")


HEADER = (f"{'model':<20} {'size':>4} {'float err':>9} {'q/all':>9} {'top1':>7} {'cos mean/min':>13} "
          f"{'ORT top1':>7} {'ORT cos mean/min':>15} {'quant s':>7} {'build s':>6}  ops left in float")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(DEFAULT_ORDER),
                    help=f"comma-separated subset of: {', '.join(DEFAULT_ORDER)}")
    ap.add_argument("--calib", type=int, default=16, help="calibration inputs (batch 1 each)")
    ap.add_argument("--eval", type=int, default=16,
                    help="evaluation inputs (not seen by calibration or BN; batch 1 each). Above 16 (at most 68 for "
                         "the photo networks: 100 photos, 16 set BatchNorm, 16 calibrate) each model gets two more "
                         "lines: the metrics on the first 16 (the default set) and on all, with the paired top-1 "
                         "counts (on how many inputs only relayq / only ORT agrees with FP32)")
    ap.add_argument("--no-ort", action="store_true", help="skip ONNX Runtime's quantize_static")
    ap.add_argument("--no-torch-export", action="store_true", help="import through ONNX only")
    ap.add_argument("--calibration", default=None,
                    help="relayq's calibrator (default: relayq.config.DEFAULT_CALIBRATION, what a user gets)")
    ap.add_argument("--size", type=int, default=None, help="input side for every model (default: the zoo's)")
    ap.add_argument("--config", default=None,
                    help="QConfig fields as JSON on top of the zoo's (relayq.testing.zoo_eval.ZOO_CONFIG), e.g. "
                         "'{\"act_symmetric\": true}'")
    ap.add_argument("--out", default=RESULTS)
    args = ap.parse_args(argv)
    names = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in names if m not in DEFAULT_ORDER]
    if unknown:
        ap.error(f"unknown models {unknown}; known: {', '.join(DEFAULT_ORDER)}")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    previous = {}
    if os.path.exists(args.out):
        with open(args.out) as f:
            previous = {r["model"]: r for r in json.load(f).get("models", [])}
    fields = {**zoo_eval.ZOO_CONFIG, **(json.loads(args.config) if args.config else {})}
    config = QConfig.from_dict(fields)
    print(HEADER, flush=True)
    for name in names:
        t0 = time.perf_counter()
        r = zoo_eval.evaluate(name, size=args.size, n_calib=args.calib, n_eval=args.eval, ort=not args.no_ort,
                              calibration=args.calibration, config=config,
                              frontends=("onnx",) if args.no_torch_export else ("onnx", "torch"))
        r["total_s"] = time.perf_counter() - t0
        r.pop("traceback", None)
        previous[name] = r
        print(row(r), flush=True)
        if args.eval > STANDARD_EVAL and not r.get("failed_stage"):
            print(paired_row(r, STANDARD_EVAL), flush=True)
            print(paired_row(r), flush=True)
        with open(args.out, "w") as f:
            json.dump({"cpu": _cpu(), "calib": args.calib, "eval": args.eval, "config": fields,
                       "models": [previous[m] for m in DEFAULT_ORDER if m in previous]}, f, indent=1)
    return 0


def _cpu() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return "unknown"


if __name__ == "__main__":
    sys.exit(main())
