"""Elementwise regions: subgraphs that compute a function of ONE tensor, element by element.

An activation reaches relayq in many spellings: ``R.sigmoid(x)``, SiLU as ``x * sigmoid(x)``,
hardswish as ``x * clip(x + 3, 0, 6) / 6`` (ONNX) or ``clip(x + 3, 0, 6) * x / 6`` (torch), GELU as
``x * (erf(x / sqrt 2) + 1) * 0.5`` or ``R.nn.gelu``, Mish and softplus as ``exp / log / where``
chains, a BatchNorm that follows no conv as ``(x - mean) / std * gamma + beta``. Instead of one
pattern per function, relayq finds every *region*: a connected set of elementwise ops whose only
tensor input is one variable (the *root*) and whose other operands are constants. A region is then
realized by one of two integer rules:

* ``"lut"``: every constant is a scalar, so the region is a function ``f: R -> R`` applied to each
  element. Its table over all ``2^bits`` input codes (:func:`relayq.qmath.lut_table`) is looked up;
* ``"affine"``: the region is ``y = a_c * g(x) + b_c`` with per-channel constants ``a``, ``b`` and
  ``g`` the identity or a (P/Leaky)ReLU applied to the root itself (a standalone BatchNorm, a
  per-channel scale, PReLU with a slope per channel): an integer per-channel multiplier, one for each
  sign of the input, plus an offset (:func:`relayq.qmath.channel_affine`).

The table :data:`FUNCS` maps each Relax op to its numpy float function (evaluated in float64) and its
*kind*, which decides how it may combine in a region. Everything relayq does with a region (annotate's
decision, realize's table, the simulated module, the numpy reference) evaluates the same
:func:`region_function`, so all of them agree on the integers.

Example::

    regions = find_regions(bindings(main_function(mod)))
    for out, r in regions.items():
        print(out.name, r.kind, [m.name for m in r.members])
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from tvm import relax

from .common import const_value, is_const_expr, op_name, shape_of, vars_of

# Op kinds: how an op combines inside a region.
UNARY = "unary"          # any function of its one tensor operand (scalar constants allowed): LUT only
AFFINE = "affine"        # add / subtract / multiply / divide with a constant, negative: may carry channel constants
ACT = "act"              # relu / clip: handled by relayq's clip rule when alone, part of a table inside a region
PRELU = "prelu"          # a (leaky/parametric) ReLU: kink at 0, so affine per channel when applied to the root
COMPARE = "compare"      # greater ...: boolean intermediate (torch's where-based softplus / PReLU)
WHERE = "where"          # select

_erf = np.vectorize(math.erf, otypes=[np.float64])


def _gelu(x):
    return 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0)))


def _gelu_tanh(x):
    return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def _sigmoid(x):
    with np.errstate(over="ignore"):
        return 1.0 / (1.0 + np.exp(-x))


def _softplus(x, attrs):
    beta, threshold = float(attrs.beta), float(attrs.threshold)
    with np.errstate(over="ignore"):
        soft = np.log1p(np.exp(beta * x)) / beta
    return np.where(beta * x > threshold, x, soft)


def _clip(call, x):
    return np.clip(x, float(call.args[1].value), float(call.args[2].value))


def _prelu_fn(call, x, alpha):
    alpha = np.asarray(alpha, np.float64)
    if alpha.size == 1:
        return np.where(x >= 0, x, float(alpha.reshape(-1)[0]) * x)
    shape = [1] * x.ndim
    shape[int(call.attrs.axis) % x.ndim] = -1
    return np.where(x >= 0, x, alpha.reshape(shape) * x)


def _elu_like(x, alpha, scale=1.0):
    with np.errstate(over="ignore"):
        return scale * np.where(x > 0, x, alpha * (np.exp(np.minimum(x, 0)) - 1.0))


def _safe(fn):
    def run(*a):
        with np.errstate(all="ignore"):
            return fn(*a)
    return run


#: Relax op -> (kind, numpy function(call, *operands in float64)). The float function of a region is
#: composed from these; an op missing here ends a region (it stays float unless another rule takes it).
FUNCS = {
    "relax.sigmoid": (UNARY, lambda c, x: _sigmoid(x)),
    "relax.tanh": (UNARY, lambda c, x: np.tanh(x)),
    "relax.exp": (UNARY, _safe(lambda c, x: np.exp(x))),
    "relax.erf": (UNARY, lambda c, x: _erf(x)),
    "relax.log": (UNARY, _safe(lambda c, x: np.log(x))),
    "relax.sqrt": (UNARY, _safe(lambda c, x: np.sqrt(x))),
    "relax.rsqrt": (UNARY, _safe(lambda c, x: 1.0 / np.sqrt(x))),
    "relax.abs": (UNARY, lambda c, x: np.abs(x)),
    "relax.square": (UNARY, lambda c, x: x * x),
    "relax.sin": (UNARY, lambda c, x: np.sin(x)),
    "relax.cos": (UNARY, lambda c, x: np.cos(x)),
    "relax.atan": (UNARY, lambda c, x: np.arctan(x)),
    "relax.floor": (UNARY, lambda c, x: np.floor(x)),
    "relax.ceil": (UNARY, lambda c, x: np.ceil(x)),
    "relax.round": (UNARY, lambda c, x: np.round(x)),
    "relax.sign": (UNARY, lambda c, x: np.sign(x)),
    "relax.power": (UNARY, _safe(lambda c, x, y: np.power(x, y))),
    "relax.maximum": (UNARY, lambda c, x, y: np.maximum(x, y)),
    "relax.minimum": (UNARY, lambda c, x, y: np.minimum(x, y)),
    "relax.nn.gelu": (UNARY, lambda c, x: _gelu(x)),
    "relax.nn.gelu_tanh": (UNARY, lambda c, x: _gelu_tanh(x)),
    "relax.nn.silu": (UNARY, lambda c, x: x * _sigmoid(x)),
    "relax.nn.softplus": (UNARY, lambda c, x: _softplus(x, c.attrs)),
    "relax.nn.selu": (UNARY, lambda c, x: _elu_like(x, 1.6732632423543772, 1.0507009873554805)),
    "relax.nn.relu": (ACT, lambda c, x: np.maximum(x, 0.0)),
    "relax.nn.relu6": (ACT, lambda c, x: np.clip(x, 0.0, 6.0)),
    "relax.clip": (ACT, lambda c, x, *_: _clip(c, x)),
    "relax.nn.leakyrelu": (PRELU, lambda c, x: np.where(x >= 0, x, float(c.attrs.alpha) * x)),
    "relax.nn.prelu": (PRELU, _prelu_fn),
    "relax.add": (AFFINE, lambda c, x, y: x + y),
    "relax.subtract": (AFFINE, lambda c, x, y: x - y),
    "relax.multiply": (AFFINE, lambda c, x, y: x * y),
    "relax.divide": (AFFINE, _safe(lambda c, x, y: x / y)),
    "relax.negative": (AFFINE, lambda c, x: -x),
    "relax.greater": (COMPARE, lambda c, x, y: x > y),
    "relax.greater_equal": (COMPARE, lambda c, x, y: x >= y),
    "relax.less": (COMPARE, lambda c, x, y: x < y),
    "relax.less_equal": (COMPARE, lambda c, x, y: x <= y),
    "relax.where": (WHERE, lambda c, cond, x, y: np.where(cond, x, y)),
}
#: Ops that never start a region on their own: alone they are relayq's exact clip rule on codes.
_CLIP_OPS = ("relax.nn.relu", "relax.nn.relu6", "relax.clip")

# Region classes while growing: "lin" is piecewise linear with its only kink at 0 and f(0) = 0 (the
# root itself, a PReLU of it, scaled by scalars); "scalar" any function with scalar constants (a
# table); "channel" a per-channel affine of a "lin" value (constants along one axis).
LIN, SCALAR, CHANNEL = "lin", "scalar", "channel"


@dataclass
class _Info:
    root: object                 # the root var
    cls: str                     # LIN | SCALAR | CHANNEL
    axis: int | None = None      # channel axis of CHANNEL
    zero_at_zero: bool = True    # f(0) == 0 (LIN only; an added constant breaks it)


@dataclass
class Region:
    """One region: ``members`` (the bindings' vars, in graph order, ``out`` last) compute a function of ``root``."""

    root: object
    out: object
    members: list
    kind: str                    # "lut" | "affine"
    axis: int | None = None      # channel axis of an "affine" region with per-channel constants
    ops: list = field(default_factory=list)


def is_prim(e) -> bool:
    """True for an immediate operand (a clip bound: IntImm / FloatImm), which is an attribute, not a tensor."""
    return not isinstance(e, relax.Var) and not is_const_expr(e) and isinstance(getattr(e, "value", None), (int, float))


_is_prim = is_prim


def _const_class(c, out_shape):
    """``("scalar", None)``, ``("channel", axis)`` or None for a constant operand of a region op."""
    if _is_prim(c):
        return "scalar", None
    if not is_const_expr(c):
        return None
    v = const_value(c)
    if v.size == 1:
        return "scalar", None
    nd = len(out_shape)
    if v.ndim > nd:
        return None
    shape = (1,) * (nd - v.ndim) + tuple(v.shape)
    big = [i for i, s in enumerate(shape) if s != 1]
    if len(big) != 1 or shape[big[0]] != out_shape[big[0]]:
        return None
    return "channel", big[0]


def _float_tensor(e) -> bool:
    ty = getattr(e, "ty", None)
    return isinstance(ty, relax.TensorType) and str(ty.dtype) in ("float32", "bool") and ty.shape is not None \
        and hasattr(ty.shape, "values")


def _grow(binds, users, excluded):
    """The root and class of every var that belongs to a region (program order, one pass)."""
    info = {}
    value = {b.var: b.value for b in binds}
    for b in binds:
        v, call = b.var, b.value
        name = op_name(call)
        if name not in FUNCS or v in excluded or not _float_tensor(v):
            continue
        kind = FUNCS[name][0]
        out_shape = shape_of(v)
        tensors, consts = [], []
        ok = True
        for k, a in enumerate(call.args):
            if isinstance(a, relax.Var):
                tensors.append(a)
            elif name == "relax.nn.prelu" and k == 1 and is_const_expr(a):
                # the slope is a vector along attrs.axis, not numpy-broadcast from the right
                n, ax = const_value(a).size, int(call.attrs.axis) % len(out_shape)
                if n == 1:
                    consts.append(("scalar", None))
                elif n == out_shape[ax]:
                    consts.append(("channel", ax))
                else:
                    ok = False
                    break
            else:
                cc = _const_class(a, out_shape)
                if cc is None:
                    ok = False
                    break
                consts.append(cc)
        if not ok or not tensors:
            continue
        roots = set()
        for a in tensors:
            if a in info:
                roots.add(info[a].root)
            elif _float_tensor(a) and str(a.ty.dtype) == "float32" and shape_of(a) == out_shape:
                roots.add(a)
            else:
                roots.add(None)
        if len(roots) != 1 or None in roots:
            continue
        root = roots.pop()
        if str(root.ty.dtype) != "float32" or shape_of(root) != out_shape:
            continue
        ins = [info.get(a, _Info(root, LIN)) for a in tensors]
        chan = [ax for k, ax in consts if k == "channel"]
        new = _combine(kind, name, call, root, tensors, ins, chan, value, info, users, out_shape)
        if new is None and len({id(t) for t in tensors}) == 1 and tensors[0] in info \
                and str(tensors[0].ty.dtype) == "float32" and shape_of(tensors[0]) == out_shape:
            # It cannot join its operand's region (a PReLU after a standalone BatchNorm): it starts a new
            # region on that operand, which becomes the first region's output (with its own scale).
            a = tensors[0]
            new = _combine(kind, name, call, a, [a], [_Info(a, LIN)], chan, value, info, users, out_shape)
        if new is not None:
            info[v] = new
    return info


def _combine(kind, name, call, root, tensors, ins, chan, value, info, users, out_shape):
    """The class of an op's result from its operands' classes, or None where it ends the region."""
    axes = {i.axis for i in ins if i.cls == CHANNEL} | set(chan)
    if len(axes) > 1:
        return None
    axis = axes.pop() if axes else None
    classes = {i.cls for i in ins}
    if kind == ACT:
        a = tensors[0]
        if a not in info and len(users.get(a, [])) == 1:
            return None          # a ReLU/clip that a conv / add layer absorbs as its fused activation
        return _Info(root, SCALAR) if CHANNEL not in classes else None
    if kind == PRELU:
        if not tensors[0].same_as(root):
            return _Info(root, SCALAR) if not chan and CHANNEL not in classes else None
        return _Info(root, CHANNEL, axis) if chan else _Info(root, LIN)
    if kind == AFFINE and len(tensors) == 1:
        src = ins[0]
        first = call.args[0].same_as(tensors[0])
        if name == "relax.divide" and not first:
            return _Info(root, SCALAR) if not chan and src.cls != CHANNEL else None     # c / x: not affine
        adds = name in ("relax.add", "relax.subtract")
        if src.cls == SCALAR:
            return _Info(root, SCALAR) if not chan else None
        if src.cls == LIN and not chan:
            return _Info(root, LIN, None, src.zero_at_zero and not adds)
        return _Info(root, CHANNEL, axis)
    if kind == WHERE:
        # torch's PReLU: where(x > 0, x, x * alpha_c)
        cond = value.get(tensors[0]) if len(tensors) == 3 else None
        if cond is not None and op_name(cond) == "relax.greater" and cond.args[0].same_as(root) \
                and _is_zero(cond.args[1]) and tensors[1].same_as(root) and ins[2].cls in (LIN, CHANNEL) \
                and ins[2].zero_at_zero and _is_pure_scaling(tensors[2], root, value):
            return _Info(root, CHANNEL, axis) if ins[2].cls == CHANNEL else _Info(root, LIN)
    if CHANNEL in classes or chan:
        return None
    return _Info(root, SCALAR)


def _is_zero(c) -> bool:
    return is_const_expr(c) and const_value(c).size == 1 and float(const_value(c).reshape(-1)[0]) == 0.0


def _is_pure_scaling(v, root, value) -> bool:
    """``v`` is ``root`` times / divided by constants only (so ``where(x > 0, x, v)`` is a PReLU)."""
    while not v.same_as(root):
        call = value.get(v)
        if op_name(call) not in ("relax.multiply", "relax.divide") or not isinstance(call.args[0], relax.Var) \
                or isinstance(call.args[1], relax.Var):
            return False
        v = call.args[0]
    return True


def _ancestors(out, info, value):
    """Vars of the region ending at ``out``: its operands with the same root, transitively (graph order)."""
    root = info[out].root
    seen, stack = set(), [out]
    while stack:
        v = stack.pop()
        if v in seen:
            continue
        seen.add(v)
        for a in value[v].args:
            if isinstance(a, relax.Var) and a in info and info[a].root.same_as(root):
                stack.append(a)
    return seen


def find_regions(binds, output_vars=(), boundaries=()) -> dict:
    """Every region of a function's bindings: ``{out var: Region}``.

    A var belongs to a region when its op is in :data:`FUNCS` and it reads one root (directly or
    through other members) plus constants. A region's output is a member read outside the region (or
    returned). ``boundaries`` are vars that must not join a region (e.g. a conv's bias add, which its
    layer absorbs). A region made of relu / clip only is left to relayq's clip rule.
    """
    value = {b.var: b.value for b in binds}
    order = {b.var: i for i, b in enumerate(binds)}
    users = {}
    for b in binds:
        for a in vars_of(b.value):
            users.setdefault(a, []).append(b.var)
    outputs_set = set(output_vars)
    excluded = set(boundaries)
    while True:
        info = _grow(binds, users, excluded)
        regions, again = {}, False
        for v, i in info.items():
            us = users.get(v, [])
            if v not in outputs_set and us and all(u in info and info[u].root.same_as(i.root) for u in us):
                continue
            members = sorted(_ancestors(v, info, value), key=order.__getitem__)
            ops = [op_name(value[m]) for m in members]
            if str(v.ty.dtype) != "float32" or all(o in _CLIP_OPS for o in ops):
                excluded.update(members)           # not a function to tabulate: leave them to the other rules
                again = True
                continue
            # Per-tensor functions become tables; per-channel constants need the integer affine rule.
            kind = "affine" if i.cls == CHANNEL else "lut"
            regions[v] = Region(i.root, v, members, kind, i.axis if i.cls == CHANNEL else None, ops)
        if not again:
            return regions


def region_function(member_bindings, root):
    """The float function of a region: ``f(x)`` with ``x`` the root's values (float64, any shape that
    broadcasts with the region's constants) evaluating each member's op from :data:`FUNCS` in order.

    >>> # f = region_function([(v, call), ...], root); f(np.linspace(-4, 4, 9))
    """
    steps = list(member_bindings)

    def f(x):
        env = {root: np.asarray(x, np.float64)}
        for v, call in steps:
            args = []
            for a in call.args:
                if isinstance(a, relax.Var):
                    args.append(env[a])
                elif _is_prim(a):
                    args.append(None)
                else:
                    c = const_value(a).astype(np.float64)
                    args.append(c.reshape(()) if c.size == 1 else c)
            env[v] = FUNCS[op_name(call)][1](call, *args)
        out = env[steps[-1][0]]
        return np.asarray(out, np.float64)

    return f


def affine_params(fn, shape, axis):
    """Per-channel ``(a_pos, a_neg, b)`` of a piecewise-affine region function ``f(x) = b + a_pos x`` for
    ``x >= 0`` and ``b + a_neg x`` below, by evaluating it at -1, 0, 1 (exact for such functions).

    >>> a_pos, a_neg, b = affine_params(lambda x: np.where(x >= 0, 2 * x, 0.5 * x) + 1, (1, 3, 2, 2), None)
    >>> float(a_pos[0]), float(a_neg[0]), float(b[0])
    (2.0, 0.5, 1.0)
    """
    if axis is None:
        probe_shape = (1,)
    else:
        probe_shape = [1] * len(shape)
        probe_shape[axis] = shape[axis]
    vals = {}
    for t in (-1.0, 0.0, 1.0):
        out = np.broadcast_to(fn(np.full(probe_shape, t)), probe_shape)
        vals[t] = np.asarray(out, np.float64).reshape(-1)
    b = vals[0.0]
    return vals[1.0] - b, b - vals[-1.0], b


def region_bindings(func_bindings, names):
    """``[(var, call)]`` of the bindings named ``names`` (an annotated module's region members)."""
    by_name = {b.var.name: b for b in func_bindings}
    return [(by_name[n].var, by_name[n].value) for n in names]


def root_of(member_bindings):
    """The one var the members read that is not a member (the region's input)."""
    members = {v for v, _ in member_bindings}
    roots = []
    for _, call in member_bindings:
        for a in call.args:
            if isinstance(a, relax.Var) and a not in members and not any(a.same_as(r) for r in roots):
                roots.append(a)
    if len(roots) != 1:
        raise ValueError(f"an elementwise region must read one tensor, got {[r.name for r in roots]}")
    return roots[0]
