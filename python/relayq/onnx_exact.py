"""Exact ONNX export: relayq's realized integer program written op for op in standard ONNX operators.

A QDQ model (:mod:`relayq.onnx_export`) leaves the integer arithmetic to the runtime: ONNX Runtime
requantizes in float32 and rounds half to even, relayq with a 31-bit fixed-point multiplier and a
rounding shift. Layer by layer the two agree on all but ~1e-5 of the codes, but a quantized network
amplifies a single differing code: on MobileNetV2, one flipped code per image in relayq's own integer
model already costs 0.3 % of output cosine. Only the same arithmetic gives the same codes, so this
export writes the realized graph itself (:func:`export_exact`): integer convolutions and matrix
products (``ConvInteger`` / ``MatMulInteger``, exact int32 sums), the requantization in int64
(``Mul``, ``Add`` and a floor division for the rounding shift), integer pooling, tables as ``Gather``.
ONNX Runtime then computes relayq's codes bit for bit. It is a reference for checking and for
runtimes that execute integer ONNX, not a fast deployment format: use the QDQ export for that.

Relax op -> ONNX op(s), see :data:`CONVERTERS`. An op outside the table raises :class:`ExportError`
naming the binding.

Example::

    qmodel.export_onnx("mobilenet_v2_int.onnx", exact=True)
    out = onnxruntime.InferenceSession("mobilenet_v2_int.onnx").run(None, {"input": x})[0]
    assert (out == relayq.build(qmodel)(x)).all()          # up to float32 rounding of the last scale
"""
from __future__ import annotations

import numpy as np
import tvm
from tvm import relax

from .onnx_export import ExportError, unique_name
from .transform.common import bindings, const_value, dtype_of, is_const_expr, main_function, op_name, shape_of

#: The opset written (QuantizeLinear with per-axis scales, ReduceSum with an axes input).
OPSET = 13


def _onnx_type(dtype: str) -> int:
    from onnx import helper

    return helper.np_dtype_to_tensor_dtype(np.dtype(dtype))


class _Writer:
    """The ONNX graph under construction: tensors by Relax var, constants, nodes."""

    def __init__(self):
        self.nodes, self.inits, self.names = [], [], set()
        self.tensor = {}              # relax var -> ONNX tensor name

    def fresh(self, base: str) -> str:
        return unique_name(self.names, base)

    def const(self, array, base: str = "c") -> str:
        from onnx import numpy_helper

        name = self.fresh(base)
        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def node(self, op: str, inputs: list, base: str, **attrs) -> str:
        from onnx import helper

        out = self.fresh(base)
        self.nodes.append(helper.make_node(op, inputs, [out], name=self.fresh(f"{base}_{op}"), **attrs))
        return out

    def arg(self, e, dtype: str | None = None) -> str:
        """The ONNX tensor of a call argument (a var, a constant, or a scalar of ``dtype``)."""
        if isinstance(e, relax.Var):
            return self.tensor[e]
        if is_const_expr(e):
            return self.const(const_value(e), "w")
        value = getattr(e, "value", None)             # a scalar argument (clip's bounds)
        if value is not None:
            return self.const(np.array(getattr(value, "value", value), dtype or "int64"), "s")
        raise ExportError(f"export_onnx(exact=True): cannot write the argument {type(e).__name__}")


def _floor_div(w: _Writer, x: str, divisor, dtype: str, base: str) -> str:
    """``floor(x / divisor)`` for integers: ONNX's integer Div truncates, so the floor remainder (Mod
    with ``fmod=0`` follows the divisor's sign, as Python's ``%``) is taken off first: then the
    division is exact and truncation does not matter."""
    d = w.const(np.asarray(divisor, dtype), "divisor")
    rem = w.node("Mod", [x, d], f"{base}_rem", fmod=0)
    return w.node("Div", [w.node("Sub", [x, rem], f"{base}_exact"), d], base)


def _conv2d(w, b, call, name):
    a = call.attrs
    if str(a.data_layout) != "NCHW" or str(a.kernel_layout) != "OIHW":
        raise ExportError(f"export_onnx(exact=True): conv2d {name} has layout {a.data_layout}/{a.kernel_layout} "
                          "(only NCHW/OIHW is written)")
    x, k = call.args
    top, left, bottom, right = (int(p) for p in a.padding)
    attrs = dict(strides=[int(s) for s in a.strides], pads=[top, left, bottom, right],
                 dilations=[int(d) for d in a.dilation], group=int(a.groups))
    if dtype_of(x) in ("int8", "uint8") and dtype_of(k) in ("int8", "uint8"):
        return w.node("ConvInteger", [w.arg(x), w.arg(k)], name, **attrs)        # int32 sums: exact
    if dtype_of(x).startswith("float") and dtype_of(k).startswith("float"):
        return w.node("Conv", [w.arg(x), w.arg(k)], name, **attrs)
    raise ExportError(f"export_onnx(exact=True): conv2d {name} on {dtype_of(x)} x {dtype_of(k)} has no exact ONNX form")


def _matmul(w, b, call, name):
    x, k = call.args
    if dtype_of(x) in ("int8", "uint8") and dtype_of(k) in ("int8", "uint8"):
        return w.node("MatMulInteger", [w.arg(x), w.arg(k)], name)
    if dtype_of(x).startswith("float"):
        return w.node("MatMul", [w.arg(x), w.arg(k)], name)
    raise ExportError(f"export_onnx(exact=True): matmul {name} on {dtype_of(x)} x {dtype_of(k)} has no exact ONNX form")


def _binary(op):
    def convert(w, b, call, name):
        dt = dtype_of(b.var)
        return w.node(op, [w.arg(call.args[0], dt), w.arg(call.args[1], dt)], name)
    return convert


def _unary(op, **fixed):
    def convert(w, b, call, name):
        return w.node(op, [w.arg(call.args[0])], name, **fixed)
    return convert


def _right_shift(w, b, call, name):
    x, s = call.args
    if not is_const_expr(s):
        raise ExportError(f"export_onnx(exact=True): right_shift {name} by a computed amount")
    dt = dtype_of(b.var)
    shift = const_value(s).astype(np.int64)
    # Arithmetic shift = floor division by 2^s (the rounding constant is already added by the graph).
    return _floor_div(w, w.arg(x), np.left_shift(np.int64(1), shift).astype(dt), dt, name)


def _floor_divide(w, b, call, name):
    x, d = call.args
    if not is_const_expr(d):
        raise ExportError(f"export_onnx(exact=True): floor_divide {name} by a computed divisor")
    dt = dtype_of(b.var)
    if not dt.startswith("int"):
        return w.node("Floor", [w.node("Div", [w.arg(x), w.arg(d)], f"{name}_q")], name)
    return _floor_div(w, w.arg(x), const_value(d), dt, name)


def _clip(w, b, call, name):
    dt = dtype_of(b.var)
    return w.node("Clip", [w.arg(call.args[0]), w.arg(call.args[1], dt), w.arg(call.args[2], dt)], name)


def _astype(w, b, call, name):
    from onnx import helper

    return w.node("Cast", [w.arg(call.args[0])], name, to=helper.np_dtype_to_tensor_dtype(np.dtype(dtype_of(b.var))))


def _quantize(w, b, call, name):
    x, scale, zp = call.args
    attrs = {"axis": int(call.attrs.axis)} if np.ndim(const_value(scale)) else {}
    return w.node("QuantizeLinear", [w.arg(x), w.arg(scale), w.const(const_value(zp).astype(dtype_of(b.var)), "zp")],
                  name, **attrs)


def _dequantize(w, b, call, name):
    x, scale, zp = call.args
    attrs = {"axis": int(call.attrs.axis)} if np.ndim(const_value(scale)) else {}
    return w.node("DequantizeLinear", [w.arg(x), w.arg(scale), w.const(const_value(zp).astype(dtype_of(x)), "zp")],
                  name, **attrs)


def _axes(call, ndim: int) -> list:
    axes = call.attrs.axis
    return list(range(ndim)) if axes is None else [int(a) % ndim for a in axes]


def _reduce(op):
    def convert(w, b, call, name):
        x = call.args[0]
        axes = w.const(np.array(_axes(call, len(shape_of(x))), np.int64), "axes")
        if op == "ReduceSum":
            return w.node(op, [w.arg(x), axes], name, keepdims=int(call.attrs.keepdims))
        # ReduceMean takes its axes as an attribute until opset 18.
        return w.node(op, [w.arg(x)], name, axes=_axes(call, len(shape_of(x))), keepdims=int(call.attrs.keepdims))
    return convert


def _reshape(w, b, call, name):
    return w.node("Reshape", [w.arg(call.args[0]), w.const(np.array(shape_of(b.var), np.int64), "shape")], name)


def _permute_dims(w, b, call, name):
    axes = call.attrs.axes
    attrs = {} if axes is None else {"perm": [int(a) for a in axes]}
    return w.node("Transpose", [w.arg(call.args[0])], name, **attrs)


def _take(w, b, call, name):
    table, idx = call.args
    n = shape_of(table)[int(call.attrs.axis)]
    # mode="clip": out-of-range indices take the end entries (ONNX's Gather would reject them).
    x = w.arg(idx)
    lo, hi = w.const(np.array(0, dtype_of(idx)), "lo"), w.const(np.array(n - 1, dtype_of(idx)), "hi")
    i = w.node("Clip", [x, lo, hi],
               f"{name}_index")
    return w.node("Gather", [w.arg(table), i], name, axis=int(call.attrs.axis))


def _concat(w, b, call, name):
    return w.node("Concat", [w.arg(f) for f in call.args[0].fields], name, axis=int(call.attrs.axis))


def _pool(op):
    def convert(w, b, call, name):
        a = call.attrs
        top, left, bottom, right = (int(p) for p in a.padding)
        attrs = dict(kernel_shape=[int(k) for k in a.pool_size], strides=[int(s) for s in a.strides],
                     pads=[top, left, bottom, right], ceil_mode=int(bool(a.ceil_mode)))
        if op == "MaxPool":
            attrs["dilations"] = [int(d) for d in a.dilation]
        else:
            attrs["count_include_pad"] = int(bool(a.count_include_pad))
        return w.node(op, [w.arg(call.args[0])], name, **attrs)
    return convert


def _pad(w, b, call, name):
    width = [int(p) for p in call.attrs.pad_width]
    pads = width[0::2] + width[1::2]                 # relax: (begin, end) per axis; ONNX: begins, then ends
    value = float(call.attrs.pad_value) if hasattr(call.attrs, "pad_value") else float(call.args[1].value.value)
    return w.node("Pad", [w.arg(call.args[0]), w.const(np.array(pads, np.int64), "pads"),
                          w.const(np.array(value, dtype_of(b.var)), "pad_value")], name, mode="constant")


def _softmax(w, b, call, name):
    return w.node("Softmax", [w.arg(call.args[0])], name, axis=int(call.attrs.axis))


def _where(w, b, call, name):
    return w.node("Where", [w.arg(a) for a in call.args], name)


#: Relax op -> converter(writer, binding, call, name) returning the ONNX tensor of the binding.
CONVERTERS = {
    "relax.nn.conv2d": _conv2d, "relax.matmul": _matmul,
    "relax.add": _binary("Add"), "relax.subtract": _binary("Sub"), "relax.multiply": _binary("Mul"),
    "relax.divide": _binary("Div"), "relax.maximum": _binary("Max"), "relax.minimum": _binary("Min"),
    "relax.greater_equal": _binary("GreaterOrEqual"), "relax.less": _binary("Less"),
    "relax.greater": _binary("Greater"), "relax.equal": _binary("Equal"),
    "relax.right_shift": _right_shift, "relax.floor_divide": _floor_divide,
    "relax.negative": _unary("Neg"), "relax.nn.relu": _unary("Relu"), "relax.sigmoid": _unary("Sigmoid"),
    "relax.tanh": _unary("Tanh"), "relax.exp": _unary("Exp"), "relax.abs": _unary("Abs"),
    "relax.clip": _clip, "relax.astype": _astype, "relax.quantize": _quantize, "relax.dequantize": _dequantize,
    "relax.sum": _reduce("ReduceSum"), "relax.mean": _reduce("ReduceMean"),
    "relax.reshape": _reshape, "relax.flatten": _reshape, "relax.permute_dims": _permute_dims,
    "relax.take": _take, "relax.concat": _concat, "relax.nn.pad": _pad, "relax.nn.softmax": _softmax,
    "relax.nn.max_pool2d": _pool("MaxPool"), "relax.nn.avg_pool2d": _pool("AveragePool"), "relax.where": _where,
}


def onnx_input_names(onnx_model) -> list | None:
    """The data input names of an ONNX model (ModelProto or path), or None without one.

    >>> # onnx_input_names("mobilenet_v2.onnx") == ["input"]
    """
    if onnx_model is None:
        return None
    import onnx

    model = onnx_model if isinstance(onnx_model, onnx.ModelProto) else onnx.load(str(onnx_model), load_external_data=False)
    inits = {t.name for t in model.graph.initializer}
    return [i.name for i in model.graph.input if i.name not in inits]


def export_exact(realized: tvm.IRModule, path: str, input_names: list | None = None) -> str:
    """Write ``realized`` (a :class:`~relayq.api.QuantizedModel`'s integer module) as an ONNX model.

    ``input_names``: the ONNX input names (default: the Relax parameter names). Returns ``path``.

    Example::

        export_exact(qmodel.realized, "model_int.onnx")
    """
    import onnx
    from onnx import helper

    func = main_function(realized)
    w = _Writer()
    graph_inputs = []
    for k, p in enumerate(func.params):
        name = input_names[k] if input_names and k < len(input_names) else p.name
        w.names.add(name)
        w.tensor[p] = name
        graph_inputs.append(helper.make_tensor_value_info(name, _onnx_type(dtype_of(p)), shape_of(p)))
    for b in bindings(func):
        call = b.value
        if isinstance(call, relax.Var):
            w.tensor[b.var] = w.tensor[call]
            continue
        op = op_name(call)
        convert = CONVERTERS.get(op)
        if convert is None:
            raise ExportError(f"export_onnx(exact=True): binding {b.var.name} is {op or type(call).__name__}, "
                              f"which has no exact ONNX form here (written ops: {', '.join(sorted(CONVERTERS))})")
        w.tensor[b.var] = convert(w, b, call, b.var.name)
    result = func.body.body
    outs = list(result.fields) if isinstance(result, relax.Tuple) else [result]
    graph_outputs = []
    for k, o in enumerate(outs):
        name = "output" if len(outs) == 1 else f"output_{k}"
        w.nodes.append(helper.make_node("Identity", [w.arg(o)], [name], name=w.fresh(f"{name}_Identity")))
        graph_outputs.append(helper.make_tensor_value_info(name, _onnx_type(dtype_of(o)), shape_of(o)))
    graph = helper.make_graph(w.nodes, "relayq_integer", graph_inputs, graph_outputs, w.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="relayq")
    model.ir_version = 8
    try:
        onnx.checker.check_model(model)
    except Exception as e:  # noqa: BLE001
        raise ExportError(f"export_onnx(exact=True): the written model does not pass onnx.checker: {e}") from None
    onnx.save(model, str(path))
    return str(path)
