"""Stage 2, annotate: insert simulated-quantize markers where the integer graph will hold codes.

A marker is a pure packed call that prints as::

    w = R.call_pure_packed("relayq.simulated_quantize", W, R.str("conv2d_0:w"), R.str("weight"), 8, 0, ...)

with arguments (tensor, point name, role ``"act"`` | ``"weight"``, bits, per-channel axis or -1). The
annotated module is self-describing: calibration reads the activation points from it, and realize
replaces each marker by real integer ops. Markers go on

* the weights of every quantized conv2d / dense,
* activation inputs that come from the float world (graph inputs, float islands),
* the output of every conv2d / dense / add / concat / multiply layer (after its fused bias and
  ReLU/clip) that feeds another quantized op. An output that only feeds float ops (a classifier's
  logits) gets none: realize dequantizes the int32 accumulator directly, which is more precise;
* the output of every elementwise region (:mod:`relayq.transform.elementwise`: sigmoid, hardswish,
  SiLU, GELU, a standalone BatchNorm, PReLU ...) on a quantized input: a table or per-channel affine
  from the input's codes to codes at this output point's scale. The region's ops stay in the
  annotated module (calibration runs them in float); the function attribute ``relayq_regions`` names
  them, so that realize and the reference evaluate the same function.

Per-op behaviour is a table (:data:`RULES`): op name -> function returning the layer's op type, or
``None`` where the call cannot be quantized. Anything else stays float and is named in a
:class:`~relayq.errors.FloatFallbackWarning`.

Example::

    annotated = relayq.transform.annotate(prepared, relayq.QConfig(per_channel=True))
    print(annotated)
"""
from __future__ import annotations

import dataclasses
import json
import warnings
from collections import Counter, defaultdict

import tvm
from tvm import relax

from ..config import QConfig
from ..errors import FloatFallbackWarning
from ..utils import names as source_names
from ..utils.names import LayerSource, describe
from .common import (SIMQ, bindings, const_value, dtype_of, is_const_expr, is_tensor, main_function, op_name, shape_of,
                     simq_info, substitute, vars_of)
from .elementwise import FUNCS, find_regions

#: Function attribute listing the binding variables of quantized ops (realize reads it).
QUANTIZED_ATTR = "relayq_quantized"
#: Function attribute listing the layers as "name=op_type" (for reports and per-layer analysis).
LAYERS_ATTR = "relayq_layers"
#: Function attribute: JSON ``{layer: [framework, node, op_type, weight, bias]}``, the user's names of each layer.
LAYER_SOURCES_ATTR = "relayq_layer_sources"
#: Function attribute: JSON ``{region output var: {"layer", "kind", "axis", "members": [var names]}}``: the
#: elementwise regions (see :mod:`relayq.transform.elementwise`), members in graph order, the output last.
REGIONS_ATTR = "relayq_regions"

# Layer kinds: "compute" layers requantize (conv2d, dense); "merge" layers combine several quantized
# inputs into a new scale (add, concat, multiply); "pass" ops keep their input's scale (pools, reshapes,
# ReLU); "region" layers map their input's codes to new codes through a function (a table or an affine).
COMPUTE, MERGE, PASS, REGION = "compute", "merge", "pass", "region"
#: op type of each elementwise region kind (``QConfig(op_overrides=...)`` keys)
REGION_OP_TYPES = {"lut": "elementwise", "affine": "affine"}


def _float(e) -> bool:
    return is_tensor(e) and dtype_of(e) == "float32"


def _rule_conv2d(call):
    a = call.attrs
    if _float(call.args[0]) and is_const_expr(call.args[1]) and a.data_layout == "NCHW" \
            and a.kernel_layout == "OIHW" and str(a.out_layout) == "NCHW" and len(shape_of(call.args[0])) == 4:
        return "conv2d", COMPUTE
    return None


def _rule_matmul(call):
    x, w = call.args
    if _float(x) and is_const_expr(w) and len(shape_of(w)) == 2 and len(shape_of(x)) == 2:
        return "dense", COMPUTE
    # Two activations (attention's Q.K^T and A.V): int x int products summed in int32, requantized.
    if isinstance(x, relax.Var) and isinstance(w, relax.Var) and _float(x) and _float(w) \
            and len(shape_of(x)) >= 2 and len(shape_of(w)) >= 2 and is_tensor(call):
        return "matmul", MERGE
    return None


def _const_operand(c, out) -> bool:
    """A constant a merge layer can quantize at its output scale: float, broadcasting into ``out``."""
    if not is_const_expr(c) or str(const_value(c).dtype) != "float32" or not is_tensor(out):
        return False
    cs, os_ = tuple(const_value(c).shape), shape_of(out)
    return len(cs) <= len(os_) and all(a in (1, b) for a, b in zip(reversed(cs), reversed(os_)))


def _rule_add(call):
    a, b = call.args
    if isinstance(a, relax.Var) and isinstance(b, relax.Var) and _float(a) and _float(b) \
            and shape_of(a) == shape_of(b):
        return "add", MERGE
    # A tensor plus a constant that no elementwise region took (a position embedding: one value per
    # element, not per channel): the constant is quantized at the output scale, so the add is exact.
    if isinstance(a, relax.Var) and _float(a) and is_tensor(call) and shape_of(a) == shape_of(call) \
            and _const_operand(b, call):
        return "add", MERGE
    return None


def _rule_multiply(call):
    # Two activations (squeeze-excitation gating, with broadcasting). A multiply by a constant is an
    # elementwise region (a table, or a per-channel affine), and x * f(x) (SiLU) is a region too.
    a, b = call.args
    if isinstance(a, relax.Var) and isinstance(b, relax.Var) and _float(a) and _float(b):
        return "multiply", MERGE
    # A constant no region took (an RNN's initial state, one value per batch row and unit): quantized on
    # its own, the product is exact in int32 like the product of two activations.
    if isinstance(a, relax.Var) and _float(a) and is_tensor(call) and shape_of(a) == shape_of(call) \
            and _const_operand(b, call):
        return "multiply", MERGE
    return None


def _rule_concat(call):
    # Constant fields (ViT's class token) are quantized at the output scale.
    t = call.args[0]
    if isinstance(t, relax.Tuple) and any(isinstance(f, relax.Var) for f in t.fields) \
            and all((isinstance(f, relax.Var) and _float(f)) or _const_operand(f, f) for f in t.fields):
        return "concat", MERGE
    return None


def _rule_max_pool(call):
    return ("max_pool2d", PASS) if call.attrs.layout == "NCHW" and str(call.attrs.out_layout) == "NCHW" else None


def _rule_avg_pool(call):
    a = call.attrs
    if a.layout == "NCHW" and str(a.out_layout) == "NCHW" and not a.ceil_mode and all(int(d) == 1 for d in a.dilation):
        return "avg_pool2d", PASS
    return None


def _rule_adaptive_pool(call):
    a = call.attrs
    if a.layout == "NCHW" and a.output_size is not None and [int(s) for s in a.output_size] == [1, 1]:
        return "global_avg_pool", PASS
    return None


def _rule_mean(call):
    x = call.args[0]
    if not is_tensor(x) or call.attrs.axis is None:
        return None
    nd = len(shape_of(x))
    axes = sorted(int(i) % nd for i in call.attrs.axis)
    if nd == 4 and axes == [2, 3]:
        return "global_avg_pool", PASS
    # Any other axes (an LSTM's mean over time): the integer sum of the codes, divided with rounding.
    return "mean", PASS


def _rule_reshape(call):
    return ("reshape", PASS) if is_tensor(call.args[0]) else None


def _static_ints(t):
    try:
        return [int(f.value) for f in t.fields]
    except (AttributeError, TypeError, ValueError):
        return None


def _rule_strided_slice(call):
    # Slicing codes is exact with one scale per tensor. Only static, forward slices: their numpy
    # equivalent (the reference executor's) is then the same as TVM's.
    parts = [_static_ints(a) for a in call.args[1:]]
    if not is_tensor(call.args[0]) or any(p is None for p in parts) or \
            (len(parts) > 3 and any(st <= 0 for st in parts[3])):
        return None
    return "reshape", PASS


def _rule_take(call):
    # Picking elements by constant indices (ViT's q/k/v unbind and class token) copies codes.
    idx = call.args[1]
    if not is_tensor(call.args[0]) or not is_const_expr(idx) or not str(const_value(idx).dtype).startswith("int"):
        return None
    n = shape_of(call.args[0])[int(call.attrs.axis) % len(shape_of(call.args[0]))]
    i = const_value(idx)
    return ("reshape", PASS) if i.size and i.min() >= 0 and i.max() < n else None


#: ``image.resize2d`` attributes realize reproduces in integers (``relayq.qmath.resize_indices``).
RESIZE_METHODS = ("nearest_neighbor", "linear")
RESIZE_COORDINATES = ("half_pixel", "align_corners", "asymmetric", "pytorch_half_pixel", "tf_half_pixel_for_nn")


def _rule_resize(call):
    a = call.attrs
    if is_tensor(call.args[0]) and is_tensor(call) and a.layout == "NCHW" and a.method in RESIZE_METHODS \
            and a.coordinate_transformation_mode in RESIZE_COORDINATES \
            and a.rounding_method in ("", "round", "floor", "ceil", "round_prefer_floor", "round_prefer_ceil") \
            and str(a.out_dtype) in ("", "void", "None", "float32"):
        return "resize", PASS
    return None


def _rule_act(call):
    if op_name(call) == "relax.clip":
        lo, hi = call.args[1], call.args[2]
        if not (isinstance(getattr(lo, "value", None), (int, float)) and isinstance(getattr(hi, "value", None), (int, float))):
            return None
    return ("act", PASS)


#: op name -> rule(call) -> (op_type, kind) or None
RULES = {
    "relax.nn.conv2d": _rule_conv2d,
    "relax.matmul": _rule_matmul,
    "relax.add": _rule_add,
    "relax.multiply": _rule_multiply,
    "relax.concat": _rule_concat,
    "relax.nn.max_pool2d": _rule_max_pool,
    "relax.nn.avg_pool2d": _rule_avg_pool,
    "relax.nn.adaptive_avg_pool2d": _rule_adaptive_pool,
    "relax.mean": _rule_mean,
    "relax.reshape": _rule_reshape,
    "relax.flatten": _rule_reshape,
    "relax.permute_dims": _rule_reshape,
    "relax.squeeze": _rule_reshape,
    "relax.expand_dims": _rule_reshape,
    "relax.strided_slice": _rule_strided_slice,
    "relax.take": _rule_take,
    "relax.image.resize2d": _rule_resize,
    "relax.nn.relu": _rule_act,
    "relax.clip": _rule_act,
}
#: Ops that never count as "left in float" in the warning: they only move data around.
_QUIET_FLOAT_OPS = {"relax.reshape", "relax.flatten", "relax.permute_dims", "relax.squeeze", "relax.expand_dims",
                    "relax.take"}


def make_marker(x, name: str, role: str, bits: int, axis: int = -1):
    """Build a simulated-quantize marker call on ``x``."""
    return relax.op.call_pure_packed(SIMQ, x, tvm.ir.StringImm(name), tvm.ir.StringImm(role),
                                     relax.prim_value(int(bits)), relax.prim_value(int(axis)), ty_args=x.ty)


def _bias_fits(op_type, acc_shape, bias) -> bool:
    bs = shape_of(bias)
    if op_type == "conv2d":
        return bs in ((1, acc_shape[1], 1, 1), (acc_shape[1], 1, 1))
    return bs in ((acc_shape[-1],), (1, acc_shape[-1]))


class _Plan:
    """What annotate decided for each binding of main."""

    def __init__(self, func, config: QConfig):
        self.func = func
        self.config = config
        self.binds = bindings(func)
        self.value = {b.var: b.value for b in self.binds}
        self.users = defaultdict(list)
        for i, b in enumerate(self.binds):
            for v in vars_of(b.value):
                self.users[v].append(i)
        self.output_vars = set(vars_of(func.body.body))
        self.layer_of = {}          # var -> layer name (every var of a fused group)
        self.layer_type = {}        # layer name -> op type
        self.layer_kind = {}        # layer name -> COMPUTE | MERGE | PASS
        self.group_out = {}         # layer name -> the var that ends its fused group
        self.root = {}              # layer name -> root var (the conv2d / add ... itself)
        self.qdomain = set()        # vars whose value is quantized (or pending) in the realized graph
        self.resolved = {}          # layer name -> ResolvedLayer
        record = source_names.read(func) or {}
        self.framework = record.get("framework")
        self.var_source = record.get("vars", {})   # binding name -> [node, op_type, [user weight names]]
        self.sources = {}           # layer name -> LayerSource
        self.regions = find_regions(self.binds, self.output_vars, self._region_boundaries())
        self.region_root = {}       # var -> root of the regions it belongs to (as member)
        for r in self.regions.values():
            for m in r.members:
                self.region_root[m] = r.root
        self.region_layer = {}      # layer name -> Region
        self._plan()
        self._drop_float_only_passes()

    def _drop_float_only_passes(self):
        """Keep a layout-only pass-through layer (reshape, transpose, squeeze ...) integer only where codes
        are read after it. One that leads only to float ops or to the graph's output moves data in float
        instead, so that the layer before it needs no output codes: a dense feeding a reshape, a residual
        add and a LayerNorm hands over its exact accumulator (``acc * s_x * s_w``) rather than 8-bit
        codes, whose one scale must also cover the few outlier channels of a transformer's residual
        stream. Only after a conv / dense / matmul, whose accumulator dequantizes exactly; pools and
        activations stay integer (they compute)."""
        # One pass is enough: a demoted layer reads a conv / dense / matmul (or float), never another
        # pass-through, so no demotion can make an earlier layer demotable.
        members = defaultdict(list)
        for v, owner in self.layer_of.items():
            members[owner].append(v)
        for layer, kind in list(self.layer_kind.items()):
            if kind != PASS or any(op_name(self.value[v]) not in _QUIET_FLOAT_OPS for v in members[layer]):
                continue
            out = self.group_out[layer]
            if out in self.region_root or any(self.binds[i].var in self.qdomain for i in self.users.get(out, [])):
                continue
            src_layer = self.layer_of.get(self.value[self.root[layer]].args[0])
            if src_layer is not None and self.layer_kind[src_layer] != COMPUTE:
                continue          # an add / concat / table must finalize its codes anyway
            for v in members[layer]:
                del self.layer_of[v]
                self.qdomain.discard(v)
            for table in (self.layer_type, self.layer_kind, self.group_out, self.root, self.resolved, self.sources):
                table.pop(layer, None)

    def _region_boundaries(self):
        """Vars no region may take: the bias add of a conv2d / dense (its layer absorbs it)."""
        out = set()
        for b in self.binds:
            call = b.value
            if op_name(call) == "relax.add" and isinstance(call.args[0], relax.Var) and is_const_expr(call.args[1]) \
                    and op_name(self.value.get(call.args[0])) in ("relax.nn.conv2d", "relax.matmul"):
                out.add(b.var)
        return out

    def source_of(self, v, bias_var=None):
        """The :class:`LayerSource` of the op bound to ``v`` (None where the frontend recorded nothing)."""
        entry = self.var_source.get(v.name)
        if entry is None:
            return None
        bias = None
        if bias_var is not None and bias_var.name in self.var_source:
            inits = self.var_source[bias_var.name][2]
            bias = inits[-1] if inits else None
        return LayerSource(self.framework, entry[0], entry[1], entry[2][0] if entry[2] else None, bias)

    def _sole_user(self, v):
        us = self.users.get(v, [])
        if len(us) == 1 and v not in self.output_vars:
            return self.binds[us[0]]
        return None

    def _plan(self):
        counters = Counter()
        for b in self.binds:
            v, call = b.var, b.value
            if v in self.layer_of:
                continue              # already absorbed into a fused group
            if v in self.region_root and self.region_root[v] in self.qdomain:
                if v in self.regions:
                    self._plan_region(self.regions[v], counters)
                continue              # inside a region: its output's layer computes it
            name = op_name(call)
            rule = RULES.get(name)
            decided = rule(call) if rule is not None else None
            if decided is None:
                continue
            op_type, kind = decided
            if kind == PASS:
                src = call.args[0]
                if not (isinstance(src, relax.Var) and src in self.qdomain):
                    continue          # a pass-through op only stays integer inside the quantized region
                if op_type not in ("act", "reshape"):
                    layer = f"{op_type}_{counters[op_type]}"
                    src = self.source_of(v)
                    if self.config.layer(layer, op_type, src.names() if src else ()).skip:
                        continue
                    counters[op_type] += 1
                else:
                    layer = f"{op_type}_{v.name}"
                self._add_layer(layer, op_type, kind, [v])
                if self.source_of(v) is not None and op_type not in ("act", "reshape"):
                    self.sources[layer] = self.source_of(v)
                continue
            if kind == MERGE and op_type != "matmul" and not self._merge_pays(v, call):
                continue
            layer = f"{op_type}_{counters[op_type]}"
            src = self.source_of(v)
            resolved = self.config.layer(layer, op_type, src.names() if src else ())
            counters[op_type] += 1
            if resolved.skip:
                continue
            group = [v]
            cur = v
            if kind == COMPUTE:
                nxt = self._sole_user(cur)
                if nxt is not None and op_name(nxt.value) == "relax.add" and nxt.value.args[0].same_as(cur) \
                        and is_const_expr(nxt.value.args[1]) and _bias_fits(op_type, shape_of(cur), nxt.value.args[1]):
                    group.append(nxt.var)
                    cur = nxt.var
            nxt = self._sole_user(cur)
            if nxt is not None and op_name(nxt.value) in ("relax.nn.relu", "relax.clip") \
                    and RULES[op_name(nxt.value)](nxt.value) is not None:
                group.append(nxt.var)
            self._add_layer(layer, op_type, kind, group)
            self.resolved[layer] = resolved
            src = self.source_of(v, group[1] if len(group) > 1 and op_name(self.value[group[1]]) == "relax.add"
                                 and kind == COMPUTE else None)
            if src is not None:
                self.sources[layer] = src
        kf = self.config.keep_first_last_bits
        compute = [n for n, k in self.layer_kind.items() if k == COMPUTE]
        if kf is not None and compute:
            for n in {compute[0], compute[-1]}:
                self.resolved[n] = dataclasses.replace(self.resolved[n], weight_bits=kf, act_bits=kf)

    def _merge_pays(self, v, call) -> bool:
        """Whether an add / concat / multiply is worth quantizing: its inputs are all quantized already, or
        something other than a float-only op (softmax, layer norm: ops without a rule) reads its result.
        Otherwise quantizing a float input would only add roundings: a residual add of a LayerNorm's output
        before the next LayerNorm, or an attention mask added to the scores before the softmax (quantizing
        the mask's -10000 would leave the scores no codes at all)."""
        if all(a in self.qdomain for a in vars_of(call)):
            return True          # already integer inputs: an integer merge costs no more than a float one
        if any(is_const_expr(a) for a in call.args) or \
                (op_name(call) == "relax.concat" and any(is_const_expr(f) for f in call.args[0].fields)):
            return False         # a float tensor with a constant: float until something quantizes its result
        if v in self.output_vars:
            return True
        readers = [op_name(self.binds[i].value) for i in self.users.get(v, [])]
        return any(r in RULES or r in FUNCS for r in readers)

    def _plan_region(self, region, counters):
        """A table / affine layer for an elementwise region whose input is quantized."""
        v = region.out
        op_type = REGION_OP_TYPES[region.kind]
        layer = f"{op_type}_{counters[op_type]}"
        src = self.source_of(v)
        resolved = self.config.layer(layer, op_type, src.names() if src else ())
        counters[op_type] += 1
        if resolved.skip:
            return
        group = [m for m in region.members if m not in self.regions and m not in self.layer_of] + [v]
        nxt = self._sole_user(v)
        if region.kind == "affine" and nxt is not None and op_name(nxt.value) in ("relax.nn.relu", "relax.clip") \
                and RULES[op_name(nxt.value)](nxt.value) is not None and nxt.var not in self.region_root:
            group.append(nxt.var)     # a ReLU after a standalone BatchNorm: the clip of the affine's output
        self._add_layer(layer, op_type, REGION, group)
        self.root[layer] = v
        self.resolved[layer] = resolved
        self.region_layer[layer] = region
        if src is not None:
            self.sources[layer] = src

    def _add_layer(self, layer, op_type, kind, group):
        for g in group:
            self.layer_of[g] = layer
            self.qdomain.add(g)
        self.layer_type[layer] = op_type
        self.layer_kind[layer] = kind
        self.root[layer] = group[0]
        self.group_out[layer] = group[-1]

    def act_inputs(self, v):
        """The activation arguments of the quantized op bound to ``v`` (compute/merge roots)."""
        call = self.value[v]
        if op_name(call) == "relax.concat":
            return [f for f in call.args[0].fields if isinstance(f, relax.Var)]
        if op_name(call) in ("relax.add", "relax.multiply", "relax.matmul"):
            return [a for a in call.args if isinstance(a, relax.Var)]     # constants join at the output scale
        return [call.args[0]]

    def bits_of_var(self, v):
        """Bits of the codes a quantized var holds: its layer's, through pass-through ops."""
        while True:
            layer = self.layer_of.get(v)
            if layer is None:
                return None
            if self.layer_kind[layer] != PASS:
                return self.bits_of_layer(layer)
            v = self.value[v].args[0]

    def bits_of_layer(self, layer):
        r = self.resolved.get(layer)
        return r.act_bits if r is not None else self.config.act_bits


def annotate(mod: tvm.IRModule, config: QConfig | None = None) -> tvm.IRModule:
    """Insert simulated-quantize markers into a prepared module (see the module docstring).

    Example::

        annotated = annotate(prepare(mod, params), QConfig())
        assert "relayq.simulated_quantize" in annotated.script()
    """
    config = config or QConfig()
    func = main_function(mod)
    plan = _Plan(func, config)

    # Which group outputs need an output marker: those read by a quantized op.
    needs_out_marker = set()
    for layer, out in plan.group_out.items():
        if plan.layer_kind[layer] == PASS:
            continue
        if plan.layer_kind[layer] == REGION:
            needs_out_marker.add(layer)     # a table maps codes to codes: its output needs a scale
            continue
        for i in plan.users.get(out, []):
            if plan.binds[i].var in plan.qdomain:
                needs_out_marker.add(layer)

    bb = relax.BlockBuilder()
    params = list(func.params)
    remap = {}                 # var -> its replacement for every user (output markers, renamed vars)
    in_marker = {}             # float var -> marker var, used only by quantized consumers
    raw = {}                   # var -> its emitted var before any output marker (region members read these)
    used_names = set(p.name for p in params)
    quantized_vars, layers_attr = [], []

    def fresh(name):
        base, k = name, 1
        while name in used_names:
            name = f"{base}_{k}"
            k += 1
        used_names.add(name)
        return name

    with bb.function("main", params, attrs=dict(func.attrs) if func.attrs is not None else None):
        with bb.dataflow():
            for b in plan.binds:
                v, call = b.var, b.value
                layer = plan.layer_of.get(v)
                local = dict(remap)
                if v in plan.region_root:
                    # Inside a region, members read each other unmarked: the region is one function of its root.
                    for a in vars_of(call):
                        if a in plan.region_root and a in raw and plan.region_root[a].same_as(plan.region_root[v]):
                            local[a] = raw[a]
                if layer is not None and plan.root[layer].same_as(v) and plan.layer_kind[layer] in (COMPUTE, MERGE):
                    bits = plan.bits_of_layer(layer)
                    for k, a in enumerate(plan.act_inputs(v)):
                        if a in plan.qdomain and plan.bits_of_var(a) == bits:
                            continue
                        if a not in in_marker:
                            src = remap.get(a, a)
                            in_marker[a] = bb.emit(make_marker(src, f"{layer}:in{k}", "act", bits), fresh(f"{layer}_in{k}"))
                        local[a] = in_marker[a]
                    if plan.layer_kind[layer] == COMPUTE:
                        r = plan.resolved[layer]
                        axis = -1
                        if r.per_channel:
                            axis = 0 if plan.layer_type[layer] == "conv2d" else 1
                        w = call.args[1]
                        wm = bb.emit(make_marker(w, f"{layer}:w", "weight", r.weight_bits, axis), fresh(f"{layer}_w"))
                        call = relax.Call(call.op, [call.args[0], wm], call.attrs, call.ty_args)
                new_value = substitute(call, local)
                if layer is not None:
                    vname = fresh(layer if plan.root[layer].same_as(v) and plan.layer_kind[layer] != PASS else v.name)
                    quantized_vars.append(vname)
                else:
                    vname = fresh(v.name)
                is_out = v in plan.output_vars
                emit = bb.emit_output if is_out and not isinstance(v, relax.DataflowVar) else bb.emit
                nv = emit(new_value, vname)
                remap[v] = nv
                raw[v] = nv
                if layer is not None and layer in needs_out_marker and plan.group_out[layer].same_as(v):
                    remap[v] = emit(make_marker(nv, f"{layer}:out", "act", plan.bits_of_layer(layer)), fresh(f"{layer}_out"))
            out = substitute(func.body.body, remap)
        bb.emit_func_output(out)
    new_mod = bb.get()
    new_func = new_mod["main"]
    for layer, t in plan.layer_type.items():
        if plan.layer_kind[layer] != PASS or t not in ("act", "reshape"):
            layers_attr.append(f"{layer}={t}")
    new_func = new_func.with_attr(QUANTIZED_ATTR, quantized_vars).with_attr(LAYERS_ATTR, layers_attr)
    if plan.region_layer:
        new_func = new_func.with_attr(REGIONS_ATTR, json.dumps({
            raw[r.out].name: {"layer": layer, "kind": r.kind, "axis": r.axis, "members": [raw[m].name for m in r.members]}
            for layer, r in plan.region_layer.items()}))
    if plan.sources:
        new_func = new_func.with_attr(LAYER_SOURCES_ATTR, json.dumps(
            {k: [s.framework, s.node, s.op_type, s.weight, s.bias] for k, s in plan.sources.items()}))
    result = tvm.IRModule({gv: (new_func if gv.name_hint == "main" else f) for gv, f in mod.functions_items()},
                          attrs=mod.attrs)
    _warn_float_ops(plan)
    return result


def point_tensors(prepared: tvm.IRModule, config: QConfig | None = None) -> dict:
    """Activation point name -> the variable of ``prepared``'s ``main`` whose float value it quantizes.

    Two annotations of the same prepared module (with different skip lists or bit widths) name their
    points differently (``conv2d_4:in0`` where ``conv2d_3:out`` was), but a point of each that maps
    to the same variable observes the same float tensor: its calibration statistics can be shared.

    >>> # point_tensors(prepared, QConfig())["conv2d_0:out"]   -> the Var of conv2d_0's ReLU output
    """
    config = config or QConfig()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FloatFallbackWarning)
        plan = _Plan(main_function(prepared), config)
    out = {}
    for layer, kind in plan.layer_kind.items():
        if kind == PASS:
            continue
        for k, a in enumerate(plan.act_inputs(plan.root[layer])):
            out[f"{layer}:in{k}"] = a
        out[f"{layer}:out"] = plan.group_out[layer]
    return out


def pass_through_source(prepared: tvm.IRModule, var):
    """The input variable of the data-movement / pooling op bound to ``var`` (None for any other op):
    the tensor whose quantization a max pool, reshape or average keeps."""
    value = {b.var: b.value for b in bindings(main_function(prepared))}.get(var)
    rule = RULES.get(op_name(value)) if value is not None else None
    if rule is None or op_name(value) in ("relax.nn.conv2d", "relax.matmul", "relax.add", "relax.concat"):
        return None
    src = value.args[0]
    return src if isinstance(src, relax.Var) else None


def _float_name(b) -> str | None:
    name = op_name(b.value)
    if name == "relax.call_tir":
        return f"call_tir({b.value.args[0].name_hint})"
    return None if name is None else name.replace("relax.", "")


def float_ops(plan_or_mod, config: QConfig | None = None) -> Counter:
    """Count the ops of ``main`` left in float (not quantized, not pure data movement).

    ``plan_or_mod``: annotate's plan, or a *prepared* module (planned here with ``config``).

    Example::

        >>> float_ops(prepare(mod, params))                 # doctest: +SKIP
        Counter({'nn.softmax': 6, 'nn.layer_norm': 13})
    """
    plan = plan_or_mod if isinstance(plan_or_mod, _Plan) else _Plan(main_function(plan_or_mod), config or QConfig())
    left = Counter()
    for b in plan.binds:
        name = op_name(b.value)
        if name is None or b.var in plan.qdomain or name in _QUIET_FLOAT_OPS:
            continue
        left[_float_name(b)] += 1
    return left


def float_groups(plan) -> list:
    """The ops left in float, grouped by the source node they came from, in graph order.

    Returns ``[(source or None, [op names])]``: one entry per source node (``(op_type, node name)``)
    where the frontend recorded it, and one entry holding the ops of unknown origin.
    """
    groups, unknown = {}, []
    for b in plan.binds:
        name = op_name(b.value)
        if name is None or b.var in plan.qdomain or name in _QUIET_FLOAT_OPS:
            continue
        entry = plan.var_source.get(b.var.name)
        if entry is None:
            unknown.append(_float_name(b))
        else:
            groups.setdefault((entry[1], entry[0]), []).append(_float_name(b))
    out = list(groups.items())
    if unknown:
        out.append((None, unknown))
    return out


def _warn_float_ops(plan) -> None:
    groups = float_groups(plan)
    if not groups:
        return
    parts = []
    for src, ops in groups:
        counts = Counter(ops)
        if src is None:
            parts.append(", ".join(f"{k} x{n}" for k, n in sorted(counts.items())))
            continue
        op_type, node = src
        n = len(ops)
        parts.append(f'{op_type} "{node}" ({n} op{"s" if n > 1 else ""}: {", ".join(sorted(counts))})')
    warnings.warn(f"relayq: ops left in float: {'; '.join(parts)}", FloatFallbackWarning, stacklevel=3)


def layers(mod: tvm.IRModule) -> dict:
    """The quantized layers of an annotated module: name -> op type.

    >>> # layers(annotated) == {"conv2d_0": "conv2d", "dense_0": "dense", ...}
    """
    attr = main_function(mod).attrs.get(LAYERS_ATTR)
    return dict(s.split("=", 1) for s in attr) if attr is not None else {}


def points(mod: tvm.IRModule) -> list:
    """The markers of an annotated module as ``(name, role, bits, axis)`` tuples, in graph order."""
    out = []
    for b in bindings(main_function(mod)):
        info = simq_info(b.value)
        if info is not None:
            out.append(info[1:])
    return out


def layer_sources(mod: tvm.IRModule) -> dict:
    """The user's names of each quantized layer of an annotated module: name -> :class:`LayerSource`.

    Empty where the model came without source names (a hand-built Relax module).

    >>> # layer_sources(annotated)["conv2d_0"].node == "/features/features.0/Conv"
    """
    attr = main_function(mod).attrs.get(LAYER_SOURCES_ATTR)
    if attr is None:
        return {}
    return {k: LayerSource(*v) for k, v in json.loads(str(attr)).items()}


def layer_aliases(mod: tvm.IRModule) -> dict:
    """relayq's layer name -> the user's names of it (ONNX node and weight names, torch module path).

    Any of them may be used in ``QConfig(skip_layers=..., layer_overrides=...)``.

    >>> # layer_aliases(annotated) == {"conv2d_0": ["/features/features.0/Conv", "onnx::Conv_20"], ...}
    """
    return {k: s.names() for k, s in layer_sources(mod).items()}


def describe_layer(mod: tvm.IRModule, name: str) -> str:
    """A layer or point (``"conv2d_3"``, ``"conv2d_3:w"``) named in relayq's and the user's terms.

    >>> # describe_layer(annotated, "conv2d_0:w") == 'conv2d_0:w (ONNX node "/.../Conv", weight "w0")'
    """
    return describe(name, layer_sources(mod).get(name.split(":", 1)[0]))


def regions(mod: tvm.IRModule) -> dict:
    """The elementwise regions of an annotated module: ``{output var name: {"layer", "kind", "axis", "members"}}``.

    >>> # regions(annotated) == {"elementwise_0": {"layer": "elementwise_0", "kind": "lut", "axis": None,
    >>> #                                           "members": ["lv3", "lv4", "elementwise_0"]}}
    """
    attr = main_function(mod).attrs.get(REGIONS_ATTR) if main_function(mod).attrs is not None else None
    return json.loads(str(attr)) if attr is not None else {}
