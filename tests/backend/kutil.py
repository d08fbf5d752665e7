"""Helpers of the backend tests: realized-style Relax layers built by hand and their numpy reference."""
from __future__ import annotations

import os

import numpy as np
import tvm
from tvm import relax

from relayq import qmath
from relayq.backend.generic import Requant
from relayq.runtime import host_cpu_flags

AVX2 = tvm.target.Target({"kind": "llvm", "mcpu": "core-avx2", "num-cores": os.cpu_count() or 1})
VNNI = tvm.target.Target({"kind": "llvm", "mcpu": "cascadelake", "num-cores": os.cpu_count() or 1})
GENERIC = tvm.target.Target({"kind": "llvm", "num-cores": os.cpu_count() or 1})


def cpu_flags():
    """This CPU's flags (the package's own reader of /proc/cpuinfo)."""
    return set(host_cpu_flags())


def rand_requant(rng, channels, per_channel, lo=-127, hi=127):
    """A random Requant (realistic factors 5e-4..1e-2) with the realize pass's rounding constant."""
    reals = rng.uniform(5e-4, 1e-2, channels if per_channel else 1)
    m, s = qmath.quantize_multipliers(reals)
    return Requant.from_arrays(m, np.left_shift(np.int64(1), s - 1), s, lo, hi)


def _i64(a, shape):
    a = np.asarray(a, np.int64)
    return relax.const(a if a.ndim == 0 else a.reshape(shape), "int64")


def emit_requant(bb, acc, bias, rq: Requant, bshape, cshape):
    """The realize chain: add bias, astype int64, multiply, add, right_shift, clip, astype int8."""
    acc = bb.emit(relax.op.add(acc, relax.const(np.asarray(bias, np.int32).reshape(bshape))))
    t = bb.emit(relax.op.astype(acc, "int64"))
    t = bb.emit(relax.op.multiply(t, _i64(rq.multiplier, cshape)))
    t = bb.emit(relax.op.add(t, _i64(rq.addend, cshape)))
    t = bb.emit(relax.op.right_shift(t, _i64(rq.shift, cshape)))
    t = bb.emit(relax.op.clip(t, int(rq.lo), int(rq.hi)))
    return bb.emit(relax.op.astype(t, "int8"))


class Layer:
    """One realized layer spec: conv (OIHW weight) or dense ((K, N) weight) + bias + Requant."""

    def __init__(self, kind, weight, bias, rq, strides=(1, 1), padding=(0, 0, 0, 0), dilation=(1, 1), groups=1):
        self.kind, self.weight, self.bias, self.rq = kind, weight, bias, rq
        self.strides, self.padding, self.dilation, self.groups = strides, padding, dilation, groups

    def emit(self, bb, x):
        if self.kind == "conv2d":
            o = self.weight.shape[0]
            acc = bb.emit(relax.op.nn.conv2d(x, relax.const(self.weight), strides=self.strides,
                                             padding=self.padding, dilation=self.dilation, groups=self.groups,
                                             data_layout="NCHW", kernel_layout="OIHW", out_dtype="int32"))
            return emit_requant(bb, acc, self.bias, self.rq, (1, o, 1, 1), (1, o, 1, 1))
        n = self.weight.shape[1]
        acc = bb.emit(relax.op.matmul(x, relax.const(self.weight), out_dtype="int32"))
        return emit_requant(bb, acc, self.bias, self.rq, (1, n), (1, n))

    def reference(self, x):
        if self.kind == "conv2d":
            acc = qmath.conv2d_int(x, self.weight, self.strides, self.padding, self.dilation, self.groups)
            acc = acc + self.bias.reshape(1, -1, 1, 1)
        else:
            acc = np.asarray(x, np.int64) @ self.weight.astype(np.int64) + self.bias.reshape(1, -1)
        ax = 1
        m, r, s = self.rq.multiplier, self.rq.addend, self.rq.shift
        if self.rq.per_channel:
            shape = [1] * acc.ndim
            shape[ax] = -1
            m, r, s = m.reshape(shape), r.reshape(shape), s.reshape(shape)
        return np.clip((acc * m + r) >> s, self.rq.lo, self.rq.hi).astype(np.int8)


def conv_layer(rng, c, o, k=3, stride=1, pad=1, groups=1, per_channel=False, relu=False, dilation=1):
    w = rng.integers(-127, 128, (o, c // groups, k, k)).astype(np.int8)
    b = rng.integers(-3000, 3000, o).astype(np.int32)
    rq = rand_requant(rng, o, per_channel, lo=0 if relu else -127)
    return Layer("conv2d", w, b, rq, (stride, stride), (pad, pad, pad, pad), (dilation, dilation), groups)


def dense_layer(rng, k, n, per_channel=False, relu=False):
    w = rng.integers(-127, 128, (k, n)).astype(np.int8)
    b = rng.integers(-3000, 3000, n).astype(np.int32)
    return Layer("dense", w, b, rand_requant(rng, n, per_channel, lo=0 if relu else -127))


def build_chain(x_shape, layers, between=None):
    """main(x int8) -> layers in sequence; ``between[i]`` (optional) maps the value after layer i."""
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(x_shape, "int8"))
    with bb.function("main", [x]):
        with bb.dataflow():
            y = x
            for i, layer in enumerate(layers):
                y = layer.emit(bb, y)
                if between and i in between:
                    y = between[i](bb, y)
            out = bb.emit_output(y)
        bb.emit_func_output(out)
    return bb.get()


def run_module(mod, target, *args):
    ex = tvm.compile(mod, target=target, relax_pipeline=relax.get_default_pipeline(target))
    vm = relax.VirtualMachine(ex, tvm.cpu())
    out = vm["main"](*[tvm.runtime.tensor(np.ascontiguousarray(a)) for a in args])
    return out.numpy(), ex


def call_tir_outputs(mod):
    """(callee name, output dtype) of every call_tir in main."""
    res = []
    call_tir = tvm.ir.Op.get("relax.call_tir")

    def visit(e):
        if isinstance(e, relax.Call) and e.op.same_as(call_tir):
            res.append((e.args[0].name_hint, str(e.ty.dtype)))

    relax.analysis.post_order_visit(mod["main"], visit)
    return res
