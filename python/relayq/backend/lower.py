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

The chains may read and write int8, uint8 (asymmetric codes: the realized ``nn.pad`` with the zero
point in front of a padded conv is absorbed into the kernel, which pads with the zero point) or int16
codes (activations above 8 bits), with int8 or int16 weights, per-tensor or per-channel, and with the
power-of-two requantization (a rounding shift without multiply). The range of every input's codes is
proven from the graph (:meth:`_Graph.code_range`: a clip's bounds, a ReLU, and ops that only move or
select elements), and the x86 kernels pick the fastest exact dot product for that range and the
layer's weights (:func:`relayq.backend.x86.select_path`). Layers that fall back to slower code (the
exact int16 path on AVX2, the portable kernels, TVM's generic lowering) are named in one
:class:`relayq.errors.SlowKernelWarning` per build; ``stats`` records each layer's ``path``.

Example::

    import tvm
    from relayq.backend.lower import lower_quantized, relax_pipeline, target_from_preset
    lowered = lower_quantized(realized_mod, "x86-avx2")
    target = target_from_preset("x86-avx2")
    ex = tvm.compile(lowered, target=target, relax_pipeline=relax_pipeline(target))
"""
from __future__ import annotations

import itertools
import warnings

import numpy as np
import tvm
import tvm_ffi
from tvm import relax

from ..errors import SlowKernelWarning
from . import generic
from .generic import CODE_DTYPES, Codes, Requant
from .presets import best_host_preset, relax_pipeline, target_from_preset  # noqa: F401  (re-exported API)

TARGET_KINDS = ("x86-avx2", "x86-vnni", "cuda-dp4a", "arm-dotprod", "generic")
# How realized integer adds (residual connections) are lowered: "fuse" into the epilogue of the x86 int8
# conv producing one operand (when that conv output has no other user; else, and on the generic
# preset, as "standalone"), "standalone" (generic.add_int8, parallel + vectorized), or None (left to TVM).
RESIDUAL_ADD = "fuse"
# Integer elementwise layers (table lookups, products, adds) of fewer output elements than this are not
# opaque kernels of their own: products and adds stay Relax ops and lookups become a plain compute marked
# injective (elementwise.lut_fusable), so TVM's FuseOps merges a whole chain of them, e.g. an LSTM cell's
# slices, gates and products, into one function per step (lstm_text: 882 -> 249 VM calls, 0.16 -> 0.10 ms
# back to back). Below it a kernel would run on one thread anyway (generic.PARALLEL_MIN_ELEMENTS).
SMALL_ELEMENTWISE = generic.PARALLEL_MIN_ELEMENTS
# A table lookup (hardswish, SiLU, sigmoid ...) right after an x86 int8 conv2d is fused into the conv's
# epilogue: one kernel, no int8 tensor written and read back in between.
FUSE_LUT_INTO_CONV = True
# The tensorized CPU kernels of relayq.backend.x86 serve AArch64 +dotprod too (isa "sdot").
_X86_ISA = {"x86-avx2": "avx2", "x86-vnni": "vnni", "arm-dotprod": "sdot"}
# Ops through which a non-negative value stays non-negative (they only move or select elements).
_SIGN_PRESERVING = ("relax.nn.max_pool2d", "relax.reshape", "relax.flatten", "relax.permute_dims",
                    "relax.squeeze", "relax.expand_dims", "relax.nn.relu", "relax.strided_slice")


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


def _dtype_range(e):
    """The (min, max) of an integer tensor's dtype, or None."""
    try:
        dt = _dtype(e)
    except AttributeError:
        return None
    if not dt.startswith(("int", "uint")) or dt in ("int", "uint"):
        return None
    info = np.iinfo(dt)
    return int(info.min), int(info.max)


def _meet(a, b):
    """The intersection of two ranges (bounds may be floats or infinite), as ints."""
    lo, hi = max(a[0], b[0]), min(a[1], b[1])
    lo = int(np.ceil(lo)) if np.isfinite(lo) else lo
    hi = int(np.floor(hi)) if np.isfinite(hi) else hi
    return lo, hi


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
        self.ranges = {}
        for v in self.order:
            r = self._value_range(self.var2val[v], v)
            if r is not None:
                self.ranges[v] = r

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
        """Whether the integer codes of ``e`` are proven >= 0."""
        r = self.code_range(e)
        return r is not None and r[0] >= 0

    def code_range(self, e):
        """``(lo, hi)``: bounds proven for the integer codes of ``e`` (its dtype's range at worst), or None
        for a non-integer value."""
        if isinstance(e, relax.Var) and e in self.ranges:
            return self.ranges[e]
        return _dtype_range(e)

    def _value_range(self, val, var):
        full = _dtype_range(var)
        if full is None:
            return None
        name = _op(val)
        if name is None:
            if isinstance(val, relax.Tuple):
                return None
            if isinstance(val, relax.Var):                # an alias (a dataflow block's output)
                return self.code_range(val) or full
            return full
        arg = val.args[0] if len(val.args) else None
        if name == "relax.clip":
            inner = self.code_range(arg) or full
            try:
                lo, hi = _prim_num(val.args[1]), _prim_num(val.args[2])
            except (TypeError, ValueError, AttributeError):
                return _meet(inner, full)
            return _meet(_meet(inner, (lo, hi)), full)
        if name == "relax.nn.relu":
            inner = self.code_range(arg) or full
            return _meet((max(0, inner[0]), inner[1]), full)
        if name == "relax.nn.pad":
            inner = self.code_range(arg)
            try:
                pv = float(val.attrs.pad_value)
            except (AttributeError, TypeError, ValueError):
                return full
            if inner is None:
                return full
            return _meet((min(inner[0], pv), max(inner[1], pv)), full)
        if name == "relax.concat":
            t = self.producer(arg) if isinstance(arg, relax.Var) else arg
            if not isinstance(t, relax.Tuple):
                return full
            parts = [self.code_range(f) for f in t.fields]
            if any(p is None for p in parts):
                return full
            return _meet((min(p[0] for p in parts), max(p[1] for p in parts)), full)
        if name == "relax.astype":
            # a cast keeps the value only where it fits the new type (otherwise it wraps)
            inner = self.code_range(arg)
            return inner if inner is not None and full[0] <= inner[0] and inner[1] <= full[1] else full
        if name in _SIGN_PRESERVING:
            inner = self.code_range(arg)
            return full if inner is None else _meet(inner, full)
        got = self._arith_range(name, val)
        # a result that may leave the dtype wraps around: then nothing narrower than the dtype is known
        return got if got is not None and full[0] <= got[0] and got[1] <= full[1] else full

    def _range_or_const(self, e):
        if _is_const(e):
            a = _np(e)
            return (int(a.min()), int(a.max())) if a.size and a.dtype.kind in "iu" else None
        return self.code_range(e)

    def _sign_test(self, cond):
        """True / False where ``cond`` is ``greater_equal(v, 0)`` and ``v``'s range decides it, else None."""
        test = self.producer(cond)
        if _op(test) != "relax.greater_equal" or not _is_const(test.args[1]) or _np(test.args[1]).size != 1 \
                or int(_np(test.args[1]).reshape(-1)[0]) != 0:
            return None
        r = self.code_range(test.args[0])
        if r is None:
            return None
        return True if r[0] >= 0 else (False if r[1] < 0 else None)

    def _pooled_average_range(self, val):
        """The range of realize's rounded average ``(conv2d(x, W) + H) // C`` (W >= 0, H and C constants per
        output position), position by position: with ``count_include_pad=False`` the counts differ at the
        border, and dividing the largest sum (an interior position's) by the smallest count (a corner's)
        overstates the result (7-bit codes pooled to [0, 286]). Each position's sum is within
        ``[lo, hi] * V`` (``V`` the sum of the weights its valid taps see; padding reads zeros)."""
        add = self.producer(val.args[0])
        if _op(add) != "relax.add" or not _is_const(add.args[1]) or not _is_const(val.args[1]):
            return None
        conv = self.producer(add.args[0])
        if _op(conv) != "relax.nn.conv2d" or not _is_const(conv.args[1]) \
                or str(conv.attrs.data_layout) != "NCHW" or str(conv.attrs.kernel_layout) != "OIHW":
            return None
        w, xr, xs, ys = _np(conv.args[1]).astype(np.int64), self.code_range(conv.args[0]), _shape(conv.args[0]), \
            _shape(conv)
        count = _np(val.args[1]).astype(np.int64)
        if w.ndim != 4 or w.size == 0 or w.min() < 0 or xr is None or xs is None or ys is None or count.min() <= 0:
            return None
        (sh, sw), (dh, dw) = (int(v) for v in conv.attrs.strides), (int(v) for v in conv.attrs.dilation)
        pt, pl = int(conv.attrs.padding[0]), int(conv.attrs.padding[1])
        (h, wd), (oh, ow), (kh, kw) = xs[2:], ys[2:], w.shape[2:]
        rows = np.array([[0 <= i * sh + k * dh - pt < h for k in range(kh)] for i in range(int(oh))], np.int64)
        cols = np.array([[0 <= j * sw + k * dw - pl < wd for k in range(kw)] for j in range(int(ow))], np.int64)
        seen = np.einsum("okl,ik,jl->oij", w.sum(axis=1), rows, cols)[None]
        half = _np(add.args[1]).astype(np.int64)
        try:
            lo = np.floor_divide(xr[0] * seen + half, count)
            hi = np.floor_divide(xr[1] * seen + half, count)
        except ValueError:                                  # shapes that do not broadcast: no refinement
            return None
        return int(min(lo.min(), hi.min())), int(max(lo.max(), hi.max()))

    def _arith_range(self, name, val):
        """Interval arithmetic through the integer ops of realize's average pooling (sum or a unit-weight
        conv, + half, floor_divide by the count, negative, where): the average of codes stays in their
        range, which lets a classifier after a pool of ReLU codes take the u8 x s8 path."""
        args = [self._range_or_const(a) for a in val.args[:2]] if len(val.args) >= 1 else []
        if name == "relax.add" and len(args) == 2 and None not in args:
            return args[0][0] + args[1][0], args[0][1] + args[1][1]
        if name == "relax.negative" and args and args[0] is not None:
            return -args[0][1], -args[0][0]
        if name == "relax.floor_divide" and len(args) == 2 and None not in args and args[1][0] > 0:
            per_position = self._pooled_average_range(val)
            if per_position is not None:
                return per_position
            (lo, hi), (c0, c1) = args
            return min(lo // c0, lo // c1), max(hi // c0, hi // c1)
        if name == "relax.where" and len(val.args) == 3:
            a, b = self._range_or_const(val.args[1]), self._range_or_const(val.args[2])
            sign = self._sign_test(val.args[0])
            if sign is not None:
                return a if sign else b                   # the test is always true / always false
            return None if a is None or b is None else (min(a[0], b[0]), max(a[1], b[1]))
        if name == "relax.sum" and args and args[0] is not None:
            src, out = _shape(val.args[0]), _shape(val)
            if src is None or out is None:
                return None
            n = int(np.prod(src)) // max(1, int(np.prod(out)))
            return args[0][0] * n, args[0][1] * n
        if name == "relax.nn.conv2d" and len(args) == 2 and args[0] is not None and _is_const(val.args[1]):
            w = _np(val.args[1]).astype(np.int64)
            lo, hi = args[0]
            if any(int(p) for p in val.attrs.padding):
                lo, hi = min(lo, 0), max(hi, 0)                 # padding reads zeros
            axes = tuple(range(1, w.ndim))
            pos, neg = np.clip(w, 0, None).sum(axis=axes), np.clip(w, None, 0).sum(axis=axes)
            return int((pos * lo + neg * hi).min()), int((pos * hi + neg * lo).max())
        return None


# ----------------------------------------------------------------------------- chain matching
def _dense_operands(xs, ws, out_shape) -> bool:
    """Whether ``matmul(x, W)`` is a dense layer relayq's kernels take: a 2-D weight ``[K, N]`` and an input
    of 2 or more dims ``[..., K]`` (the leading dims are flattened into the kernel's rows).

    >>> _dense_operands((1, 17, 768), (768, 3072), (1, 17, 3072)), _dense_operands((4, 8), (8, 2, 3), (4, 2, 3))
    (True, False)
    """
    return (len(xs) >= 2 and len(ws) == 2 and len(out_shape) == len(xs) and int(xs[-1]) == int(ws[0])
            and int(out_shape[-1]) == int(ws[1]) and tuple(out_shape[:-1]) == tuple(xs[:-1]))


def _rows_2d(xs) -> tuple:
    """A dense layer's input shape as the kernel's ``(rows, K)``.

    >>> _rows_2d((1, 17, 768))
    (17, 768)
    """
    return (int(np.prod([int(d) for d in xs[:-1]])), int(xs[-1]))


class _IntChain:
    def __init__(self, kind, x, weight, bias, rq, attrs, out_shape, codes=None, layer=None):
        self.kind, self.x, self.weight, self.bias, self.rq = kind, x, weight, bias, rq
        self.attrs, self.out_shape = attrs, out_shape
        self.codes = codes or Codes()
        self.layer = layer
        self.lut = None             # (table, lo) of a following lookup fused into the epilogue (x86 conv2d)


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


class _Tail:
    """A realized requantization ``astype(clip(((astype(acc, int64) [* M] [+ R >> S]) [+ zp]), lo, hi))``."""

    def __init__(self, src, m, r, s, zp, lo, hi, out_dtype, scalar):
        self.src, self.m, self.r, self.s, self.zp = src, m, r, s, zp
        self.lo, self.hi, self.out_dtype, self.scalar = lo, hi, out_dtype, scalar


def _requant_tail(g: _Graph, head, inner: list) -> _Tail | None:
    """The realized requantization ending at ``head``: ``astype(clip(((astype(acc, int64) * M + R) >> S)
    [+ zp]), int8 | uint8 | int16)`` with constant M, R, S (per tensor or per channel) and a scalar output
    zero point; the power-of-two form drops the multiply (and the shift where it is 0). None if not.
    """
    if _op(head) != "relax.astype" or str(head.attrs.dtype) not in CODE_DTYPES:
        return None
    clip = _walk(g, head.args[0], "relax.clip", inner)
    if clip is None:
        return None
    try:
        lo, hi = _prim_int(clip.args[1]), _prim_int(clip.args[2])
    except (TypeError, ValueError, AttributeError, OverflowError):
        return None
    t, zp = clip.args[0], 0
    # The rounding addend R is always followed by the shift, so an add right before the clip is the zero point.
    if _op(g.producer(t)) == "relax.add":
        add_zp = _walk(g, t, "relax.add", inner)
        if add_zp is None or _scalar(add_zp.args[1]) is None:
            return None
        t, zp = add_zp.args[0], _scalar(add_zp.args[1])
    one, zero = np.ones(1, np.int64), np.zeros(1, np.int64)
    m, r, sh, scalar = one, zero, zero, True
    if _op(g.producer(t)) == "relax.right_shift":
        shr = _walk(g, t, "relax.right_shift", inner)
        if shr is None or not _is_const(shr.args[1]):
            return None
        add_r = _walk(g, shr.args[0], "relax.add", inner)
        if add_r is None or not _is_const(add_r.args[1]):
            return None
        r, sh, t = _np(add_r.args[1]).reshape(-1), _np(shr.args[1]).reshape(-1), add_r.args[0]
        scalar = scalar and r.size == 1 and sh.size == 1
    if _op(g.producer(t)) == "relax.multiply":
        mul = _walk(g, t, "relax.multiply", inner)
        if mul is None or not _is_const(mul.args[1]):
            return None
        m, t = _np(mul.args[1]).reshape(-1), mul.args[0]
        scalar = scalar and m.size == 1
    cast = _walk(g, t, "relax.astype", inner)
    if cast is None or str(cast.attrs.dtype) != "int64":
        return None
    if np.any(sh < 0) or np.any(sh > 63):
        return None
    return _Tail(cast.args[0], m, r, sh, zp, lo, hi, str(head.attrs.dtype), scalar)


# Shift-only requantization (power-of-two scales) is rewritten with this multiplier so that it runs on the
# 32-bit split path of generic.requant_expr (AVX2 has no 64-bit arithmetic shift, min or max).
_SPLIT_MULTIPLIER_BITS = 30


def _split_friendly(m, r, s):
    """``(M, R, S)`` computing the same ``(t * M + R) >> S`` for every int32 ``t``: a shift-only form
    (``M = 1``, ``2 <= S <= 33``) becomes ``(t * 2^30 + R * 2^30) >> (S + 30)``, exact since
    ``(t + R) * 2^30`` stays inside int64, and on the split path (``S >= 32``)."""
    k = _SPLIT_MULTIPLIER_BITS
    if np.all(m == 1) and np.all(s >= 32 - k) and np.all(s <= 63 - k) and np.all(np.abs(r) < (1 << 32)):
        return np.full_like(m, 1 << k), np.left_shift(r.astype(np.int64), k), s + k
    return m, r, s


def _absorbed_pad(g: _Graph, x, inner):
    """``(input, (top, left, bottom, right), pad code)`` when ``x`` is a constant-mode ``nn.pad`` of H and W
    only with an integer pad value and no other user (realize pads asymmetric codes with the zero point
    in front of the conv); None otherwise."""
    val = g.producer(x)
    if _op(val) != "relax.nn.pad" or not g.single_use(x):
        return None
    a = val.attrs
    try:
        widths = [int(v) for v in a.pad_width]
        pad_value = float(a.pad_value)
        mode = str(getattr(a, "pad_mode", "constant"))
    except (AttributeError, TypeError, ValueError):
        return None
    if mode != "constant" or len(widths) != 8 or any(widths[:4]) or pad_value != int(pad_value):
        return None
    inner.append(x)
    return val.args[0], (widths[4], widths[6], widths[5], widths[7]), int(pad_value)


def match_int_chain(g: _Graph, head) -> _IntChain | None:
    """Match the realized integer conv/dense requant chain that ends at the Call ``head`` (int8, uint8
    or int16 codes in and out, int8 or int16 weights; see the module docstring)."""
    inner = []
    tail = _requant_tail(g, head, inner)
    if tail is None:
        return None
    acc_var, bias_c = _bias_add(g, tail.src, inner)
    if acc_var is None:
        return None
    acc = g.producer(acc_var)
    if acc is None or not g.single_use(acc_var) or _op(acc) not in ("relax.nn.conv2d", "relax.matmul"):
        return None
    x, w = acc.args[0], acc.args[1]
    if not _is_const(w) or _dtype(w) not in ("int8", "int16") or _dtype(x) not in CODE_DTYPES \
            or _dtype(acc_var) != "int32":
        return None
    xs, out_shape = _shape(x), _shape(head)
    if xs is None or out_shape is None:
        return None
    # a conv's channels are axis 1; a dense layer's the last axis (its input may have leading batch dims:
    # a transformer's [batch, tokens, features], lowered as one [batch * tokens, features] dense kernel)
    channels = out_shape[1] if _op(acc) == "relax.nn.conv2d" else out_shape[-1]
    m, r, s = tail.m, tail.r, tail.s
    if any(a.size not in (1, channels) for a in (m, r, s)):
        return None
    rq = Requant.from_arrays(*_split_friendly(m, r, s), tail.lo, tail.hi, tail.zp, tail.out_dtype)
    bias = np.zeros(1, np.int32) if bias_c is None else _np(bias_c).reshape(-1)
    if bias.size not in (1, channels):
        return None
    bias = np.broadcast_to(bias, (channels,)).astype(np.int32)
    layer = acc_var.name
    if _op(acc) == "relax.nn.conv2d":
        a = acc.attrs
        if (str(a.data_layout), str(a.kernel_layout)) != ("NCHW", "OIHW") or \
                str(a.out_layout) not in ("NCHW", "") or len(xs) != 4:
            return None
        attrs = {"strides": tuple(int(v) for v in a.strides), "padding": tuple(int(v) for v in a.padding),
                 "dilation": tuple(int(v) for v in a.dilation), "groups": int(a.groups)}
        if len(attrs["padding"]) == 2:
            attrs["padding"] = attrs["padding"] * 2
        pad_code = 0
        pad = _absorbed_pad(g, x, inner) if not any(attrs["padding"]) else None
        if pad is not None:
            x, attrs["padding"], pad_code = pad
            xs = _shape(x)
            if xs is None or _dtype(x) not in CODE_DTYPES:
                return None
        lo, hi = g.code_range(x)
        codes = Codes.of(_dtype(x), lo, hi, pad_code)
        return _IntChain("conv2d", x, _np(w), bias, rq, attrs, out_shape, codes, layer)
    if not _dense_operands(xs, _shape(w), out_shape):
        return None
    lo, hi = g.code_range(x)
    return _IntChain("dense", x, _np(w), bias, rq, {}, out_shape, Codes.of(_dtype(x), lo, hi), layer)


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
    if not _is_const(w) or _dtype(w) not in ("int8", "int16") or _dtype(x) not in CODE_DTYPES:
        return None
    xs, out_shape, ws = _shape(x), _shape(head), _shape(w)
    if xs is None or out_shape is None or ws is None or not _dense_operands(xs, ws, out_shape):
        return None
    n = out_shape[-1]
    scale = _np(sc).astype(np.float32)
    bias = np.zeros(1, np.int32) if bias_c is None else _np(bias_c).reshape(-1)
    if scale.size not in (1, n) or scale.size != 1 and scale.shape[-1] != n or bias.size not in (1, n):
        return None
    bias = np.broadcast_to(bias, (n,)).astype(np.int32)
    lo, hi = g.code_range(x)
    return _IntChain("dense_deq", x, _np(w), bias, None, {"scale": scale.reshape(-1)}, out_shape,
                     Codes.of(_dtype(x), lo, hi), acc_var.name)


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
        self.fusable = False        # a small lookup: a plain compute TVM may fuse (see SMALL_ELEMENTWISE)

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
    chain = _ElementwiseChain("lut", [q], None)
    chain.table = (full, lo)
    chain.make_kernel = lambda: (ew.lut_fusable if chain.fusable else ew.lut_kernel)(_shape(q), _dtype(q), full, lo)
    return chain


def match_mul_chain(g: _Graph, head) -> _ElementwiseChain | None:
    """``astype(a, int32) * astype(b, int32)`` (int8, broadcasting) -> ``* M + R >> S`` -> clip -> int8."""
    inner = []
    tail = _requant_tail(g, head, inner)
    # one multiplier for the whole tensor, int8 codes out
    if tail is None or not tail.scalar or tail.zp or tail.out_dtype != "int8":
        return None
    prod = _walk(g, tail.src, "relax.multiply", inner)
    if prod is None or _dtype(tail.src) != "int32":
        return None
    ops = []
    for e in prod.args:
        c = _walk(g, e, "relax.astype", inner)
        if c is None or str(c.attrs.dtype) != "int32" or not isinstance(c.args[0], relax.Var) \
                or _dtype(c.args[0]) != "int8" or _shape(c.args[0]) is None:
            return None
        ops.append(c.args[0])
    rq = Requant.from_arrays(tail.m, tail.r, tail.s, tail.lo, tail.hi)
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
    if not _dense_operands(_shape(x), w.shape, out_shape):
        return None
    n = w.shape[1]
    if bias is not None and bias.size != n:
        return None
    return _FloatChain("dense", x, w, None if bias is None else bias.reshape(-1), act, {}, out_shape)


# ----------------------------------------------------------------------------- kernel selection
def _int_kernel(chain: _IntChain, kind: str):
    xs, codes = _shape(chain.x), chain.codes
    if chain.kind != "conv2d":
        xs = _rows_2d(xs)
    if chain.kind == "dense_deq":
        if kind not in _X86_ISA:
            return None
        from . import x86
        if x86.select_path(_X86_ISA[kind], codes, chain.weight, 0) is None:
            return None
        return x86.dense_int8(xs, chain.weight, chain.bias, None, isa=_X86_ISA[kind], out_scale=chain.attrs["scale"],
                              codes=codes)
    if kind in _X86_ISA:
        from . import x86
        isa = _X86_ISA[kind]
        if chain.kind == "conv2d":
            a = chain.attrs
            return x86.conv2d_int8(xs, chain.weight, chain.bias, chain.rq, a["strides"], a["padding"],
                                   a["dilation"], a["groups"], isa=isa, codes=codes, lut=chain.lut)
        return x86.dense_int8(xs, chain.weight, chain.bias, chain.rq, isa=isa, codes=codes)
    if kind == "cuda-dp4a":
        from . import cuda
        if codes.dtype != "int8" or chain.weight.dtype != np.int8 or chain.rq.out_dtype != "int8":
            return None
        if chain.kind == "conv2d":
            a = chain.attrs
            if a["groups"] != 1:
                return None
            return cuda.conv2d_int8(xs, chain.weight, chain.bias, chain.rq, a["strides"], a["padding"],
                                    a["dilation"])
        return cuda.dense_int8(xs, chain.weight, chain.bias, chain.rq)
    if chain.kind == "conv2d":
        a = chain.attrs
        k = generic.conv2d_int8(xs, chain.weight, chain.bias, chain.rq, a["strides"], a["padding"],
                                a["dilation"], a["groups"], codes=codes)
    else:
        k = generic.dense_int8(xs, chain.weight, chain.bias, chain.rq, codes=codes)
    k.info["path"] = "generic"
    return k


def _add_kernel(chain: _AddChain, kind: str):
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
                               a["groups"], isa=_X86_ISA[kind], residual=residual, codes=c.codes)
    return generic.add_int8(chain.out_shape, [_dtype(q) for q in chain.inputs], chain.spec)


def _float_kernel(chain: _FloatChain, kind: str):
    xs = _shape(chain.x)
    if chain.kind != "conv2d":
        xs = _rows_2d(xs)
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


def _fusable_elementwise(chain, head) -> bool:
    """Whether a matched chain is a small integer elementwise layer left to TVM's fusion (SMALL_ELEMENTWISE):
    a lookup, product or add (not one fused into a conv's epilogue) of fewer than SMALL_ELEMENTWISE outputs."""
    if not isinstance(chain, (_ElementwiseChain, _AddChain)) or getattr(chain, "conv", None) is not None:
        return False
    shape = _shape(head)
    return shape is not None and int(np.prod(shape)) < SMALL_ELEMENTWISE


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
        # structural hash -> [(PrimFunc without its symbol, GlobalVar)]: kernels whose code is the same
        # (the same shapes and schedule; weights and requant tables are arguments) are added once
        self.kernel_cache = {}

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
            if isinstance(chain, _ElementwiseChain) and chain.kind == "lut" and self.kind in _X86_ISA \
                    and FUSE_LUT_INTO_CONV:
                fused = self._conv_with_lut(g, chain)
                if fused is not None:
                    chain = fused
            if _fusable_elementwise(chain, val):
                if chain.kind != "lut":
                    continue            # left to TVM's fusion as it is
                chain.fusable = True
            plans[val] = chain
            absorbed.update(self._interior(g, val, chain))
        return g, plans

    def _epilogue_conv(self, g, q):
        """The int conv2d chain producing ``q`` whose x86 kernel can take a fused epilogue (a residual add or a
        lookup): ``q`` used once, groups=1, a tensorized path for its codes and weights; else None."""
        if not g.single_use(q):
            return None
        conv = match_int_chain(g, g.producer(q))
        if conv is None or conv.kind != "conv2d" or conv.attrs["groups"] != 1:
            return None
        from . import x86
        return None if x86.select_path(_X86_ISA[self.kind], conv.codes, conv.weight, 1) is None else conv

    def _conv_with_lut(self, g, lut_chain):
        """The int conv2d producing a lookup's only input, with the lookup fused into its epilogue
        (hardswish / SiLU / sigmoid after a conv: one kernel, no int8 tensor in between), or None."""
        conv = self._epilogue_conv(g, lut_chain.x)
        if conv is None or conv.rq.out_dtype != _dtype(lut_chain.x):
            return None
        conv.lut = lut_chain.table
        return conv

    def _match_add(self, g, val):
        """An add chain, fused into the epilogue of the x86 int8 conv producing one operand if possible."""
        chain = match_add_chain(g, val)
        if chain is None:
            return None
        if self.kind in _X86_ISA and self.fuse_add:
            for i, q in enumerate(chain.inputs):
                if chain.inputs[1 - i].same_as(q) or _dtype(q) not in CODE_DTYPES:
                    continue
                conv = self._epilogue_conv(g, q)
                if conv is None or tuple(conv.out_shape) != tuple(chain.out_shape):
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

    def _add_kernel_func(self, func, new_symbol, with_symbol=None):
        """The GlobalVar of the PrimFunc ``func``, shared with an earlier layer whose kernel is the same code
        (an LSTM's steps, equal layers of a transformer or a ResNet stage: weights and requant tables are
        arguments), so that it is compiled once; else added under ``new_symbol()`` (the function
        ``with_symbol(symbol)`` where given)."""
        key = tvm_ffi.structural_hash(func)
        for seen, gv in self.kernel_cache.get(key, []):
            if tvm_ffi.structural_equal(func, seen):
                return gv, gv.name_hint
        symbol = new_symbol()
        gv = self.builder_.add_func(with_symbol(symbol) if with_symbol else func, symbol)
        self.kernel_cache.setdefault(key, []).append((func, gv))
        return gv, symbol

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
            nonneg = chain.conv.codes.lo >= 0 if chain.conv is not None else None
            kernel = _add_kernel(chain, self.kind)
            inputs = chain.stop_vars()
        elif isinstance(chain, _IntChain):
            nonneg = chain.codes.lo >= 0
            kernel = _int_kernel(chain, self.kind)
        else:
            nonneg = None
            kernel = _float_kernel(chain, self.kind)
        if kernel is None:
            return super().visit_call_(call)
        if kernel.info.get("fusable"):
            # a plain compute for TVM to fuse and schedule (not one of relayq's scheduled "relayq_" kernels)
            # (no global symbol: private, so that FuseTIR drops it once fused)
            gv, symbol = self._add_kernel_func(kernel.func.without_attr("global_symbol"),
                                               lambda: f"{kernel.name}_fusable_{next(self.names).split('_')[-1]}")
        else:
            gv, symbol = self._add_kernel_func(kernel.finalize("relayq_kernel"),
                                               lambda: f"{next(self.names)}_{kernel.name}", kernel.finalize)
        args = [self.visit_expr(v) for v in inputs] + [_const(c) for c in kernel.consts]
        flat = chain.kind in ("dense", "dense_deq") and len(_shape(chain.x)) > 2
        if flat:
            # [..., K] -> [rows, K] for the kernel, and its [rows, N] back (reshapes of contiguous tensors)
            args[0] = self.builder_.emit(relax.op.reshape(args[0], _rows_2d(_shape(chain.x))))
        kind = chain.kind if not isinstance(chain, _AddChain) or chain.conv is None else "conv2d+add"
        int_layer = chain if isinstance(chain, _IntChain) else getattr(chain, "conv", None)
        extra = {}
        if int_layer is not None:
            extra = {"layer": int_layer.layer, "in_dtype": int_layer.codes.dtype, "w_dtype": str(int_layer.weight.dtype),
                     "out_dtype": kernel.out_dtype}
        self.stats.append({"symbol": symbol, "kind": kind,
                           "int8": isinstance(chain, (_IntChain, _AddChain, _ElementwiseChain)),
                           "nonneg": nonneg, **extra, **kernel.info})
        out = relax.call_tir(gv, args, relax.TensorType(list(kernel.out_shape), kernel.out_dtype))
        if flat:
            out = relax.op.reshape(self.builder_.emit(out), [int(d) for d in chain.out_shape])
        return out

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
    first = len(stats)
    out = _Lowerer(mod, target_kind, do_int, do_float, stats).transform()
    if len(stats) > first:
        out = relax.transform.DeadCodeElimination()(out)
    if do_int:
        _warn_slow_layers(target_kind, stats[first:], unlowered_int_layers(out))
    return out


#: How many layer names a slow-path warning lists before "and N more".
_NAMES_SHOWN = 12


def _names(layers) -> str:
    shown = ", ".join(layers[:_NAMES_SHOWN])
    return shown + (f" and {len(layers) - _NAMES_SHOWN} more" if len(layers) > _NAMES_SHOWN else "")


def _warn_slow_layers(kind: str, stats: list, unlowered: list) -> None:
    """One :class:`SlowKernelWarning` per kind of slow code a build falls back to, naming the layers."""
    if unlowered:
        warnings.warn(f"relayq: {kind}: {len(unlowered)} integer conv/dense layer(s) have no relayq kernel and run "
                      f"on TVM's generic lowering (int32 tensors in memory, several times slower): "
                      f"{_names(unlowered)}", SlowKernelWarning, stacklevel=3)
    # 9..16-bit codes have no faster exact path than int16: only 8-bit codes fall back to it
    int16 = [s.get("layer") or s["symbol"] for s in stats if s.get("path") == "int16"
             and s.get("in_dtype") != "int16" and s.get("w_dtype") == "int8"]
    if int16 and kind == "x86-avx2":
        warnings.warn(
            f"relayq: x86-avx2: {len(int16)} layer(s) take the exact int16 path (about half the speed of the u8 x s8 "
            f"vpmaddubsw path): {_names(int16)}. Their codes (after the offset that makes them unsigned) times "
            "their 8-bit weights could saturate vpmaddubsw's int16 pair sums; weights of at most 7 bits "
            "(QConfig(weight_bits=7), or LayerConfig(weight_bits=7) for these layers) or 7-bit activations "
            "(act_bits=7) make them exact on the fast path", SlowKernelWarning, stacklevel=3)
    portable = [s.get("layer") or s["symbol"] for s in stats if s.get("path") == "generic"]
    if portable and kind != "generic":
        warnings.warn(f"relayq: {kind}: {len(portable)} layer(s) run on the portable kernels (no SIMD dot product): "
                      f"{_names(portable)}", SlowKernelWarning, stacklevel=3)
    if portable and kind == "generic":
        warnings.warn(f"relayq: the generic preset runs all {len(portable)} integer conv/dense layers on portable "
                      "kernels without SIMD dot products (many times slower than x86-avx2 / x86-vnni / "
                      "arm-dotprod); use it only where no other preset applies", SlowKernelWarning, stacklevel=3)


def unlowered_int_layers(mod: tvm.IRModule) -> list:
    """Names of the integer conv2d / matmul layers left to TVM in ``mod``: int32 accumulators that are
    requantized or dequantized (through an ``astype``, possibly after the bias add). Realize's integer
    average pooling (a conv with unit weights and a rounding division) is not a layer.

    >>> # unlowered_int_layers(lower_quantized(realized, "x86-avx2"))  ->  []
    """
    names = []
    for _, f in mod.functions_items():
        if not isinstance(f, relax.Function):
            continue
        users = {}
        binds = [b for block in f.body.blocks for b in block.bindings if isinstance(b, relax.VarBinding)]
        for b in binds:
            if isinstance(b.value, relax.Call):
                for a in b.value.args:
                    if isinstance(a, relax.Var):
                        users.setdefault(a, []).append(b.value)

        def requantized(v, depth=0):
            for u in users.get(v, []):
                if _op(u) == "relax.astype":
                    return True
                if depth == 0 and _op(u) == "relax.add":
                    owner = next((b.var for b in binds if b.value.same_as(u)), None)
                    if owner is not None and requantized(owner, 1):
                        return True
            return False

        for b in binds:
            if _op(b.value) in ("relax.nn.conv2d", "relax.matmul") and _dtype_range(b.var) is not None \
                    and requantized(b.var):
                names.append(b.var.name)
    return names


def fast_path_overrides(realized: tvm.IRModule, target_kind: str = "x86-avx2") -> dict:
    """``{layer: LayerConfig(weight_bits=7)}`` for every layer of a realized module that takes the exact
    int16 path on ``target_kind`` with 8-bit codes and 8-bit weights: quantizing again with these
    ``layer_overrides`` puts those layers on the u8 x s8 path (7-bit weights never saturate
    ``vpmaddubsw``: ``255 * 126 <= 32767``), and leaves every other layer at 8 bits.

    >>> # over = fast_path_overrides(qmodel.realized)
    >>> # qmodel = relayq.quantize_model(mod, params, data, config=relayq.QConfig(layer_overrides=over))
    """
    from ..config import LayerConfig

    stats = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SlowKernelWarning)
        _Lowerer(realized, target_kind, True, False, stats).transform()
    return {s["layer"]: LayerConfig(weight_bits=7) for s in stats
            if s.get("layer") and s.get("path") == "int16" and s.get("in_dtype") != "int16" and s.get("w_dtype") == "int8"}


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
