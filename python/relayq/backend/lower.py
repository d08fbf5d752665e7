"""Replace realized integer layers (and fp32 conv/dense layers) with relayq's fused kernels.

:func:`lower_quantized` finds, in every Relax function of a module, the chain the ``realize`` pass emits
per quantized layer::

    acc = conv2d(xq, Wq, ..., out_dtype="int32") | matmul(xq, WqT, out_dtype="int32")
    acc = add(acc, Bq)  ->  astype int64  ->  multiply Mc  ->  add Rc  ->  right_shift Sc
        ->  clip(lo, hi)  ->  astype int8

(``Wq``, ``Bq``, ``Mc``, ``Rc``, ``Sc`` constants) and replaces the whole chain with one
``relax.call_tir`` of a scheduled PrimFunc that computes it bit-exactly (int8 in, int8 out; the
int32 accumulator never leaves registers). :func:`lower_float` does the same for fp32
``conv2d / matmul (+ add bias) (+ relu | clip)`` chains, for a fairly scheduled FP32 baseline.
The realized integer add of two quantized tensors (a residual connection: ``astype int64 -> subtract
zp -> multiply -> rounding shift`` per operand, add, rounding shift, clip, cast; see
:class:`relayq.backend.generic.AddRequant`) is fused into the epilogue of the x86 int8 conv producing
one operand when that conv output has no other user, else lowered to the standalone parallel,
vectorized :func:`relayq.backend.generic.add_int8` (int32 arithmetic where provably exact); see
:data:`RESIDUAL_ADD`. Realized elementwise regions (``take(table, astype(q, int32) - qmin)``) and
products of two quantized tensors (``astype(a, int32) * astype(b, int32)`` -> requant -> int8, the
squeeze-excitation gate) get the kernels of :mod:`relayq.backend.elementwise`. Everything else is
left as is (TVM legalizes it).

The kernel family comes from the target kind:

* ``"x86-avx2"``: :mod:`relayq.backend.x86` with the AVX2 intrinsics,
* ``"x86-vnni"``: :mod:`relayq.backend.x86` with AVX-512 VNNI,
* ``"cuda-dp4a"``: :mod:`relayq.backend.cuda` (DP4A; fp32 chains are left to TVM's dlight),
* ``"arm-dotprod"``: :mod:`relayq.backend.x86`'s tiling with the AArch64 ``sdot`` intrinsic,
* ``"generic"``: :mod:`relayq.backend.generic` (portable schedules, no intrinsics).

Whether an int8 input is non-negative (which allows the fast u8 x s8 AVX2 path, see
:mod:`relayq.backend.intrin`) is proven from the graph: the producer is a clip with ``lo >= 0``
(the realized requant chain of a layer with a fused ReLU), a ReLU, or a max_pool2d / reshape /
flatten / concat of such values.

Example::

    import tvm
    from relayq.backend.lower import lower_quantized, relax_pipeline, target_from_preset
    lowered = lower_quantized(realized_mod, "x86-avx2")
    target = target_from_preset("x86-avx2")
    ex = tvm.compile(lowered, target=target, relax_pipeline=relax_pipeline(target))
"""
from __future__ import annotations

import itertools

import numpy as np
import tvm
from tvm import relax

from . import generic
from .generic import Requant
from .presets import best_host_preset, relax_pipeline, target_from_preset  # noqa: F401  (re-exported API)

TARGET_KINDS = ("x86-avx2", "x86-vnni", "cuda-dp4a", "arm-dotprod", "generic")
# How realized integer adds (residual connections) are lowered: "fuse" into the epilogue of the x86 int8
# conv producing one operand (when that conv output has no other user; else, and on the generic
# preset, as "standalone"), "standalone" (generic.add_int8, parallel + vectorized), or None (left to TVM).
RESIDUAL_ADD = "fuse"
# The tensorized CPU kernels of relayq.backend.x86 serve AArch64 +dotprod too (isa "sdot").
_X86_ISA = {"x86-avx2": "avx2", "x86-vnni": "vnni", "arm-dotprod": "sdot"}
# Ops through which a non-negative value stays non-negative (they only move or select elements).
_SIGN_PRESERVING = ("relax.nn.max_pool2d", "relax.reshape", "relax.flatten", "relax.permute_dims",
                    "relax.squeeze", "relax.expand_dims", "relax.astype", "relax.nn.relu")


def _op(expr):
    if isinstance(expr, relax.Call) and isinstance(expr.op, tvm.ir.Op):
        return expr.op.name
    return None


def _is_const(e):
    return isinstance(e, tvm.ir.GenericConst)


def _np(e):
    return e.value.numpy()


def _dtype(e):
    return str(e.ty.dtype)


def _shape(e):
    try:
        return tuple(int(v) for v in e.ty.shape.values)
    except (AttributeError, TypeError):
        return None


def _prim_num(e):
    """The Python number of a clip bound (an IntImm/FloatImm, possibly wrapped in a PrimValue)."""
    v = e
    for _ in range(3):
        if isinstance(v, (int, float)):
            break
        v = v.value
    return v


def _prim_int(e):
    return int(_prim_num(e))


class _Graph:
    """Bindings, use counts and the non-negativity facts of one Relax function."""

    def __init__(self, func):
        self.var2val = {}
        self.uses = {}
        self.order = []
        for block in func.body.blocks:
            for b in block.bindings:
                if isinstance(b, relax.VarBinding):
                    self.var2val[b.var] = b.value
                    self.order.append(b.var)
                    self._count(b.value)
        self._count(func.body.body)
        self.nonneg = set()
        for v in self.order:
            if self._value_nonneg(self.var2val[v]):
                self.nonneg.add(v)

    def _count(self, e):
        if isinstance(e, relax.Var):
            self.uses[e] = self.uses.get(e, 0) + 1
        elif isinstance(e, relax.Call):
            for a in e.args:
                self._count(a)
        elif isinstance(e, relax.Tuple):
            for f in e.fields:
                self._count(f)
        elif isinstance(e, relax.TupleGetItem):
            self._count(e.tuple_value)

    def producer(self, e):
        """The bound value of a var (None for params and non-vars)."""
        return self.var2val.get(e) if isinstance(e, relax.Var) else None

    def single_use(self, e):
        return isinstance(e, relax.Var) and self.uses.get(e, 0) == 1 and e in self.var2val

    def is_nonneg(self, e) -> bool:
        if isinstance(e, relax.Var):
            return e in self.nonneg
        return self._value_nonneg(e)

    def _value_nonneg(self, val) -> bool:
        name = _op(val)
        if name is None:
            if isinstance(val, relax.Tuple):
                return all(self.is_nonneg(f) for f in val.fields)
            return False
        if name == "relax.nn.relu":
            return True
        if name == "relax.clip":
            try:
                # compared as a number: a float clip may be open below (-inf, ONNX Clip with only a max)
                if _prim_num(val.args[1]) >= 0:
                    return True
            except (TypeError, ValueError, AttributeError):
                pass
            return self.is_nonneg(val.args[0])
        if name == "relax.concat":
            t = val.args[0]
            t = self.producer(t) if isinstance(t, relax.Var) else t
            return isinstance(t, relax.Tuple) and all(self.is_nonneg(f) for f in t.fields)
        if name in _SIGN_PRESERVING:
            return self.is_nonneg(val.args[0])
        return False


# ----------------------------------------------------------------------------- chain matching
class _IntChain:
    def __init__(self, kind, x, weight, bias, rq, attrs, out_shape):
        self.kind, self.x, self.weight, self.bias, self.rq = kind, x, weight, bias, rq
        self.attrs, self.out_shape = attrs, out_shape


def _walk(g, e, op_name, interior):
    """The producer call of ``e`` when it is ``op_name`` and ``e`` has no other user."""
    val = g.producer(e)
    if val is None or _op(val) != op_name or not g.single_use(e):
        return None
    interior.append(e)
    return val


def _widened_codes(g, t, dtype: str, inner: list):
    """``astype(q, dtype) [- c]`` ending at ``t``: ``(q, c)`` (``c`` = 0 without the subtract), or None."""
    offset = 0
    if _op(g.producer(t)) == "relax.subtract":
        sub = _walk(g, t, "relax.subtract", inner)
        if sub is None or _scalar(sub.args[1]) is None:
            return None
        t, offset = sub.args[0], _scalar(sub.args[1])
    cast = _walk(g, t, "relax.astype", inner)
    if cast is None or str(cast.attrs.dtype) != dtype:
        return None
    return cast.args[0], offset


def _bias_add(g, e, inner):
    """``(accumulator var, int32 bias const or None)`` for ``add(acc, Bq)`` or a bare ``acc`` (no bias)."""
    val = g.producer(e)
    if _op(val) == "relax.add":
        add_b = _walk(g, e, "relax.add", inner)
        if add_b is None or not _is_const(add_b.args[1]) or _dtype(add_b.args[1]) != "int32":
            return None, None
        return add_b.args[0], add_b.args[1]
    if _op(val) in ("relax.nn.conv2d", "relax.matmul"):
        return e, None
    return None, None


def _requant_tail(g: _Graph, head, inner: list):
    """The realized requantization ending at ``head``: ``astype(clip((astype(acc, int64) * M + R) >> S),
    int8)`` with constant M, R, S. Returns the calls ``(clip, shr, add, mul, cast)``, or None."""
    if _op(head) != "relax.astype" or str(head.attrs.dtype) != "int8":
        return None
    clip = _walk(g, head.args[0], "relax.clip", inner)
    if clip is None:
        return None
    shr = _walk(g, clip.args[0], "relax.right_shift", inner)
    if shr is None or not _is_const(shr.args[1]):
        return None
    add_r = _walk(g, shr.args[0], "relax.add", inner)
    if add_r is None or not _is_const(add_r.args[1]):
        return None
    mul = _walk(g, add_r.args[0], "relax.multiply", inner)
    if mul is None or not _is_const(mul.args[1]):
        return None
    cast = _walk(g, mul.args[0], "relax.astype", inner)
    if cast is None or str(cast.attrs.dtype) != "int64":
        return None
    return clip, shr, add_r, mul, cast


def match_int_chain(g: _Graph, head) -> _IntChain | None:
    """Match the realized int8 conv/dense requant chain that ends at the Call ``head``."""
    inner = []
    tail = _requant_tail(g, head, inner)
    if tail is None:
        return None
    clip, shr, add_r, mul, cast = tail
    acc_var, bias_c = _bias_add(g, cast.args[0], inner)
    if acc_var is None:
        return None
    acc = g.producer(acc_var)
    if acc is None or not g.single_use(acc_var) or _op(acc) not in ("relax.nn.conv2d", "relax.matmul"):
        return None
    x, w = acc.args[0], acc.args[1]
    if not _is_const(w) or _dtype(w) != "int8" or _dtype(x) != "int8" or _dtype(acc_var) != "int32":
        return None
    xs, out_shape = _shape(x), _shape(head)
    if xs is None or out_shape is None:
        return None
    channels = out_shape[1]
    try:
        lo, hi = _prim_int(clip.args[1]), _prim_int(clip.args[2])
    except (TypeError, ValueError, AttributeError):
        return None
    m, r, s = (_np(c.args[1]).reshape(-1) for c in (mul, add_r, shr))
    if any(a.size not in (1, channels) for a in (m, r, s)) or np.any(s < 0) or np.any(s > 63):
        return None
    rq = Requant.from_arrays(m, r, s, max(lo, -128), min(hi, 127))
    bias = np.zeros(1, np.int32) if bias_c is None else _np(bias_c).reshape(-1)
    if bias.size not in (1, channels):
        return None
    bias = np.broadcast_to(bias, (channels,)).astype(np.int32)
    if _op(acc) == "relax.nn.conv2d":
        a = acc.attrs
        if (str(a.data_layout), str(a.kernel_layout)) != ("NCHW", "OIHW") or \
                str(a.out_layout) not in ("NCHW", "") or len(xs) != 4:
            return None
        attrs = {"strides": tuple(int(v) for v in a.strides), "padding": tuple(int(v) for v in a.padding),
                 "dilation": tuple(int(v) for v in a.dilation), "groups": int(a.groups)}
        if len(attrs["padding"]) == 2:
            attrs["padding"] = attrs["padding"] * 2
        return _IntChain("conv2d", x, _np(w), bias, rq, attrs, out_shape)
    if len(xs) != 2 or len(_shape(w)) != 2:
        return None
    return _IntChain("dense", x, _np(w), bias, rq, {}, out_shape)


def match_dequant_dense_chain(g: _Graph, head) -> _IntChain | None:
    """Match a quantized classifier whose output stays float (no requant)::

        acc = matmul(xq, WqT, out_dtype="int32") ; acc = add(acc, Bq) ; y = astype(acc, "float32") * S

    (``Wq``, ``Bq``, ``S`` constants; ``S`` a scalar or per-column vector). The kernel computes the
    very same fp32 operations after the int32 accumulation, so it is bit-exact.
    """
    if _op(head) != "relax.multiply" or _dtype(head) != "float32":
        return None
    sc = head.args[1]
    if not _is_const(sc) or _dtype(sc) != "float32":
        return None
    inner = []
    cast = _walk(g, head.args[0], "relax.astype", inner)
    if cast is None or str(cast.attrs.dtype) != "float32":
        return None
    acc_var, bias_c = _bias_add(g, cast.args[0], inner)
    if acc_var is None:
        return None
    acc = g.producer(acc_var)
    if acc is None or not g.single_use(acc_var) or _op(acc) != "relax.matmul" or _dtype(acc_var) != "int32":
        return None
    x, w = acc.args[0], acc.args[1]
    if not _is_const(w) or _dtype(w) != "int8" or _dtype(x) != "int8":
        return None
    xs, out_shape, ws = _shape(x), _shape(head), _shape(w)
    if xs is None or out_shape is None or ws is None or len(xs) != 2 or len(ws) != 2 or len(out_shape) != 2:
        return None
    n = out_shape[1]
    scale = _np(sc).astype(np.float32)
    bias = np.zeros(1, np.int32) if bias_c is None else _np(bias_c).reshape(-1)
    if scale.size not in (1, n) or scale.size != 1 and scale.shape[-1] != n or bias.size not in (1, n):
        return None
    bias = np.broadcast_to(bias, (n,)).astype(np.int32)
    return _IntChain("dense_deq", x, _np(w), bias, None, {"scale": scale.reshape(-1)}, out_shape)


class _AddChain:
    """A realized integer add of two quantized tensors (see :class:`relayq.backend.generic.AddRequant`).

    ``inputs`` are the operand vars (int8/uint8). ``conv`` (set by the planner) is the int conv chain
    producing operand ``conv_index`` when it is fused into that conv's epilogue.
    """

    kind = "add"

    def __init__(self, inputs, spec, out_shape):
        self.inputs, self.spec, self.out_shape = list(inputs), spec, out_shape
        self.conv, self.conv_index = None, None

    @property
    def x(self):
        return self.conv.x if self.conv is not None else self.inputs[0]

    def stop_vars(self):
        """Vars at which the chain's interior ends (its real inputs)."""
        if self.conv is None:
            return list(self.inputs)
        return [self.conv.x] + [v for i, v in enumerate(self.inputs) if i != self.conv_index]


def _scalar(e):
    """The Python int of a scalar (size-1) integer constant, else None."""
    if not _is_const(e):
        return None
    a = _np(e)
    if a.size != 1 or a.dtype.kind not in "iu":
        return None
    return int(a.reshape(-1)[0])


def _rshift_const(g, e, inner):
    """``(t + r) >> s`` with scalar constants ending at var ``e``: (t, r, s) or None."""
    shr = _walk(g, e, "relax.right_shift", inner)
    if shr is None or _scalar(shr.args[1]) is None:
        return None
    add = _walk(g, shr.args[0], "relax.add", inner)
    if add is None or _scalar(add.args[1]) is None:
        return None
    return add.args[0], _scalar(add.args[1]), _scalar(shr.args[1])


def _add_term(g, e, inner):
    """One operand term ``((astype(q, int64) [- zp]) * m + r) >> s``: (q var, AddTerm) or None."""
    rs = _rshift_const(g, e, inner)
    if rs is None:
        return None
    t, r, s = rs
    mul = _walk(g, t, "relax.multiply", inner)
    if mul is None or _scalar(mul.args[1]) is None:
        return None
    m, t = _scalar(mul.args[1]), mul.args[0]
    found = _widened_codes(g, t, "int64", inner)
    if found is None:
        return None
    q, zp = found
    if not isinstance(q, relax.Var) or _dtype(q) not in ("int8", "uint8"):
        return None
    return q, generic.AddTerm(zp, m, r, s)


def match_add_chain(g: _Graph, head) -> _AddChain | None:
    """Match realize's integer add of two quantized tensors ending at the Call ``head``::

        t_i = ((astype(q_i, int64) [- zp_i]) * m_i + r_i) >> s_i ;  t = add(t_0, t_1)
        t = (t + r) >> s  [+ zp]  ->  clip(lo, hi)  ->  astype int8 | uint8

    (scalar constants; both operands of the output's shape).
    """
    if _op(head) != "relax.astype" or str(head.attrs.dtype) not in ("int8", "uint8"):
        return None
    out_dtype = str(head.attrs.dtype)
    inner = []
    clip = _walk(g, head.args[0], "relax.clip", inner)
    if clip is None:
        return None
    try:
        lo, hi = _prim_int(clip.args[1]), _prim_int(clip.args[2])
    except (TypeError, ValueError, AttributeError):
        return None
    info = np.iinfo(out_dtype)
    lo, hi = max(lo, int(info.min)), min(hi, int(info.max))
    t, zp = clip.args[0], 0
    val = g.producer(t)
    if _op(val) == "relax.add" and _scalar(val.args[1]) is not None:
        add_zp = _walk(g, t, "relax.add", inner)
        if add_zp is None:
            return None
        t, zp = add_zp.args[0], _scalar(add_zp.args[1])
    rs = _rshift_const(g, t, inner)
    if rs is None:
        return None
    t, r, s = rs
    total = _walk(g, t, "relax.add", inner)
    if total is None or _dtype(t) != "int64":
        return None
    out_shape = _shape(head)
    if out_shape is None:
        return None
    inputs, terms = [], []
    for a in total.args:
        got = _add_term(g, a, inner)
        if got is None or _shape(got[0]) != out_shape:
            return None
        inputs.append(got[0])
        terms.append(got[1])
    ranges = [(int(np.iinfo(_dtype(q)).min), int(np.iinfo(_dtype(q)).max)) for q in inputs]
    spec = generic.AddRequant(terms, r, s, zp, lo, hi, out_dtype, ranges)
    return _AddChain(inputs, spec, out_shape)


class _ElementwiseChain:
    """A realized table lookup or product of two quantized tensors, lowered to one kernel."""

    def __init__(self, kind, inputs, make_kernel):
        self.kind, self.inputs, self.make_kernel = kind, list(inputs), make_kernel

    @property
    def x(self):
        return self.inputs[0]

    def stop_vars(self):
        return list(self.inputs)


def match_lut_chain(g: _Graph, head) -> _ElementwiseChain | None:
    """``take(table, astype(q, int32) [- qmin])`` with a constant 1-D table, ``q`` an int8/uint8/int16 var."""
    if _op(head) != "relax.take" or not _is_const(head.args[0]) or len(_shape(head.args[0]) or ()) != 1:
        return None
    inner, t = [], head.args[1]
    found = _widened_codes(g, t, "int32", inner)
    if found is None:
        return None
    q, offset = found
    if not isinstance(q, relax.Var) or _dtype(q) not in ("int8", "uint8", "int16") or _shape(q) is None:
        return None
    table = _np(head.args[0])
    lo = int(np.iinfo(_dtype(q)).min)
    hi = int(np.iinfo(_dtype(q)).max)
    if str(head.attrs.mode) != "clip" and (lo - offset < 0 or hi - offset >= table.size):
        return None
    # The table over the whole storage range, indices clamped as take(mode="clip") does: no code can read
    # out of bounds, and every code gets exactly the entry the realized graph gives it.
    full = np.empty(hi - lo + 1, table.dtype)
    idx = np.arange(lo, hi + 1) - offset
    full[:] = table[np.clip(idx, 0, table.size - 1)]
    from . import elementwise as ew
    return _ElementwiseChain("lut", [q], lambda: ew.lut_kernel(_shape(q), _dtype(q), full, lo))


def match_mul_chain(g: _Graph, head) -> _ElementwiseChain | None:
    """``astype(a, int32) * astype(b, int32)`` (int8, broadcasting) -> ``* M + R >> S`` -> clip -> int8."""
    inner = []
    tail = _requant_tail(g, head, inner)
    if tail is None:
        return None
    clip, shr, add_r, mul, cast = tail
    if any(_scalar(c.args[1]) is None for c in (shr, add_r, mul)):     # one multiplier for the whole tensor
        return None
    prod = _walk(g, cast.args[0], "relax.multiply", inner)
    if prod is None or _dtype(cast.args[0]) != "int32":
        return None
    ops = []
    for e in prod.args:
        c = _walk(g, e, "relax.astype", inner)
        if c is None or str(c.attrs.dtype) != "int32" or not isinstance(c.args[0], relax.Var) \
                or _dtype(c.args[0]) != "int8" or _shape(c.args[0]) is None:
            return None
        ops.append(c.args[0])
    try:
        lo, hi = _prim_int(clip.args[1]), _prim_int(clip.args[2])
    except (TypeError, ValueError, AttributeError):
        return None
    m, r, sh = _scalar(mul.args[1]), _scalar(add_r.args[1]), _scalar(shr.args[1])
    if not 0 <= sh <= 63:
        return None
    rq = Requant.from_arrays(m, r, sh, max(lo, -128), min(hi, 127))
    out_shape = _shape(head)
    from . import elementwise as ew
    return _ElementwiseChain("multiply", ops, lambda: ew.multiply_kernel(_shape(ops[0]), _shape(ops[1]), "int8", "int8",
                                                                        out_shape, rq))


class _FloatChain:
    def __init__(self, kind, x, weight, bias, act, attrs, out_shape):
        self.kind, self.x, self.weight, self.bias, self.act = kind, x, weight, bias, act
        self.attrs, self.out_shape = attrs, out_shape


def _float_core(g, e, inner):
    """conv2d/matmul(x, const W) producing ``e`` (looks through permute_dims of a constant)."""
    val = g.producer(e)
    if val is None or not g.single_use(e):
        return None
    name = _op(val)
    if name not in ("relax.nn.conv2d", "relax.matmul"):
        return None
    x, w = val.args[0], val.args[1]
    wv = None
    if _is_const(w):
        wv = _np(w)
    elif name == "relax.matmul" and _op(g.producer(w)) == "relax.permute_dims":
        p = g.producer(w)
        axes = p.attrs.axes
        if _is_const(p.args[0]) and (axes is None or [int(a) for a in axes] == [1, 0]):
            wv = _np(p.args[0]).T
    if wv is None or wv.dtype != np.float32 or _dtype(x) != "float32" or _shape(x) is None:
        return None
    inner.append(e)
    return val, x, wv


def match_float_chain(g: _Graph, head) -> _FloatChain | None:
    """Match ``conv2d|matmul (+ add const) (+ relu | clip)`` in fp32 ending at ``head``."""
    name = _op(head)
    act = None
    cur = head
    inner = []
    if name in ("relax.nn.relu", "relax.clip"):
        if _dtype(head) != "float32":
            return None
        if name == "relax.nn.relu":
            act = (0.0, float("inf"))
        else:
            try:
                act = (float(_prim_num(head.args[1])), float(_prim_num(head.args[2])))
            except AttributeError:
                return None
        arg = head.args[0]
        val = g.producer(arg)
        if val is None or not g.single_use(arg):
            return None
        if _op(val) == "relax.add":
            cur = val
            inner.append(arg)
        else:
            core = _float_core(g, arg, inner)
            return _make_float(core, None, act, head)
    if _op(cur) == "relax.add":
        b = cur.args[1]
        if not _is_const(b) or _dtype(b) != "float32":
            return None
        core = _float_core(g, cur.args[0], inner)
        return _make_float(core, _np(b), act, head)
    if _op(cur) in ("relax.nn.conv2d", "relax.matmul") and cur is head:
        x, w = head.args[0], head.args[1]
        if _is_const(w) and _dtype(w) == "float32" and _dtype(x) == "float32" and _shape(x) is not None:
            return _make_float((head, x, _np(w)), None, None, head)
    return None


def _make_float(core, bias, act, head):
    if core is None:
        return None
    call, x, w = core
    out_shape = _shape(head)
    if out_shape is None:
        return None
    if _op(call) == "relax.nn.conv2d":
        a = call.attrs
        if (str(a.data_layout), str(a.kernel_layout)) != ("NCHW", "OIHW") or len(_shape(x)) != 4:
            return None
        if a.out_dtype is not None and str(a.out_dtype) not in ("float32", "", "void"):
            return None
        o = w.shape[0]
        if bias is not None and bias.size != o:
            return None
        attrs = {"strides": tuple(int(v) for v in a.strides), "padding": tuple(int(v) for v in a.padding),
                 "dilation": tuple(int(v) for v in a.dilation), "groups": int(a.groups)}
        if len(attrs["padding"]) == 2:
            attrs["padding"] = attrs["padding"] * 2
        return _FloatChain("conv2d", x, w, None if bias is None else bias.reshape(-1), act, attrs, out_shape)
    if len(_shape(x)) != 2 or w.ndim != 2:
        return None
    n = w.shape[1]
    if bias is not None and bias.size != n:
        return None
    return _FloatChain("dense", x, w, None if bias is None else bias.reshape(-1), act, {}, out_shape)


# ----------------------------------------------------------------------------- kernel selection
def _int_kernel(chain: _IntChain, kind: str, nonneg: bool):
    xs = _shape(chain.x)
    if chain.kind == "dense_deq":
        if kind not in _X86_ISA:
            return None
        from . import x86
        return x86.dense_int8(xs, chain.weight, chain.bias, None, isa=_X86_ISA[kind], nonneg=nonneg,
                              out_scale=chain.attrs["scale"])
    if kind in _X86_ISA:
        from . import x86
        isa = _X86_ISA[kind]
        if chain.kind == "conv2d":
            a = chain.attrs
            return x86.conv2d_int8(xs, chain.weight, chain.bias, chain.rq, a["strides"], a["padding"],
                                   a["dilation"], a["groups"], isa=isa, nonneg=nonneg)
        return x86.dense_int8(xs, chain.weight, chain.bias, chain.rq, isa=isa, nonneg=nonneg)
    if kind == "cuda-dp4a":
        from . import cuda
        if chain.kind == "conv2d":
            a = chain.attrs
            if a["groups"] != 1:
                return None
            return cuda.conv2d_int8(xs, chain.weight, chain.bias, chain.rq, a["strides"], a["padding"],
                                    a["dilation"])
        return cuda.dense_int8(xs, chain.weight, chain.bias, chain.rq)
    if chain.kind == "conv2d":
        a = chain.attrs
        return generic.conv2d_int8(xs, chain.weight, chain.bias, chain.rq, a["strides"], a["padding"],
                                   a["dilation"], a["groups"])
    return generic.dense_int8(xs, chain.weight, chain.bias, chain.rq)


def _add_kernel(chain: _AddChain, kind: str, nonneg: bool):
    if kind == "cuda-dp4a":
        return None
    if chain.conv is not None:
        from . import x86
        c = chain.conv
        a = c.attrs
        spec = chain.spec
        # the conv's operand range is its requant clip range (tighter than int8: more often int32-exact)
        ranges = list(spec.in_ranges)
        ranges[chain.conv_index] = (c.rq.lo, c.rq.hi)
        spec = generic.AddRequant(spec.terms, spec.r, spec.s, spec.zp, spec.lo, spec.hi, spec.out_dtype, ranges)
        other = chain.inputs[1 - chain.conv_index]
        residual = (chain.conv_index, spec, _dtype(other))
        return x86.conv2d_int8(_shape(c.x), c.weight, c.bias, c.rq, a["strides"], a["padding"], a["dilation"],
                               a["groups"], isa=_X86_ISA[kind], nonneg=nonneg, residual=residual)
    return generic.add_int8(chain.out_shape, [_dtype(q) for q in chain.inputs], chain.spec)


def _float_kernel(chain: _FloatChain, kind: str):
    xs = _shape(chain.x)
    if kind == "cuda-dp4a":
        return None
    if kind in _X86_ISA:
        from . import x86
        isa = _X86_ISA[kind]
        if chain.kind == "conv2d":
            a = chain.attrs
            return x86.conv2d_fp32(xs, chain.weight, chain.bias, chain.act, a["strides"], a["padding"],
                                   a["dilation"], a["groups"], isa=isa)
        return x86.dense_fp32(xs, chain.weight, chain.bias, chain.act, isa=isa)
    if chain.kind == "conv2d":
        a = chain.attrs
        return generic.conv2d_fp32(xs, chain.weight, chain.bias, chain.act, a["strides"], a["padding"],
                                   a["dilation"], a["groups"])
    return generic.dense_fp32(xs, chain.weight, chain.bias, chain.act)


def _const(a):
    # relax.const turns int64 numpy arrays into int32 unless the dtype is given explicitly.
    a = np.ascontiguousarray(a)
    return relax.const(a, str(a.dtype))


# ----------------------------------------------------------------------------- the mutator
@relax.expr_functor.mutator
class _Lowerer(relax.PyExprMutator):
    def __init__(self, mod, kind, do_int, do_float, stats, fuse_add=None):
        super().__init__(mod)
        self.mod_ = mod
        mode = RESIDUAL_ADD if fuse_add is None else fuse_add
        self.lower_add, self.fuse_add = mode in ("fuse", "standalone"), mode == "fuse"
        self.kind, self.do_int, self.do_float, self.stats = kind, do_int, do_float, stats
        self.plans = {}
        taken = {gv.name_hint for gv in mod.get_global_vars()}
        self.names = (f"relayq_{i}" for i in itertools.count() if f"relayq_{i}" not in taken)
        self.graph = None

    def _plan(self, func):
        """Pick the chain heads, last binding first, so that a longer chain wins over its parts."""
        g = _Graph(func)
        plans, absorbed = {}, set()
        for v in reversed(g.order):
            if v in absorbed:
                continue
            val = g.var2val[v]
            chain = None
            if self.do_int and self.lower_add and self.kind != "cuda-dp4a":
                chain = self._match_add(g, val)
            if chain is None and self.do_int:
                chain = match_int_chain(g, val)
                if chain is None and self.kind in _X86_ISA:
                    chain = match_dequant_dense_chain(g, val)
                if chain is None and self.kind != "cuda-dp4a":
                    chain = match_lut_chain(g, val) or match_mul_chain(g, val)
            if chain is None and self.do_float:
                chain = match_float_chain(g, val)
            if chain is None:
                continue
            plans[val] = chain
            absorbed.update(self._interior(g, val, chain))
        return g, plans

    def _match_add(self, g, val):
        """An add chain, fused into the epilogue of the x86 int8 conv producing one operand if possible."""
        chain = match_add_chain(g, val)
        if chain is None:
            return None
        if self.kind in _X86_ISA and self.fuse_add:
            for i, q in enumerate(chain.inputs):
                if chain.inputs[1 - i].same_as(q) or not g.single_use(q):
                    continue
                conv = match_int_chain(g, g.producer(q))
                if conv is None or conv.kind != "conv2d" or conv.attrs["groups"] != 1 or \
                        tuple(conv.out_shape) != tuple(chain.out_shape) or _dtype(q) != "int8":
                    continue
                chain.conv, chain.conv_index = conv, i
                break
        return chain

    @staticmethod
    def _interior(g, head, chain):
        """Vars strictly inside a matched chain (their bindings become dead)."""
        out, stack = set(), list(head.args)
        stops = chain.stop_vars() if isinstance(chain, (_AddChain, _ElementwiseChain)) else [chain.x]
        while stack:
            e = stack.pop()
            if not isinstance(e, relax.Var) or any(e.same_as(v) for v in stops) or e not in g.var2val:
                continue
            out.add(e)
            val = g.var2val[e]
            if isinstance(val, relax.Call):
                stack.extend(val.args)
        return out

    def visit_call_(self, call):
        chain = self.plans.get(call)
        if chain is None:
            return super().visit_call_(call)
        inputs = [chain.x]
        if isinstance(chain, _ElementwiseChain):
            nonneg = None
            kernel = chain.make_kernel()
            inputs = chain.stop_vars()
        elif isinstance(chain, _AddChain):
            nonneg = self.graph.is_nonneg(chain.x) if chain.conv is not None else None
            kernel = _add_kernel(chain, self.kind, nonneg)
            inputs = chain.stop_vars()
        elif isinstance(chain, _IntChain):
            nonneg = self.graph.is_nonneg(chain.x)
            kernel = _int_kernel(chain, self.kind, nonneg)
        else:
            nonneg = None
            kernel = _float_kernel(chain, self.kind)
        if kernel is None:
            return super().visit_call_(call)
        symbol = f"{next(self.names)}_{kernel.name}"
        gv = self.builder_.add_func(kernel.finalize(symbol), symbol)
        args = [self.visit_expr(v) for v in inputs] + [_const(c) for c in kernel.consts]
        kind = chain.kind if not isinstance(chain, _AddChain) or chain.conv is None else "conv2d+add"
        self.stats.append({"symbol": symbol, "kind": kind,
                           "int8": isinstance(chain, (_IntChain, _AddChain, _ElementwiseChain)),
                           "nonneg": nonneg, **kernel.info})
        return relax.call_tir(gv, args, relax.TensorType(list(kernel.out_shape), kernel.out_dtype))

    def transform(self):
        for gv, func in self.mod_.functions_items():
            if isinstance(func, relax.Function):
                self.graph, self.plans = self._plan(func)
                if not self.plans:
                    continue
                new = self.visit_expr(func)
                self.builder_.update_func(gv, new)
        return self.builder_.get()


def _lower(mod, target_kind, do_int, do_float, stats):
    if target_kind not in TARGET_KINDS:
        raise ValueError(f"unknown target kind {target_kind!r}; known: {list(TARGET_KINDS)}")
    stats = [] if stats is None else stats
    out = _Lowerer(mod, target_kind, do_int, do_float, stats).transform()
    if stats:
        out = relax.transform.DeadCodeElimination()(out)
    return out


def lower_quantized(mod: tvm.IRModule, target_kind: str, include_float: bool = True,
                    stats: list | None = None) -> tvm.IRModule:
    """Replace every realized int8 conv2d/dense requant chain by a fused relayq kernel.

    With ``include_float`` (default) fp32 conv/dense chains left in the graph (float fallback layers)
    are lowered too, as by :func:`lower_float`. ``stats`` (a list) receives one dict per replaced
    layer (symbol, kind, int8, nonneg, intrinsic, tile). Unmatched ops are left as they are.

    >>> # lowered = lower_quantized(realized, "x86-avx2")
    >>> # ex = tvm.compile(lowered, target=target_from_preset("x86-avx2"), relax_pipeline=...)
    """
    return _lower(mod, target_kind, True, include_float, stats)


def lower_float(mod: tvm.IRModule, target_kind: str, stats: list | None = None) -> tvm.IRModule:
    """Replace fp32 ``conv2d|matmul (+ bias add) (+ relu | clip)`` chains with relayq's fp32 kernels.

    The FP32 baseline that int8 models are compared against (NCHW8c-style FMA conv, packed-B dense).
    For ``"cuda-dp4a"`` float chains are left to TVM (dlight schedules them).

    >>> # lowered = lower_float(float_mod, "x86-avx2")
    """
    return _lower(mod, target_kind, False, True, stats)


def lowered_kernels(mod: tvm.IRModule) -> list:
    """Names of relayq kernels called from the Relax functions of ``mod`` (for inspection/tests).

    >>> # lowered_kernels(lower_quantized(m, "generic"))  ->  ["relayq_0_qconv2d_generic", ...]
    """
    names = []
    call_tir = tvm.ir.Op.get("relax.call_tir")

    def visit(e):
        if isinstance(e, relax.Call) and e.op.same_as(call_tir) and e.args[0].name_hint.startswith("relayq_"):
            names.append(e.args[0].name_hint)

    for _, f in mod.functions_items():
        if isinstance(f, relax.Function):
            relax.analysis.post_order_visit(f, visit)
    return names
