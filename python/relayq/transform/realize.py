"""Stage 4, realize: replace simulated quantization by real integer ops.

Realize walks ``main`` once and gives every variable one of four *values*:

* ``Float``: an ordinary float tensor (graph inputs, float islands);
* ``Q``: integer codes (int8, or int16 above 8 bits) with a scale;
* ``Acc``: a conv2d / dense int32 accumulator (bias already added) whose ReLU/clip bounds are known but
  which is not yet requantized;
* ``Pending``: an add or concat of ``Q`` values waiting for its output scale;
* ``Lut`` / ``Affine``: an elementwise region of a ``Q`` value (a function looked up in a table over
  all input codes, or a per-channel piecewise-affine map) waiting for its output scale. A multiply of
  two ``Q`` values is an ``Acc``: the exact integer product at scale ``s_a * s_b``.

A marker on an ``Acc`` or ``Pending`` value *finalizes* it into ``Q`` at the marker's scale with
integer-only arithmetic (see :mod:`relayq.qmath`): ``(acc * M + 2^(s-1)) >> s`` in int64, then a clip
that also implements a fused ReLU / ReLU6, then a cast. A float op that reads a quantized value gets a
dequantized copy: this is the only place where float comes back, so two consecutive quantized ops are
never separated by a float op.

Example::

    realized = realize(annotated, qpoints)
    print(realized)           # conv2d(..., out_dtype="int32"), right_shift, clip, astype("int8") ...
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import tvm
from tvm import relax

from .. import qmath
from ..errors import BiasClampWarning, ConfigError, FloatFallbackWarning, OverflowRiskError
from ..utils.names import describe
from . import elementwise
from .annotate import QUANTIZED_ATTR, layer_sources, regions
from .common import (bindings, const_value, is_const_expr, main_function, op_name, shape_of, simq_info, substitute,
                     vars_of)

_INT32_MAX = qmath.INT32_MAX
#: Ops that only move codes: realize applies them to the codes unchanged (same scale and zero point).
_DATA_MOVEMENT = ("relax.reshape", "relax.flatten", "relax.permute_dims", "relax.strided_slice", "relax.squeeze",
                  "relax.expand_dims", "relax.take")


@dataclass
class Float:
    expr: Any


@dataclass
class Q:
    expr: Any
    scale: float
    bits: int
    zp: int = 0                   # zero point (asymmetric unsigned codes); 0 when symmetric
    signed: bool = True

    @property
    def lo(self):
        return qmath.qrange(self.bits, self.signed)[0]

    @property
    def hi(self):
        return qmath.qrange(self.bits, self.signed)[1]

    def same_codes(self, scale, bits, zp, signed) -> bool:
        return self.scale == scale and self.bits == bits and self.zp == zp and self.signed == signed


@dataclass
class Acc:
    expr: Any                     # int32 accumulator
    scale: Any                    # float or per-channel np vector (s_x * s_w)
    channel_axis: int             # axis of per-channel scales in the accumulator
    ndim: int
    lo: float = -np.inf           # real-valued clip bounds of a fused ReLU / clip
    hi: float = np.inf
    bias_added: bool = False
    corr: Any = None              # int64 per-channel zero-point correction not yet added (folded into the bias)
    wpoint: Any = None            # the layer's weight QPoint (its bias correction applies to the bias)
    worst: int = 0                # the largest |accumulator| before the bias (the bias clamp keeps the sum in int32)
    wide: bool = False            # an int64 accumulator (a product of two 16-bit tensors may leave int32)
    bound: Any = None             # per channel, the largest |accumulator + bias| over all input codes (conv /
    #                               dense: qmath.accumulator_bounds); sets the multiplier's bits


@dataclass
class Const:
    """A float constant operand of a merge (a class token, a position embedding): quantized at the merge's
    output scale when the merge is finalized."""
    value: np.ndarray


@dataclass
class Pending:
    kind: str                     # "add" | "concat"
    parts: list
    attrs: dict = field(default_factory=dict)
    lo: float = -np.inf
    hi: float = np.inf


@dataclass
class Lut:
    x: Q                          # the region's input codes
    fn: Any                       # the region's float function (numpy, float64)
    lo: float = -np.inf           # clip bounds of a fused ReLU / clip (none: the region holds them)
    hi: float = np.inf


@dataclass
class Affine:
    x: Q
    a_pos: np.ndarray             # per-channel slope for x >= 0 (size 1: per tensor)
    a_neg: np.ndarray             # per-channel slope for x < 0
    b: np.ndarray                 # per-channel offset
    axis: Any                     # channel axis, None per tensor
    ndim: int
    lo: float = -np.inf
    hi: float = np.inf


@dataclass
class Deferred:
    """An op inside an elementwise region: emitted in float only if something outside reads it."""
    var: Any
    call: Any


def _i64(v, shape=None):
    a = np.asarray(v, dtype=np.int64)
    if shape is not None and a.ndim:
        a = a.reshape(shape)
    return relax.const(a, "int64")


class Realizer:
    """The realize walk over one annotated ``main`` (see the module docstring)."""

    def __init__(self, annotated: tvm.IRModule, qpoints: dict):
        self.mod = annotated
        self.func = main_function(annotated)
        self.qpoints = qpoints
        attr = self.func.attrs.get(QUANTIZED_ATTR) if self.func.attrs is not None else None
        self.quantized = set(attr) if attr is not None else set()
        self.bb = relax.BlockBuilder()
        self.values = {}
        self.weights = {}          # marker var -> (float weight, QPoint)
        self.int_params = {}       # name -> integer constants (for reports / export size)
        self.dequantized = {}      # id of a Q value -> its float copy (emitted once)
        self.sources = layer_sources(annotated)     # layer -> the user's names of it
        self.regions = regions(annotated)          # region output var name -> its layer, kind, members
        self.region_interior = {m for r in self.regions.values() for m in r["members"]} - set(self.regions)
        self.func_bindings = bindings(self.func)

    def describe(self, layer: str) -> str:
        """``conv2d_3 (ONNX node "...", weight "...")``: a layer in relayq's and the user's names."""
        return describe(layer, self.sources.get(layer))

    # ---------------------------------------------------------------- helpers
    def emit(self, expr, name=None):
        return self.bb.emit(expr, name) if name else self.bb.emit(expr)

    def to_float(self, val):
        """A float expression of any value (dequantizing where needed)."""
        if isinstance(val, Float):
            return val.expr
        if isinstance(val, Q):
            key = id(val)
            if key not in self.dequantized:
                self.dequantized[key] = self.dequantize(val)
            return self.dequantized[key]
        if isinstance(val, Acc):
            s = np.asarray(val.scale, dtype=np.float32)
            if s.ndim:
                shape = [1] * val.ndim
                shape[val.channel_axis] = -1
                s = s.reshape(shape)
            y = self.emit(relax.op.multiply(relax.op.astype(self.acc_int(val), "float32"), relax.const(s)))
            return self._float_clip(y, val.lo, val.hi)
        if isinstance(val, Deferred):
            key = id(val)
            if key not in self.dequantized:
                remap = {a: self.to_float(self.values[a]) for a in vars_of(val.call) if a in self.values}
                self.dequantized[key] = self.emit(substitute(val.call, remap))
            return self.dequantized[key]
        if isinstance(val, Const):
            return relax.const(val.value.astype(np.float32))
        if isinstance(val, (Lut, Affine)):
            raise ConfigError("realize: an elementwise region without an output point (the annotated module is "
                              "inconsistent)")
        if isinstance(val, Pending):
            fl = [self.to_float(p) for p in val.parts]
            if val.kind == "add":
                y = self.emit(relax.op.add(fl[0], fl[1]))
            else:
                y = self.emit(relax.op.concat(fl, axis=val.attrs["axis"]))
            return self._float_clip(y, val.lo, val.hi)
        raise TypeError(val)

    # ------------------------------------------------------ carrier hooks
    # The realized graph carries integer codes; :class:`Simulator` overrides these four hooks to carry
    # dequantized floats instead, with every rounding done on codes recovered exactly from them.
    def codes(self, q: Q):
        """The integer codes of ``q`` (an int8/uint8/int16 expression)."""
        return q.expr

    def wrap(self, codes, scale, bits, zp=0, signed=True, name=None) -> Q:
        """A Q value from an integer-codes expression."""
        return Q(codes, scale, bits, zp, signed)

    def dequantize(self, q: Q):
        """``(codes - zp) * scale`` in float32: where the graph leaves the quantized region."""
        f = self.emit(relax.op.astype(q.expr, "float32"))
        if q.zp:
            f = self.emit(relax.op.subtract(f, relax.const(np.float32(q.zp))))
        return self.emit(relax.op.multiply(f, relax.const(np.float32(q.scale))))

    def acc_int(self, acc: Acc):
        """The int32 accumulator of ``acc`` (its pending zero-point correction added)."""
        self._apply_corr(acc)
        return acc.expr

    def _float_clip(self, y, lo, hi):
        if lo == 0.0 and hi == np.inf:
            return self.emit(relax.op.nn.relu(y))
        if lo > -np.inf or hi < np.inf:
            return self.emit(relax.op.clip(y, float(lo), float(hi)))
        return y

    def _code_bounds(self, lo_real, hi_real, scale, bits, zp=0, signed=True):
        qlo, qhi = qmath.qrange(bits, signed)
        lo = qlo if lo_real == -np.inf else max(qlo, int(np.round(lo_real / scale)) + zp)
        hi = qhi if hi_real == np.inf else min(qhi, int(np.round(hi_real / scale)) + zp)
        return lo, hi

    def _cast(self, t, bits, signed=True, name=None):
        e = relax.op.astype(t, qmath.storage_dtype(bits, signed))
        return self.bb.emit(e, name) if name else self.emit(e)

    def _apply_corr(self, acc: Acc) -> None:
        """Add a pending zero-point correction to an accumulator that got no bias to fold it into."""
        if acc.corr is not None:
            shape = [1] * acc.ndim
            shape[acc.channel_axis] = -1
            acc.expr = self.emit(relax.op.add(acc.expr, relax.const(acc.corr.astype(np.int32).reshape(shape))))
            acc.corr = None

    def _rounding_shift(self, t, shift, shape=None):
        """``(t + 2^(shift-1)) >> shift`` on int64 tensors (shift >= 0, scalar or per channel; 0 keeps t)."""
        shift = np.asarray(shift, dtype=np.int64)
        half = np.where(shift > 0, np.left_shift(np.int64(1), np.maximum(shift, 1) - 1), 0)
        t = self.emit(relax.op.add(t, _i64(half, shape)))
        return self.emit(relax.op.right_shift(t, _i64(shift, shape)))

    def requantize(self, acc, factor, bits, lo, hi, shape=None, name=None, zp_in=0, zp_out=0, signed=True,
                   bound=None):
        """Emit the integer requantization chain of ``acc`` (codes less ``zp_in``) by the real ``factor``.

        Where every factor is a power of two (``QConfig(power_of_two_scale=True)``) the multiply is
        dropped and the chain is a rounding shift only; it computes the same integers as qmath.
        With ``bound`` (the largest |acc|, see :class:`Acc`) the multiplier is as short as
        :func:`relayq.qmath.requant_multiplier_bits` allows, so the kernels can requantize in int32.
        """
        factor = np.asarray(factor, dtype=np.float64)
        mbits = qmath.MULTIPLIER_BITS if bound is None else qmath.requant_multiplier_bits(int(np.max(bound)), bits)
        m, s = qmath.quantize_multipliers(factor.reshape(-1), mbits)
        if factor.ndim == 0:
            m, s, shape = m[0], s[0], None
        t = self.emit(relax.op.astype(acc, "int64"))
        if zp_in:
            t = self.emit(relax.op.subtract(t, _i64(zp_in)))
        if np.all(m == (1 << 30)) and np.all(s >= 30):
            # M = 2^30: (t * 2^30 + 2^(s-1)) >> s == (t + 2^(s-31)) >> (s-30), or t itself when s == 30.
            k = np.asarray(s, np.int64) - 30
            if np.any(k > 0):
                t = self._rounding_shift(t, k, shape)
        else:
            t = self.emit(relax.op.multiply(t, _i64(m, shape)))
            t = self._rounding_shift(t, s, shape)
        if zp_out:
            t = self.emit(relax.op.add(t, _i64(zp_out)))
        t = self.emit(relax.op.clip(t, int(lo), int(hi)))
        return self._cast(t, bits, signed, name)

    def finalize(self, val, scale: float, bits: int, name=None, zp: int = 0, signed: bool = True) -> Q:
        """Bring any value to codes at ``(scale, zp)`` (a marker on it)."""
        st = qmath.storage_dtype(bits, signed)
        qlo, qhi = qmath.qrange(bits, signed)
        if isinstance(val, Float):
            q = self.emit(relax.op.quantize(val.expr, relax.const(np.float32(scale)), relax.const(zp, st),
                                            axis=-1, out_dtype=st))
            if (qlo, qhi) != (np.iinfo(st).min, np.iinfo(st).max):
                q = self.emit(relax.op.clip(q, qlo, qhi), name)
            return self.wrap(q, scale, bits, zp, signed, name)
        if isinstance(val, Q):
            if val.same_codes(scale, bits, zp, signed):
                return val
            return self.wrap(self.requantize(self.codes(val), val.scale / scale, bits, qlo, qhi, name=name,
                                             zp_in=val.zp, zp_out=zp, signed=signed), scale, bits, zp, signed, name)
        if isinstance(val, Acc):
            lo, hi = self._code_bounds(val.lo, val.hi, scale, bits, zp, signed)
            shape = None
            if np.ndim(val.scale):
                shape = [1] * val.ndim
                shape[val.channel_axis] = -1
            return self.wrap(self.requantize(self.acc_int(val), np.asarray(val.scale, np.float64) / scale, bits, lo,
                                             hi, shape, name, zp_out=zp, signed=signed, bound=val.bound),
                             scale, bits, zp, signed, name)
        if isinstance(val, Lut):
            return self.wrap(self._lookup(val, scale, bits, zp, signed, name), scale, bits, zp, signed, name)
        if isinstance(val, Affine):
            return self.wrap(self._affine(val, scale, bits, zp, signed, name), scale, bits, zp, signed, name)
        if isinstance(val, Pending):
            lo, hi = self._code_bounds(val.lo, val.hi, scale, bits, zp, signed)
            if val.kind == "add":
                terms = []
                for p in val.parts:
                    if isinstance(p, Const):
                        terms.append(_i64(qmath.add_constant_term(p.value, scale)))
                        continue
                    m, s = qmath.add_rescale_params(p.scale, scale)
                    t = self.emit(relax.op.astype(self.codes(p), "int64"))
                    if p.zp:
                        t = self.emit(relax.op.subtract(t, _i64(p.zp)))
                    t = self.emit(relax.op.multiply(t, _i64(m)))
                    terms.append(self._rounding_shift(t, s))
                t = self.emit(relax.op.add(terms[0], terms[1]))
                t = self._rounding_shift(t, qmath.ADD_EXTRA_BITS)
                if zp:
                    t = self.emit(relax.op.add(t, _i64(zp)))
                t = self.emit(relax.op.clip(t, lo, hi))
                return self.wrap(self._cast(t, bits, signed, name), scale, bits, zp, signed, name)
            parts = []
            for p in val.parts:
                if isinstance(p, Const):
                    codes = np.clip(qmath.quantize(p.value, np.float32(scale), bits, signed, zp), lo, hi)
                    parts.append(relax.const(codes.astype(st), st))
                elif p.same_codes(scale, bits, zp, signed) and (lo, hi) == (qlo, qhi):
                    parts.append(self.codes(p))
                else:
                    parts.append(self.requantize(self.codes(p), p.scale / scale, bits, lo, hi, zp_in=p.zp, zp_out=zp,
                                                 signed=signed))
            return self.wrap(self.emit(relax.op.concat(parts, axis=val.attrs["axis"])), scale, bits, zp, signed, name)
        raise TypeError(val)

    def _lookup(self, val: Lut, scale, bits, zp, signed, name):
        """``take(table, codes - qmin)``: the region's function on every input code (:func:`qmath.lut_table`)."""
        x = val.x
        lo, hi = self._code_bounds(val.lo, val.hi, scale, bits, zp, signed)
        table = qmath.lut_table(val.fn, x.bits, x.scale, bits, scale, x.zp, zp, x.signed, signed, lo, hi)
        idx = self.emit(relax.op.astype(self.codes(x), "int32"))
        if x.lo != 0:
            idx = self.emit(relax.op.subtract(idx, relax.const(np.int32(x.lo))))
        tab = relax.const(table.astype(qmath.storage_dtype(bits, signed)))
        e = relax.op.take(tab, idx, axis=0, mode="clip")     # "fast" warns at every build
        return self.bb.emit(e, name) if name else self.emit(e)

    def _affine(self, val: Affine, scale, bits, zp, signed, name):
        """The integer per-channel affine of :func:`qmath.channel_affine`."""
        x = val.x
        lo, hi = self._code_bounds(val.lo, val.hi, scale, bits, zp, signed)
        m_pos, m_neg, off, shift = qmath.channel_affine_params(val.a_pos, val.a_neg, val.b, x.scale, scale)
        shape = None
        if m_pos.size > 1:
            shape = [1] * val.ndim
            shape[val.axis] = -1
        t = self.emit(relax.op.astype(self.codes(x), "int64"))
        if x.zp:
            t = self.emit(relax.op.subtract(t, _i64(x.zp)))
        if np.array_equal(m_pos, m_neg):
            m = _i64(m_pos if shape else m_pos.reshape(()), shape)
        else:
            m = self.emit(relax.op.where(relax.op.greater_equal(t, _i64(0)), _i64(m_pos if shape else m_pos[0], shape),
                                         _i64(m_neg if shape else m_neg[0], shape)))
        t = self.emit(relax.op.multiply(t, m))
        if np.any(off != 0):
            t = self.emit(relax.op.add(t, _i64(off if shape else off[0], shape)))
        t = self._rounding_shift(t, shift)
        if zp:
            t = self.emit(relax.op.add(t, _i64(zp)))
        t = self.emit(relax.op.clip(t, int(lo), int(hi)))
        return self._cast(t, bits, signed, name)

    def rule_region(self, v):
        """The value of an elementwise region's output: a ``Lut`` or an ``Affine`` of its input's codes."""
        info = self.regions[v.name]
        members = elementwise.region_bindings(self.func_bindings, info["members"])
        root = elementwise.root_of(members)
        x = self.as_q(self.values[root], v.name)
        fn = elementwise.region_function(members, root)
        if info["kind"] == "lut":
            return Lut(x, fn)
        a_pos, a_neg, b = elementwise.affine_params(fn, shape_of(v), info["axis"])
        return Affine(x, a_pos, a_neg, b, info["axis"], len(shape_of(v)))

    def rule_multiply(self, v, call, args):
        """The exact product of two quantized tensors' codes (less their zero points), at scale s_a * s_b."""
        a, b = self._product_operands(v, call)
        worst = max(abs(a.lo - a.zp), abs(a.hi - a.zp)) * max(abs(b.lo - b.zp), abs(b.hi - b.zp))
        dt = "int32" if worst <= _INT32_MAX else "int64"
        terms = []
        for q in (a, b):
            t = self.emit(relax.op.astype(self.codes(q), dt))
            if q.zp:
                t = self.emit(relax.op.subtract(t, relax.const(np.asarray(q.zp, dt), dt)))
            terms.append(t)
        e = self.emit(relax.op.multiply(terms[0], terms[1]), v.name)
        return Acc(e, float(np.float64(a.scale) * np.float64(b.scale)), 1, len(shape_of(v)), wide=dt == "int64")

    def _product_operands(self, v, call):
        """The two factors of a product as Q values; a constant factor gets codes of its own
        (qmath.constant_codes, at the other factor's bits)."""
        x = next(self.as_q(self.values[a], v.name) for a in call.args if isinstance(a, relax.Var))
        out = []
        for a in call.args:
            if isinstance(a, relax.Var):
                out.append(self.as_q(self.values[a], v.name))
            else:
                codes, scale = qmath.constant_codes(const_value(a), x.bits)
                st = qmath.storage_dtype(x.bits)
                out.append(self.wrap(relax.const(codes.astype(st), st), scale, x.bits))
        return out

    def _matmul_worst(self, a: Q, b: Q, k: int) -> int:
        return k * max(abs(a.lo - a.zp), abs(a.hi - a.zp)) * max(abs(b.lo - b.zp), abs(b.hi - b.zp))

    def rule_matmul(self, v, call, args):
        """Two quantized activations (attention): the exact integer matmul of their codes (less their zero
        points), int32 (int64 where the worst case leaves int32), at scale s_a * s_b; requantized like dense."""
        a, b = (self.as_q(x, v.name) for x in args)
        dt = "int32" if self._matmul_worst(a, b, shape_of(call.args[0])[-1]) <= _INT32_MAX else "int64"
        terms = []
        for q in (a, b):
            t = self.codes(q)
            if q.zp or dt == "int64":
                t = self.emit(relax.op.astype(t, dt))
                if q.zp:
                    t = self.emit(relax.op.subtract(t, relax.const(np.asarray(q.zp, dt), dt)))
            terms.append(t)
        e = self.emit(relax.op.matmul(terms[0], terms[1], out_dtype=dt), v.name)
        return Acc(e, float(np.float64(a.scale) * np.float64(b.scale)), 1, len(shape_of(v)), wide=dt == "int64")

    def as_q(self, val, where: str) -> Q:
        if isinstance(val, Q):
            return val
        raise ConfigError(f"realize: {where} expects a quantized input but got {type(val).__name__} "
                          "(the annotated module is inconsistent)")

    # ---------------------------------------------------------------- op rules
    def _weight_codes(self, v, call, x: Q):
        """The layer's integer weights, their QPoint, the accumulator scale s_x * s_w and the worst-case
        accumulator (overflow-checked)."""
        w_float, wp = self.weights[call.args[1]]
        wq = wp.weight_codes(w_float)
        self.int_params[f"{wp.name}"] = wq.astype(qmath.storage_dtype(wp.bits))
        acc_scale = np.float64(x.scale) * np.asarray(wp.scale, dtype=np.float64)
        k = int(np.prod(w_float.shape[1:])) if op_name(call) == "relax.nn.conv2d" else int(w_float.shape[0])
        worst = self._check_overflow(v.name, k, x, wp)
        return wq, wp, (acc_scale if acc_scale.ndim else float(acc_scale)), worst

    def rule_compute(self, v, call, args):
        x = self.as_q(args[0], v.name)
        wq, wp, acc_scale, worst = self._weight_codes(v, call, x)
        wconst = relax.const(wq.astype(qmath.storage_dtype(wp.bits)))
        corr = None
        if x.zp:
            # sum_k w (x - zp) = sum_k w x - zp * sum_k w: the second term is a per-channel constant,
            # folded into the int32 bias (rule_bias) or added on its own when the layer has none.
            corr = -np.int64(x.zp) * wq.reshape(wq.shape[0], -1).sum(axis=1) if call.op.name == "relax.nn.conv2d" \
                else -np.int64(x.zp) * wq.sum(axis=0)
        if op_name(call) == "relax.nn.conv2d":
            a = call.attrs
            xe, padding = x.expr, [int(p) for p in a.padding]
            if x.zp and any(padding):
                # Padding must hold the code of real zero, which is the zero point, not 0.
                pt, pl, pb, pr = padding
                xe = self.emit(relax.op.nn.pad(xe, [0, 0, 0, 0, pt, pb, pl, pr], pad_value=float(x.zp)))
                padding = [0, 0, 0, 0]
            e = self.emit(relax.op.nn.conv2d(xe, wconst, strides=a.strides, padding=padding,
                                             dilation=a.dilation, groups=a.groups, data_layout="NCHW",
                                             kernel_layout="OIHW", out_dtype="int32"), v.name)
            return Acc(e, acc_scale, 1, 4, corr=corr, wpoint=wp, worst=worst, bound=self._bounds(call, wq, x))
        e = self.emit(relax.op.matmul(x.expr, wconst, out_dtype="int32"), v.name)
        return Acc(e, acc_scale, 1, 2, corr=corr, wpoint=wp, worst=worst, bound=self._bounds(call, wq, x))

    @staticmethod
    def _bounds(call, wq, x: Q):
        """Per output channel, the largest |sum w (x - zp)| (qmath.accumulator_bounds)."""
        axes = (1, 2, 3) if op_name(call) == "relax.nn.conv2d" else (0,)
        return qmath.accumulator_bounds(wq, axes, x.bits, x.signed, x.zp)

    @staticmethod
    def _bias_bound(acc: Acc, bq):
        """The accumulator's bound after adding the bias codes ``bq`` (which hold the zero-point term)."""
        if acc.bound is None:
            return None
        true_bias = np.asarray(bq, np.int64).reshape(-1)
        if acc.corr is not None:
            true_bias = true_bias - np.asarray(acc.corr, np.int64).reshape(-1)
        return acc.bound + np.abs(true_bias)

    def _check_overflow(self, layer, k, x: Q, wp) -> int:
        """The worst-case accumulator of the layer, or an OverflowRiskError naming it."""
        xmax = max(abs(x.lo), abs(x.hi))
        wmax = qmath.qrange(wp.bits)[1]
        worst = qmath.worst_accumulator(k, x.bits, x.signed, wp.bits)
        if worst > _INT32_MAX:
            raise OverflowRiskError(
                f"layer {self.describe(layer)}: worst-case accumulator {k} x {xmax} x {wmax} = {worst} overflows "
                "int32; lower act_bits/weight_bits for this layer")
        return worst

    def _bias_codes(self, v, call, acc: Acc) -> np.ndarray:
        """The bias as int32 codes at the accumulator's scale, with any zero-point correction folded in."""
        b = const_value(call.args[1]).astype(np.float64)
        if acc.wpoint is not None and acc.wpoint.bias_corr is not None:
            b = b - np.asarray(acc.wpoint.bias_corr, np.float64).reshape(b.shape)
        scale = np.asarray(acc.scale, dtype=np.float64)
        bq = np.round(b / (scale.reshape(b.shape) if scale.ndim else scale))
        if acc.corr is not None:
            bq = bq + acc.corr.reshape(bq.shape)       # annotate only fuses biases with one value per channel
        clamped, limit = qmath.clamp_bias(bq, acc.worst)
        if np.any(clamped != bq):
            layer = acc.wpoint.name.split(":", 1)[0] if acc.wpoint is not None else v.name
            src = self.sources.get(layer)
            bias_name = f' "{src.bias}"' if src is not None and src.bias else ""
            err = np.abs(bq - clamped) * (scale.reshape(bq.shape) if scale.ndim else scale)
            worst_ch = int(np.argmax(err.reshape(-1)))
            warnings.warn(
                f"relayq: layer {self.describe(layer)}: bias{bias_name} does not fit int32 at the accumulator scale "
                f"s_x*s_w; clamped {int(np.count_nonzero(clamped != bq))} of {bq.size} value(s) to +-{limit} codes "
                f"(largest clamp error {float(err.reshape(-1)[worst_ch]):.4g} in real units, channel {worst_ch})",
                BiasClampWarning, stacklevel=2)
            bq = clamped.astype(np.float64)
        self.int_params[f"{v.name}:bias"] = bq.astype(np.int32)
        return bq

    def rule_bias(self, v, call, args):
        acc = args[0]
        bq = self._bias_codes(v, call, acc)
        e = self.emit(relax.op.add(acc.expr, relax.const(bq.astype(np.int32))), v.name)
        return Acc(e, acc.scale, acc.channel_axis, acc.ndim, acc.lo, acc.hi, True, bound=self._bias_bound(acc, bq))

    def rule_act(self, v, call, args):
        val = args[0]
        if op_name(call) == "relax.nn.relu":
            lo, hi = 0.0, np.inf
        else:
            lo, hi = float(call.args[1].value), float(call.args[2].value)
        if isinstance(val, (Acc, Pending, Lut, Affine)):
            val.lo, val.hi = max(val.lo, lo), min(val.hi, hi)
            return val
        q = self.as_q(val, v.name)
        clo, chi = self._code_bounds(lo, hi, q.scale, q.bits, q.zp, q.signed)
        return self.wrap(self.emit(relax.op.clip(self.codes(q), clo, chi)), q.scale, q.bits, q.zp, q.signed, v.name)

    def _merge_part(self, e, where):
        if is_const_expr(e):
            return Const(const_value(e).astype(np.float64))
        return self.as_q(self.values[e], where)

    def rule_merge(self, v, call, args):
        if op_name(call) == "relax.add":
            return Pending("add", [self._merge_part(a, v.name) for a in call.args])
        return Pending("concat", [self._merge_part(f, v.name) for f in call.args[0].fields],
                       {"axis": int(call.attrs.axis)})

    def rule_pass(self, v, call, args):
        name = op_name(call)
        q = self.as_q(args[0], v.name)
        like = dict(scale=q.scale, bits=q.bits, zp=q.zp, signed=q.signed)
        if name == "relax.nn.max_pool2d":
            return Q(self.emit(relax.Call(call.op, [q.expr], call.attrs), v.name), **like)
        if name == "relax.take":
            # annotate checked the constant indices are in range: "clip" computes the same, without the
            # warning TVM prints for "fast" at every build
            return Q(self.emit(relax.op.take(q.expr, call.args[1], axis=int(call.attrs.axis), mode="clip"), v.name),
                     **like)
        if name in _DATA_MOVEMENT:
            # Codes move, values do not: the same op on the codes (or on the simulated float carrier).
            return Q(self.emit(relax.Call(call.op, [q.expr] + list(call.args[1:]), call.attrs), v.name), **like)
        if name in ("relax.mean", "relax.nn.adaptive_avg_pool2d"):
            shape = shape_of(call.args[0])
            if name == "relax.nn.adaptive_avg_pool2d":
                axes, keep = [2, 3], True
            else:
                axes, keep = sorted(int(a) % len(shape) for a in call.attrs.axis), bool(call.attrs.keepdims)
            count = int(np.prod([shape[a] for a in axes]))
            total = self.emit(relax.op.sum(relax.op.astype(self.codes(q), "int32"), axis=axes, keepdims=keep))
            return self.wrap(self._int_average(total, np.array(count, np.int32), q, None), name=v.name, **like)
        if name == "relax.image.resize2d":
            return self.wrap(self._resize(q, call, shape_of(v)), name=v.name, **like)
        if name == "relax.nn.avg_pool2d":
            return self.wrap(self._avg_pool(q, call, None), name=v.name, **like)
        raise ConfigError(f"realize: no integer rule for {name}")

    def _resize(self, q: Q, call, out_shape):
        """Nearest: a copy of codes by index (qmath.resize_nearest_indices). Bilinear: integer weights per
        axis, rows then columns, one rounding shift (qmath.resize2d_linear)."""
        a = call.attrs
        (h, w), (oh, ow) = shape_of(call.args[0])[2:], out_shape[2:]
        codes = self.codes(q)
        if a.method == "nearest_neighbor":
            rows = qmath.resize_nearest_indices(h, oh, a.coordinate_transformation_mode, a.rounding_method)
            cols = qmath.resize_nearest_indices(w, ow, a.coordinate_transformation_mode, a.rounding_method)
            t = self.emit(relax.op.take(codes, relax.const(rows), axis=2, mode="clip"))
            return self.emit(relax.op.take(t, relax.const(cols), axis=3, mode="clip"))
        dt = qmath.resize_work_dtype(q.bits)
        t = self.emit(relax.op.astype(codes, dt))
        for axis, (n, on) in ((2, (h, oh)), (3, (w, ow))):
            i0, i1, w0, w1 = qmath.resize_linear_weights(n, on, a.coordinate_transformation_mode)
            shape = [1, 1, 1, 1]
            shape[axis] = on
            lo = self.emit(relax.op.multiply(self.emit(relax.op.take(t, relax.const(i0), axis=axis, mode="clip")),
                                             relax.const(w0.astype(dt).reshape(shape), dt)))
            hi = self.emit(relax.op.multiply(self.emit(relax.op.take(t, relax.const(i1), axis=axis, mode="clip")),
                                             relax.const(w1.astype(dt).reshape(shape), dt)))
            t = self.emit(relax.op.add(lo, hi))
        bits = 2 * qmath.RESIZE_FRAC_BITS
        t = self.emit(relax.op.add(t, relax.const(np.asarray(1 << (bits - 1), dt), dt)))
        t = self.emit(relax.op.right_shift(t, relax.const(np.asarray(bits, dt), dt)))
        return self._cast(t, q.bits, q.signed)

    def _int_average(self, total, count, q: Q, name):
        """qmath.avg_pool_divide in Relax: divide with rounding half away from zero."""
        cnt = relax.const(np.asarray(count, np.int32))
        half = relax.const(np.asarray(count, np.int32) // 2)
        pos = self.emit(relax.op.floor_divide(relax.op.add(total, half), cnt))
        neg = self.emit(relax.op.negative(relax.op.floor_divide(relax.op.add(relax.op.negative(total), half), cnt)))
        zero = relax.const(np.int32(0))
        avg = self.emit(relax.op.where(relax.op.greater_equal(total, zero), pos, neg))
        return self._cast(avg, q.bits, q.signed, name)

    def _avg_pool(self, q: Q, call, name):
        a = call.attrs
        n, c, h, w = shape_of(call.args[0])
        kh, kw = (int(s) for s in a.pool_size)
        pad = [int(p) for p in a.padding]
        ones = relax.const(np.ones((c, 1, kh, kw), dtype=qmath.storage_dtype(q.bits, q.signed)))
        total = self.emit(relax.op.nn.conv2d(self.codes(q), ones, strides=a.strides, padding=pad, groups=c,
                                             out_dtype="int32"))
        oh, ow = shape_of(total)[2:]
        # The number of real (unpadded) inputs under each window, computed once here.
        mask = np.pad(np.ones((h, w), np.int64), ((pad[0], pad[2]), (pad[1], pad[3])))
        sh, sw = (int(s) for s in a.strides)
        real = np.array([[mask[i * sh:i * sh + kh, j * sw:j * sw + kw].sum() for j in range(ow)]
                         for i in range(oh)], np.int32).reshape(1, 1, oh, ow)
        if a.count_include_pad:
            count = np.full((1, 1, oh, ow), kh * kw, np.int32)
            if q.zp and np.any(real != kh * kw):
                # Padded cells hold real zero, i.e. the zero point: add what the zero padding left out.
                total = self.emit(relax.op.add(total, relax.const((q.zp * (kh * kw - real)).astype(np.int32))))
        else:
            count = real
        return self._int_average(total, count, q, name)

    def outputs(self, out):
        """The function's output expression (a hook: analysis adds the values at the points)."""
        return out

    # ---------------------------------------------------------------- walk
    def run(self) -> tvm.IRModule:
        func = self.func
        left_float = []
        with self.bb.function("main", list(func.params)):
            with self.bb.dataflow():
                for p in func.params:
                    self.values[p] = Float(p)
                for b in bindings(func):
                    v, call = b.var, b.value
                    info = simq_info(call)
                    if info is not None:
                        x, name, role = info[0], info[1], info[2]
                        qp = self.qpoints[name]
                        if role == "weight":
                            self.weights[v] = (const_value(x), qp)
                            continue
                        self.values[v] = self.finalize(self.values[x], float(qp.scale), qp.bits, name=v.name,
                                                       zp=qp.zero_point, signed=qp.signed)
                        continue
                    name = op_name(call)
                    if v.name in self.region_interior:
                        self.values[v] = Deferred(v, call)
                        continue
                    if v.name in self.regions:
                        self.values[v] = self.rule_region(v)
                        continue
                    if v.name in self.quantized:
                        args = [self.values.get(a) for a in call.args if isinstance(a, relax.Var)]
                        if name == "relax.multiply":
                            val = self.rule_multiply(v, call, args)
                        elif name in ("relax.nn.conv2d", "relax.matmul") and call.args[1] in self.weights:
                            val = self.rule_compute(v, call, args)
                        elif name == "relax.matmul":
                            val = self.rule_matmul(v, call, args)
                        elif name == "relax.add" and isinstance(args[0], Acc) and is_const_expr(call.args[1]):
                            val = self.rule_bias(v, call, args)
                        elif name in ("relax.nn.relu", "relax.clip"):
                            val = self.rule_act(v, call, args)
                        elif name in ("relax.add", "relax.concat"):
                            val = self.rule_merge(v, call, args)
                        else:
                            val = self.rule_pass(v, call, args)
                        self.values[v] = val
                        continue
                    # A float op: its inputs come back to float here.
                    remap = {a: self.to_float(self.values[a]) for a in vars_of(call) if a in self.values}
                    self.values[v] = Float(self.emit(substitute(call, remap), v.name))
                    if name is not None:
                        left_float.append(name)
                out = self.to_float(self.values[func.body.body]) if isinstance(func.body.body, relax.Var) \
                    else substitute(func.body.body, {a: self.to_float(self.values[a]) for a in vars_of(func.body.body)})
                out = self.bb.emit_output(self.outputs(out))
            self.bb.emit_func_output(out)
        mod = self.bb.get()
        for gv, f in self.mod.functions_items():
            if gv.name_hint != "main":
                mod[gv] = f
        return mod


class Simulator(Realizer):
    """The simulated (fake-quantized) graph: realize's integer semantics on a float carrier.

    Between layers every quantized tensor is a float32 of dequantized codes, ``(q - zp) * scale``, exactly
    the values the realized graph dequantizes to. conv2d / dense run in float64 on dequantized inputs
    and weights; each rounding step (requantization, integer add, average pooling) first recovers the
    integer codes exactly (a float64 division and a round: the errors are far below half a code for any
    accumulator that passes the int32 overflow guard) and then applies the same integer arithmetic as
    :class:`Realizer`. So the simulated and the realized graph agree bit for bit, at every bit width.
    """

    def codes(self, q: Q):
        t = self.emit(relax.op.astype(q.expr, "float64"))
        t = self.emit(relax.op.round(relax.op.divide(t, relax.const(float(np.float32(q.scale)), "float64"))))
        if q.zp:
            t = self.emit(relax.op.add(t, relax.const(float(q.zp), "float64")))
        return self.emit(relax.op.astype(t, qmath.storage_dtype(q.bits, q.signed)))

    def wrap(self, codes, scale, bits, zp=0, signed=True, name=None) -> Q:
        f = self.emit(relax.op.astype(codes, "float32"))
        if zp:
            f = self.emit(relax.op.subtract(f, relax.const(np.float32(zp))))
        f = relax.op.multiply(f, relax.const(np.float32(scale)))
        return Q(self.bb.emit(f, name) if name else self.emit(f), scale, bits, zp, signed)

    def dequantize(self, q: Q):
        return q.expr

    def _scale_tensor(self, acc: Acc):
        s = np.asarray(acc.scale, dtype=np.float64)
        if s.ndim:
            shape = [1] * acc.ndim
            shape[acc.channel_axis] = -1
            s = s.reshape(shape)
        return s

    def acc_int(self, acc: Acc):
        t = self.emit(relax.op.divide(acc.expr, relax.const(self._scale_tensor(acc), "float64")))
        return self.emit(relax.op.astype(self.emit(relax.op.round(t)), "int64" if acc.wide else "int32"))

    def _real64(self, q: Q):
        """``(codes - zp) * scale`` in float64 from the exact codes."""
        t = self.emit(relax.op.astype(self.codes(q), "float64"))
        if q.zp:
            t = self.emit(relax.op.subtract(t, relax.const(float(q.zp), "float64")))
        return self.emit(relax.op.multiply(t, relax.const(float(q.scale), "float64")))

    def rule_multiply(self, v, call, args):
        # The float64 product of the dequantized values is the integer product times s_a * s_b up to a
        # relative 2^-51: acc_int recovers the integer exactly.
        a, b = self._product_operands(v, call)
        worst = max(abs(a.lo - a.zp), abs(a.hi - a.zp)) * max(abs(b.lo - b.zp), abs(b.hi - b.zp))
        e = self.emit(relax.op.multiply(self._real64(a), self._real64(b)), v.name)
        return Acc(e, float(np.float64(a.scale) * np.float64(b.scale)), 1, len(shape_of(v)), wide=worst > _INT32_MAX)

    def rule_matmul(self, v, call, args):
        # As rule_multiply: the float64 matmul of the dequantized values is the integer accumulator times
        # s_a * s_b, within far less than half a unit for any accumulator in range (acc_int rounds it).
        a, b = (self.as_q(x, v.name) for x in args)
        wide = self._matmul_worst(a, b, shape_of(call.args[0])[-1]) > _INT32_MAX
        e = self.emit(relax.op.matmul(self._real64(a), self._real64(b), out_dtype="float64"), v.name)
        return Acc(e, float(np.float64(a.scale) * np.float64(b.scale)), 1, len(shape_of(v)), wide=wide)

    def rule_compute(self, v, call, args):
        x = self.as_q(args[0], v.name)
        wq, wp, acc_scale, worst = self._weight_codes(v, call, x)
        # Dequantize in float64 from the exact codes (float32 products would lose the low bits).
        xf = self.emit(relax.op.astype(self.codes(x), "float64"))
        if x.zp:
            xf = self.emit(relax.op.subtract(xf, relax.const(float(x.zp), "float64")))
        xf = self.emit(relax.op.multiply(xf, relax.const(float(x.scale), "float64")))
        ws = np.asarray(wp.scale, dtype=np.float64)
        if op_name(call) == "relax.nn.conv2d":
            wf = wq.astype(np.float64) * (ws.reshape(-1, 1, 1, 1) if ws.ndim else ws)
            a = call.attrs
            e = self.emit(relax.op.nn.conv2d(xf, relax.const(wf, "float64"), strides=a.strides, padding=a.padding,
                                             dilation=a.dilation, groups=a.groups, out_dtype="float64"), v.name)
            return Acc(e, acc_scale, 1, 4, wpoint=wp, worst=worst, bound=self._bounds(call, wq, x))
        wf = wq.astype(np.float64) * (ws.reshape(1, -1) if ws.ndim else ws)
        return Acc(self.emit(relax.op.matmul(xf, relax.const(wf, "float64"), out_dtype="float64"), v.name), acc_scale,
                   1, 2, wpoint=wp, worst=worst, bound=self._bounds(call, wq, x))

    def rule_bias(self, v, call, args):
        acc = args[0]
        bq = self._bias_codes(v, call, acc)
        s = np.asarray(acc.scale, dtype=np.float64)
        bf = bq * (s.reshape(bq.shape) if s.ndim else s)
        e = self.emit(relax.op.add(acc.expr, relax.const(bf.astype(np.float64), "float64")), v.name)
        return Acc(e, acc.scale, acc.channel_axis, acc.ndim, acc.lo, acc.hi, True, bound=self._bias_bound(acc, bq))


def simulate(annotated: tvm.IRModule, qpoints: dict) -> tvm.IRModule:
    """The simulated (fake-quantized, float-carrier) module of a calibrated annotated module.

    It runs in float between layers and equals :func:`realize`'s integer graph bit for bit.

    Example::

        sim = simulate(annotated, qpoints)      # what calibrate returns as its first value
    """
    r = Simulator(annotated, qpoints)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FloatFallbackWarning)
        warnings.simplefilter("ignore", BiasClampWarning)     # realize names the clamped layer once
        mod = r.run()
    return relax.transform.DeadCodeElimination(["main"])(relax.transform.Normalize()(mod))


def realize(annotated: tvm.IRModule, qpoints: dict, return_params: bool = False):
    """Realize an annotated module with calibrated ``qpoints`` into an integer graph.

    With ``return_params`` also returns the integer weights and biases (name -> array).

    Example::

        simulated, qpoints = calibrate(annotated, data, "naive")
        int_mod = realize(annotated, qpoints)
    """
    missing = [info[1] for b in bindings(main_function(annotated))
               if (info := simq_info(b.value)) is not None and info[1] not in qpoints]
    if missing:
        raise ConfigError(f"realize: no calibrated parameters for quantization point(s) {missing[:5]}")
    r = Realizer(annotated, qpoints)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FloatFallbackWarning)
        mod = r.run()
    mod = relax.transform.DeadCodeElimination(["main"])(relax.transform.Normalize()(mod))
    return (mod, r.int_params) if return_params else mod
