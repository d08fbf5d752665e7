"""Stage 1, prepare: bind params, fold BatchNorm into conv/dense, canonicalize, fold constants.

After ``prepare`` the ``main`` function takes only the data inputs; every weight is a constant, every
BatchNorm that follows a conv2d (with or without a bias add: the form both the ONNX and the PyTorch
frontends emit, which TVM's own ``FoldBatchnormToConv2D`` misses) is folded into the conv's weights
and bias, ``minimum(maximum(x, lo), hi)`` becomes ``clip(x, lo, hi)`` and ``maximum(x, 0)`` becomes
``relu(x)``.

Example::

    mod = relayq.transform.prepare(mod, params)
    print(mod)          # conv2d -> add(bias) -> relu ..., no batch_norm left
"""
from __future__ import annotations

import numpy as np
import tvm
from tvm import relax
from tvm.relax.dpl import is_const, is_op, is_tuple_get_item, rewrite_call, wildcard

from ..errors import ModelError
from ..utils import names as source_names
from .common import bindings, const_value, is_const_expr, main_function, map_functions, op_name, shape_of, vars_of

#: Ops whose second argument is a weight: a parameter missing from ``params`` there is a missing weight.
WEIGHT_CONSUMERS = ("relax.nn.conv2d", "relax.matmul", "relax.nn.batch_norm")


def input_names(mod: tvm.IRModule, params: dict | None) -> list:
    """Names of ``main``'s data inputs: the parameters that are not weights.

    A frontend marks them with the ``num_input`` attribute; otherwise every parameter not in
    ``params`` is an input.
    """
    func = main_function(mod)
    names = [p.name for p in func.params]
    num_input = func.attrs.get("num_input") if func.attrs is not None else None
    if num_input is not None:
        return names[: int(num_input)]
    params = params or {}
    return [n for n in names if n not in params]


def _check_missing_weights(func: relax.Function, inputs: list, params: dict) -> None:
    declared = {p.name for p in func.params}
    missing = [n for n in declared if n not in inputs and n not in params]
    if missing:
        raise ModelError(f"weight(s) missing from params: {sorted(missing)}")
    # Without a num_input attribute every unbound parameter counts as an input; a weight slot of
    # conv2d / matmul fed by one of them is then a missing weight, not a second input.
    inputs_set = set(inputs[1:])
    culprits = []
    producer = {}
    for block in func.body.blocks:
        for b in block.bindings:
            producer[b.var] = b.value

    def source(a):
        # Look through the layout ops a frontend puts between a weight and its consumer.
        while isinstance(a, relax.Var) and a in producer and isinstance(producer[a], relax.Call) \
                and getattr(producer[a].op, "name", "") in ("relax.permute_dims", "relax.reshape", "relax.astype"):
            a = producer[a].args[0]
        return a

    for e in producer.values():
        if isinstance(e, relax.Call) and isinstance(e.op, tvm.ir.Op) and e.op.name in WEIGHT_CONSUMERS + ("relax.add",):
            for a in e.args[1:]:
                a = source(a)
                if isinstance(a, relax.Var) and a.name in inputs_set:
                    culprits.append((e.op.name, a.name))
    if culprits:
        op, name = culprits[0]
        raise ModelError(f"weight {name!r} of {op} is missing from params")


def bind_params(mod: tvm.IRModule, params: dict | None) -> tvm.IRModule:
    """Bind ``params`` (name -> array) into ``main`` as constants, checking names, shapes and dtypes.

    >>> # mod = bind_params(mod, {"conv.weight": np.ones((4, 3, 3, 3), "float32")})
    """
    func = main_function(mod)
    params = dict(params or {})
    inputs = input_names(mod, params)
    _check_missing_weights(func, inputs, params)
    by_name = {p.name: p for p in func.params}
    bound = {}
    for name, value in params.items():
        if name not in by_name:
            continue            # extra entries (e.g. unused aux states) are harmless
        arr = value.numpy() if hasattr(value, "numpy") else np.asarray(value)
        ty = by_name[name].ty
        want = tuple(int(s) for s in ty.shape.values)
        if tuple(arr.shape) != want:
            raise ModelError(f"param {name!r} has shape {tuple(arr.shape)}, the model expects {want}")
        dtype = str(ty.dtype)
        if str(arr.dtype) != dtype:
            arr = arr.astype(dtype)
        bound[name] = tvm.runtime.tensor(np.require(arr, requirements="C"))
    if bound:
        mod = relax.transform.BindParams("main", bound)(mod)
    func = main_function(mod)
    if func.attrs is not None and "num_input" in func.attrs:
        mod["main"] = func.without_attr("num_input").without_attr("params") \
            if "params" in func.attrs else func.without_attr("num_input")
    return mod


def _fold_bn_rewriter(stats: dict | None = None):
    x, w, b = wildcard(), is_const(), is_const()
    g, beta, mean, var = is_const(), is_const(), is_const(), is_const()
    conv = is_op("relax.nn.conv2d")(x, w)
    conv_b = is_op("relax.add")(conv, b)
    bn = is_op("relax.nn.batch_norm")(conv_b | conv, g, beta, mean, var)
    pattern = is_tuple_get_item(bn, 0)

    def rewrite(expr, m):
        call = m[conv]
        if call.attrs.data_layout != "NCHW" or call.attrs.kernel_layout != "OIHW" or int(m[bn].attrs.axis) != 1 \
                or bool(m[bn].attrs.training):
            return expr             # a training-mode BN normalizes with batch statistics: not foldable
        eps = float(m[bn].attrs.epsilon)
        gamma, bet, mu, sig2 = (const_value(m[p]).astype(np.float64) for p in (g, beta, mean, var))
        scale = gamma / np.sqrt(sig2 + eps)
        bias = const_value(m[b]).astype(np.float64).reshape(-1) if b in m else 0.0
        weight = const_value(m[w]).astype(np.float64) * scale[:, None, None, None]
        new_bias = (bias - mu) * scale + bet
        if stats is not None:
            # The folded conv's output has mean ~beta and std ~|gamma| per channel (high-bias absorption).
            from .equalize import weight_key
            stats[weight_key(weight.astype("float32"))] = (bet.copy(), np.abs(gamma))
        y = relax.op.nn.conv2d(
            m[x], relax.const(weight.astype("float32")), strides=call.attrs.strides, padding=call.attrs.padding,
            dilation=call.attrs.dilation, groups=call.attrs.groups, data_layout="NCHW", kernel_layout="OIHW",
            out_layout=call.attrs.out_layout, out_dtype="float32")
        return relax.op.add(y, relax.const(new_bias.reshape(1, -1, 1, 1).astype("float32")))

    return pattern, rewrite


def _clip_rewriters():
    x, lo, hi = wildcard(), is_const(), is_const()
    mx = is_op("relax.maximum")(x, lo)
    both = is_op("relax.minimum")(mx, hi)

    def scalar(e):
        v = const_value(e)
        return float(v.reshape(-1)[0]) if v.size == 1 else None

    def rw_both(expr, m):
        a, b = scalar(m[lo]), scalar(m[hi])
        if a is None or b is None:
            return expr
        return relax.op.clip(m[x], a, b)

    def rw_max(expr, m):
        a = scalar(m[lo])
        if a is None or a != 0.0:
            return expr
        return relax.op.nn.relu(m[x])

    c, y = is_const(), wildcard()
    add_p, mul_p = is_op("relax.add")(c, y), is_op("relax.multiply")(c, y)
    const_first = add_p | mul_p

    def rw_swap(expr, m):
        # Commutative ops with the constant first (torch's linear emits add(bias, matmul)): put it second,
        # so that bias-add fusion sees the same form whatever the frontend.
        # DPL matches commutative ops in either order, so test the actual argument positions.
        # ``expr`` may be the bound variable rather than the call: read the call from the match.
        call = m[add_p] if add_p in m else m[mul_p]
        if not isinstance(call.args[0], tvm.ir.GenericConst) or isinstance(call.args[1], tvm.ir.GenericConst):
            return expr
        return relax.Call(call.op, [call.args[1], call.args[0]], call.attrs)

    px, alpha = wildcard(), is_const()
    gt = is_op("relax.greater")(px, is_const())
    neg = is_op("relax.multiply")(px, alpha)
    prelu_p = is_op("relax.where")(gt, px, neg)

    def rw_prelu(expr, m):
        # torch.export's PReLU / LeakyReLU: where(x > 0, x, x * alpha) -> the ops ONNX's PRelu / LeakyRelu give.
        call, g = m[prelu_p], m[gt]
        x = call.args[1]              # the variable (m[px] may be the call bound to it)
        if not (g.args[0].same_as(x) and m[neg].args[0].same_as(x)) \
                or float(const_value(g.args[1]).reshape(-1)[0]) != 0.0 or const_value(g.args[1]).size != 1:
            return expr
        a = const_value(m[alpha])
        shape = [int(v) for v in x.ty.shape.values]
        if a.size == 1:
            return relax.op.nn.leakyrelu(x, float(a.reshape(-1)[0]))
        if len(shape) >= 2 and a.size == shape[1] and a.ndim <= len(shape) and \
                [i for i, d in enumerate((1,) * (len(shape) - a.ndim) + a.shape) if d != 1] == [1]:
            return relax.op.nn.prelu(x, relax.const(a.reshape(-1).astype("float32")), axis=1)
        return expr

    return [(both, rw_both), (mx, rw_max), (const_first, rw_swap), (prelu_p, rw_prelu)]


def fold_batch_norm(mod: tvm.IRModule, stats: dict | None = None) -> tvm.IRModule:
    """Fold ``batch_norm(conv2d(x, W) [+ b])`` (inference mode, constant statistics) into conv2d + add.

    Remaining batch norms (not after a conv) are decomposed into elementwise float ops. A ``stats``
    dict receives, per folded weight (:func:`~relayq.transform.equalize.weight_key`), the BatchNorm's
    ``(beta, |gamma|)``.
    """
    mod = relax.transform.FoldConstant()(mod)
    pattern, rw = _fold_bn_rewriter(stats)
    mod = map_functions(mod, lambda f: rewrite_call(pattern, rw, f))
    mod = relax.transform.DecomposeOpsForInference()(mod)
    return mod


def _static_shape(e):
    try:
        return list(shape_of(e))
    except (AttributeError, TypeError, ValueError):
        return None


def _linear_nd_rewriters():
    """``matmul(x, W) [+ b]`` with ``x`` of rank > 2 and a constant 2-D ``W`` (a linear layer on
    ``(batch, tokens, features)``) becomes ``reshape(matmul(reshape(x, (-1, K)), W) [+ b], shape)``: the
    2-D dense that annotate quantizes and the backend has kernels for. Exact: the same dot products."""
    x, w, b = wildcard(), is_const(), is_const()
    mm = is_op("relax.matmul")(x, w)
    mm_b = is_op("relax.add")(mm, b)

    def flat(m):
        xs, ws = _static_shape(m[x]), _static_shape(m[w])
        # torch.export writes a linear on a non-contiguous input as a batched matmul whose weight has
        # leading unit dims ((1, K, N)): the same 2-D weight.
        if xs is None or ws is None or len(xs) <= 2 or len(ws) < 2 or len(ws) > len(xs) \
                or any(d != 1 for d in ws[:-2]) or xs[-1] != ws[-2] \
                or str(m[mm].attrs.out_dtype) not in ("", "void", "None", "float32"):
            return None
        rows = int(np.prod(xs[:-1]))
        weight = m[w] if len(ws) == 2 else relax.const(const_value(m[w]).reshape(ws[-2:]))
        y = relax.op.matmul(relax.op.reshape(m[x], (rows, ws[-2])), weight)
        return y, xs[:-1] + [ws[-1]]

    def rw_bias(expr, m):
        got = flat(m)
        bias = const_value(m[b])
        if got is None or bias.size != got[1][-1] or bias.ndim > len(got[1]) or \
                any(d != 1 for d in bias.shape[:-1]) or bias.shape[-1] != got[1][-1]:
            return expr
        y = relax.op.add(got[0], relax.const(bias.reshape(-1), str(bias.dtype)))
        return relax.op.reshape(y, got[1])

    def rw_plain(expr, m):
        got = flat(m)
        return expr if got is None else relax.op.reshape(got[0], got[1])

    # broadcast_to a tensor's own shape (torch.export's expand before a batched matmul) is a no-op.
    bx, bshape = wildcard(), wildcard()
    bcast = is_op("relax.broadcast_to")(bx, bshape)

    def rw_bcast(expr, m):
        src, dst = _static_shape(m[bx]), _static_shape(m[bcast])
        return m[bx] if src is not None and src == dst else expr

    return [(bcast, rw_bcast), (mm_b, rw_bias), (mm, rw_plain)]


def _split_stack_rewriters():
    """``split(x)[i]`` becomes one ``strided_slice`` per item and ``stack(xs, axis)`` an ``expand_dims``
    per input and a ``concat``: the same values, spelled with ops that annotate keeps integer (a tuple
    of tensors has no one scale). The LSTM / GRU converters write their gates and outputs this way."""
    x = wildcard()
    split = is_op("relax.split")(x)
    item = is_tuple_get_item(split)

    def rw_item(expr, m):
        call, shape = m[split], _static_shape(m[x])
        if shape is None:
            return expr
        axis = int(call.attrs.axis) % len(shape)
        ios = call.attrs.indices_or_sections
        if not isinstance(ios, (list, tuple, tvm.ir.Array)):
            n = int(ios)
            if n <= 0 or shape[axis] % n:
                return expr
            bounds = [shape[axis] // n * k for k in range(n + 1)]
        else:
            bounds = [0] + [min(int(i), shape[axis]) for i in ios] + [shape[axis]]
        k = int(expr.index)
        return relax.op.strided_slice(m[x], axes=[axis], begin=[bounds[k]], end=[bounds[k + 1]])

    fields = wildcard()
    stack = is_op("relax.stack")(fields)

    def rw_stack(expr, m):
        t = m[fields]
        if not isinstance(t, relax.Tuple) or any(_static_shape(f) is None for f in t.fields):
            return expr
        axis = int(m[stack].attrs.axis)
        rank = len(_static_shape(t.fields[0])) + 1
        axis %= rank
        return relax.op.concat([relax.op.expand_dims(f, [axis]) for f in t.fields], axis=axis)

    return [(item, rw_item), (stack, rw_stack)]


def canonicalize(mod: tvm.IRModule) -> tvm.IRModule:
    """Turn max/min pairs into ``clip``, ``maximum(x, 0)`` into ``relu``, put constants second, spell
    torch's ``where(x > 0, x, x * alpha)`` as ``nn.prelu`` / ``nn.leakyrelu`` (as ONNX's PRelu imports),
    flatten linear layers on N-D inputs to 2-D dense (see :func:`_linear_nd_rewriters`), and spell
    ``split`` / ``stack`` with slices and ``concat`` (see :func:`_split_stack_rewriters`)."""
    for pattern, rw in _clip_rewriters() + _split_stack_rewriters():
        mod = map_functions(mod, lambda f, p=pattern, r=rw: rewrite_call(p, r, f))
    mod = relax.transform.FoldConstant()(mod)    # permute_dims(W) of torch's linear becomes a constant
    for pattern, rw in _linear_nd_rewriters():
        mod = map_functions(mod, lambda f, p=pattern, r=rw: rewrite_call(p, r, f))
    return mod


def prepare(mod: tvm.IRModule, params: dict | None = None, config=None) -> tvm.IRModule:
    """Run the whole prepare stage: bind, fold BatchNorm, canonicalize, fold constants, clean up.

    With ``config.cross_layer_equalization`` (a :class:`~relayq.config.QConfig`) conv chains are then
    equalized (and biases absorbed with ``config.high_bias_absorption``), see
    :mod:`relayq.transform.equalize`.

    Example::

        prepared = prepare(mod, params)
        assert "batch_norm" not in prepared.script()
    """
    if not isinstance(mod, tvm.IRModule):
        raise ModelError(f"expected a Relax IRModule, got {type(mod).__name__}")
    record = source_names.read(main_function(mod))
    if record:
        mod, record = unique_binding_names(mod, record)
    before = main_function(mod)
    mod = bind_params(mod, params)
    mod = relax.transform.Normalize()(mod)
    cle = config is not None and config.cross_layer_equalization
    bn_stats = {} if cle and config.high_bias_absorption else None
    mod = fold_batch_norm(mod, bn_stats)
    mod = relax.transform.FoldConstant()(mod)
    mod = canonicalize(mod)
    mod = relax.transform.FoldConstant()(mod)
    mod = relax.transform.DeadCodeElimination(["main"])(mod)
    mod = relax.transform.ConvertToDataflow()(mod)
    if cle:
        from .equalize import equalize

        mod, report = equalize(mod, config.cle_replace_relu6, config.high_bias_absorption, bn_stats)
        if config.show_progress:
            from ..utils.log import get_logger

            skipped = f", {len(report['skipped'])} ReLU6 chains left alone" if report["skipped"] else ""
            absorbed = f", biases absorbed in {report['absorbed']}" if config.high_bias_absorption else ""
            get_logger("prepare").info(f"cross-layer equalization: {report['chains']} conv chains in "
                                       f"{report['sweeps']} sweeps{skipped}{absorbed}")
    if record:
        mod = source_names.attach(mod, carry_source_names(record, before, main_function(mod)))
    return mod


@relax.expr_functor.mutator
class _RenameBindings(relax.PyExprMutator):
    """Re-emit every binding of a function under the name ``names[old name]``."""

    def __init__(self, mod, names: dict):
        super().__init__(mod)
        self.names = names

    def visit_var_binding_(self, binding):
        value = self.visit_expr(binding.value)
        kind = relax.DataflowVar if isinstance(binding.var, relax.DataflowVar) else relax.Var
        new = kind(self.names.get(binding.var.name, binding.var.name), binding.var.ty)
        self.builder_.emit_normalized(relax.VarBinding(new, value))
        self.set_var_remap(binding.var, new)


#: Suffix of the binding names :func:`unique_binding_names` gives: TVM names the bindings its passes
#: create ``lv``, ``lv1``, ``lv2_1`` ..., never with this suffix.
SOURCE_SUFFIX = "_src"


def unique_binding_names(mod: tvm.IRModule, record: dict) -> tuple:
    """Rename ``main``'s bindings so that no binding a later pass creates can take one of their names.

    The source-name record is keyed by binding names. The frontends name bindings ``lv<k>``, and so do
    the passes of prepare for the bindings they create (BatchNorm folding re-emits every conv it folds):
    a new conv named ``lv4`` would inherit the record of the frontend's ``lv4``, another node. Renamed to
    ``lv4_src``, the frontend's bindings keep their records and new bindings start without one.
    Returns ``(module, record re-keyed to the new names)``.

    Example::

        mod, record = unique_binding_names(mod, source_names.read(mod["main"]))
    """
    func = main_function(mod)
    taken = {p.name for p in func.params}
    names = {}
    for b in bindings(func):
        new, k = b.var.name + SOURCE_SUFFIX, 1
        while new in taken:
            new, k = f"{b.var.name}{SOURCE_SUFFIX}{k}", k + 1
        taken.add(new)
        names[b.var.name] = new
    renamed = _RenameBindings(mod, names).visit_expr(func)
    out = tvm.IRModule(dict(mod.functions_items()), attrs=mod.attrs)
    out[out.get_global_var("main")] = renamed
    record = dict(record, vars={names.get(k, k): v for k, v in record.get("vars", {}).items()})
    return source_names.attach(out, record), record


_LAYOUT_OPS = ("relax.permute_dims", "relax.reshape", "relax.astype")
_COMPUTE_OPS = ("relax.nn.conv2d", "relax.matmul")


def carry_source_names(record: dict, before: relax.Function, after: relax.Function) -> dict:
    """Re-key a frontend's source-name record (see :mod:`relayq.utils.names`) from ``before`` to ``after``.

    The weights' parameters disappear when they are bound, so each binding that reads one (through the
    layout ops a frontend puts in between) takes the user's name of that weight. Bindings keep their
    names through prepare except where BatchNorm folding rebuilt them; conv2d / matmul layers are then
    matched by their order, which folding keeps.
    """
    params = record.get("params", {})
    entries = {k: [v[0], v[1], list(v[2])] for k, v in record.get("vars", {}).items()}
    producer = {b.var: b.value for b in bindings(before)}

    def source(a):
        while isinstance(a, relax.Var) and op_name(producer.get(a)) in _LAYOUT_OPS:
            a = producer[a].args[0]
        return a

    compute_before = []
    for b in bindings(before):
        read = [source(a) for a in vars_of(b.value)]
        weights = [params[a.name] for a in read if isinstance(a, relax.Var) and a.name in params]
        if weights:
            entry = entries.setdefault(b.var.name, [weights[0][1], weights[0][2], []])
            entry[2] += [w[0] for w in weights if w[0] not in entry[2]]
        w = source(b.value.args[1]) if op_name(b.value) in _COMPUTE_OPS else None
        if isinstance(w, relax.Var) and w.name in params:
            compute_before.append(b.var.name)
    after_binds = bindings(after)
    compute_after = [b.var.name for b in after_binds if op_name(b.value) in _COMPUTE_OPS
                     and is_const_expr(b.value.args[1])]
    if len(compute_before) == len(compute_after):
        moved = {a: entries[b] for a, b in zip(compute_after, compute_before) if b in entries}
        entries.update(moved)
    alive = {b.var.name for b in after_binds}
    return {"framework": record.get("framework"), "vars": {k: v for k, v in entries.items() if k in alive}}
