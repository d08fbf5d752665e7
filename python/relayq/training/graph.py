"""A trainable torch twin of relayq's annotated graph, with fake quantization at every quantization point.

:class:`TorchGraph` interprets the ``main`` function of an annotated Relax module with torch ops, one
binding at a time, through an op table (:data:`OPS`: Relax op name -> torch builder; an op without an
entry raises :class:`~relayq.errors.UnsupportedOpError` naming it and its binding). Every
``relayq.simulated_quantize`` marker becomes a :class:`FakeQuant`:

* weights: ``clip(round(w / s), -qmax, qmax) * s``, per tensor or per channel along the marker's axis;
* activations: ``(clip(round(x / s) + zp, qmin, qmax) - zp) * s``, signed symmetric or unsigned with a
  zero point, any width 2..16;

with the rounding of :func:`relayq.qmath.quantize` (round half to even, which is also ``torch.round``)
in float32, so that after training ``QPoint.weight_codes`` recomputes exactly the codes the training
saw. Rounding passes gradients straight through; the scales are learned as ``s = s0 * exp(t)`` (LSQ's
gradient, on a log scale so that one learning rate suits scales of any size). Beyond the markers, the
twin follows what realize does between them (see :mod:`relayq.transform.realize`):

* a quantized layer's fused bias is quantized at ``s_x * s_w`` (round half to even, as realize);
* an average pool or mean over codes returns codes at the same scale, divided with rounding half away
  from zero (:func:`relayq.qmath.avg_pool_divide`), computed exactly on the codes;
* requantization (the fixed-point multiply of realize, which rounds half up) is modelled by the next
  marker's round half to even: the two differ only on exact ties.

The weights under weight markers and the fused biases of quantized layers are the trainable
parameters; every other constant (float layers included) stays fixed. With ``quantize=False`` the same
graph runs in plain float: the default teacher of distillation.

Example::

    student = TorchGraph(qmodel.annotated, qmodel.qpoints)
    teacher = TorchGraph(qmodel.annotated, qmodel.qpoints, quantize=False)
    y = student(torch.from_numpy(x))
"""
from __future__ import annotations

import math

import numpy as np
import tvm
from tvm import relax

from .. import qmath
from ..errors import MissingDependencyError, ModelError, UnsupportedOpError
from ..transform.annotate import QUANTIZED_ATTR, describe_layer
from ..transform.common import bindings, const_value, is_const_expr, main_function, op_name, shape_of, simq_info


def require_torch(what: str = "relayq.finetune"):
    """Import torch, or raise :class:`MissingDependencyError` saying how to install it.

    >>> require_torch().__name__
    'torch'
    """
    try:
        import torch
    except ImportError:
        raise MissingDependencyError(f"{what} trains with PyTorch, which is not installed: pip install "
                                     "'relayq[train]' (or pip install torch)") from None
    return torch


# ----------------------------------------------------------------------------------------------------
# straight-through rounding
# ----------------------------------------------------------------------------------------------------

def round_ste(x):
    """Round half to even forward (``torch.round``, as ``np.round`` in qmath), identity backward."""
    return x + (x.round() - x).detach()


def _ceil_ste(x):
    return x + (x.ceil() - x).detach()


def _round_half_away(x):
    """Round half away from zero (qmath.avg_pool_divide's rule) on exact integer ratios."""
    return x.sign() * (x.abs() + 0.5).floor()


def _fake_quant_class():
    torch = require_torch()

    class FakeQuant(torch.nn.Module):
        """Fake quantization with a learnable scale (see the module docstring).

        ``scale0`` is the calibrated scale (a float, or a vector along ``axis`` for per-channel
        weights); the effective scale is ``float32(scale0) * exp(log_ratio)``, exactly ``scale0`` before
        training. ``pow2`` rounds it up to a power of two, as ``QConfig(power_of_two_scale=True)``.
        """

        def __init__(self, point, ndim: int, learn_scale: bool, pow2: bool = False):
            super().__init__()
            self.name, self.role, self.bits = point.name, point.role, point.bits
            self.signed, self.zero_point = point.signed, int(point.zero_point)
            self.qmin, self.qmax = qmath.qrange(point.bits, point.signed)
            s0 = np.asarray(point.scale, dtype=np.float32)
            shape = [1] * ndim
            if s0.ndim == 1 and ndim:
                shape[point.axis] = -1
            self.view = tuple(shape) if s0.ndim else ()
            self.register_buffer("scale0", torch.from_numpy(s0.copy()))
            self.log_ratio = torch.nn.Parameter(torch.zeros_like(self.scale0), requires_grad=learn_scale)
            self.pow2 = pow2
            self.enabled = True

        def scale(self):
            """The effective scale (per-channel: the vector), float32."""
            s = self.scale0 * torch.exp(self.log_ratio)
            if self.pow2:
                s = torch.exp2(_ceil_ste(torch.log2(s)))
            return s

        def scale_view(self):
            s = self.scale()
            return s.reshape(self.view) if self.view else s

        def codes(self, x):
            """The integer codes (as float) of ``x``, the fake-quantized value this quantizer returned."""
            s = self.scale_view().detach()
            return torch.round(x.detach() / s) + self.zero_point

        def forward(self, x):
            if not self.enabled:
                return x
            s = self.scale_view()
            q = torch.clamp(round_ste(x / s) + self.zero_point, self.qmin, self.qmax)
            return (q - self.zero_point) * s

    return FakeQuant


# ----------------------------------------------------------------------------------------------------
# the op table
# ----------------------------------------------------------------------------------------------------

def _ints(v) -> list:
    return [int(i) for i in v]


def _check_layout(call, **want):
    for attr, value in want.items():
        got = getattr(call.attrs, attr, None)
        if got is not None and str(got) not in ("", value):
            raise UnsupportedOpError(f"{call.op.name} with {attr}={got}: the torch twin supports {value} only")


def _pad4(F, x, padding, value=0.0):
    """Relax's (top, left, bottom, right) padding as an explicit pad (torch's own is symmetric only)."""
    t, l, b, r = padding
    return F.pad(x, (l, r, t, b), value=value) if any(padding) else x


def _conv2d(call, F):
    _check_layout(call, data_layout="NCHW", kernel_layout="OIHW", out_layout="NCHW")
    a = call.attrs
    strides, dilation, groups, padding = _ints(a.strides), _ints(a.dilation), int(a.groups), _ints(a.padding)
    if padding[:2] == padding[2:]:
        return lambda x, w: F.conv2d(x, w, None, strides, padding[:2], dilation, groups)
    return lambda x, w: F.conv2d(_pad4(F, x, padding), w, None, strides, 0, dilation, groups)


def _max_pool2d(call, F):
    _check_layout(call, layout="NCHW", out_layout="NCHW")
    a = call.attrs
    k, st, dil, pad = _ints(a.pool_size), _ints(a.strides), _ints(a.dilation), _ints(a.padding)
    ceil = bool(a.ceil_mode)
    if pad[:2] == pad[2:]:
        return lambda x: F.max_pool2d(x, k, st, pad[:2], dil, ceil_mode=ceil)
    return lambda x: F.max_pool2d(_pad4(F, x, pad, -math.inf), k, st, 0, dil, ceil_mode=ceil)


def _avg_pool_float(call, F):
    _check_layout(call, layout="NCHW", out_layout="NCHW")
    a = call.attrs
    k, st, pad = _ints(a.pool_size), _ints(a.strides), _ints(a.padding)
    if any(d != 1 for d in _ints(a.dilation)):
        raise UnsupportedOpError("relax.nn.avg_pool2d with dilation: the torch twin supports dilation 1 only")
    ceil, inc = bool(a.ceil_mode), bool(a.count_include_pad)
    if pad[:2] == pad[2:]:
        return lambda x: F.avg_pool2d(x, k, st, pad[:2], ceil, inc)
    if not inc:
        raise UnsupportedOpError("relax.nn.avg_pool2d with asymmetric padding and count_include_pad=False")
    return lambda x: F.avg_pool2d(_pad4(F, x, pad), k, st, 0, ceil, True)


def _adaptive_avg_pool(call, F):
    _check_layout(call, layout="NCHW", out_layout="NCHW")
    size = call.attrs.output_size
    if size is None:
        return lambda x: x              # Relax: no output size means the input's size
    return lambda x: F.adaptive_avg_pool2d(x, _ints(size))


def _axes(call, ndim):
    axis = call.attrs.axis
    return list(range(ndim)) if axis is None else [int(i) % ndim for i in axis]


def _reduce(fn_name):
    def build(call, F):
        torch = F.torch
        ndim = len(shape_of(call.args[0]))
        axes, keep = _axes(call, ndim), bool(call.attrs.keepdims)
        if fn_name == "mean":
            return lambda x: torch.mean(x, dim=axes, keepdim=keep)
        if fn_name == "sum":
            return lambda x: torch.sum(x, dim=axes, keepdim=keep)
        return lambda x: torch.amax(x, dim=axes, keepdim=keep)
    return build


def _reshape(call, F):
    target = list(shape_of(call))
    src = shape_of(call.args[0])
    # Keep the batch dimension free: the module's batch size is fixed, training batches need not be.
    flexible = bool(target) and bool(src) and target[0] == src[0]
    if flexible:
        return lambda x, *_: x.reshape(x.shape[0], *target[1:])
    return lambda x, *_: x.reshape(target)


def _flatten(call, F):
    return lambda x: x.reshape(-1)


def _clip(call, F):
    lo, hi = float(call.args[1].value), float(call.args[2].value)
    return lambda x, *_: F.torch.clamp(x, lo, hi)


def _softmax(kind):
    def build(call, F):
        axis = int(call.attrs.axis)
        return (lambda x: F.softmax(x, axis)) if kind == "softmax" else (lambda x: F.log_softmax(x, axis))
    return build


def _permute(call, F):
    axes = call.attrs.axes
    if axes is None:
        return lambda x: x.permute(*reversed(range(x.dim())))
    axes = _ints(axes)
    return lambda x: x.permute(*axes)


def _squeeze(call, F):
    axis = call.attrs.axis
    if axis is None:
        return lambda x: x.squeeze()
    axes = sorted(_ints(axis), reverse=True)

    def run(x):
        for a in axes:
            x = x.squeeze(a)
        return x
    return run


def _expand_dims(call, F):
    axes = sorted(_ints(call.attrs.axis))

    def run(x):
        for a in axes:
            x = x.unsqueeze(a if a >= 0 else x.dim() + 1 + a)
        return x
    return run


def _concat(call, F):
    axis = int(call.attrs.axis) if call.attrs.axis is not None else 0
    return lambda xs: F.torch.cat(list(xs), dim=axis)


def _pad(call, F):
    if str(call.attrs.pad_mode) != "constant":
        raise UnsupportedOpError(f"relax.nn.pad with pad_mode={call.attrs.pad_mode}: the torch twin pads with a constant only")
    widths = _ints(call.attrs.pad_width)        # (before, after) per axis, first axis first
    value = float(getattr(call.attrs, "pad_value", 0.0) or 0.0)
    flat = []
    for i in range(len(widths) // 2 - 1, -1, -1):
        flat += [widths[2 * i], widths[2 * i + 1]]
    return lambda x, *_: F.pad(x, flat, value=value)


def _astype(call, F):
    dtype = str(call.attrs.dtype)
    if dtype != "float32":
        raise UnsupportedOpError(f"relax.astype to {dtype}: the torch twin computes in float32 only")
    return lambda x: x


def _binary(name):
    def build(call, F):
        fn = getattr(F.torch, name)
        return lambda a, b: fn(a, b)
    return build


def _unary(name):
    def build(call, F):
        fn = getattr(F.torch, name, None) or getattr(F, name)
        return lambda x: fn(x)
    return build


def _gelu(call, F):
    return lambda x: F.gelu(x)


#: Relax op name -> builder(call, F) -> function of the evaluated arguments (tensors, numbers, lists).
OPS = {
    "relax.nn.conv2d": _conv2d,
    "relax.matmul": _binary("matmul"),
    "relax.add": _binary("add"),
    "relax.subtract": _binary("subtract"),
    "relax.multiply": _binary("multiply"),
    "relax.divide": _binary("divide"),
    "relax.maximum": _binary("maximum"),
    "relax.minimum": _binary("minimum"),
    "relax.power": _binary("pow"),
    "relax.nn.relu": _unary("relu"),
    "relax.clip": _clip,
    "relax.sigmoid": _unary("sigmoid"),
    "relax.tanh": _unary("tanh"),
    "relax.exp": _unary("exp"),
    "relax.sqrt": _unary("sqrt"),
    "relax.rsqrt": _unary("rsqrt"),
    "relax.negative": _unary("neg"),
    "relax.nn.silu": _unary("silu"),
    "relax.nn.gelu": _gelu,
    "relax.nn.softmax": _softmax("softmax"),
    "relax.nn.log_softmax": _softmax("log_softmax"),
    "relax.nn.max_pool2d": _max_pool2d,
    "relax.nn.avg_pool2d": _avg_pool_float,
    "relax.nn.adaptive_avg_pool2d": _adaptive_avg_pool,
    "relax.mean": _reduce("mean"),
    "relax.sum": _reduce("sum"),
    "relax.max": _reduce("max"),
    "relax.concat": _concat,
    "relax.reshape": _reshape,
    "relax.flatten": _flatten,
    "relax.permute_dims": _permute,
    "relax.squeeze": _squeeze,
    "relax.expand_dims": _expand_dims,
    "relax.nn.pad": _pad,
    "relax.astype": _astype,
}

#: Pooling ops that, on codes, divide with rounding (realize's integer average): op -> count function.
_CODE_AVERAGES = ("relax.nn.avg_pool2d", "relax.nn.adaptive_avg_pool2d", "relax.mean")
#: Ops realize keeps on codes at the same scale (so their output is still quantized).
_SAME_SCALE = ("relax.nn.max_pool2d", "relax.reshape", "relax.flatten", "relax.nn.relu", "relax.clip",
               "relax.permute_dims", "relax.squeeze", "relax.expand_dims") + _CODE_AVERAGES


class _F:
    """torch.nn.functional with torch itself reachable as ``F.torch`` (handed to the op builders)."""

    def __init__(self):
        import torch
        import torch.nn.functional as functional

        self._f, self.torch = functional, torch

    def __getattr__(self, name):
        return getattr(self._f, name)


def _code_average(call, F, quantizer):
    """realize's integer average pool / mean on codes, exact, with the float average's gradient."""
    torch = F.torch
    float_fn = OPS[op_name(call)](call, F)
    name = op_name(call)
    a = call.attrs
    if name == "relax.nn.avg_pool2d":
        k, st, pad = _ints(a.pool_size), _ints(a.strides), _ints(a.padding)
        include = bool(a.count_include_pad)

        def totals(c):
            zp = float(quantizer.zero_point)
            if include:
                # Padded cells hold real zero: the zero point's code.
                total = F.avg_pool2d(_pad4(F, c, pad, zp), k, st, 0, False, True, divisor_override=1)
                count = torch.full_like(total, float(k[0] * k[1]))
            else:
                padded = _pad4(F, c, pad, 0.0)
                total = F.avg_pool2d(padded, k, st, 0, False, True, divisor_override=1)
                ones = _pad4(F, torch.ones_like(c[:1, :1]), pad, 0.0)
                count = F.avg_pool2d(ones, k, st, 0, False, True, divisor_override=1)
            return total, count
    else:
        if name == "relax.nn.adaptive_avg_pool2d":
            size = a.output_size
            if size is not None and _ints(size) != [1, 1]:
                return float_fn
            dims, keep = [2, 3], True
        else:
            nd = len(shape_of(call.args[0]))
            dims, keep = _axes(call, nd), bool(a.keepdims)

        def totals(c):
            total = torch.sum(c, dim=dims, keepdim=keep)
            return total, float(np.prod([c.shape[d] for d in dims]))

    def run(x):
        y = float_fn(x)
        codes = quantizer.codes(x)
        total, count = totals(codes)
        half = torch.floor(torch.as_tensor(count) / 2) if not isinstance(count, float) else math.floor(count / 2)
        pos = torch.floor((total + half) / count)
        neg = -torch.floor((-total + half) / count)
        avg = torch.where(total >= 0, pos, neg)
        exact = (avg - quantizer.zero_point) * quantizer.scale_view().detach()
        return y + (exact - y).detach()
    return run


def _trainable_bias(call, acc_of) -> bool:
    return op_name(call) == "relax.add" and call.args[0] in acc_of and is_const_expr(call.args[1])


def build_torch_graph(annotated, qpoints: dict, *, quantize: bool = True, learn_scales: bool = True,
                      train_weights: bool = True, train_biases: bool | None = None, pow2: bool = False):
    """The :class:`TorchGraph` of an annotated module (see the module docstring).

    Example::

        student = build_torch_graph(qmodel.annotated, qmodel.qpoints)
        student(torch.randn(2, 3, 8, 8)).sum().backward()
    """
    torch = require_torch()
    FakeQuant = _fake_quant_class()
    if train_biases is None:
        train_biases = train_weights
    F = _F()
    func = main_function(annotated)
    attr = func.attrs.get(QUANTIZED_ATTR) if func.attrs is not None else None
    quantized = set(attr) if attr is not None else set()

    class TorchGraph(torch.nn.Module):
        """The torch twin of one annotated module; ``forward(*inputs)`` returns a tensor or a tuple."""

        def __init__(self):
            super().__init__()
            self.weights = torch.nn.ParameterDict()      # weight point name -> float weight
            self.biases = torch.nn.ParameterDict()       # bias binding name -> float bias (its const's shape)
            self.quantizers = torch.nn.ModuleDict()      # point name -> FakeQuant
            self.input_names = [p.name for p in func.params]
            self.input_shapes = [shape_of(p) for p in func.params]
            self.steps = []
            self._consts = []
            self.bias_binding = {}                       # bias parameter key -> binding var name
            self.act_points = {}                         # activation point name -> (its marker Var, its input Var)
            self.folded_bias_points = set()              # weight points whose bias is trained (bias_corr folded in)
            self._build()

        # -------------------------------------------------------------------- building
        def _const(self, e):
            t = torch.from_numpy(np.ascontiguousarray(const_value(e)))
            if t.dtype == torch.float64:
                t = t.float()
            self.register_buffer(f"c{len(self._consts)}", t)
            self._consts.append(f"c{len(self._consts)}")
            name = self._consts[-1]
            return lambda env: getattr(self, name)

        def _arg(self, e, where):
            if isinstance(e, relax.Var):
                return lambda env: env[e]
            if is_const_expr(e):
                return self._const(e)
            if isinstance(e, relax.Tuple):
                getters = [self._arg(f, where) for f in e.fields]
                return lambda env: [g(env) for g in getters]
            if isinstance(e, (tvm.ir.prim.expr.IntImm, tvm.ir.prim.expr.FloatImm)):
                v = e.value
                return lambda env: v
            if isinstance(e, relax.ShapeExpr):
                v = tuple(int(s) for s in e.values)
                return lambda env: v
            if isinstance(e, tvm.ir.StringImm):
                v = e.value
                return lambda env: v
            raise UnsupportedOpError(f"binding {where}: the torch twin cannot read a {type(e).__name__} argument")

        def _build(self):
            qsrc = {}            # var -> FakeQuant whose codes it holds (realize's Q values)
            acc_of = {}          # var -> (input FakeQuant, weight FakeQuant) of a quantized conv2d / dense
            wvar = {}            # weight marker var -> its parameter key
            for b in bindings(func):
                v, call = b.var, b.value
                info = simq_info(call)
                if info is not None:
                    x, name, role, bits, axis = info
                    point = qpoints.get(name)
                    if point is None:
                        raise ModelError(f"no QPoint for quantization point {name!r}: pass the qpoints calibrate returned")
                    if role == "weight":
                        w = np.asarray(const_value(x), dtype=np.float32)
                        if point.codes is not None:
                            # Learned rounding (AdaRound): start from weights that round to its codes.
                            ax = None if point.axis < 0 else point.axis
                            s = np.asarray(point.scale, np.float32)
                            if s.ndim and ax is not None:
                                shp = [1] * w.ndim
                                shp[ax] = -1
                                s = s.reshape(shp)
                            w = (np.asarray(point.codes, np.float32) * s).astype(np.float32)
                        key = _key(name)
                        self.weights[key] = torch.nn.Parameter(torch.from_numpy(w.copy()), requires_grad=train_weights)
                        fq = FakeQuant(point, w.ndim, learn_scales, pow2)
                        fq.enabled = quantize
                        self.quantizers[key] = fq
                        self.steps.append((v, _weight_step(self, key)))
                        wvar[v] = key
                        continue
                    ndim = len(shape_of(x))
                    if isinstance(x, relax.Var):
                        self.act_points[name] = (v, x)
                    fq = FakeQuant(point, ndim, learn_scales, pow2)
                    fq.enabled = quantize
                    self.quantizers[_key(name)] = fq
                    qsrc[v] = fq
                    getter = self._arg(x, v.name)
                    self.steps.append((v, _act_step(getter, fq)))
                    continue
                if isinstance(call, relax.Var):
                    getter = self._arg(call, v.name)
                    self.steps.append((v, lambda env, g=getter: g(env)))
                    if call in qsrc:
                        qsrc[v] = qsrc[call]
                    continue
                if isinstance(call, relax.Tuple):
                    getter = self._arg(call, v.name)
                    self.steps.append((v, getter))
                    continue
                if isinstance(call, relax.TupleGetItem):
                    getter, idx = self._arg(call.tuple_value, v.name), int(call.index)
                    self.steps.append((v, lambda env, g=getter, i=idx: g(env)[i]))
                    continue
                name = op_name(call)
                if name not in OPS:
                    what = name or type(call).__name__
                    layer = describe_layer(annotated, v.name) if v.name in quantized else v.name
                    raise UnsupportedOpError(
                        f"relayq.finetune cannot train through op {what!r} (binding {layer!r}): the torch twin "
                        f"knows {sorted(k.replace('relax.', '') for k in OPS)}")
                is_q = v.name in quantized
                if is_q and name in ("relax.nn.conv2d", "relax.matmul") and call.args[1] in wvar:
                    acc_of[v] = (qsrc.get(call.args[0]), self.quantizers[wvar[call.args[1]]])
                if is_q and _trainable_bias(call, acc_of):
                    fx, fw = acc_of[call.args[0]]
                    b0 = np.asarray(const_value(call.args[1]), dtype=np.float32)
                    point = qpoints.get(fw.name)
                    if quantize and point is not None and point.bias_corr is not None:
                        # realize subtracts the bias correction from the float bias: start from there.
                        b0 = (b0.astype(np.float64) - np.asarray(point.bias_corr, np.float64).reshape(b0.shape))
                        b0 = b0.astype(np.float32)
                    key = _key(v.name)
                    self.biases[key] = torch.nn.Parameter(torch.from_numpy(b0.copy()), requires_grad=train_biases)
                    self.bias_binding[key] = v.name
                    if fw is not None:
                        self.folded_bias_points.add(fw.name)
                    acc_getter = self._arg(call.args[0], v.name)
                    self.steps.append((v, _bias_step(self, key, acc_getter, fx, fw, quantize)))
                    continue
                getters = [self._arg(a, v.name) for a in call.args]
                fn = OPS[name](call, F)
                if is_q and name in _CODE_AVERAGES and call.args[0] in qsrc and quantize:
                    fn = _code_average(call, F, qsrc[call.args[0]])
                self.steps.append((v, _call_step(fn, getters)))
                if is_q and name in _SAME_SCALE and call.args[0] in qsrc:
                    qsrc[v] = qsrc[call.args[0]]
            body = func.body.body
            self._out = self._arg(body, "the output")
            self._tuple_out = isinstance(body, relax.Tuple)

        # -------------------------------------------------------------------- running
        def forward(self, *inputs, record=None):
            """The outputs; with ``record`` (a set of ``relax.Var``: names may repeat) also ``{var: value}``."""
            env = dict(zip(func.params, inputs))
            for v, step in self.steps:
                env[v] = step(env)
            out = self._out(env)
            out = tuple(out) if self._tuple_out else out
            if record is None:
                return out
            return out, {v: env[v] for v in record if v in env}

        def set_quantize(self, on: bool) -> None:
            """Switch every fake quantizer on or off (off: the float graph with the current weights)."""
            for q in self.quantizers.values():
                q.enabled = bool(on)

    return TorchGraph()


def _key(name: str) -> str:
    """A ParameterDict / ModuleDict key for a point or binding name (they may not contain '.')."""
    return name.replace(".", "__dot__")


def _weight_step(graph, key):
    def step(env):
        return graph.quantizers[key](graph.weights[key])
    return step


def _act_step(getter, fq):
    return lambda env: fq(getter(env))


def _call_step(fn, getters):
    return lambda env: fn(*[g(env) for g in getters])


def _bias_step(graph, key, acc_getter, fx, fw, quantize):
    def step(env):
        b = graph.biases[key]
        if quantize and fx is not None and fx.enabled and fw.enabled:
            s = fx.scale().detach() * fw.scale().detach()
            s = s.reshape(b.shape) if s.dim() else s
            b = round_ste(b / s) * s
        return acc_getter(env) + b
    return step
