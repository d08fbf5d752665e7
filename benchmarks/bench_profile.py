"""Per-kernel profile of relayq INT8 / FP32 beside OpenVINO INT8's own per-layer times, one network per run.

relayq's times come from the Relax VM's instrument hook (wall time of every kernel call, summed over
``--rounds`` runs after a warm-up); OpenVINO's from its performance counters (``PERF_COUNT``:
``real_time`` of every executed node of the NNCF-quantized model, same calibration images). Both are
grouped by what the layer is (3x3 / 1x1 / stem conv, depthwise, pooling, the rest), so the table says
where relayq loses time against OpenVINO, and the top kernels of each engine are listed. Batch 1,
``--threads`` threads (2 by default), ``--hold-avx2`` holds OpenVINO to AVX2 (``ONEDNN_MAX_CPU_ISA``) as
``bench_latency.py`` does. Writes ``benchmarks/results/profile_<model>.json``.

    python benchmarks/bench_profile.py --model resnet18 --hold-avx2
    python benchmarks/bench_profile.py --model mobilenet_v2 --preset x86-avx2 --rounds 20
    python benchmarks/bench_profile.py --model vit_b_16 --hold-avx2     # any network of bench_zoo_latency

``--model`` takes ResNet-18 / MobileNetV2 (``relayq.testing.zoo``, 224 px, the benchmark photos) or any
image network of the zoo (:mod:`relayq.testing.torchvision_zoo`, at its zoo size and with its zoo inputs,
as ``bench_zoo_latency.py`` runs it).

The instrument hook costs a few microseconds a call: the per-kernel sum is about the plain latency
(printed beside it), not exactly it.
"""
from __future__ import annotations

import os
import sys

THREADS = int(next((a.split("=", 1)[1] for a in sys.argv if a.startswith("--threads=")), "2"))
os.environ.setdefault("TVM_NUM_THREADS", str(THREADS))
os.environ.setdefault("OMP_NUM_THREADS", str(THREADS))
if "--hold-avx2" in sys.argv:
    os.environ["ONEDNN_MAX_CPU_ISA"] = "AVX2"          # read by OpenVINO's CPU plugin when it loads
elif "--hold-vnni" in sys.argv:
    os.environ["ONEDNN_MAX_CPU_ISA"] = "AVX512_CORE_VNNI"   # no AMX: the peer of relayq's x86-vnni preset

import argparse  # noqa: E402
import collections  # noqa: E402
import json  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import peers  # noqa: E402
import relayq  # noqa: E402
from relayq.backend import lower  # noqa: E402
from relayq.testing import data as rdata  # noqa: E402
from relayq.testing import zoo  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def relayq_profile(lib, x, rounds: int) -> tuple[dict, float]:
    """{kernel symbol: mean ms per run} from the VM's instrument hook, and the plain median latency."""
    import tvm
    from tvm import relax

    vm = relax.VirtualMachine(lib.executable, tvm.cpu())
    arg = tvm.runtime.tensor(np.ascontiguousarray(x))
    for _ in range(3):
        vm["main"](arg)
    plain = []
    for _ in range(rounds):
        t = time.perf_counter()
        vm["main"](arg)
        plain.append(time.perf_counter() - t)
    spent, started = collections.defaultdict(float), {}

    def instrument(func, name, before, ret, *args):
        if before:
            started[name] = time.perf_counter()
        else:
            spent[name] += time.perf_counter() - started[name]
        return 0

    vm.set_instrument(instrument)
    for _ in range(rounds):
        vm["main"](arg)
    return {k: v / rounds * 1e3 for k, v in spent.items() if not k.startswith("vm.builtin")}, \
        float(np.median(plain)) * 1e3


def relayq_groups(kernels: dict, stats: list) -> dict:
    """relayq kernel times grouped by layer kind: int8 conv by kernel path (``stats`` from
    ``lower_quantized`` name each kernel's path), depthwise, pooling, the rest."""
    kind_of = {}
    for s in stats:
        k = s.get("kind", "?")
        if s.get("path") == "depthwise":
            k = "depthwise"
        elif k.startswith("conv2d"):
            k = f"conv {s.get('path', '?')}"
        kind_of[s["symbol"]] = k
    groups = collections.defaultdict(float)
    for name, ms in kernels.items():
        if name in kind_of:
            groups[kind_of[name]] += ms
        elif "dwconv" in name:
            groups["depthwise"] += ms
        elif "conv2d" in name:
            groups["conv fp32"] += ms
        elif "dense_fp32" in name:
            groups["dense fp32"] += ms
        elif "pool" in name:
            groups["pooling"] += ms
        else:
            groups["other (TVM-scheduled)"] += ms
    return dict(groups)


def ov_profile(compiled, x, rounds: int) -> tuple[dict, dict, float]:
    """OpenVINO's per-node mean ms ({name: (type, exec_type, ms)}), grouped by node type, and the median
    latency of the same requests."""
    req = compiled.create_infer_request()
    for _ in range(3):
        req.infer({0: x})
    per_node, plain = collections.defaultdict(float), []
    info = {}
    for _ in range(rounds):
        t = time.perf_counter()
        req.infer({0: x})
        plain.append(time.perf_counter() - t)
        for p in req.profiling_info:
            if p.status.name != "EXECUTED":
                continue
            per_node[p.node_name] += p.real_time.total_seconds() * 1e3
            info[p.node_name] = (p.node_type, p.exec_type)
    nodes = {n: (info[n][0], info[n][1], ms / rounds) for n, ms in per_node.items()}
    groups = collections.defaultdict(float)
    for n, (typ, _, ms) in nodes.items():
        groups[typ] += ms
    return nodes, dict(groups), float(np.median(plain)) * 1e3


def network(name: str):
    """(onnx model, 16 calibration inputs, one more input) of a benchmark or zoo network."""
    if name in ("resnet18", "mobilenet_v2"):
        onnx_model = zoo.resnet18(batch=1) if name == "resnet18" else zoo.mobilenet_v2(batch=1)
        photos = rdata.calibration_photos(17) if rdata.has_calibration_photos() else \
            np.random.default_rng(0).standard_normal((17, 3, 224, 224)).astype("float32")
        return onnx_model, [p[None] for p in photos[:16]], photos[16][None]
    from relayq.testing import torchvision_zoo as tz
    from relayq.testing import zoo_eval

    if name not in tz.ARCHITECTURES:
        raise SystemExit(f"unknown --model {name!r}: resnet18, mobilenet_v2 or one of {sorted(tz.ARCHITECTURES)}")
    size = tz.ARCHITECTURES[name].size
    net, _ = zoo_eval._network(name, size)
    inputs = [c[0] for c in zoo_eval._model_inputs(name, 17, tz.BN_PHOTOS, size)]
    return tz.onnx_export(net, (inputs[0],), input_name="input"), inputs[:16], inputs[16]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet18", help="resnet18, mobilenet_v2 or a zoo image network")
    ap.add_argument("--preset", default="x86-avx2")
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--top", type=int, default=12, help="kernels listed per engine")
    ap.add_argument("--threads", default=str(THREADS), help="threads (also --threads=N, read before TVM loads)")
    ap.add_argument("--hold-avx2", action="store_true", help="hold OpenVINO to AVX2 (ONEDNN_MAX_CPU_ISA)")
    ap.add_argument("--hold-vnni", action="store_true", help="hold OpenVINO to AVX-512 VNNI without AMX")
    ap.add_argument("--no-openvino", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    onnx_model, calib, x = network(args.model)
    in_name = onnx_model.graph.input[0].name
    mod, params = relayq.frontend.from_onnx(onnx_model)
    q = relayq.quantize_model(mod, params, [{in_name: c} for c in calib], "kl", relayq.QConfig(show_progress=False))
    stats8 = []
    lower.lower_quantized(q.realized, args.preset, stats=stats8)
    lib8 = relayq.build(q, target=args.preset)
    lib32 = relayq.build(mod, params=params, target=args.preset)
    k8, plain8 = relayq_profile(lib8, x, args.rounds)
    k32, plain32 = relayq_profile(lib32, x, args.rounds)
    result = {"model": args.model, "preset": args.preset, "threads": THREADS, "hold_avx2": args.hold_avx2, "hold_vnni": args.hold_vnni,
              "relayq_int8": {"latency_ms": plain8, "kernels_ms": k8, "groups_ms": relayq_groups(k8, stats8)},
              "relayq_fp32": {"latency_ms": plain32, "kernels_ms": k32, "groups_ms": relayq_groups(k32, [])}}
    if not args.no_openvino and peers.openvino_available():
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, f"{args.model}.onnx")
            import onnx

            onnx.save(onnx_model, path)
            import openvino as ov

            cfg = {"INFERENCE_NUM_THREADS": THREADS, "PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": "f32",
                   "NUM_STREAMS": 1, "PERF_COUNT": True}
            ov8 = ov.Core().compile_model(peers.nncf_quantize(path, calib), "CPU", cfg)
            nodes, groups, plain_ov = ov_profile(ov8, x, args.rounds)
        result["openvino_int8"] = {"latency_ms": plain_ov, "nodes_ms": nodes, "groups_ms": groups}

    print(f"{args.model}, batch 1, {THREADS} threads, relayq preset {args.preset}"
          f"{', OpenVINO held to AVX2' if args.hold_avx2 else ''}{', OpenVINO held to AVX-512 VNNI' if args.hold_vnni else ''}"
          f"; mean ms per run over {args.rounds} runs")
    print(f"  latency (plain median): relayq INT8 {plain8:.2f}  relayq FP32 {plain32:.2f}"
          + (f"  OpenVINO INT8 {result['openvino_int8']['latency_ms']:.2f}" if "openvino_int8" in result else ""))
    for label, key in (("relayq INT8", "relayq_int8"), ("relayq FP32", "relayq_fp32")):
        print(f"  {label} by layer kind:")
        for k, ms in sorted(result[key]["groups_ms"].items(), key=lambda kv: -kv[1]):
            print(f"    {k:28s}{ms:8.3f}")
    if "openvino_int8" in result:
        print("  OpenVINO INT8 by node type:")
        for k, ms in sorted(result["openvino_int8"]["groups_ms"].items(), key=lambda kv: -kv[1]):
            if ms >= 0.005:
                print(f"    {k:28s}{ms:8.3f}")
    print(f"  top {args.top} relayq INT8 kernels:")
    for k, ms in sorted(k8.items(), key=lambda kv: -kv[1])[:args.top]:
        print(f"    {k:40s}{ms:8.3f}")
    if "openvino_int8" in result:
        print(f"  top {args.top} OpenVINO INT8 nodes:")
        nodes = sorted(result["openvino_int8"]["nodes_ms"].items(), key=lambda kv: -kv[1][2])
        for n, (typ, ex, ms) in nodes[:args.top]:
            print(f"    {n[:40]:40s}{ms:8.3f}   {typ} / {ex}")
    out = args.out or os.path.join(RESULTS, f"profile_{args.model}.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(result, f, indent=1)
    print("wrote", out)


if __name__ == "__main__":
    main()
