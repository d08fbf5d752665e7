"""Portable fused kernels (no intrinsics) and the pieces every relayq kernel shares.

A *kernel* here is one scheduled TIR ``PrimFunc`` that computes a whole realized layer: the int8 conv2d
or dense, the int32 bias, the integer requantization of :func:`relayq.qmath.requantize` and the clip
and cast to int8, so that no int32 tensor is ever written to memory. The float kernels compute
conv2d/dense + bias + clip (ReLU / ReLU6) in fp32 for the baseline.

Requantization is bit-exact with the realized Relax chain::

    t = int64(acc + bias) ; t = (t * M + R) >> S ; q = int8(clip(t, lo, hi))

with ``M``, ``R``, ``S`` int64 scalars (baked into the code as immediates) or per-output-channel
vectors (passed as one ``(3, O)`` int64 table).

This module's own schedules are deliberately simple (NCHW, parallel over (batch, channel), one
output row of accumulators at a time): the fallback for the ``"generic"`` preset and for grouped
convolutions that the x86 kernels do not cover.

Example::

    >>> import numpy as np
    >>> rq = Requant.from_arrays(np.int64(1 << 30), np.int64(1 << 30), np.int64(31), -127, 127)
    >>> k = conv2d_int8((1, 4, 6, 6), np.ones((8, 4, 3, 3), np.int8), np.zeros(8, np.int32), rq,
    ...                 (1, 1), (1, 1, 1, 1), (1, 1), 1)
    >>> k.out_shape, k.out_dtype
    ((1, 8, 6, 6), 'int8')
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np
import tvm
from tvm import te, tirx
from tvm import s_tir

# Attribute value of TVM's ``kOpaque`` operator pattern: FuseOps must never merge a scheduled
# kernel into a neighbour (that would discard its schedule).
OP_PATTERN_OPAQUE = 8
# ``kInjective``: a plain compute FuseOps may merge with its elementwise / injective neighbours.
OP_PATTERN_INJECTIVE = 2


@dataclass
class Requant:
    """Integer requantization ``cast(clip(((acc * M + R) >> S) + zp, lo, hi), out_dtype)`` (M, R, S
    scalars or per-channel vectors; ``zp`` the output zero point of asymmetric codes, ``out_dtype``
    int8, uint8 or int16).

    >>> Requant.from_arrays(3, 4, 3, 0, 127).per_channel
    False
    """

    multiplier: np.ndarray
    addend: np.ndarray
    shift: np.ndarray
    lo: int
    hi: int
    zp: int = 0
    out_dtype: str = "int8"
    # set by a kernel that proved |acc * M + R| < 2^31 for every input (int32_requant): the
    # requantization then runs in int32 (8 lanes a vector on AVX2 instead of two 64-bit halves)
    int32_exact: bool = False

    @classmethod
    def from_arrays(cls, multiplier, addend, shift, lo, hi, zp=0, out_dtype="int8") -> "Requant":
        """Build from anything numpy can read; size-1 vectors become scalars.

        >>> Requant.from_arrays([5], [2], [2], -127, 127).multiplier.shape
        ()
        >>> Requant.from_arrays(5, 2, 2, 0, 255, zp=128, out_dtype="uint8").out_dtype
        'uint8'
        """
        if out_dtype not in CODE_DTYPES:
            raise ValueError(f"requantized codes are one of {CODE_DTYPES}, got {out_dtype!r}")
        arrs = [np.asarray(a, dtype=np.int64).reshape(-1) for a in (multiplier, addend, shift)]
        n = max(a.size for a in arrs)
        if n == 1:
            arrs = [a.reshape(()) for a in arrs]
        else:
            arrs = [np.broadcast_to(a, (n,)).copy() for a in arrs]
        info = np.iinfo(out_dtype)
        return cls(arrs[0], arrs[1], arrs[2], max(int(lo), int(info.min)), min(int(hi), int(info.max)), int(zp),
                   out_dtype)

    @property
    def split_shift(self) -> bool:
        """True when every shift is >= 32 and every multiplier fits int32: the requantization then
        runs as a 32-bit high-half plus an int32 shift (:func:`requant_expr`), exactly.

        >>> Requant.from_arrays(1 << 30, 1 << 37, 38, 0, 127).split_shift, Requant.from_arrays(3, 4, 3, 0, 9).split_shift
        (True, False)
        """
        return bool(np.all(self.shift >= 32) and np.all(self.shift <= 63)
                    and np.all(np.abs(self.multiplier) < (1 << 31)))

    @property
    def per_channel(self) -> bool:
        """True when M/R/S are vectors (one entry per output channel)."""
        return self.multiplier.ndim > 0

    def table(self, channels: int) -> np.ndarray:
        """The ``(3, channels)`` int64 table [M; R; S] padded with harmless entries (M=0, S=1).

        >>> Requant.from_arrays([1, 2], [1, 1], [1, 1], 0, 9).table(4)[:, 3].tolist()
        [0, 0, 1]
        """
        out = np.zeros((3, channels), np.int64)
        out[2] = 1
        n = self.multiplier.size
        out[0, :n], out[1, :n], out[2, :n] = self.multiplier, self.addend, self.shift
        return out

    def int32_requant(self, bound) -> "Requant":
        """This requantization marked ``int32_exact`` where, for every channel ``o``, an accumulator
        within ``[-bound[o], bound[o]]`` (the kernel's value with the bias; see
        :func:`accumulator_bound`) keeps ``acc * M + R`` inside int32 and the shift is below 32: int32
        arithmetic (which wraps like a ring, so folding the bias into R changes nothing) then gives
        the same integers as int64. Otherwise ``self`` unchanged. Realize makes the multiplier short
        enough for this where the layer's accumulator is small (:func:`relayq.qmath.requant_multiplier_bits`).

        >>> Requant.from_arrays(2458, 1 << 12, 13, -127, 127).int32_requant(145161).int32_exact
        True
        >>> Requant.from_arrays(1 << 30, 1 << 35, 36, -127, 127).int32_requant(145161).int32_exact
        False
        """
        bound = np.asarray(bound, np.int64).reshape(-1)
        m, r, s = (np.broadcast_to(a, bound.shape).astype(np.int64) for a in (self.multiplier, self.addend,
                                                                             self.shift))
        # exact Python integers: bound * M may exceed int64 when it fails
        fits = all(int(b) * abs(int(mm)) + abs(int(rr)) <= (1 << 31) - 1 and 0 <= int(ss) <= 31
                   for b, mm, rr, ss in zip(bound, m, r, s))
        return dataclasses.replace(self, int32_exact=True) if fits else self

    def reference(self, acc) -> np.ndarray:
        """numpy evaluation on an int64 accumulator with channels on axis 1 (for tests)."""
        acc = np.asarray(acc, np.int64)
        m, r, s = self.multiplier, self.addend, self.shift
        if self.per_channel:
            shape = [1] * acc.ndim
            shape[1] = -1
            m, r, s = m.reshape(shape), r.reshape(shape), s.reshape(shape)
        return np.clip(((acc * m + r) >> s) + self.zp, self.lo, self.hi).astype(self.out_dtype)


#: Storage types of the integer codes relayq's kernels read and write (8-bit symmetric, 8-bit
#: asymmetric with a zero point, and 9..16-bit codes).
CODE_DTYPES = ("int8", "uint8", "int16")

#: Kernels with less work than this run on the calling thread alone: multiply-adds for conv / dense,
#: elements for elementwise kernels (lookup tables, adds, products; schedule_rest's loop nests use the
#: same element count). Waking the thread pool costs more
#: than such a kernel (an LSTM text classifier of ~180 kernels of 25-37 K multiply-adds each: 1.24 ms
#: per run from idle with every kernel parallel, 2 threads, AMD Zen 4; see ``schedule``).
PARALLEL_MIN_MACS = 1 << 17
PARALLEL_MIN_ELEMENTS = 1 << 14


class _SerialSchedule:
    """A :class:`tvm.s_tir.Schedule` whose ``parallel`` does nothing (every other call goes through)."""

    def __init__(self, sch):
        self._sch = sch

    def parallel(self, loop):  # noqa: ARG002 - the loop stays serial
        return None

    def __getattr__(self, name):
        return getattr(self._sch, name)


def schedule(func, work: int, min_work: int = PARALLEL_MIN_MACS):
    """``s_tir.Schedule(func)`` for a kernel of ``work`` units (multiply-adds or elements): below
    ``min_work`` its ``parallel`` calls are ignored, so a tiny kernel never launches the thread pool.

    >>> import tvm
    >>> from tvm import te
    >>> a = te.placeholder((64,), "float32"); b = te.compute((64,), lambda i: a[i] * 2.0)
    >>> sch = schedule(te.create_prim_func([a, b]), work=64)
    >>> sch.parallel(sch.get_loops(sch.get_sblock("compute"))[0]) is None
    True
    >>> "parallel" in sch.mod.script()
    False
    """
    sch = s_tir.Schedule(func)
    return sch if work >= min_work else _SerialSchedule(sch)


@dataclass(frozen=True)
class Codes:
    """What a kernel knows about the integer codes of its input: storage ``dtype``, a proven range
    ``[lo, hi]`` (from the producer's clip: a fused ReLU gives ``lo >= 0``) and ``pad``, the code that
    padding holds (the zero point of asymmetric codes, whose real zero is not code 0).

    >>> Codes.of("uint8", pad=128).hi, Codes.of("int8", lo=0).lo
    (255, 0)
    """

    dtype: str = "int8"
    lo: int = -128
    hi: int = 127
    pad: int = 0

    @classmethod
    def of(cls, dtype: str, lo=None, hi=None, pad: int = 0) -> "Codes":
        """The codes of ``dtype`` narrowed to ``[lo, hi]`` where given (never wider than the dtype)."""
        if dtype not in CODE_DTYPES:
            raise ValueError(f"kernel inputs are one of {CODE_DTYPES}, got {dtype!r}")
        info = np.iinfo(dtype)
        lo = int(info.min) if lo is None else max(int(lo), int(info.min))
        hi = int(info.max) if hi is None else min(int(hi), int(info.max))
        return cls(dtype, lo, hi, int(pad))

    @property
    def span(self) -> tuple:
        """The range of every value the kernel reads, padding included."""
        return min(self.lo, self.pad), max(self.hi, self.pad)


@dataclass
class Kernel:
    """A scheduled PrimFunc plus the constant arguments (packed weights, bias, requant table).

    Call convention: ``func(x, *consts, out)``; ``out`` has ``out_shape`` / ``out_dtype``.
    """

    func: tvm.tirx.PrimFunc
    consts: list = field(default_factory=list)
    out_shape: tuple = ()
    out_dtype: str = "int8"
    name: str = "relayq_kernel"
    info: dict = field(default_factory=dict)

    def finalize(self, symbol: str) -> tvm.tirx.PrimFunc:
        """The PrimFunc with the attributes a Relax module needs (global symbol, scheduled, opaque).

        >>> # kernel.finalize("relayq_qconv_0").attrs["global_symbol"] == "relayq_qconv_0"
        """
        return (self.func.with_attr("global_symbol", symbol).with_attr("tirx.is_scheduled", True)
                .with_attr("op_pattern", OP_PATTERN_OPAQUE).with_attr("tirx.noalias", True))


def kernel_acc_bound(weight, in_axes, codes: Codes, bias) -> np.ndarray:
    """Per output channel, the largest ``|sum_k w x + b|`` a kernel can requantize, for input codes
    (and padding) within ``codes.span`` and the int32 ``bias`` the kernel adds (which holds any
    zero-point term): centred on the padding code ``c``, the value is ``sum w (x - c) + (b + c sum w)``.

    >>> kernel_acc_bound(np.array([[1, -2], [3, 3]]), (1,), Codes.of("int8", lo=0), [5, -5]).tolist()
    [386, 767]
    """
    w = np.asarray(weight, np.int64)
    c = int(codes.pad)
    lo, hi = codes.span
    xmax = max(abs(lo - c), abs(hi - c))
    wsum = w.sum(axis=tuple(in_axes)).reshape(-1)
    wabs = np.abs(w).sum(axis=tuple(in_axes)).reshape(-1)
    b = np.broadcast_to(np.asarray(bias, np.int64).reshape(-1), wsum.shape)
    return wabs * xmax + np.abs(b + c * wsum)


def weight_codes(weight) -> np.ndarray:
    """Integer weight codes as int8, or int16 where they need it (weights above 8 bits).

    >>> weight_codes(np.array([3, -5])).dtype, weight_codes(np.array([300])).dtype
    (dtype('int8'), dtype('int16'))
    """
    w = np.asarray(weight)
    if w.dtype in (np.int8, np.int16):
        return w
    w64 = w.astype(np.int64)
    if w64.size == 0 or (w64.min() >= -128 and w64.max() <= 127):
        return w64.astype(np.int8)
    return w64.astype(np.int16)


# ----------------------------------------------------------------------------- shared expressions
def requant_expr(acc_i32, o, rq: Requant, table):
    """TE expression of the fused requantization of an int32 value (``table``: (3, O) or None).

    >>> # out = te.compute(shape, lambda n, o, h, w: requant_expr(acc[n, o, h, w] + b[o], o, rq, tbl))
    """
    if rq.int32_exact:
        # proven by Requant.int32_requant: the int64 value never leaves int32 (the table's addend with
        # the folded bias is wrapped to int32; ring arithmetic makes the sum exact all the same)
        if table is None:
            m, r, s = (tirx.const(int(v), "int32") for v in (rq.multiplier, rq.addend, rq.shift))
        else:
            m, r, s = (table[i, o].astype("int32") for i in range(3))
        t = (acc_i32 * m + r) >> s
        if rq.zp:
            t = t + tirx.const(rq.zp, "int32")
        return te.max(te.min(t, tirx.const(rq.hi, "int32")), tirx.const(rq.lo, "int32")).astype(rq.out_dtype)
    t = acc_i32.astype("int64")
    if rq.split_shift:
        # Same value, vector friendly on AVX2 (no 64-bit arithmetic shift / min / max there):
        # floor(t / 2^S) == floor(floor(t / 2^32) / 2^(S-32)); t >> 32 always fits int32, and the
        # 32-bit multiplier is spelled as a sign-extended int32 so LLVM emits vpmuldq.
        if table is None:
            t = t * tirx.const(int(rq.multiplier), "int64") + tirx.const(int(rq.addend), "int64")
            hi = (t >> tirx.const(32, "int64")).astype("int32")
            r = hi >> tirx.const(int(rq.shift) - 32, "int32")
        else:
            t = t * table[0, o].astype("int32").astype("int64") + table[1, o]
            hi = (t >> tirx.const(32, "int64")).astype("int32")
            # the clamp to [0, 31] (a no-op for split_shift tables) keeps TVM's bound analysis from
            # "proving" the result small and dropping the clip below
            sh = te.max(te.min(table[2, o].astype("int32") - tirx.const(32, "int32"), tirx.const(31, "int32")),
                        tirx.const(0, "int32"))
            r = hi >> sh
        if rq.zp:
            # |acc * M + R| < 2^62 (M < 2^31) and S >= 32, so r + zp stays far inside int32
            r = r + tirx.const(rq.zp, "int32")
        r = te.max(te.min(r, tirx.const(rq.hi, "int32")), tirx.const(rq.lo, "int32"))
        return r.astype(rq.out_dtype)
    if table is None:
        t = (t * tirx.const(int(rq.multiplier), "int64") + tirx.const(int(rq.addend), "int64")) \
            >> tirx.const(int(rq.shift), "int64")
    else:
        t = (t * table[0, o] + table[1, o]) >> table[2, o]
    if rq.zp:
        t = t + tirx.const(rq.zp, "int64")
    t = te.max(te.min(t, tirx.const(rq.hi, "int64")), tirx.const(rq.lo, "int64"))
    return t.astype(rq.out_dtype)


def act_expr(y, act):
    """Clamp a float expression to ``act = (lo, hi)`` (None or +-inf ends are skipped).

    >>> act_expr  # act=(0.0, inf) is ReLU, (0.0, 6.0) ReLU6
    <function act_expr at ...>
    """
    if act is None:
        return y
    lo, hi = act
    dt = "float32"  # the float kernels are fp32 only
    if hi is not None and np.isfinite(hi):
        y = te.min(y, tirx.const(float(hi), dt))
    if lo is not None and np.isfinite(lo):
        y = te.max(y, tirx.const(float(lo), dt))
    return y


def conv_out_hw(h, w, kh, kw, strides, padding, dilation):
    """Output (OH, OW) of a conv with Relax's (top, left, bottom, right) padding.

    >>> conv_out_hw(56, 56, 3, 3, (2, 2), (1, 1, 1, 1), (1, 1))
    (28, 28)
    """
    pt, pl, pb, pr = padding
    oh = (h + pt + pb - dilation[0] * (kh - 1) - 1) // strides[0] + 1
    ow = (w + pl + pr - dilation[1] * (kw - 1) - 1) // strides[1] + 1
    return int(oh), int(ow)


def pad_nchw(X, padding, hp, wp, fill, name="pad", cast=None):
    """A TE stage padding NCHW ``X`` to (hp, wp) (extra right/bottom rows are filled as well)."""
    pt, pl = padding[0], padding[1]
    _, _, h, w = X.shape

    def f(n, c, i, j):
        v = X[n, c, i - pt, j - pl]
        if cast is not None:
            v = cast(v)
        ok = tirx.all(i >= pt, i < pt + h, j >= pl, j < pl + w)
        return tirx.if_then_else(ok, v, tirx.const(fill, v.dtype))

    return te.compute((X.shape[0], X.shape[1], hp, wp), f, name=name)


def _padded_hw(x_shape, kh, kw, strides, padding, dilation, oh, ow):
    h, w = x_shape[2], x_shape[3]
    hp = max(h + padding[0] + padding[2], (oh - 1) * strides[0] + (kh - 1) * dilation[0] + 1)
    wp = max(w + padding[1] + padding[3], (ow - 1) * strides[1] + (kw - 1) * dilation[1] + 1)
    return hp, wp


# ----------------------------------------------------------------------------- generic kernels
def _conv_compute(x_shape, w_shape, dtype, acc_dtype, strides, padding, dilation, groups, w_dtype=None, fill=0):
    n, c, h, w = x_shape
    o, cg, kh, kw = w_shape
    oh, ow = conv_out_hw(h, w, kh, kw, strides, padding, dilation)
    hp, wp = _padded_hw(x_shape, kh, kw, strides, padding, dilation, oh, ow)
    X = te.placeholder(x_shape, dtype, name="x")
    W = te.placeholder(w_shape, w_dtype or dtype, name="w")
    Xp = pad_nchw(X, padding, hp, wp, fill, "pad")
    og = o // groups
    ic = te.reduce_axis((0, cg), "ic")
    ry = te.reduce_axis((0, kh), "kh")
    rx = te.reduce_axis((0, kw), "kw")
    sh, sw = strides
    dh, dw = dilation
    acc = te.compute(
        (n, o, oh, ow),
        lambda b, oc, i, j: te.sum(
            Xp[b, (oc // og) * cg + ic, i * sh + ry * dh, j * sw + rx * dw].astype(acc_dtype)
            * W[oc, ic, ry, rx].astype(acc_dtype), axis=[ic, ry, rx]),
        name="acc")
    return X, W, acc, (n, o, oh, ow)


def _schedule_generic_conv(func):
    sch = s_tir.Schedule(func)
    pad, acc, out = sch.get_sblock("pad"), sch.get_sblock("acc"), sch.get_sblock("out")
    ploops = sch.get_loops(pad)
    sch.parallel(sch.fuse(*ploops[:2]))
    n, o, i, j = sch.get_loops(out)
    sch.parallel(sch.fuse(n, o))
    sch.compute_at(acc, i, preserve_unit_loops=True)
    loops = sch.get_loops(acc)
    j2, ic, ry, rx = loops[-4:]
    sch.reorder(ic, ry, rx, j2)
    sch.decompose_reduction(acc, ic)
    return sch.mod["main"]


def conv2d_int8(x_shape, weight, bias, rq: Requant, strides, padding, dilation, groups, codes=None) -> Kernel:
    """Fused integer conv2d (any ``groups``) + int32 bias + requant + clip + cast, simple schedule.

    ``weight`` is the OIHW int8 (or int16) numpy array, ``bias`` an int32 vector of length O, ``codes``
    the input's :class:`Codes` (int8 padded with 0 by default; uint8 / int16 inputs, and the zero point
    as padding, otherwise).

    >>> # k = conv2d_int8((1, 8, 8, 8), w, b, rq, (1, 1), (1, 1, 1, 1), (1, 1), 1); k.func, k.consts
    """
    codes = codes or Codes()
    weight = weight_codes(weight)
    X, W, acc, oshape = _conv_compute(tuple(x_shape), weight.shape, codes.dtype, "int32", strides, padding,
                                      dilation, groups, str(weight.dtype), codes.pad)
    o = weight.shape[0]
    B = te.placeholder((o,), "int32", name="bias")
    tbl = te.placeholder((3, o), "int64", name="rq") if rq.per_channel else None
    out = te.compute(oshape, lambda b, oc, i, j: requant_expr(acc[b, oc, i, j] + B[oc], oc, rq, tbl),
                     name="out")
    args = [X, W, B] + ([tbl] if tbl is not None else []) + [out]
    func = _schedule_generic_conv(te.create_prim_func(args))
    consts = [weight, np.asarray(bias, np.int32).reshape(-1)] + ([rq.table(o)] if tbl is not None else [])
    return Kernel(func, consts, oshape, rq.out_dtype, "qconv2d_generic")


def conv2d_fp32(x_shape, weight, bias, act, strides, padding, dilation, groups) -> Kernel:
    """Fused fp32 conv2d (any ``groups``) + bias + clip ``act=(lo, hi)``, simple schedule.

    >>> # k = conv2d_fp32((1, 8, 8, 8), w, b, (0.0, 6.0), (1, 1), (1, 1, 1, 1), (1, 1), 1)
    """
    weight = np.asarray(weight, np.float32)
    X, W, acc, oshape = _conv_compute(tuple(x_shape), weight.shape, "float32", "float32", strides, padding,
                                      dilation, groups)
    o = weight.shape[0]
    B = te.placeholder((o,), "float32", name="bias")
    out = te.compute(oshape, lambda b, oc, i, j: act_expr(acc[b, oc, i, j] + B[oc], act), name="out")
    func = _schedule_generic_conv(te.create_prim_func([X, W, B, out]))
    return Kernel(func, [weight, _fbias(bias, o)], oshape, "float32", "conv2d_generic")


def _fbias(bias, o):
    return np.zeros(o, np.float32) if bias is None else np.asarray(bias, np.float32).reshape(-1)


# Output columns per parallel task of the generic dense (keeps a row of accumulators in cache).
GENERIC_DENSE_COLS = 64


def _schedule_generic_dense(func, n_cols):
    sch = s_tir.Schedule(func)
    acc, out = sch.get_sblock("acc"), sch.get_sblock("out")
    m, n = sch.get_loops(out)
    no, _ = sch.split(n, [None, min(GENERIC_DENSE_COLS, n_cols)])
    sch.parallel(sch.fuse(m, no))
    sch.compute_at(acc, sch.get_loops(out)[0], preserve_unit_loops=True)
    loops = sch.get_loops(acc)
    n2, k = loops[-2:]
    sch.reorder(k, n2)
    sch.decompose_reduction(acc, k)
    return sch.mod["main"]


def _dense_compute(x_shape, w_shape, dtype, acc_dtype, w_dtype=None):
    m, k = x_shape
    k2, n = w_shape
    A = te.placeholder((m, k), dtype, name="x")
    W = te.placeholder((k, n), w_dtype or dtype, name="w")
    r = te.reduce_axis((0, k), "k")
    acc = te.compute((m, n), lambda i, j: te.sum(A[i, r].astype(acc_dtype) * W[r, j].astype(acc_dtype), axis=r),
                     name="acc")
    return A, W, acc


def dense_int8(x_shape, weight_kn, bias, rq: Requant, codes=None) -> Kernel:
    """Fused integer dense ``(M, K) x (K, N)`` + bias + requant + clip + cast, simple schedule
    (``codes``: the input's :class:`Codes`, int8 by default).

    >>> # k = dense_int8((1, 64), w_kn, b, rq)
    """
    codes = codes or Codes()
    weight_kn = weight_codes(weight_kn)
    A, W, acc = _dense_compute(tuple(x_shape), weight_kn.shape, codes.dtype, "int32", str(weight_kn.dtype))
    n = weight_kn.shape[1]
    B = te.placeholder((n,), "int32", name="bias")
    tbl = te.placeholder((3, n), "int64", name="rq") if rq.per_channel else None
    out = te.compute(acc.shape, lambda i, j: requant_expr(acc[i, j] + B[j], j, rq, tbl), name="out")
    args = [A, W, B] + ([tbl] if tbl is not None else []) + [out]
    func = _schedule_generic_dense(te.create_prim_func(args), n)
    consts = [weight_kn, np.asarray(bias, np.int32).reshape(-1)] + ([rq.table(n)] if tbl is not None else [])
    return Kernel(func, consts, (x_shape[0], n), rq.out_dtype, "qdense_generic")


def dense_fp32(x_shape, weight_kn, bias, act) -> Kernel:
    """Fused fp32 dense + bias + clip, simple schedule.

    >>> # k = dense_fp32((1, 64), w_kn, b, None)
    """
    weight_kn = np.asarray(weight_kn, np.float32)
    A, W, acc = _dense_compute(tuple(x_shape), weight_kn.shape, "float32", "float32")
    n = weight_kn.shape[1]
    B = te.placeholder((n,), "float32", name="bias")
    out = te.compute(acc.shape, lambda i, j: act_expr(acc[i, j] + B[j], act), name="out")
    func = _schedule_generic_dense(te.create_prim_func([A, W, B, out]), n)
    return Kernel(func, [weight_kn, _fbias(bias, n)], (x_shape[0], n), "float32", "dense_generic")


# ----------------------------------------------------------------------------- quantized residual add
_I32_LIMIT = 1 << 31


@dataclass
class AddTerm:
    """One operand of the realized integer add: ``((q - zp) * m + r) >> s`` (int64 semantics)."""

    zp: int
    m: int
    r: int
    s: int


@dataclass
class AddRequant:
    """The realized add chain of :func:`relayq.qmath.add` (``Realizer.finalize``'s Pending "add")::

        t = sum_i ((q_i - zp_i) * m_i + r_i) >> s_i ;  t = ((t + r) >> s) + zp ;  out = cast(clip(t, lo, hi))

    ``in_ranges`` are the possible codes of each operand (their storage range, or the clip range of a
    requantized operand). :attr:`int32_ok` says whether every intermediate provably fits int32, in
    which case :func:`add_requant_expr` computes the chain in int32 (``m = mh * 2^16 + ml`` split,
    exact); otherwise it uses int64.

    >>> a = AddRequant([AddTerm(0, 1 << 30, 1 << 14, 15), AddTerm(0, 1 << 30, 1 << 14, 15)], 1 << 15, 16, 0,
    ...                -127, 127, "int8", [(-128, 127), (-128, 127)])
    >>> a.reference([np.array([10]), np.array([-3])]).tolist()
    [7]
    """

    terms: list
    r: int
    s: int
    zp: int
    lo: int
    hi: int
    out_dtype: str
    in_ranges: list

    @staticmethod
    def _split_term_bounds(term: AddTerm, v):
        """The int32 path's intermediates of one term for code offsets ``v`` (int64 numpy)."""
        mh, ml = term.m >> 16, term.m & 0xFFFF
        a = v * mh
        b = v * ml + term.r
        if term.s >= 16:
            u = a + (b >> 16)
            out = u >> (term.s - 16)
            return [a, b, u, out], out
        sa = a << (16 - term.s)
        out = sa + (b >> term.s)
        return [a, b, sa, out], out

    @property
    def int32_ok(self) -> bool:
        if len(self.terms) != len(self.in_ranges):
            return False
        lo_sum, hi_sum = 0, 0
        for term, (qlo, qhi) in zip(self.terms, self.in_ranges):
            if not (0 < term.m < _I32_LIMIT and 1 <= term.s <= 40 and abs(term.r) < (1 << 30)):
                return False
            v = np.array([qlo - term.zp, qhi - term.zp], np.int64)
            if np.any(np.abs(v) >= (1 << 15)):
                return False
            inter, out = self._split_term_bounds(term, v)
            if any(np.any(np.abs(x) >= _I32_LIMIT) for x in inter):
                return False
            lo_sum, hi_sum = lo_sum + int(out.min()), hi_sum + int(out.max())
        if not 1 <= self.s <= 31:
            return False
        ext = [lo_sum + self.r, hi_sum + self.r, lo_sum, hi_sum]
        return all(abs(x) < _I32_LIMIT - abs(self.zp) - 1 for x in ext)

    def reference(self, codes) -> np.ndarray:
        """numpy int64 evaluation (the realized graph's semantics)."""
        t = 0
        for term, q in zip(self.terms, codes):
            t = t + (((np.asarray(q, np.int64) - term.zp) * term.m + term.r) >> term.s)
        t = ((t + self.r) >> self.s) + self.zp
        return np.clip(t, self.lo, self.hi).astype(self.out_dtype)


def add_requant_expr(values, spec: AddRequant, int32=None):
    """TE expression of the add chain on operand values (any integer TE expressions, e.g. int8 loads).

    >>> # out = te.compute(shape, lambda *i: add_requant_expr([A[i], B[i]], spec), name="out")
    """
    if int32 is None:
        int32 = spec.int32_ok
    dt = "int32" if int32 else "int64"

    def c(v):
        return tirx.const(int(v), dt)

    total = None
    for term, val in zip(spec.terms, values):
        v = val.astype(dt)
        if term.zp:
            v = v - c(term.zp)
        if int32:
            a = v * c(term.m >> 16)
            b = v * c(term.m & 0xFFFF) + c(term.r)
            if term.s >= 16:
                t = a + (b >> c(16))
                if term.s > 16:
                    t = t >> c(term.s - 16)
            else:
                t = (a << c(16 - term.s)) + (b >> c(term.s))
        else:
            t = (v * c(term.m) + c(term.r)) >> c(term.s)
        total = t if total is None else total + t
    t = (total + c(spec.r)) >> c(spec.s)
    if spec.zp:
        t = t + c(spec.zp)
    t = te.max(te.min(t, c(spec.hi)), c(spec.lo))
    return t.astype(spec.out_dtype)


# Elements per vector of the standalone add kernel (a multiple of every ISA's lane count).
ADD_VECTOR = 64


def add_int8(shape, in_dtypes, spec: AddRequant) -> Kernel:
    """Standalone fused integer add + rescale + clip + cast: two int8/uint8 tensors in, one out.

    Parallel over contiguous chunks and vectorized (``ADD_VECTOR`` elements per inner loop); computed in
    int32 when :attr:`AddRequant.int32_ok` holds, bit-exact with the realized int64 chain either way.

    >>> # k = add_int8((1, 64, 56, 56), ["int8", "int8"], spec)
    """
    shape = tuple(int(v) for v in shape)
    size = int(np.prod(shape))
    ins = [te.placeholder(shape, dt, name=f"q{i}") for i, dt in enumerate(in_dtypes)]
    out = te.compute(shape, lambda *idx: add_requant_expr([a[idx] for a in ins], spec), name="out")
    sch = schedule(te.create_prim_func(ins + [out]), size, PARALLEL_MIN_ELEMENTS)
    blk = sch.get_sblock("out")
    i = sch.fuse(*sch.get_loops(blk))
    vec = ADD_VECTOR if size % ADD_VECTOR == 0 else next(v for v in (32, 16, 8, 4, 2, 1) if size % v == 0)
    chunks = size // vec
    # about 4 tasks per core-ish granularity: inner chunk of vectors per task keeps tasks >= 4 KiB
    per_task = max(1, min(chunks, 4096 // vec))
    while chunks % per_task:
        per_task -= 1
    io, im, ii = sch.split(i, [None, per_task, vec])
    sch.parallel(io)
    sch.vectorize(ii)
    func = sch.mod["main"]
    info = {"int32": spec.int32_ok, "vector": vec}
    return Kernel(func, [], shape, spec.out_dtype, "qadd", info)


