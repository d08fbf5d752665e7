"""ONNX QDQ export: the user's ONNX graph with relayq's quantization as QuantizeLinear / DequantizeLinear.

:func:`export_onnx` rewrites the ONNX model the float model was imported from, found by the node and
initializer names relayq carries with every layer (:mod:`relayq.frontend.source_names`):

* **weights** of every quantized Conv / Gemm / MatMul become integer initializers (relayq's codes,
  AdaRound's included) read through ``DequantizeLinear`` (per-channel with ``axis`` where relayq is
  per-channel); BatchNormalization nodes that relayq folded into a convolution are removed (the
  folded weights are the ones written);
* **biases** become int32 initializers at the accumulator scale ``s_x * s_w`` through
  ``DequantizeLinear``, as ONNX Runtime's own quantizer writes them (relayq's bias correction included);
* **activations**: a ``QuantizeLinear -> DequantizeLinear`` pair at every tensor relayq quantizes
  (a layer's output after its fused ReLU / Clip, a quantized layer's float input); an average pool
  that relayq computes on integer codes gets a pair at its output at its input's scale.

Types by width (:data:`ONNX_TYPES`): 8 bits int8 / uint8; 4 bits the int4 / uint4 of opset 21 (ONNX
Runtime runs them; the model's opset is raised to 21); 16 bits int16 / uint16 (opset 21); 2, 3, 5, 6
and 7 bits are stored in int8 / uint8, and activations get a ``Clip`` on the codes between Q and DQ.

Layers are found through the source-name record (each layer's ONNX node and weight initializer).

The exported model computes relayq's integers up to rounding details: ONNX Runtime requantizes in
float32 and rounds half to even, relayq uses a 31-bit fixed-point multiplier and rounds half up. Layer by
layer about 1e-5 of the codes differ; a deep network amplifies each (MobileNetV2: 96.7 % top-1 agreement
with relayq, benchmarks/bench_qdq.py). ``export_onnx(..., exact=True)`` (:mod:`relayq.onnx_exact`)
writes relayq's integer arithmetic itself, which ONNX Runtime reproduces bit for bit.

Example::

    qmodel = relayq.quantize_model("mobilenet_v2.onnx", None, calib, "kl")
    qmodel.export_onnx("mobilenet_v2_qdq.onnx")
    sess = onnxruntime.InferenceSession("mobilenet_v2_qdq.onnx")
"""
from __future__ import annotations

import copy
import os

import numpy as np

from .errors import ModelError
from .transform.annotate import layer_sources, layers as layers_of
from .transform.common import bindings, main_function, simq_info
from .transform.realize import Realizer


class ExportError(ModelError):
    """The model cannot be written as ONNX QDQ (the message names the layer or node at fault)."""


#: (bits, signed) -> ONNX element type name. Other widths up to 8 use the 8-bit type (with a Clip on
#: activation codes), up to 16 the 16-bit one.
ONNX_TYPES = {(8, True): "INT8", (8, False): "UINT8", (4, True): "INT4", (4, False): "UINT4",
              (16, True): "INT16", (16, False): "UINT16"}
#: Element types that need opset 21 (and IR version 10).
_OPSET21_TYPES = {"INT4", "UINT4", "INT16", "UINT16"}
#: Ops relayq fuses into the layer before them (a layer's output point is after them).
_FUSED_ACTS = ("Relu", "Clip")


#: relayq layer type -> the ONNX op types its node may have.
_NODE_TYPES = {"conv2d": ("Conv",), "dense": ("Gemm", "MatMul"), "add": ("Add", "Sum"), "concat": ("Concat",),
               "global_avg_pool": ("GlobalAveragePool", "ReduceMean"), "avg_pool2d": ("AveragePool",),
               "max_pool2d": ("MaxPool",)}


def unique_name(names: set, base: str) -> str:
    """``base``, or ``base_1``, ``base_2`` ... : the first not in ``names``, which then holds it.

    Example::

        >>> names = {"w"}; unique_name(names, "w"), unique_name(names, "w")
        ('w_1', 'w_2')
    """
    name, k = base, 1
    while name in names:
        name, k = f"{base}_{k}", k + 1
    names.add(name)
    return name


def _find_node(g, layer: str, op: str, source):
    """The ONNX node of a layer, as the source-name record names it (:mod:`relayq.frontend.source_names`)."""
    node = g.node(source.node) if source is not None and source.node else None
    if node is None:
        raise ExportError(f"export_onnx: layer {layer} ({op}) has no node in the ONNX model"
                          + (f" (the record names {source.node!r})" if source is not None and source.node else
                             " (the importer recorded none)"))
    if node.op_type not in _NODE_TYPES.get(op, (node.op_type,)):
        raise ExportError(f"export_onnx: layer {layer} ({op}) is recorded as ONNX node {node.name!r} of type "
                          f"{node.op_type}, which it cannot come from")
    return node


def _elem_type(bits: int, signed: bool) -> str:
    if (bits, signed) in ONNX_TYPES:
        return ONNX_TYPES[(bits, signed)]
    if bits < 8:
        return "INT8" if signed else "UINT8"
    return "INT16" if signed else "UINT16"


class _Collect(Realizer):
    """A realize walk that keeps every compute layer's integer weights and bias (ONNX's convention)."""

    def __init__(self, annotated, qpoints):
        super().__init__(annotated, qpoints)
        self.layer_params = {}

    def _weight_codes(self, v, call, x):
        res = super()._weight_codes(v, call, x)
        wq, wp, acc_scale, _ = res
        self.layer_params[wp.name.rsplit(":", 1)[0]] = {"codes": wq, "point": wp, "acc_scale": acc_scale}
        return res

    def _bias_codes(self, v, call, acc):
        bq = super()._bias_codes(v, call, acc)
        if acc.wpoint is not None:
            # relayq folds the input zero point's term into its bias; ONNX's DequantizeLinear subtracts the
            # zero point itself, so the bias it gets is without that term.
            corr = 0 if acc.corr is None else acc.corr.reshape(bq.shape)
            self.layer_params[acc.wpoint.name.rsplit(":", 1)[0]]["bias"] = (bq - corr).astype(np.int64)
        return bq


class _Graph:
    """The ONNX graph being rewritten: nodes by name, producers and consumers of tensors."""

    def __init__(self, model):
        self.model = model
        self.g = model.graph
        self.inits = {t.name: t for t in self.g.initializer}
        self.new_inits = []
        self.new_nodes = []          # (after this node name or None, node)
        self.removed = set()
        self.opset21 = False
        self.names = {n.name for n in self.g.node} | {t.name for t in self.g.initializer}

    def node(self, name):
        for n in self.g.node:
            if n.name == name:
                return n
        return None

    def consumers(self, tensor):
        return [n for n in self.g.node if tensor in n.input and n.name not in self.removed]

    def producer(self, tensor):
        return next((n for n in self.g.node if tensor in n.output and n.name not in self.removed), None)

    def fresh(self, base):
        return unique_name(self.names, base)

    def const(self, base, array, elem: str):
        from onnx import TensorProto, helper

        name = self.fresh(base)
        a = np.asarray(array)
        t = getattr(TensorProto, elem)
        if elem in _OPSET21_TYPES:
            self.opset21 = True
        if elem == "FLOAT":
            tensor = helper.make_tensor(name, t, a.shape, a.astype(np.float32).reshape(-1).tolist())
        else:
            tensor = helper.make_tensor(name, t, a.shape, a.astype(np.int64).reshape(-1).tolist())
        self.new_inits.append(tensor)
        return name

    def float_array(self, name):
        from onnx import numpy_helper

        return numpy_helper.to_array(self.inits[name]).astype(np.float32)


def _scale_zp(g: _Graph, base: str, scale, zp, elem: str):
    s = np.asarray(scale, np.float32)
    z = np.zeros(s.shape, np.int64) + int(zp)
    return g.const(f"{base}_scale", s, "FLOAT"), g.const(f"{base}_zero_point", z, elem)


def _dequant_weight(g: _Graph, node, index: int, codes, point, axis: int, where: str):
    """Replace input ``index`` of ``node`` by DequantizeLinear of integer ``codes`` (weights)."""
    from onnx import helper

    elem = _elem_type(point.bits, True)
    base = node.input[index] or f"{node.name}_w"
    q = g.const(f"{base}_quantized", codes, elem)
    s, z = _scale_zp(g, base, point.scale, 0, elem)
    out = g.fresh(f"{base}_dequantized")
    attrs = {"axis": axis} if np.ndim(point.scale) else {}
    g.new_nodes.append((None, helper.make_node("DequantizeLinear", [q, s, z], [out], name=g.fresh(f"{base}_DQ"),
                                               **attrs)))
    node.input[index] = out


def _dequant_bias(g: _Graph, node, index: int, bias_codes, acc_scale, base: str):
    from onnx import helper

    q = g.const(f"{base}_quantized", np.asarray(bias_codes).reshape(-1), "INT32")
    s, z = _scale_zp(g, base, acc_scale, 0, "INT32")
    out = g.fresh(f"{base}_dequantized")
    attrs = {"axis": 0} if np.ndim(acc_scale) else {}
    g.new_nodes.append((None, helper.make_node("DequantizeLinear", [q, s, z], [out], name=g.fresh(f"{base}_DQ"),
                                               **attrs)))
    while len(node.input) <= index:
        node.input.append("")
    node.input[index] = out


def _fold_batchnorm(g: _Graph, node) -> None:
    """Remove the BatchNormalization that reads ``node``'s output alone (relayq folded it into the weights)."""
    users = g.consumers(node.output[0])
    if len(users) == 1 and users[0].op_type == "BatchNormalization" \
            and node.output[0] not in {o.name for o in g.g.output}:
        bn = users[0]
        g.removed.add(bn.name)
        node.output[0] = bn.output[0]


def _layer_output(g: _Graph, node) -> str:
    """The tensor at a layer's output point: after a ReLU / Clip that reads the node's output alone."""
    t = node.output[0]
    users = g.consumers(t)
    if len(users) == 1 and users[0].op_type in _FUSED_ACTS and t not in {o.name for o in g.g.output}:
        return users[0].output[0]
    return t


def _qdq(g: _Graph, tensor: str, point, consumers) -> str:
    """Insert QuantizeLinear -> (Clip) -> DequantizeLinear on ``tensor`` for ``consumers``; returns DQ output."""
    from onnx import helper

    elem = _elem_type(point.bits, point.signed)
    base = tensor.replace("/", "_").strip("_") or "t"
    s, z = _scale_zp(g, base, point.scale, point.zero_point, elem)
    q = g.fresh(f"{base}_quantized")
    nodes = [helper.make_node("QuantizeLinear", [tensor, s, z], [q], name=g.fresh(f"{base}_Q"),
                              doc_string=f"relayq point {point.name}")]
    if point.bits not in (4, 8, 16):
        lo, hi = point.qmin, point.qmax
        clipped = g.fresh(f"{base}_clipped")
        nodes.append(helper.make_node("Clip", [q, g.const(f"{base}_qmin", np.array(lo), elem),
                                               g.const(f"{base}_qmax", np.array(hi), elem)], [clipped],
                                      name=g.fresh(f"{base}_clip")))
        q = clipped
    out = g.fresh(f"{base}_dequantized")
    nodes.append(helper.make_node("DequantizeLinear", [q, s, z], [out], name=g.fresh(f"{base}_DQ")))
    prod = g.producer(tensor)
    for n in nodes:
        g.new_nodes.append((prod.name if prod is not None else None, n))
    for c in consumers:
        for i, name in enumerate(c.input):
            if name == tensor:
                c.input[i] = out
    return out


def _load(onnx_model):
    import onnx

    if isinstance(onnx_model, onnx.ModelProto):
        return copy.deepcopy(onnx_model)
    if isinstance(onnx_model, (str, os.PathLike)):
        if not os.path.exists(onnx_model):
            raise ExportError(f"export_onnx: no ONNX model at {onnx_model}")
        return onnx.load(str(onnx_model))
    raise ExportError(f"export_onnx: onnx_model must be an onnx.ModelProto or a path, got {type(onnx_model).__name__}")


def _set_opset(model, version: int) -> None:
    """Raise the default-domain opset to ``version`` (IR version to match)."""
    import onnx

    current = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)
    if current >= version:
        return
    try:
        converted = onnx.version_converter.convert_version(model, version)
        model.CopyFrom(converted)
    except Exception:  # noqa: BLE001 - the converter lacks adapters for some ops: a plain bump is right for CNN ops
        for o in model.opset_import:
            if o.domain in ("", "ai.onnx"):
                o.version = version
    model.ir_version = max(model.ir_version, 10)


def export_onnx(qmodel, path, onnx_model=None) -> str:
    """Write ``onnx_model`` (default: the model ``quantize_model`` imported) with relayq's QDQ pairs.

    See the module docstring. Returns ``path``.

    Example::

        qmodel = relayq.quantize_model(onnx_model, None, calib, "kl", relayq.QConfig(per_channel=True))
        export_onnx(qmodel, "model_qdq.onnx")
    """
    import onnx
    from onnx import helper

    src = onnx_model if onnx_model is not None else getattr(qmodel, "source_model", None)
    if src is None:
        raise ExportError("export_onnx needs the ONNX model the float model was imported from: pass "
                          "onnx_model=<ModelProto or path> (quantize_model keeps it only when it imported the "
                          "ONNX model itself)")
    cfg = qmodel.config
    if cfg.cross_layer_equalization and (cfg.cle_replace_relu6 or cfg.skip_layers
                                         or cfg.skip_ops or any(lc.skip for lc in cfg.layer_overrides.values())):
        # The export writes the equalized weights and biases of quantized layers only: a float layer of an
        # equalized pair, or a ReLU6 that CLE turned into a ReLU, would be left as they were.
        raise ExportError("export_onnx: this model was equalized with cle_replace_relu6 or "
                          "with layers left in float; its float graph differs from the ONNX model's, so the QDQ "
                          "export would not compute it (export a model quantized without these options)")
    model = _load(src)
    sources = layer_sources(qmodel.annotated)
    if not sources or next(iter(sources.values())).framework != "ONNX":
        raise ExportError("export_onnx: the quantized model carries no ONNX node names (it was not imported "
                          "from ONNX with relayq.frontend.from_onnx)")
    collect = _Collect(qmodel.annotated, qmodel.qpoints)
    collect.run()
    g = _Graph(model)
    all_layers = layers_of(qmodel.annotated)
    node_of = {}
    for layer, op in all_layers.items():
        node_of[layer] = _find_node(g, layer, op, sources.get(layer))
    # Weights and biases.
    for layer, p in collect.layer_params.items():
        node = node_of[layer]
        point, codes = p["point"], np.asarray(p["codes"])
        base = (sources[layer].weight or f"{node.name}_weight").removeprefix("onnx::")
        if node.op_type == "Conv":
            _fold_batchnorm(g, node)
            _dequant_weight(g, node, 1, codes, point, 0, layer)
            if "bias" in p:
                _dequant_bias(g, node, 2, p["bias"], p["acc_scale"], f"{base}_bias")
        elif node.op_type == "Gemm":
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            if attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0 or attrs.get("transA", 0):
                raise ExportError(f"export_onnx: Gemm node {node.name!r} has alpha/beta/transA other than 1, 1, 0")
            if attrs.get("transB", 0):
                _dequant_weight(g, node, 1, codes.T, point, 0, layer)
            else:
                _dequant_weight(g, node, 1, codes, point, 1, layer)
            if "bias" in p:
                _dequant_bias(g, node, 2, p["bias"], p["acc_scale"], f"{base}_bias")
        elif node.op_type == "MatMul":
            _dequant_weight(g, node, 1, codes, point, 1, layer)
            if "bias" in p:
                adds = [c for c in g.consumers(node.output[0]) if c.op_type == "Add"]
                if len(adds) != 1:
                    raise ExportError(f"export_onnx: cannot find the bias Add after MatMul node {node.name!r}")
                k = 1 if adds[0].input[0] == node.output[0] else 0
                _dequant_bias(g, adds[0], k, p["bias"], p["acc_scale"], f"{base}_bias")
        else:
            raise ExportError(f"export_onnx: layer {layer} maps to ONNX node {node.name!r} of type "
                              f"{node.op_type}, which relayq does not know how to write as QDQ")
    # Activations.
    quant_of = {}                 # tensor -> the point quantizing it
    for b in bindings(main_function(qmodel.annotated)):
        info = simq_info(b.value)
        if info is None or info[2] != "act":
            continue
        name = info[1]
        layer, _, where = name.rpartition(":")
        point = qmodel.qpoints[name]
        node = node_of.get(layer)
        if node is None:
            raise ExportError(f"export_onnx: point {name} belongs to no layer with an ONNX node")
        if where == "out":
            tensor = _layer_output(g, node)
            users = g.consumers(tensor)
        else:
            tensor = node.input[int(where[2:])]
            quantized_nodes = {n.name for n in node_of.values()}
            users = [c for c in g.consumers(tensor) if c.name in quantized_nodes]
        if tensor in quant_of:
            continue
        quant_of[tensor] = point
        quant_of[_qdq(g, tensor, point, users)] = point
    # Average pools run on integer codes in relayq: their output keeps the input's quantization.
    for layer, op in all_layers.items():
        node = node_of[layer]
        if op in ("avg_pool2d", "global_avg_pool"):
            point = quant_of.get(node.input[0])
            if point is not None and node.output[0] not in quant_of:
                quant_of[node.output[0]] = point
                _qdq(g, node.output[0], point, g.consumers(node.output[0]))
    _write(g, model)
    if g.opset21:
        _set_opset(model, 21)
    else:
        _set_opset(model, 13)          # per-channel DequantizeLinear (axis) needs 13
    try:
        onnx.checker.check_model(model)
    except Exception as e:  # noqa: BLE001
        raise ExportError(f"export_onnx: the written model does not pass onnx.checker: {e}") from None
    path = str(path)
    onnx.save(model, path)
    return path


def _write(g: _Graph, model) -> None:
    """Put the new nodes in topological position and drop the removed ones."""
    g.g.initializer.extend(g.new_inits)
    after = {}
    front = []
    for anchor, n in g.new_nodes:
        if anchor is None:
            front.append(n)
        else:
            after.setdefault(anchor, []).append(n)
    nodes = list(front)
    for n in g.g.node:
        if n.name in g.removed:
            continue
        nodes.append(n)
        nodes.extend(after.get(n.name, []))
    del g.g.node[:]
    g.g.node.extend(nodes)
    # Clip nodes of the original graph read their bounds as float initializers: unchanged.
    used = {i for n in g.g.node for i in n.input}
    keep = [t for t in g.g.initializer if t.name in used or t.name in {i.name for i in g.g.input}]
    del g.g.initializer[:]
    g.g.initializer.extend(keep)
