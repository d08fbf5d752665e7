"""Micro-benchmark of the elementwise paths: table lookups (activations) and the squeeze-excitation product.

For each activation on a MobileNetV3 / EfficientNet-sized tensor: time (best of repeats) of
(a) relayq's LUT kernel (int8 in, int8 out: ``relayq.backend.elementwise.lut_kernel``),
(b) the same realized ``take`` chain through TVM's default pipeline (untuned),
(c) the float op it replaces, fp32 in and out (TVM's default pipeline), and
(d) what relayq did before tables: dequantize -> float op -> quantize (default pipeline).
For the gate multiply ``x * s`` (``s`` of shape (1, C, 1, 1)): relayq's fused int8 product + requant
kernel, the realized chain through the default pipeline, and the fp32 multiply. The kernels are checked
bit for bit against the default pipeline's output. Writes benchmarks/results/elementwise.json.

    PYTHONPATH=python python3 benchmarks/bench_elementwise.py [--preset x86-avx2]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys

import numpy as np
import tvm
from tvm import relax

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))
from relayq import qmath  # noqa: E402
from relayq.backend import lower as L  # noqa: E402
from relayq.backend import presets  # noqa: E402

R = relax.op
SHAPES = [(1, 64, 56, 56), (1, 240, 28, 28)]
# The machine is shared: the minimum over repeats is the least disturbed measurement.
NUMBER, REPEAT = 10, 15
IN_SCALE, OUT_SCALE = 6.0 / 127, 6.0 / 127


def _c(v):
    return relax.const(np.float32(v))


# name -> (float Relax expression builder, numpy function): the spellings the ONNX importer produces
FUNCS = {
    "sigmoid": (lambda bb, x: R.sigmoid(x), lambda x: 1 / (1 + np.exp(-x))),
    "hardswish": (lambda bb, x: R.multiply(x, bb.emit(R.divide(bb.emit(R.clip(bb.emit(R.add(x, _c(3.0))), 0.0, 6.0)),
                                                                _c(6.0)))),
                  lambda x: x * np.clip(x + 3, 0, 6) / 6),
    "silu": (lambda bb, x: R.multiply(x, bb.emit(R.sigmoid(x))), lambda x: x / (1 + np.exp(-x))),
    "gelu(erf)": (lambda bb, x: R.multiply(bb.emit(R.multiply(x, bb.emit(R.add(bb.emit(R.erf(bb.emit(
        R.divide(x, _c(math.sqrt(2)))))), _c(1.0))))), _c(0.5)),
                  lambda x: 0.5 * x * (1 + np.vectorize(math.erf)(x / math.sqrt(2)))),
}


def _module(shape, dtype, body):
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(shape, dtype))
    with bb.function("main", [x]):
        with bb.dataflow():
            out = bb.emit_output(body(bb, x))
        bb.emit_func_output(out)
    return bb.get()


def _module2(shapes, dtype, body):
    bb = relax.BlockBuilder()
    a = relax.Var("a", relax.TensorType(shapes[0], dtype))
    b = relax.Var("b", relax.TensorType(shapes[1], dtype))
    with bb.function("main", [a, b]):
        with bb.dataflow():
            out = bb.emit_output(body(bb, a, b))
        bb.emit_func_output(out)
    return bb.get()


def _lut_chain(table):
    def body(bb, x):
        i = bb.emit(R.subtract(bb.emit(R.astype(x, "int32")), relax.const(np.int32(-127))))
        return bb.emit(R.take(relax.const(table), i, axis=0, mode="clip"))
    return body


def _fallback_chain(build):
    def body(bb, x):
        f = bb.emit(R.multiply(bb.emit(R.astype(x, "float32")), _c(IN_SCALE)))
        y = bb.emit(build(bb, f))
        q = bb.emit(R.quantize(y, _c(OUT_SCALE), relax.const(0, "int8"), axis=-1, out_dtype="int8"))
        return bb.emit(R.clip(q, -127, 127))
    return body


def _mul_chain(m, r, s):
    def body(bb, a, b):
        p = bb.emit(R.multiply(bb.emit(R.astype(a, "int32")), bb.emit(R.astype(b, "int32"))))
        t = bb.emit(R.multiply(bb.emit(R.astype(p, "int64")), relax.const(np.int64(m), "int64")))
        t = bb.emit(R.right_shift(bb.emit(R.add(t, relax.const(np.int64(r), "int64"))), relax.const(np.int64(s), "int64")))
        return bb.emit(R.astype(bb.emit(R.clip(t, -127, 127)), "int8"))
    return body


def _time(mod, target, args, lower_kind=None):
    if lower_kind is not None:
        stats = []
        mod = L.lower_quantized(mod, lower_kind, stats=stats)
        assert stats, "the relayq kernel did not match"
    ex = tvm.compile(mod, target=target, relax_pipeline=relax.get_default_pipeline(target))
    vm = relax.VirtualMachine(ex, tvm.cpu())
    targs = [tvm.runtime.tensor(a) for a in args]
    out = vm["main"](*targs).numpy()
    res = vm.time_evaluator("main", tvm.cpu(), number=NUMBER, repeat=REPEAT)(*targs)
    return float(np.min(res.results)) * 1e3, out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default=presets.best_host_preset())
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                  "elementwise.json"))
    args = ap.parse_args()
    target = presets.target_from_preset(args.preset)
    kind = presets.KERNEL_FAMILY.get(args.preset, args.preset)
    rng = np.random.default_rng(0)
    rows = []
    print(f"preset {args.preset}; best of {REPEAT} x {NUMBER} runs, ms")
    print(f"{'op':<12} {'shape':<18} {'relayq int8':>12} {'TVM int8':>10} {'fp32 op':>10} {'deq-fp32-q':>11}")
    for shape in SHAPES:
        x8 = rng.integers(-127, 128, shape).astype(np.int8)
        xf = (x8.astype(np.float32) * np.float32(IN_SCALE)).astype(np.float32)
        for name, (build, fn) in FUNCS.items():
            table = qmath.lut_table(fn, 8, IN_SCALE, 8, OUT_SCALE).astype(np.int8)
            lut = _module(shape, "int8", _lut_chain(table))
            t_k, y_k = _time(lut, target, [x8], kind)
            t_d, y_d = _time(lut, target, [x8])
            assert np.array_equal(y_k, y_d), name
            t_f, _ = _time(_module(shape, "float32", lambda bb, x, b=build: b(bb, x)), target, [xf])
            t_q, _ = _time(_module(shape, "int8", _fallback_chain(build)), target, [x8])
            rows.append({"op": name, "shape": list(shape), "relayq_int8_ms": t_k, "tvm_default_int8_ms": t_d,
                         "fp32_ms": t_f, "dequant_fp32_quant_ms": t_q})
            print(f"{name:<12} {str(shape):<18} {t_k:>12.3f} {t_d:>10.3f} {t_f:>10.3f} {t_q:>11.3f}")
        gshape = (1, shape[1], 1, 1)
        g8 = rng.integers(0, 128, gshape).astype(np.int8)
        m, s = qmath.quantize_multiplier(IN_SCALE * (1 / 127) / OUT_SCALE)
        mul = _module2([shape, gshape], "int8", _mul_chain(m, 1 << (s - 1), s))
        t_k, y_k = _time(mul, target, [x8, g8], kind)
        t_d, y_d = _time(mul, target, [x8, g8])
        assert np.array_equal(y_k, y_d)
        fmul = _module2([shape, gshape], "float32", lambda bb, a, b: bb.emit(R.multiply(a, b)))
        t_f, _ = _time(fmul, target, [xf, (g8 / 127).astype(np.float32)])
        rows.append({"op": "se multiply", "shape": list(shape), "relayq_int8_ms": t_k, "tvm_default_int8_ms": t_d,
                     "fp32_ms": t_f})
        print(f"{'se multiply':<12} {str(shape):<18} {t_k:>12.3f} {t_d:>10.3f} {t_f:>10.3f} {'-':>11}")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"preset": args.preset, "cpu": platform.processor() or platform.machine(), "rows": rows}, f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
