"""Latency of every zoo network: relayq INT8 / FP32 beside ONNX Runtime and OpenVINO (issue 9's zoo table).

For each network of the model zoo (:mod:`relayq.testing.torchvision_zoo`: torchvision architectures with
realistic random weights, the test-defined detector / segmenter / LSTM, MobileNetV2 with real weights),
at the zoo's input size, batch 1, ``--threads`` threads (2): the network is exported to ONNX the way
users do, then

* relayq INT8: ``quantize_model`` with relayq's defaults on 16 calibration inputs (its time is the
  "calibration" column), built for ``--preset`` (``x86-avx2``); relayq FP32: the same import built for
  the same preset;
* ONNX Runtime FP32 and INT8 (``quantize_static``, QDQ U8S8, MinMax, same calibration inputs);
* OpenVINO FP32 and INT8 (NNCF ``quantize`` defaults, same calibration inputs), where installed.

All engines run interleaved in one process (``bench_latency.interleaved``) and the table gives the
medians, relayq INT8 / OpenVINO INT8, relayq INT8 / ONNX Runtime INT8, relayq FP32 / ONNX Runtime FP32,
relayq INT8's speed-up over its own FP32, and calibration time per input in units of one FP32 run,
then the geometric means. ``--hold-avx2`` holds OpenVINO (and relayq, through its preset) to AVX2 on an
AVX-512 host; ONNX Runtime cannot be held. Writes ``benchmarks/results/zoo_latency.json``.

    python benchmarks/bench_zoo_latency.py --hold-avx2                      # every network (~25 min)
    python benchmarks/bench_zoo_latency.py --models resnet18,mobilenet_v2 --rounds 10
"""
from __future__ import annotations

import os
import sys

THREADS = int(next((a.split("=", 1)[1] for a in sys.argv if a.startswith("--threads=")), "2"))
os.environ.setdefault("TVM_NUM_THREADS", str(THREADS))
os.environ.setdefault("OMP_NUM_THREADS", str(THREADS))
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")      # see bench_latency.py
if "--hold-avx2" in sys.argv:
    os.environ["ONEDNN_MAX_CPU_ISA"] = "AVX2"
    os.environ["DNNL_MAX_CPU_ISA"] = "AVX2"

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_latency as BL  # noqa: E402
import peers  # noqa: E402
import relayq  # noqa: E402
from relayq.testing import torchvision_zoo as tz  # noqa: E402
from relayq.testing import zoo_eval  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "zoo_latency.json")
#: Image networks of the zoo (MiniLM takes two integer inputs and is left to bench_zoo.py).
DEFAULT_MODELS = ("squeezenet1_1", "unet_small", "detector_fpn", "lstm_text", "shufflenet_v2_x1_0", "mobilenet_v2",
                  "mobilenet_v3_small", "resnet18", "mnasnet1_0", "efficientnet_b0", "mobilenet_v3_large",
                  "regnet_y_400mf", "googlenet", "densenet121", "resnet50", "inception_v3", "convnext_tiny",
                  "vit_b_16", "mobilenet_v2_real")


def measure(name: str, args, workdir: str, log) -> dict:
    """One network: build every engine, time them interleaved; failures are recorded, not raised."""
    import onnx

    r = {"model": name}
    size = 224 if name == "mobilenet_v2_real" else (args.size or tz.ARCHITECTURES[name].size)
    r["size"] = size
    # the zoo's own networks and inputs (zoo_eval's helpers: the same protocol as bench_zoo.py)
    net, _ = zoo_eval._network(name, size)
    offset = 0 if name == "mobilenet_v2_real" else tz.BN_PHOTOS
    calib = [c[0] for c in zoo_eval._model_inputs(name, args.calib, offset, size)]
    x = calib[0]
    onnx_model = tz.onnx_export(net, (x,), input_name="input")
    in_name = onnx_model.graph.input[0].name
    path = os.path.join(workdir, f"{name}.onnx")
    onnx.save(onnx_model, path)
    engines = {}
    mod, params = relayq.frontend.from_onnx(onnx_model)
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = relayq.quantize_model(mod, params, [{in_name: c} for c in calib], relayq.config.DEFAULT_CALIBRATION,
                                  relayq.QConfig(show_progress=False))
        r["calibration_s"] = time.perf_counter() - t0
        engines["relayq INT8"] = relayq.build(q, target=args.preset)
        engines["relayq FP32"] = relayq.build(mod, params=params, target=args.preset)
    r["kernel_paths"] = BL.kernel_paths(q, args.preset)
    if not args.no_ort:
        s32 = BL.ort_session(onnx_model.SerializeToString())
        s8 = BL.ort_session(BL.ort_int8(onnx_model, calib, workdir))
        engines["ORT FP32"] = lambda b, s=s32: s.run(None, {in_name: b})[0]
        engines["ORT INT8"] = lambda b, s=s8: s.run(None, {in_name: b})[0]
    if not args.no_openvino and peers.openvino_available():
        ov32, ov8 = BL.ov_models(path, calib)
        engines["OpenVINO FP32"] = lambda b, c=ov32: c(b)[0]
        engines["OpenVINO INT8"] = lambda b, c=ov8: c(b)[0]
        r["openvino_kernels"] = BL.ov_kernels(ov8)
    med, _ = BL.interleaved(engines, x, args.rounds)
    r["median_ms"] = med
    r8, r32 = med["relayq INT8"], med["relayq FP32"]
    r["int8_speedup_over_fp32"] = r32 / r8
    r["calibration_per_input_in_fp32_runs"] = r["calibration_s"] * 1e3 / args.calib / r32
    if "OpenVINO INT8" in med:
        r["int8_vs_openvino_int8"] = r8 / med["OpenVINO INT8"]
    if "ORT INT8" in med:
        r["int8_vs_ort_int8"] = r8 / med["ORT INT8"]
        r["fp32_vs_ort_fp32"] = r32 / med["ORT FP32"]
    log(row(r))
    return r


COLUMNS = (("relayq INT8", "r8"), ("relayq FP32", "r32"), ("ORT INT8", "o8"), ("ORT FP32", "o32"),
           ("OpenVINO INT8", "v8"), ("OpenVINO FP32", "v32"))
HEADER = (f"{'model':20s}{'size':>5s}" + "".join(f"{c:>8s}" for _, c in COLUMNS)
          + f"{'r8/v8':>8s}{'r8/o8':>8s}{'r32/o32':>8s}{'r32/r8':>8s}{'cal/in':>8s}")


def _f(v, spec=".2f"):
    return "-" if v is None else format(v, spec)


def row(r: dict) -> str:
    """One table line (ms; ratios below 1 favour relayq, except r32/r8, relayq INT8's speed-up)."""
    if r.get("error"):
        return f"{r['model']:20s}  failed: {r['error']}"
    med = r["median_ms"]
    return (f"{r['model']:20s}{r['size']:5d}" + "".join(f"{_f(med.get(k)):>8s}" for k, _ in COLUMNS)
            + f"{_f(r.get('int8_vs_openvino_int8')):>8s}{_f(r.get('int8_vs_ort_int8')):>8s}"
            + f"{_f(r.get('fp32_vs_ort_fp32')):>8s}{_f(r['int8_speedup_over_fp32']):>8s}"
            + f"{_f(r['calibration_per_input_in_fp32_runs'], '.1f'):>8s}")


def geomean(values) -> float | None:
    values = [v for v in values if v is not None and v > 0]
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(DEFAULT_MODELS))
    ap.add_argument("--preset", default="x86-avx2")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--calib", type=int, default=16)
    ap.add_argument("--size", type=int, default=None, help="input side for every network (default: the zoo's)")
    ap.add_argument("--threads", default=str(THREADS), help="threads (also --threads=N, read before TVM loads)")
    ap.add_argument("--hold-avx2", action="store_true", help="hold OpenVINO to AVX2 (ONEDNN_MAX_CPU_ISA)")
    ap.add_argument("--no-ort", action="store_true")
    ap.add_argument("--no-openvino", action="store_true")
    ap.add_argument("--out", default=RESULTS)
    args = ap.parse_args(argv)
    tz.import_torchvision()
    import torch

    torch.set_num_threads(THREADS)
    lines = []

    def log(s=""):
        print(s, flush=True)
        lines.append(s)

    log(f"relayq preset {args.preset}, {THREADS} threads, batch 1, {args.calib} calibration inputs, "
        f"CPU {BL._cpu_name()}{', OpenVINO held to AVX2' if args.hold_avx2 else ''}; times in ms (medians of "
        f"{args.rounds} interleaved rounds)")
    log("r8/v8: relayq INT8 / OpenVINO INT8; r8/o8: / ORT INT8; r32/o32: relayq FP32 / ORT FP32; "
        "r32/r8: relayq INT8's speed-up over its FP32; cal/in: calibration time per input in FP32 runs")
    log(HEADER)
    results = []
    with tempfile.TemporaryDirectory() as workdir:
        for name in [m for m in args.models.split(",") if m]:
            try:
                results.append(measure(name, args, workdir, log))
            except Exception as e:  # noqa: BLE001 - one network's failure must not end the table
                r = {"model": name, "error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:200]}
                results.append(r)
                log(row(r))
    ok = [r for r in results if not r.get("error")]
    means = {k: geomean([r.get(k) for r in ok]) for k in ("int8_vs_openvino_int8", "int8_vs_ort_int8",
                                                           "fp32_vs_ort_fp32", "int8_speedup_over_fp32")}
    worst = max(ok, key=lambda r: r.get("int8_vs_openvino_int8") or 0, default=None)
    log(f"geometric means over {len(ok)} networks: relayq INT8 / OpenVINO INT8 {_f(means['int8_vs_openvino_int8'])}, "
        f"/ ORT INT8 {_f(means['int8_vs_ort_int8'])}; relayq FP32 / ORT FP32 {_f(means['fp32_vs_ort_fp32'])}; "
        f"relayq INT8 speed-up over FP32 {_f(means['int8_speedup_over_fp32'])}x")
    if worst is not None and worst.get("int8_vs_openvino_int8"):
        log(f"worst relayq INT8 / OpenVINO INT8: {worst['model']} {worst['int8_vs_openvino_int8']:.2f}")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"preset": args.preset, "threads": THREADS, "hold_avx2": args.hold_avx2, "cpu": BL._cpu_name(),
                   "geomeans": means, "results": results, "table": lines}, f, indent=1)
    print("wrote", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
