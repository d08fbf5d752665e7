"""A numpy executor of a calibrated annotated graph with :mod:`relayq.qmath` integer semantics.

It is a second, independent implementation of what the realized graph computes: every quantized op is
evaluated with ``qmath`` (integer conv in int64, fixed-point requantization, integer add and average),
so that tests can check the compiled integer model against it bit for bit, and ``quant_points`` can
report the integer codes at every point. Float ops are limited to the few a classifier head needs.

Example::

    ref = reference_run(qmodel.annotated, qmodel.qpoints, x)        # float outputs, like the realized model
    codes = reference_run(qmodel.annotated, qmodel.qpoints, x, return_codes=True)[1]
"""
from __future__ import annotations

import numpy as np
import tvm
from tvm import relax

from .. import qmath
from ..transform import elementwise
from ..transform.annotate import QUANTIZED_ATTR, regions
from ..transform.common import bindings, const_value, is_const_expr, main_function, op_name, shape_of, simq_info


class _Q:
    def __init__(self, codes, scale, bits, zp=0, signed=True):
        self.codes, self.scale, self.bits, self.zp, self.signed = codes, float(scale), bits, int(zp), signed

    def like(self, codes):
        return _Q(codes, self.scale, self.bits, self.zp, self.signed)


class _Acc:
    def __init__(self, acc, scale, axis, wpoint=None):
        self.acc, self.scale, self.axis, self.wpoint = acc, np.asarray(scale, np.float64), axis, wpoint
        self.worst, self.corr = 0, None          # worst-case |accumulator|, zero-point term (see realize)
        self.bound = None                        # per channel, the largest |accumulator + bias| (see realize.Acc)
        self.lo, self.hi = -np.inf, np.inf


class _Pending:
    def __init__(self, kind, parts, axis=None):
        self.kind, self.parts, self.axis = kind, parts, axis
        self.lo, self.hi = -np.inf, np.inf


class _Region:
    """An elementwise region's output before its output point: a table (``affine`` None) or an affine."""

    def __init__(self, x, fn, affine=None, axis=None):
        self.x, self.fn, self.affine, self.axis = x, fn, affine, axis
        self.lo, self.hi = -np.inf, np.inf


def _bounds(lo, hi, scale, bits, zp=0, signed=True):
    qlo, qhi = qmath.qrange(bits, signed)
    a = qlo if lo == -np.inf else max(qlo, int(np.round(lo / scale)) + zp)
    b = qhi if hi == np.inf else min(qhi, int(np.round(hi / scale)) + zp)
    return a, b


def _finalize(val, scale, bits, zp=0, signed=True):
    out = lambda codes: _Q(codes, scale, bits, zp, signed)  # noqa: E731
    if isinstance(val, np.ndarray):
        return out(qmath.quantize(val.astype(np.float32), np.float32(scale), bits, signed, zp))
    qlo, qhi = qmath.qrange(bits, signed)
    if isinstance(val, _Region):
        lo, hi = _bounds(val.lo, val.hi, scale, bits, zp, signed)
        x = val.x
        if val.affine is None:
            table = qmath.lut_table(val.fn, x.bits, x.scale, bits, scale, x.zp, zp, x.signed, signed, lo, hi)
            return out(qmath.lut_lookup(x.codes, table, x.bits, x.signed))
        m_pos, m_neg, off, shift = qmath.channel_affine_params(*val.affine, x.scale, scale)
        return out(qmath.channel_affine(x.codes, m_pos, m_neg, off, shift, lo, hi, val.axis, x.zp, zp))
    if isinstance(val, _Q):
        if (val.scale, val.bits, val.zp, val.signed) == (scale, bits, zp, signed):
            return val
        m, s = qmath.quantize_multiplier(val.scale / scale)
        return out(qmath.requantize(val.codes - val.zp, m, s, qlo, qhi, zero_point=zp))
    if isinstance(val, _Acc):
        lo, hi = _bounds(val.lo, val.hi, scale, bits, zp, signed)
        mbits = qmath.MULTIPLIER_BITS if val.bound is None else \
            qmath.requant_multiplier_bits(int(np.max(val.bound)), bits)
        m, s = qmath.quantize_multipliers((val.scale / scale).reshape(-1), mbits)
        if val.scale.ndim == 0:
            return out(qmath.requantize(val.acc, m[0], s[0], lo, hi, zero_point=zp))
        return out(qmath.requantize(val.acc, m, s, lo, hi, axis=val.axis, zero_point=zp))
    lo, hi = _bounds(val.lo, val.hi, scale, bits, zp, signed)
    if val.kind == "add":
        a, b = val.parts
        if isinstance(b, np.ndarray):          # a float constant operand
            return out(qmath.add_constant(a.codes, b, a.scale, scale, lo, hi, a.zp, zp))
        return out(qmath.add(a.codes, b.codes, a.scale, b.scale, scale, lo, hi, a.zp, b.zp, zp))
    parts = []
    for p in val.parts:
        if isinstance(p, np.ndarray):
            parts.append(np.clip(qmath.quantize(p, np.float32(scale), bits, signed, zp), lo, hi))
        elif (p.scale, p.bits, p.zp, p.signed) == (scale, bits, zp, signed) and (lo, hi) == (qlo, qhi):
            parts.append(p.codes)
        else:
            m, s = qmath.quantize_multiplier(p.scale / scale)
            parts.append(qmath.requantize(p.codes - p.zp, m, s, lo, hi, zero_point=zp))
    return out(np.concatenate(parts, axis=val.axis))


def _to_float(val):
    if isinstance(val, np.ndarray):
        return val
    if isinstance(val, _Q):
        return ((val.codes - val.zp).astype(np.float32) * np.float32(val.scale)).astype(np.float32)
    if isinstance(val, _Region):          # only an unquantized reader inside another region sees this
        return val.fn(_to_float(val.x).astype(np.float64)).astype(np.float32)
    if isinstance(val, _Acc):
        s = val.scale.astype(np.float32)
        if s.ndim:
            shape = [1] * val.acc.ndim
            shape[val.axis] = -1
            s = s.reshape(shape)
        y = val.acc.astype(np.float32) * s
    else:
        fl = [p.astype(np.float32) if isinstance(p, np.ndarray) else _to_float(p) for p in val.parts]
        y = fl[0] + fl[1] if val.kind == "add" else np.concatenate(fl, axis=val.axis)
    if val.lo > -np.inf or val.hi < np.inf:
        y = np.clip(y, val.lo, val.hi)
    return y.astype(np.float32)


def _pool_sum(codes, kh, kw, sh, sw, pad, fill):
    x = np.pad(codes, ((0, 0), (0, 0), (pad[0], pad[2]), (pad[1], pad[3])), constant_values=fill)
    oh = (x.shape[2] - kh) // sh + 1
    ow = (x.shape[3] - kw) // sw + 1
    wins = np.stack([x[:, :, i:i + sh * (oh - 1) + 1:sh, j:j + sw * (ow - 1) + 1:sw]
                     for i in range(kh) for j in range(kw)], axis=0)
    return wins


def _float_op(call, args):
    name = op_name(call)
    if name in elementwise.FUNCS and all(isinstance(a, np.ndarray) for a in args):
        full = []
        it = iter(args)
        for a in call.args:
            if isinstance(a, relax.Var):
                full.append(next(it).astype(np.float64))
            elif elementwise.is_prim(a):
                full.append(None)
            else:
                c = const_value(a).astype(np.float64)
                full.append(c.reshape(()) if c.size == 1 else c)
        return np.asarray(elementwise.FUNCS[name][1](call, *full), np.float64).astype(np.float32)
    if name == "relax.nn.softmax":
        x = args[0]
        e = np.exp(x - x.max(axis=int(call.attrs.axis), keepdims=True))
        return e / e.sum(axis=int(call.attrs.axis), keepdims=True)
    if name in ("relax.reshape", "relax.flatten", "relax.squeeze", "relax.expand_dims"):
        return args[0].reshape(shape_of(call))
    if name == "relax.nn.relu":
        return np.maximum(args[0], 0)
    if name == "relax.permute_dims":
        axes = call.attrs.axes
        return args[0].transpose(None if axes is None else [int(a) for a in axes])
    if name == "relax.take" and is_const_expr(call.args[1]):
        return np.take(args[0], const_value(call.args[1]), axis=int(call.attrs.axis))
    if name == "relax.matmul" and len(args) == 2:
        return np.matmul(args[0], args[1]).astype(np.float32)
    if name == "relax.nn.layer_norm":
        # float64 statistics: the compiled model's float32 LayerNorm differs in the last bits, so a
        # quantizer after it may round differently; tests compare such models within a tolerance.
        x = args[0].astype(np.float64)
        axes = tuple(int(a) for a in call.attrs.axes)
        mu = x.mean(axis=axes, keepdims=True)
        var = ((x - mu) ** 2).mean(axis=axes, keepdims=True)
        y = (x - mu) / np.sqrt(var + float(call.attrs.epsilon))
        if bool(call.attrs.scale):
            y = y * const_value(call.args[1])
        if bool(call.attrs.center):
            y = y + const_value(call.args[2])
        return y.astype(np.float32)
    raise NotImplementedError(f"reference executor: float op {name} is not supported")


def reference_run(annotated: tvm.IRModule, qpoints: dict, *inputs, return_codes: bool = False):
    """Execute ``annotated`` with integer semantics in numpy; returns the float output (and codes).

    A model with a tuple result returns a list of arrays, flattened as the compiled model returns them.
    """
    func = main_function(annotated)
    quantized = set(func.attrs[QUANTIZED_ATTR]) if QUANTIZED_ATTR in func.attrs else set()
    vals = {p: np.asarray(x, dtype=np.float32) for p, x in zip(func.params, inputs)}
    weights, codes = {}, {}
    region_info = regions(annotated)
    interior = {m for r in region_info.values() for m in r["members"]} - set(region_info)
    func_bindings = bindings(func)
    for b in func_bindings:
        v, call = b.var, b.value
        info = simq_info(call)
        if info is not None:
            p = qpoints[info[1]]
            if p.role == "weight":
                w = const_value(info[0])
                weights[v] = (p.weight_codes(w), p)
            else:
                vals[v] = _finalize(vals[info[0]], float(p.scale), p.bits, p.zero_point, p.signed)
                codes[p.name] = vals[v].codes
            continue
        if isinstance(call, (relax.Tuple, relax.TupleGetItem)):
            vals[v] = _tuple_value(call, vals)         # a multi-output model's result tuple
            continue
        name = op_name(call)
        args = [vals.get(a) for a in call.args if isinstance(a, relax.Var)]
        if v.name in interior:
            vals[v] = _float_op(call, [_to_float(a) for a in args])     # read only by float ops, if at all
            continue
        if v.name in region_info:
            info = region_info[v.name]
            members = elementwise.region_bindings(func_bindings, info["members"])
            root = elementwise.root_of(members)
            fn = elementwise.region_function(members, root)
            affine = None if info["kind"] == "lut" else elementwise.affine_params(fn, shape_of(v), info["axis"])
            vals[v] = _Region(vals[root], fn, affine, info["axis"])
            continue
        if v.name not in quantized:
            vals[v] = _float_op(call, [_to_float(a) for a in args])
            continue
        if name in ("relax.nn.conv2d", "relax.matmul") and call.args[1] in weights:
            x = args[0]
            wq, wp = weights[call.args[1]]
            scale = np.float64(x.scale) * np.asarray(wp.scale, np.float64)
            if name == "relax.nn.conv2d":
                a = call.attrs
                # The integer identity: sum w (x - zp), with padding of real zero.
                acc = qmath.conv2d_int(x.codes - x.zp, wq, [int(s) for s in a.strides], [int(p) for p in a.padding],
                                       [int(d) for d in a.dilation], int(a.groups))
            else:
                acc = (x.codes.astype(np.int64) - x.zp) @ wq.astype(np.int64)
            k = int(np.prod(wq.shape[1:])) if name == "relax.nn.conv2d" else int(wq.shape[0])
            vals[v] = _Acc(acc, scale, 1, wp)
            vals[v].worst = qmath.worst_accumulator(k, x.bits, x.signed, wp.bits)
            vals[v].bound = qmath.accumulator_bounds(wq, (1, 2, 3) if name == "relax.nn.conv2d" else (0,), x.bits,
                                                     x.signed, x.zp)
            if x.zp:
                sums = wq.reshape(wq.shape[0], -1).sum(axis=1) if name == "relax.nn.conv2d" else wq.sum(axis=0)
                vals[v].corr = -np.int64(x.zp) * sums.astype(np.int64)
        elif name == "relax.add" and isinstance(args[0], _Acc) and is_const_expr(call.args[1]):
            acc = args[0]
            bias = const_value(call.args[1]).astype(np.float64)
            if acc.wpoint is not None and acc.wpoint.bias_corr is not None:
                bias = bias - np.asarray(acc.wpoint.bias_corr, np.float64).reshape(bias.shape)
            bq = np.round(bias / (acc.scale.reshape(bias.shape) if acc.scale.ndim else acc.scale)).astype(np.int64)
            # The realized graph adds the bias with the zero-point term folded in, clamped into int32
            # (qmath.clamp_bias); here the zero-point term is already inside the accumulator.
            corr = acc.corr.reshape(bq.shape) if acc.corr is not None else 0
            bq = qmath.clamp_bias(bq + corr, acc.worst)[0] - corr
            acc.acc = acc.acc + bq
            if acc.bound is not None:
                acc.bound = acc.bound + np.abs(np.asarray(bq, np.int64).reshape(-1))
            vals[v] = acc
        elif name == "relax.multiply":
            a, bq = [_operand(e, vals) for e in call.args]
            if isinstance(a, np.ndarray):
                a, bq = bq, a
            if isinstance(bq, np.ndarray):            # a constant factor: codes of its own, at a's bits
                bq = _Q(*qmath.constant_codes(bq, a.bits), a.bits)
            vals[v] = _Acc((a.codes.astype(np.int64) - a.zp) * (bq.codes.astype(np.int64) - bq.zp),
                           np.float64(a.scale) * np.float64(bq.scale), 1)
        elif name in ("relax.nn.relu", "relax.clip"):
            lo, hi = (0.0, np.inf) if name == "relax.nn.relu" else (float(call.args[1].value), float(call.args[2].value))
            val = args[0]
            if isinstance(val, (_Acc, _Pending, _Region)):
                val.lo, val.hi = max(val.lo, lo), min(val.hi, hi)
                vals[v] = val
            else:
                a, bnd = _bounds(lo, hi, val.scale, val.bits, val.zp, val.signed)
                vals[v] = val.like(np.clip(val.codes, a, bnd))
        elif name == "relax.add":
            vals[v] = _Pending("add", [_operand(a, vals) for a in call.args])
        elif name == "relax.concat":
            vals[v] = _Pending("concat", [_operand(f, vals) for f in call.args[0].fields], int(call.attrs.axis))
        elif name == "relax.matmul":
            a, bq = args
            vals[v] = _Acc(qmath.matmul(a.codes, bq.codes, a.zp, bq.zp), np.float64(a.scale) * np.float64(bq.scale), 1)
        else:
            q = args[0]
            if name == "relax.nn.max_pool2d":
                a = call.attrs
                lo = np.iinfo(qmath.storage_dtype(q.bits, q.signed)).min
                w = _pool_sum(q.codes, *[int(s) for s in a.pool_size], *[int(s) for s in a.strides],
                              [int(p) for p in a.padding], lo)
                out = w.max(axis=0)
            elif name in ("relax.reshape", "relax.flatten", "relax.squeeze", "relax.expand_dims"):
                out = q.codes.reshape(shape_of(call))
            elif name == "relax.take":
                out = np.take(q.codes, const_value(call.args[1]), axis=int(call.attrs.axis))
            elif name == "relax.image.resize2d":
                a = call.attrs
                (h, wd), (oh, ow) = q.codes.shape[2:], shape_of(call)[2:]
                mode, rounding = a.coordinate_transformation_mode, a.rounding_method
                if a.method == "nearest_neighbor":
                    out = qmath.resize2d_nearest(q.codes, qmath.resize_nearest_indices(h, oh, mode, rounding),
                                                 qmath.resize_nearest_indices(wd, ow, mode, rounding))
                else:
                    out = qmath.resize2d_linear(q.codes, qmath.resize_linear_weights(h, oh, mode),
                                                qmath.resize_linear_weights(wd, ow, mode))
            elif name == "relax.permute_dims":
                axes = call.attrs.axes
                out = q.codes.transpose(None if axes is None else [int(a) for a in axes])
            elif name == "relax.strided_slice":
                axes, begin, end, *rest = ([int(f.value) for f in t.fields] for t in call.args[1:])
                steps = rest[0] if rest else [1] * len(axes)
                index = [slice(None)] * q.codes.ndim
                for ax, b, e, st in zip(axes, begin, end, steps):
                    index[ax] = slice(b, e, st)
                out = q.codes[tuple(index)]
            elif name == "relax.nn.adaptive_avg_pool2d":
                out = qmath.mean_codes(q.codes, [2, 3], keepdims=True)
            elif name == "relax.mean":
                out = qmath.mean_codes(q.codes, [int(i) for i in call.attrs.axis], bool(call.attrs.keepdims))
            elif name == "relax.nn.avg_pool2d":
                a = call.attrs
                kh, kw = (int(s) for s in a.pool_size)
                sh, sw = (int(s) for s in a.strides)
                pad = [int(p) for p in a.padding]
                # Padding holds real zero (the zero point) where it counts, and nothing where it does not.
                total = _pool_sum(q.codes, kh, kw, sh, sw, pad, q.zp if a.count_include_pad else 0).sum(axis=0)
                if a.count_include_pad:
                    count = kh * kw
                else:
                    ones = np.ones((1, 1) + q.codes.shape[2:], np.int64)
                    count = _pool_sum(ones, kh, kw, sh, sw, pad, 0).sum(axis=0)
                out = qmath.avg_pool_divide(total, count)
            else:
                raise NotImplementedError(f"reference executor: quantized op {name}")
            vals[v] = q.like(out)
    out = _outputs(_tuple_value(func.body.body, vals))
    out = out[0] if len(out) == 1 else out
    return (out, codes) if return_codes else out


def _operand(e, vals):
    """A merge operand: a quantized value, or a float constant (quantized at the merge's output scale)."""
    return const_value(e).astype(np.float64) if is_const_expr(e) else vals[e]


def _tuple_value(e, vals):
    """The value of a variable, tuple or tuple item: tuples are Python tuples of values."""
    if isinstance(e, relax.Tuple):
        return tuple(_tuple_value(f, vals) for f in e.fields)
    if isinstance(e, relax.TupleGetItem):
        t = _tuple_value(e.tuple_value, vals)
        if not isinstance(t, tuple):           # an op returning a tuple (split ...) is not supported
            raise NotImplementedError("reference executor: tuple item of a non-tuple value")
        return t[int(e.index)]
    if is_const_expr(e):
        return const_value(e)                  # a constant field (the unused statistics of a decomposed BatchNorm)
    return vals[e]


def _outputs(val) -> list:
    """Float outputs, flattened like the compiled model's (a tuple result gives one array per tensor)."""
    if isinstance(val, tuple):
        return [o for v in val for o in _outputs(v)]
    return [_to_float(val)]
