"""Micro-benchmark of relayq's fused kernels on ResNet-18 / MobileNetV2 layer shapes.

For each layer: median time of (a) the relayq int8 fused kernel (conv/dense + bias + requant + clip +
cast), (b) relayq's fp32 kernel (conv/dense + bias + ReLU), (c) TVM's default legalized int8 chain and
(d) TVM's default legalized fp32 chain (both through ``relax.get_default_pipeline``, untuned). Every
variant is a one-layer Relax module run by the VM. Writes benchmarks/results/kernels.json.

    PYTHONPATH=python python3 benchmarks/bench_kernels.py [--preset x86-avx2] [--quick] [--no-default]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import numpy as np
import tvm
from tvm import relax

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))
from relayq import qmath  # noqa: E402
from relayq.backend import lower as L  # noqa: E402

# (name, kind, shape-args): conv = (C, O, H, W, k, stride, pad, groups); dense = (M, K, N)
LAYERS = [
    ("resnet18.layer1.conv 64-64 3x3 56", "conv", (64, 64, 56, 56, 3, 1, 1, 1)),
    ("resnet18.layer2.conv1 64-128 3x3 s2", "conv", (64, 128, 56, 56, 3, 2, 1, 1)),
    ("resnet18.layer3.conv 256-256 3x3 14", "conv", (256, 256, 14, 14, 3, 1, 1, 1)),
    ("resnet18.layer4.down 256-512 1x1 s2", "conv", (256, 512, 14, 14, 1, 2, 0, 1)),
    ("mobilenetv2.expand 24-144 1x1 56", "conv", (24, 144, 56, 56, 1, 1, 0, 1)),
    ("mobilenetv2.expand 16-96 1x1 112", "conv", (16, 96, 112, 112, 1, 1, 0, 1)),
    ("mobilenetv2.dw 32 3x3 112", "conv", (32, 32, 112, 112, 3, 1, 1, 32)),
    ("mobilenetv2.dw 144 3x3 56", "conv", (144, 144, 56, 56, 3, 1, 1, 144)),
    ("mobilenetv2.dw 144 3x3 s2 56", "conv", (144, 144, 56, 56, 3, 2, 1, 144)),
    ("mobilenetv2.dw 384 3x3 14", "conv", (384, 384, 14, 14, 3, 1, 1, 384)),
    ("resnet18.fc 1x512x1000", "dense", (1, 512, 1000)),
    ("dense 256x512x512", "dense", (256, 512, 512)),
]
# Timing repetitions: the fused kernels are ~0.1-3 ms, the untuned defaults up to ~150 ms.
FAST_NUMBER, FAST_REPEAT = 10, 5
SLOW_NUMBER, SLOW_REPEAT = 1, 3


def int_module(kind, a, rng):
    """A realized-style one-layer module: int8 x -> conv/matmul -> bias -> requant chain -> int8."""
    bb = relax.BlockBuilder()
    if kind == "conv":
        c, o, h, w, k, s, p, g = a
        shape = (1, c, h, w)
        wt = rng.integers(-127, 128, (o, c // g, k, k)).astype(np.int8)
        cshape = (1, o, 1, 1)
    else:
        m, k_, n = a
        shape, wt, o, cshape = (m, k_), rng.integers(-127, 128, (k_, n)).astype(np.int8), n, (1, n)
    bias = rng.integers(-999, 999, cshape).astype(np.int32)
    # the multiplier realize would pick: short where the accumulator is provably small (int32 requant)
    bound = qmath.accumulator_bounds(wt, (1, 2, 3) if kind == "conv" else (0,), 8, True) + np.abs(bias).reshape(-1)
    mult, sh = qmath.quantize_multipliers(rng.uniform(1e-4, 1e-3, o), qmath.requant_multiplier_bits(int(bound.max()), 8))
    x = relax.Var("x", relax.TensorType(shape, "int8"))
    with bb.function("main", [x]):
        with bb.dataflow():
            if kind == "conv":
                acc = bb.emit(relax.op.nn.conv2d(x, relax.const(wt), strides=(s, s), padding=(p, p, p, p), groups=g,
                                                 out_dtype="int32"))
            else:
                acc = bb.emit(relax.op.matmul(x, relax.const(wt), out_dtype="int32"))
            acc = bb.emit(relax.op.add(acc, relax.const(bias)))
            t = bb.emit(relax.op.astype(acc, "int64"))
            t = bb.emit(relax.op.multiply(t, relax.const(mult.reshape(cshape), "int64")))
            t = bb.emit(relax.op.add(t, relax.const(np.left_shift(1, sh - 1).reshape(cshape), "int64")))
            t = bb.emit(relax.op.right_shift(t, relax.const(sh.reshape(cshape), "int64")))
            t = bb.emit(relax.op.clip(t, 0, 127))
            out = bb.emit_output(bb.emit(relax.op.astype(t, "int8")))
        bb.emit_func_output(out)
    return bb.get(), rng.integers(0, 128, shape).astype(np.int8)


def float_module(kind, a, rng):
    bb = relax.BlockBuilder()
    if kind == "conv":
        c, o, h, w, k, s, p, g = a
        shape, wt, bshape = (1, c, h, w), rng.standard_normal((o, c // g, k, k)).astype(np.float32), (1, o, 1, 1)
    else:
        m, k_, n = a
        shape, wt, bshape = (m, k_), rng.standard_normal((k_, n)).astype(np.float32), (1, n)
    x = relax.Var("x", relax.TensorType(shape, "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            if kind == "conv":
                y = bb.emit(relax.op.nn.conv2d(x, relax.const(wt), strides=(s, s), padding=(p, p, p, p), groups=g))
            else:
                y = bb.emit(relax.op.matmul(x, relax.const(wt)))
            y = bb.emit(relax.op.add(y, relax.const(rng.standard_normal(bshape).astype(np.float32))))
            out = bb.emit_output(bb.emit(relax.op.nn.relu(y)))
        bb.emit_func_output(out)
    return bb.get(), rng.standard_normal(shape).astype(np.float32)


def time_module(mod, target, x, slow=False):
    ex = tvm.compile(mod, target=target, relax_pipeline=relax.get_default_pipeline(target))
    vm = relax.VirtualMachine(ex, tvm.cpu())
    arg = tvm.runtime.tensor(x)
    vm["main"](arg)
    number, repeat = (SLOW_NUMBER, SLOW_REPEAT) if slow else (FAST_NUMBER, FAST_REPEAT)
    res = vm.time_evaluator("main", tvm.cpu(), number=number, repeat=repeat)(arg)
    return float(np.median(res.results)) * 1e3


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default=L.best_host_preset())
    ap.add_argument("--quick", action="store_true", help="first 3 layers only")
    ap.add_argument("--no-default", action="store_true", help="skip TVM's (slow) untuned default kernels")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "kernels.json"))
    args = ap.parse_args()
    target = L.target_from_preset(args.preset)
    rng = np.random.default_rng(0)
    rows = []
    layers = LAYERS[:3] if args.quick else LAYERS
    hdr = f"{'layer':40s} {'int8 fused':>11s} {'fp32 relayq':>12s} {'int8 TVM':>10s} {'fp32 TVM':>10s} {'fp32/int8':>9s}"
    print(f"preset {args.preset}, target {target}, times in ms (median)")
    print(hdr)
    for name, kind, a in layers:
        t0 = time.time()
        imod, xi = int_module(kind, a, rng)
        fmod, xf = float_module(kind, a, rng)
        r = {"layer": name, "kind": kind, "shape": list(a)}
        r["int8_relayq_ms"] = time_module(L.lower_quantized(imod, args.preset), target, xi)
        r["fp32_relayq_ms"] = time_module(L.lower_float(fmod, args.preset), target, xf)
        if not args.no_default:
            r["int8_tvm_default_ms"] = time_module(imod, target, xi, slow=True)
            r["fp32_tvm_default_ms"] = time_module(fmod, target, xf, slow=True)
        r["speedup_int8_vs_fp32"] = r["fp32_relayq_ms"] / r["int8_relayq_ms"]
        rows.append(r)
        print(f"{name:40s} {r['int8_relayq_ms']:11.3f} {r['fp32_relayq_ms']:12.3f} "
              f"{r.get('int8_tvm_default_ms', float('nan')):10.2f} {r.get('fp32_tvm_default_ms', float('nan')):10.2f} "
              f"{r['speedup_int8_vs_fp32']:8.2f}x   ({time.time() - t0:.0f} s)", flush=True)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"preset": args.preset, "target": str(target), "machine": platform.processor() or platform.machine(),
                   "cpu_count": os.cpu_count(), "tvm": tvm.__version__, "layers": rows}, f, indent=1)
    print("wrote", args.out)


if __name__ == "__main__":
    main()
