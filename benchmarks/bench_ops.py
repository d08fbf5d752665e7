"""Every op scheduled: zoo networks compiled with TVM's CPU pipeline (the ops relayq has no kernel for run
on TVM's unscheduled loops) against relayq's pipeline (:mod:`relayq.backend.schedule_rest`), same process,
interleaved, plus the calibration time of one network both ways.

Both builds take the same module: relayq's conv/dense kernels (``presets.lower_for``), then either
``relax.get_default_pipeline`` ("TVM default") or ``presets.relax_pipeline`` ("scheduled"). FP32 for every
network, INT8 (realized, 4 calibration inputs) for those in ``--int8``. Prints a table and writes
benchmarks/results/ops.json.

Example::

    python benchmarks/bench_ops.py --models vit_b_16,convnext_tiny --int8 mobilenet_v3_small --rounds 5
    python benchmarks/bench_ops.py --models none --calib-model convnext_tiny --calib 16   # calibration only
    python benchmarks/bench_ops.py --models vit_b_16@224 --int8 none --rounds 3 --calib-model none
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import statistics
import sys
import time

import numpy as np

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "ops.json")
DEFAULT_MODELS = "vit_b_16,convnext_tiny,minilm,mobilenet_v3_small,efficientnet_b0"
DEFAULT_INT8 = "mobilenet_v3_small,efficientnet_b0"
#: Calibration inputs of the INT8 builds (the speed does not depend on how good the scales are).
INT8_CALIB = 4


def _cpu() -> str:
    with open("/proc/cpuinfo") as f:
        return next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "?")


def _load() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def network(name: str, n_calib: int):
    """(ONNX-imported mod, params, calibration inputs as dicts, one input tuple) of a zoo network."""
    import relayq
    from relayq.testing import torchvision_zoo as tz
    from relayq.testing import zoo_eval

    name, _, at = name.partition("@")
    size = int(at) if at else (128 if name == "minilm" else None)
    if name == "vit_b_16" and size:
        # the zoo builds ViT for 64x64 (its position embedding fixes the size): another size is another net
        import torch

        torch.manual_seed(0)
        net = tz._nonzero_head(tz.import_torchvision().vit_b_16(weights=None, image_size=size)).eval()
        x = tz.photos(max(n_calib, 1), size, offset=tz.BN_PHOTOS)
        calib = [(x[i:i + 1],) for i in range(len(x))]
        onnx_model = tz.onnx_export(net, calib[0], input_name="input")
        mod, params = relayq.frontend.from_onnx(onnx_model)
        return mod, params, [{"input": c[0]} for c in calib[:n_calib]], calib[0]
    net, _ = zoo_eval._network(name, size)
    offset = 0 if name == "minilm" else tz.BN_PHOTOS
    calib = zoo_eval._model_inputs(name, max(n_calib, 1), offset, size)
    if name == "minilm":
        names = ["input_ids", "attention_mask"]
        onnx_model = zoo_eval._export_named(net, calib[0], names)
    else:
        onnx_model = tz.onnx_export(net, calib[0], input_name="input")
        names = [i.name for i in onnx_model.graph.input]
    mod, params = relayq.frontend.from_onnx(onnx_model)
    return mod, params, [dict(zip(names, x)) for x in calib[:n_calib]], calib[0]


def _default_pipeline(target):
    from tvm import relax

    return relax.get_default_pipeline(target)


@contextlib.contextmanager
def tvm_default_pipeline():
    """Make relayq compile through TVM's own CPU pipeline (the state before schedule_rest), e.g. for
    calibration's tap model."""
    from relayq.backend import presets

    real = presets.relax_pipeline
    presets.relax_pipeline = _default_pipeline
    try:
        yield
    finally:
        presets.relax_pipeline = real


def compile_both(lowered, target):
    """{variant: (HostFunction, compile seconds)} for the TVM default and the scheduled pipeline."""
    import tvm
    from relayq.backend import presets
    from relayq.runtime import HostFunction

    out = {}
    for variant, pipeline in (("tvm_default", _default_pipeline(target)), ("scheduled", presets.relax_pipeline(target))):
        t0 = time.perf_counter()
        out[variant] = (HostFunction(tvm.compile(lowered, target=target, relax_pipeline=pipeline)),
                        time.perf_counter() - t0)
    return out


def interleaved(fns: dict, x, rounds: int) -> tuple:
    """``({name: (median ms, min ms)}, {name: first call s})`` over ``rounds`` interleaved calls (after one
    warm-up call each, which includes LLVM's lazy code generation). On a loaded machine the minimum is the
    steadier figure: a parallel kernel waits for whichever worker the OS descheduled."""
    first = {}
    for k, f in fns.items():
        t0 = time.perf_counter()
        f(*x)
        first[k] = time.perf_counter() - t0
    times = {k: [] for k in fns}
    for _ in range(rounds):
        for k, f in fns.items():
            t0 = time.perf_counter()
            f(*x)
            times[k].append((time.perf_counter() - t0) * 1e3)
    return {k: (statistics.median(v), min(v)) for k, v in times.items()}, first


def _rel(a, b) -> float:
    return float(np.max(np.abs(a.astype(np.float64) - b)) / max(float(np.max(np.abs(b))), 1e-30))


def bench_model(name: str, int8: bool, rounds: int, target, preset: str) -> list:
    import relayq
    from relayq.backend import presets
    from relayq.transform.prepare import prepare

    mod, params, calib, x = network(name, INT8_CALIB if int8 else 0)
    rows = []
    variants = [("fp32", lambda: prepare(mod, params))]
    if int8:
        def realized():
            q = relayq.quantize_model(mod, params, dataset=calib, config=relayq.QConfig(show_progress=False))
            return q.realized

        variants.append(("int8", realized))
    for precision, make in variants:
        lowered = presets.lower_for(make(), target, preset)
        built = compile_both(lowered, target)
        fns = {k: v[0] for k, v in built.items()}
        med, first = interleaved(fns, x, rounds)
        outs = {k: f(*x)[0] for k, f in fns.items()}
        row = {"model": name, "precision": precision, "rounds": rounds, "load": _load(),
               "threads": os.environ.get("TVM_NUM_THREADS", str(os.cpu_count())),
               "tvm_default_ms": med["tvm_default"][0], "scheduled_ms": med["scheduled"][0],
               "tvm_default_min_ms": med["tvm_default"][1], "scheduled_min_ms": med["scheduled"][1],
               "speedup": med["tvm_default"][0] / med["scheduled"][0],
               "speedup_min": med["tvm_default"][1] / med["scheduled"][1],
               "compile_s": {k: v[1] for k, v in built.items()}, "first_call_s": first,
               "max_rel_diff": _rel(outs["scheduled"], outs["tvm_default"])}
        print(f"{name:<20} {precision:<5} {row['tvm_default_ms']:10.2f} {row['scheduled_ms']:10.2f} "
              f"{row['speedup']:7.1f}x {row['tvm_default_min_ms']:10.2f} {row['scheduled_min_ms']:10.2f} "
              f"{row['speedup_min']:7.1f}x {row['max_rel_diff']:9.1e}  load {row['load']}", flush=True)
        rows.append(row)
    return rows


class _CalibLog(logging.Handler):
    def __init__(self):
        super().__init__()
        self.lines = []

    def emit(self, record):
        msg = record.getMessage()
        if msg.startswith("calibration "):
            self.lines.append(msg)


def bench_calibration(name: str, n: int) -> list:
    """Seconds of quantize_model on ``n`` calibration inputs, tap model compiled both ways (interleaved
    order: default first, then scheduled)."""
    import relayq

    mod, params, calib, _ = network(name, n)
    rows = []
    handler = _CalibLog()
    log = logging.getLogger("relayq")
    log.addHandler(handler)
    old_level = log.level
    log.setLevel(logging.INFO)
    try:
        for variant in ("tvm_default", "scheduled"):
            ctx = tvm_default_pipeline() if variant == "tvm_default" else contextlib.nullcontext()
            handler.lines.clear()
            with ctx:
                t0 = time.perf_counter()
                q = relayq.quantize_model(mod, params, dataset=calib, config=relayq.QConfig(show_progress=False))
                total = time.perf_counter() - t0
            row = {"model": name, "calibration_inputs": n, "variant": variant, "quantize_s": total,
                   "calibration_s": q.calibration_seconds, "log": list(handler.lines), "load": _load()}
            print(f"calibration {name} x{n} {variant:<12} quantize {total:7.1f} s, calibration "
                  f"{q.calibration_seconds:7.1f} s  {' | '.join(handler.lines)}  load {row['load']}", flush=True)
            rows.append(row)
    finally:
        log.removeHandler(handler)
        log.setLevel(old_level)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=DEFAULT_MODELS,
                    help="comma-separated zoo names (name@size for another input size: vit_b_16@224), or 'none'")
    ap.add_argument("--int8", default=DEFAULT_INT8, help="models that also get an INT8 build")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--preset", default="x86-avx2")
    ap.add_argument("--calib-model", default="convnext_tiny", help="model whose calibration is timed, or 'none'")
    ap.add_argument("--calib", type=int, default=16, help="calibration inputs of --calib-model")
    ap.add_argument("--threads", type=int, default=0, help="TVM_NUM_THREADS (0: TVM's default, every core)")
    ap.add_argument("--out", default=RESULTS)
    args = ap.parse_args(argv)
    if args.threads:
        os.environ["TVM_NUM_THREADS"] = str(args.threads)      # read when TVM's thread pool starts

    from relayq.backend import presets

    target = presets.target_from_preset(args.preset)
    int8 = set(filter(None, args.int8.split(",")))
    models = [] if args.models == "none" else args.models.split(",")
    print(f"CPU: {_cpu()}, {os.cpu_count()} cores, TVM threads {args.threads or os.cpu_count()}, preset "
          f"{args.preset}; load {_load()}")
    print(f"{'model':<20} {'':<5} {'TVM default':>10} {'scheduled':>10} {'speedup':>8} {'min: TVM':>10} "
          f"{'scheduled':>10} {'speedup':>8} {'rel diff':>9}  (ms; median, then minimum)")
    result = {"cpu": _cpu(), "preset": args.preset, "threads": args.threads or os.cpu_count(), "rows": [],
              "calibration": []}
    for name in models:
        try:
            result["rows"].extend(bench_model(name, name in int8, args.rounds, target, args.preset))
        except Exception as e:  # noqa: BLE001 - one network's failure must not lose the others' rows
            print(f"{name:<20} FAILED: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}", flush=True)
            result["rows"].append({"model": name, "error": f"{type(e).__name__}: {e}"})
    if args.calib_model != "none":
        result["calibration"] = bench_calibration(args.calib_model, args.calib)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
