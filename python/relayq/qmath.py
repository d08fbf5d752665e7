"""The integer arithmetic of relayq, in numpy: the single reference shared by realize, the kernels and tests.

Conventions (every realized graph and every kernel must compute exactly these integers):

* A quantized tensor is ``real ~= scale * (q - zero_point)``. Symmetric schemes have ``zero_point = 0``.
  A signed ``bits``-bit symmetric tensor uses the range ``[-(2^(bits-1) - 1), 2^(bits-1) - 1]`` (the
  most negative code is left unused so that the range is symmetric and negation is exact).
* Quantizing a float: ``q = clip(round_half_even(x / scale) + zero_point, qmin, qmax)``. This is what
  ``relax.op.quantize`` computes (it divides, and rounds half to even), so the graph input quantizer
  and this reference agree bit for bit.
* Requantizing an integer accumulator by a real factor ``r = M * 2^-shift`` (``M`` a Q31 integer in
  ``[2^30, 2^31)``): ``(acc * M + 2^(shift-1)) >> shift`` with an arithmetic shift, i.e. round half
  towards +infinity, computed in int64 so that it can never overflow for int32 accumulators.
  A conv / dense layer whose accumulator is provably small gets a shorter multiplier
  (:func:`requant_multiplier_bits`, at least ``out_bits + 4`` bits) so that the whole
  requantization fits int32: the kernels then run it on 8 int32 lanes instead of 64-bit halves.

Example::

    >>> import numpy as np
    >>> from relayq import qmath
    >>> M, s = qmath.quantize_multiplier(0.0123)
    >>> int(qmath.requantize(np.array([1000]), M, s, -127, 127)[0])
    12
"""
from __future__ import annotations

import numpy as np

from .errors import ConfigError

# Q31: the multiplier keeps 31 fractional bits, the precision of an int32 fixed-point number.
MULTIPLIER_BITS = 31
# Extra precision bits used when two tensors of different scales are added: each operand is first
# rescaled to ``out_scale / 2^ADD_EXTRA_BITS`` so that the sum is rounded once, at the end.
ADD_EXTRA_BITS = 16


def qrange(bits: int, signed: bool = True) -> tuple[int, int]:
    """The integer range of a ``bits``-bit code: symmetric when signed, ``[0, 2^bits - 1]`` when not.

    >>> qrange(8), qrange(8, signed=False), qrange(4)
    ((-127, 127), (0, 255), (-7, 7))
    """
    if not 2 <= int(bits) <= 32:
        raise ConfigError(f"bit width must be in [2, 32], got {bits}")
    if signed:
        hi = (1 << (bits - 1)) - 1
        return -hi, hi
    return 0, (1 << bits) - 1


def storage_dtype(bits: int, signed: bool = True) -> str:
    """The narrowest numpy/TVM integer dtype that holds a ``bits``-bit code.

    >>> storage_dtype(4), storage_dtype(8, signed=False), storage_dtype(12)
    ('int8', 'uint8', 'int16')
    """
    lo, hi = qrange(bits, signed)
    for dt in (("int8", "int16", "int32") if signed else ("uint8", "uint16", "uint32")):
        info = np.iinfo(dt)
        if info.min <= lo and hi <= info.max:
            return dt
    raise ConfigError(f"no storage type for {bits}-bit codes")


def scale_from_threshold(threshold: float, bits: int, signed: bool = True) -> float:
    """The scale that maps ``threshold`` onto the largest code.

    A zero threshold (an all-zero tensor) gets scale 1 so that nothing divides by zero.

    >>> scale_from_threshold(12.7, 8) == 12.7 / 127
    True
    """
    _, hi = qrange(bits, signed)
    t = float(threshold)
    if not np.isfinite(t) or t < 0:
        raise ConfigError(f"threshold must be finite and >= 0, got {threshold}")
    return t / hi if t > 0 else 1.0


def quantize(x, scale, bits: int = 8, signed: bool = True, zero_point=0, axis: int | None = None):
    """Quantize a float array: ``clip(round_half_even(x / scale) + zp, qmin, qmax)``, as int64.

    ``scale`` and ``zero_point`` may be vectors along ``axis`` (per-channel).

    >>> quantize(np.array([0.25, -0.36, 100.0]), 0.1).tolist()
    [2, -4, 127]
    """
    lo, hi = qrange(bits, signed)
    x = np.asarray(x)
    scale = np.asarray(scale, dtype=x.dtype if x.dtype.kind == "f" else np.float32)
    zp = np.asarray(zero_point)
    if axis is not None and scale.ndim == 1:
        shape = [1] * x.ndim
        shape[axis] = -1
        scale = scale.reshape(shape)
        if zp.ndim == 1:
            zp = zp.reshape(shape)
    q = np.round(x / scale) + zp
    return np.clip(q, lo, hi).astype(np.int64)


def dequantize(q, scale, zero_point=0):
    """``scale * (q - zero_point)`` in float32.

    >>> dequantize(np.array([2, -4]), 0.5).tolist()
    [1.0, -2.0]
    """
    return (np.asarray(scale, dtype=np.float32) * (np.asarray(q, dtype=np.float32) - np.float32(zero_point)))


def quantize_multiplier(real: float, bits: int = MULTIPLIER_BITS) -> tuple[int, int]:
    """Split a positive real factor into a Q31 integer multiplier ``M`` and a right shift.

    ``real ~= M * 2^-shift`` with ``2^30 <= M < 2^31`` (relative error below 2^-31). Returns plain
    Python ints. Raises :class:`ConfigError` when the factor cannot be expressed with a right shift of
    1..62 bits (a factor >= 2^30, or so small that every accumulator would map to zero).

    With ``bits < 31`` the multiplier keeps ``bits`` significant bits (``2^(bits-1) <= M < 2^bits``,
    relative error below 2^-bits; see :func:`requant_multiplier_bits`), except for a power of two,
    which keeps the Q31 form ``M = 2^30`` (exact either way; realize turns it into a bare shift).

    >>> quantize_multiplier(0.5)
    (1073741824, 31)
    >>> quantize_multiplier(0.3, bits=12)
    (2458, 13)
    """
    real = float(real)
    if not np.isfinite(real) or real <= 0:
        raise ConfigError(f"requantization factor must be finite and > 0, got {real}")
    mant, exp = np.frexp(real)
    if float(mant) == 0.5:
        bits = MULTIPLIER_BITS
    m = int(round(float(mant) * (1 << bits)))
    exp = int(exp)
    if m == (1 << bits):
        m //= 2
        exp += 1
    shift = bits - exp
    if shift < 1:
        raise ConfigError(f"requantization factor {real} is too large (>= 2^30)")
    if shift > 62:
        # Every int32 accumulator would round to zero: represent it as the smallest usable factor.
        m, shift = 1 << 30, 62
    return m, shift


def quantize_multipliers(reals, bits: int = MULTIPLIER_BITS) -> tuple[np.ndarray, np.ndarray]:
    """Vector form of :func:`quantize_multiplier`: int64 arrays of multipliers and shifts.

    >>> m, s = quantize_multipliers([0.5, 0.25]); s.tolist()
    [31, 32]
    """
    pairs = [quantize_multiplier(r, bits) for r in np.asarray(reals, dtype=np.float64).reshape(-1)]
    return (np.array([p[0] for p in pairs], dtype=np.int64), np.array([p[1] for p in pairs], dtype=np.int64))


#: The fewest significant bits a shortened multiplier keeps beyond the output's bits: its relative error
#: (below 2^-bits) then moves an output code by at most 2^-4 of a unit.
MULTIPLIER_GUARD_BITS = 4


def requant_multiplier_bits(bound: int, out_bits: int) -> int:
    """Multiplier bits for a requantization whose input is provably within ``[-bound, bound]``: the most
    bits that keep ``bound * M + 2^(shift-1)`` inside int32 (``bound * 2^bits <= 2^30``, and the rounding
    addend at most ``2^30`` when the shift is at most 31), or :data:`MULTIPLIER_BITS` (Q31, int64
    arithmetic) when that leaves fewer than ``out_bits + MULTIPLIER_GUARD_BITS`` bits. Realize and the
    reference use it with the same bound (:func:`accumulator_bounds` plus the bias), so their integers stay identical.

    >>> requant_multiplier_bits(9 * 127 * 127, 8), requant_multiplier_bits(576 * 127 * 127, 8)
    (12, 31)
    """
    bits = 30 - int(bound).bit_length()
    return bits if out_bits + MULTIPLIER_GUARD_BITS <= bits < MULTIPLIER_BITS else MULTIPLIER_BITS


def accumulator_bounds(weight_codes, in_axes, x_bits: int, x_signed: bool, x_zp: int = 0) -> np.ndarray:
    """Per output channel, the largest ``|sum_k w (x - zp)|`` of a conv2d / dense over every input code
    of its type: ``sum |w| * max|x - zp|`` (``in_axes``: the weight axes summed per output channel).
    Adding ``|bias|`` and taking the maximum gives the bound of :func:`requant_multiplier_bits`.

    >>> accumulator_bounds(np.array([[3, -4], [1, 1]]), (1,), 8, True).tolist()
    [889, 254]
    """
    lo, hi = qrange(x_bits, x_signed)
    xmax = max(abs(lo - int(x_zp)), abs(hi - int(x_zp)))
    return np.abs(np.asarray(weight_codes, np.int64)).sum(axis=tuple(in_axes)).reshape(-1) * xmax


def rounding_right_shift(x, shift):
    """``(x + 2^(shift-1)) >> shift`` on int64 (round half towards +inf); ``shift`` >= 1.

    >>> rounding_right_shift(np.array([5, -5, 6]), 1).tolist()
    [3, -2, 3]
    """
    x = np.asarray(x, dtype=np.int64)
    shift = np.asarray(shift, dtype=np.int64)
    return (x + (np.int64(1) << (shift - 1))) >> shift


def requantize(acc, multiplier, shift, qmin: int, qmax: int, axis: int | None = None, zero_point: int = 0):
    """Integer-only requantization: ``clip(((acc * M + 2^(shift-1)) >> shift) + zp, qmin, qmax)`` as int64.

    ``multiplier`` and ``shift`` may be vectors along ``axis`` (per-channel); ``zero_point`` is the
    output's (asymmetric codes).

    >>> M, s = quantize_multiplier(0.1)
    >>> requantize(np.array([14, 16, -16, 5000]), M, s, -127, 127).tolist()
    [1, 2, -2, 127]
    """
    acc = np.asarray(acc, dtype=np.int64)
    m = np.asarray(multiplier, dtype=np.int64)
    s = np.asarray(shift, dtype=np.int64)
    if axis is not None and m.ndim == 1:
        shape = [1] * acc.ndim
        shape[axis] = -1
        m, s = m.reshape(shape), s.reshape(shape)
    return np.clip(rounding_right_shift(acc * m, s) + np.int64(zero_point), qmin, qmax)


def asymmetric_params(lo: float, hi: float, bits: int) -> tuple[float, int]:
    """Scale and zero point of an unsigned ``bits``-bit code covering ``[lo, hi]`` (which holds 0).

    The zero point is an integer code, so real zero is represented exactly (padding, ReLU).

    >>> asymmetric_params(-1.0, 3.0, 8)
    (0.01568627450980392, 64)
    """
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    levels = (1 << bits) - 1
    scale = (hi - lo) / levels if hi > lo else 1.0
    zp = int(np.clip(np.round(-lo / scale), 0, levels))
    return scale, zp


def power_of_two(scale):
    """Round scales up to powers of two (so that every requantization is a rounding shift).

    >>> power_of_two(0.3), power_of_two(0.25)
    (0.5, 0.25)
    """
    s = np.asarray(scale, dtype=np.float64)
    out = np.exp2(np.ceil(np.log2(s)))
    return float(out) if out.ndim == 0 else out


def quantize_bias(bias, input_scale, weight_scale):
    """Bias as int64 codes at scale ``s_x * s_w`` (per-channel when ``weight_scale`` is a vector).

    >>> quantize_bias(np.array([0.5]), 0.1, 0.05).tolist()
    [100]
    """
    s = np.float64(input_scale) * np.asarray(weight_scale, dtype=np.float64)
    return np.round(np.asarray(bias, dtype=np.float64) / s).astype(np.int64)


#: The largest int32 value: accumulators (and the biases added to them) stay within +-INT32_MAX.
INT32_MAX = (1 << 31) - 1


def worst_accumulator(k: int, x_bits: int, x_signed: bool, w_bits: int) -> int:
    """The largest |sum_k w x| of a conv2d / dense over ``k`` products of codes (before the bias).

    >>> worst_accumulator(27, 8, True, 8)
    435483
    """
    xlo, xhi = qrange(x_bits, x_signed)
    return int(k) * max(abs(xlo), abs(xhi)) * qrange(w_bits)[1]


def clamp_bias(bias_codes, worst_acc: int):
    """Clamp int32 bias codes so that ``accumulator + bias`` cannot leave int32 (the rule for a bias too
    large for the accumulator scale ``s_x * s_w``). Returns ``(clamped int64 codes, limit)``.

    The realized graph adds the bias in int32, the reference and the simulated graph add it exactly:
    the three agree bit for bit only if the sum cannot wrap, hence the limit ``INT32_MAX - worst_acc``.

    >>> clamp_bias(np.array([5, -3_000_000_000]), 100)[0].tolist()
    [5, -2147483547]
    """
    limit = max(INT32_MAX - int(worst_acc), 0)
    return np.clip(np.asarray(bias_codes, dtype=np.int64), -limit, limit), limit


def add_rescale_params(in_scale: float, out_scale: float):
    """Multiplier and shift that bring an operand of an add to ``out_scale / 2^ADD_EXTRA_BITS``."""
    return quantize_multiplier(float(in_scale) / float(out_scale) * (1 << ADD_EXTRA_BITS))


def add(a, b, a_scale, b_scale, out_scale, qmin: int, qmax: int, a_zp: int = 0, b_zp: int = 0, out_zp: int = 0):
    """Integer addition of two tensors with different scales (and zero points) into ``out_scale``.

    Each operand, less its zero point, is rescaled (rounded) to a common scale
    ``out_scale / 2^ADD_EXTRA_BITS``; the sum is then rounded once to ``out_scale`` and the output
    zero point added.

    >>> add(np.array([10]), np.array([10]), 0.1, 0.2, 0.3, -127, 127).tolist()
    [10]
    """
    ma, sa = add_rescale_params(a_scale, out_scale)
    mb, sb = add_rescale_params(b_scale, out_scale)
    t = rounding_right_shift((np.asarray(a, np.int64) - a_zp) * ma, sa) + \
        rounding_right_shift((np.asarray(b, np.int64) - b_zp) * mb, sb)
    return np.clip(rounding_right_shift(t, ADD_EXTRA_BITS) + np.int64(out_zp), qmin, qmax)


def rescale(q, in_scale: float, out_scale: float, qmin: int, qmax: int, in_zp: int = 0, out_zp: int = 0):
    """Bring codes from ``(in_scale, in_zp)`` to ``(out_scale, out_zp)`` (requantize by ``in_scale / out_scale``).

    >>> rescale(np.array([100]), 0.1, 0.2, -127, 127).tolist()
    [50]
    """
    q = np.asarray(q, np.int64) - np.int64(in_zp)
    if float(in_scale) == float(out_scale):
        return np.clip(q + np.int64(out_zp), qmin, qmax)
    m, s = quantize_multiplier(float(in_scale) / float(out_scale))
    return requantize(q, m, s, qmin, qmax, zero_point=out_zp)


def avg_pool_divide(total, count):
    """Integer average: ``total / count`` rounded half away from zero, on int64.

    >>> avg_pool_divide(np.array([5, -5, 4]), 2).tolist()
    [3, -3, 2]
    """
    total = np.asarray(total, dtype=np.int64)
    count = np.asarray(count, dtype=np.int64)
    half = count // 2
    return np.where(total >= 0, (total + half) // count, -((-total + half) // count))


def pack_codes(q, bits: int) -> np.ndarray:
    """Pack signed symmetric ``bits``-bit codes into a dense bit stream (``ceil(n * bits / 8)`` bytes).

    Each code is offset to ``q + qmax`` (in ``[0, 2^bits - 2]``) and written in ``bits`` bits, little
    end first. :func:`unpack_codes` inverts it exactly.

    >>> p = pack_codes(np.array([-7, 0, 7, 3]), 4); p.nbytes
    2
    >>> unpack_codes(p, 4, 4).tolist()
    [-7, 0, 7, 3]
    """
    lo, hi = qrange(bits)
    q = np.asarray(q, dtype=np.int64).reshape(-1)
    if q.size and (q.min() < lo or q.max() > hi):
        raise ConfigError(f"codes outside the {bits}-bit range [{lo}, {hi}]")
    u = (q - lo).astype(np.uint32)
    bitmat = ((u[:, None] >> np.arange(bits, dtype=np.uint32)) & 1).astype(np.uint8)
    return np.packbits(bitmat.reshape(-1), bitorder="little")


def unpack_codes(packed, bits: int, count: int) -> np.ndarray:
    """The ``count`` signed codes stored by :func:`pack_codes` (as int64)."""
    lo, _ = qrange(bits)
    flat = np.unpackbits(np.asarray(packed, dtype=np.uint8), bitorder="little")[:count * bits]
    bitmat = flat.reshape(count, bits).astype(np.int64)
    return (bitmat << np.arange(bits, dtype=np.int64)).sum(axis=1) + lo


def conv2d_int(x, w, strides=(1, 1), padding=(0, 0, 0, 0), dilation=(1, 1), groups=1):
    """Exact integer NCHW x OIHW convolution in int64 (the reference for integer conv kernels).

    ``padding`` is (top, left, bottom, right) as in Relax.
    """
    x = np.asarray(x, dtype=np.int64)
    w = np.asarray(w, dtype=np.int64)
    n, c, h, wd = x.shape
    o, cg, kh, kw = w.shape
    pt, pl, pb, pr = padding
    sh, sw = strides
    dh, dw = dilation
    xp = np.pad(x, ((0, 0), (0, 0), (pt, pb), (pl, pr)))
    oh = (h + pt + pb - dh * (kh - 1) - 1) // sh + 1
    ow = (wd + pl + pr - dw * (kw - 1) - 1) // sw + 1
    og = o // groups
    out = np.zeros((n, o, oh, ow), dtype=np.int64)
    for g in range(groups):
        xs = xp[:, g * cg:(g + 1) * cg]
        ws = w[g * og:(g + 1) * og]
        for i in range(kh):
            for j in range(kw):
                patch = xs[:, :, i * dh: i * dh + sh * (oh - 1) + 1: sh, j * dw: j * dw + sw * (ow - 1) + 1: sw]
                out[:, g * og:(g + 1) * og] += np.einsum("nchw,oc->nohw", patch, ws[:, :, i, j])
    return out


# ----------------------------------------------------------------------------- elementwise functions
def lut_table(fn, in_bits: int, in_scale: float, out_bits: int, out_scale: float, in_zp: int = 0, out_zp: int = 0,
              in_signed: bool = True, out_signed: bool = True, lo: int | None = None, hi: int | None = None):
    """The lookup table of a float function ``fn`` on quantized codes: one output code per input code.

    Entry ``i`` holds the output code of input code ``qmin_in + i``: ``fn`` is evaluated (float64) on
    the dequantized value ``(code - in_zp) * in_scale`` and the result quantized at ``(out_scale,
    out_zp)`` with the rounding of :func:`quantize` (half to even), clipped to ``[lo, hi]`` (default:
    the output range). NaN (e.g. ``log`` of a negative) maps to real zero, infinities to the range ends.
    Realize, the simulated module and the reference all look codes up in this one table.

    >>> lut_table(np.tanh, 4, 0.5, 4, 1 / 7).tolist()
    [-7, -7, -7, -7, -6, -5, -3, 0, 3, 5, 6, 7, 7, 7, 7]
    """
    qlo, qhi = qrange(in_bits, in_signed)
    olo, ohi = qrange(out_bits, out_signed)
    lo = olo if lo is None else max(int(lo), olo)
    hi = ohi if hi is None else min(int(hi), ohi)
    codes = np.arange(qlo, qhi + 1, dtype=np.int64)
    x = (codes - np.int64(in_zp)).astype(np.float64) * np.float64(in_scale)
    with np.errstate(all="ignore"):
        y = np.asarray(fn(x), dtype=np.float64)
        y = np.broadcast_to(y, x.shape)
        q = np.round(y / np.float64(out_scale))
    q = np.nan_to_num(q, nan=0.0, posinf=float(ohi) + 1 - out_zp, neginf=float(olo) - 1 - out_zp) + out_zp
    return np.clip(q, lo, hi).astype(np.int64)


def lut_lookup(q, table, in_bits: int, in_signed: bool = True):
    """Apply a :func:`lut_table` to codes: ``table[q - qmin]`` (int64).

    >>> lut_lookup(np.array([-7, 0, 7]), lut_table(np.tanh, 4, 0.5, 4, 1 / 7), 4).tolist()
    [-7, 0, 7]
    """
    return np.asarray(table, np.int64)[np.asarray(q, np.int64) - qrange(in_bits, in_signed)[0]]


#: int64 headroom of :func:`channel_affine`: |code| < 2^17 times |multiplier| < 2^31 leaves 2^15 below 2^63
#: for the offset term, which is clamped to 2^61 (any larger offset saturates the output anyway).
_AFFINE_OFFSET_LIMIT = 1 << 61


def channel_affine_params(a_pos, a_neg, b, in_scale: float, out_scale: float):
    """Integer form of ``y = b_c + (x >= 0 ? a_pos_c : a_neg_c) * x`` from codes at ``in_scale`` to codes at
    ``out_scale``: per-channel int64 multipliers ``m_pos``, ``m_neg`` and offsets, and ONE shift.

    ``m = round(a * in_scale / out_scale * 2^shift)``, ``offset = round(b / out_scale * 2^shift)``; the
    shift puts the largest |factor| in ``[2^30, 2^31)`` (Q31, as :func:`quantize_multiplier`), so a
    channel's factor keeps at least its own share of 31 bits. Factors may be negative or zero.

    >>> m_pos, m_neg, off, s = channel_affine_params([1.0], [0.25], [0.0], 0.1, 0.1)
    >>> int(m_pos[0]) >> 28, int(m_neg[0]) >> 28, int(s)
    (4, 1, 30)
    """
    r = float(in_scale) / float(out_scale)
    fp = np.asarray(a_pos, np.float64).reshape(-1) * r
    fn = np.asarray(a_neg, np.float64).reshape(-1) * r
    big = float(max(np.abs(fp).max(initial=0.0), np.abs(fn).max(initial=0.0)))
    if not np.isfinite(big):
        raise ConfigError(f"affine factor is not finite ({big})")
    shift = MULTIPLIER_BITS - int(np.frexp(big)[1]) if big > 0 else MULTIPLIER_BITS
    shift = int(np.clip(shift, 1, 62))
    scale = np.float64(2.0) ** shift
    off = np.round(np.asarray(b, np.float64).reshape(-1) / float(out_scale) * scale)
    off = np.clip(np.nan_to_num(off), -_AFFINE_OFFSET_LIMIT, _AFFINE_OFFSET_LIMIT)
    return (np.round(fp * scale).astype(np.int64), np.round(fn * scale).astype(np.int64), off.astype(np.int64),
            shift)


def channel_affine(q, m_pos, m_neg, offset, shift: int, qmin: int, qmax: int, axis: int | None = None,
                   in_zp: int = 0, out_zp: int = 0):
    """``clip(((t * (t >= 0 ? m_pos : m_neg) + offset + 2^(shift-1)) >> shift) + out_zp)`` with ``t = q - in_zp``,
    all in int64; ``m_pos``, ``m_neg``, ``offset`` per channel along ``axis`` (or scalars).

    >>> m_pos, m_neg, off, s = channel_affine_params([2.0], [0.5], [1.0], 1.0, 1.0)
    >>> channel_affine(np.array([-4, 0, 3]), m_pos, m_neg, off, s, -127, 127).tolist()
    [-1, 1, 7]
    """
    t = np.asarray(q, np.int64) - np.int64(in_zp)
    vecs = [np.asarray(a, np.int64) for a in (m_pos, m_neg, offset)]
    if axis is not None and vecs[0].size > 1:
        shape = [1] * t.ndim
        shape[axis] = -1
        vecs = [a.reshape(shape) for a in vecs]
    else:
        vecs = [a.reshape(()) if a.size == 1 else a for a in vecs]
    mp, mn, off = vecs
    return np.clip(rounding_right_shift(t * np.where(t >= 0, mp, mn) + off, shift) + np.int64(out_zp), qmin, qmax)


def multiply(a, b, a_scale: float, b_scale: float, out_scale: float, qmin: int, qmax: int, a_zp: int = 0,
             b_zp: int = 0, out_zp: int = 0):
    """Integer product of two quantized tensors (numpy broadcasting): the exact product of the codes less
    their zero points, requantized by ``a_scale * b_scale / out_scale`` (see :func:`requantize`).

    >>> multiply(np.array([100]), np.array([64]), 0.05, 1 / 127, 0.05, -127, 127).tolist()
    [50]
    """
    prod = (np.asarray(a, np.int64) - a_zp) * (np.asarray(b, np.int64) - b_zp)
    m, s = quantize_multiplier(float(a_scale) * float(b_scale) / float(out_scale))
    return requantize(prod, m, s, qmin, qmax, zero_point=out_zp)


# ----------------------------------------------------------------------------- data movement and merges
def add_constant_term(c, out_scale: float):
    """A float constant added to quantized codes, as an int64 term at ``out_scale / 2^ADD_EXTRA_BITS``
    (the common scale of :func:`add`): one rounding here, one at the end of the add.

    >>> add_constant_term(np.array([0.25, -1.0]), 0.5).tolist()
    [32768, -131072]
    """
    t = np.round(np.asarray(c, np.float64) / float(out_scale) * (1 << ADD_EXTRA_BITS))
    # Far beyond any output code: clamping keeps the int64 sum exact and saturates the same way.
    return np.clip(np.nan_to_num(t), -_AFFINE_OFFSET_LIMIT, _AFFINE_OFFSET_LIMIT).astype(np.int64)


def add_constant(a, c, a_scale: float, out_scale: float, qmin: int, qmax: int, a_zp: int = 0, out_zp: int = 0):
    """Integer ``a + c`` for quantized ``a`` and a float constant ``c`` (numpy broadcasting), at ``out_scale``:
    ``a`` is rescaled as in :func:`add`, ``c`` enters through :func:`add_constant_term`.

    >>> add_constant(np.array([10, -10]), np.array([0.5, 0.5]), 0.1, 0.1, -127, 127).tolist()
    [15, -5]
    """
    ma, sa = add_rescale_params(a_scale, out_scale)
    t = rounding_right_shift((np.asarray(a, np.int64) - a_zp) * ma, sa) + add_constant_term(c, out_scale)
    return np.clip(rounding_right_shift(t, ADD_EXTRA_BITS) + np.int64(out_zp), qmin, qmax)


def constant_codes(c, bits: int):
    """A float constant multiplied with quantized codes: symmetric ``bits``-bit codes at the scale of its
    largest magnitude (scale 1 for an all-zero constant, whose codes are then exactly 0).

    >>> codes, scale = constant_codes(np.array([0.5, -1.0]), 8); codes.tolist(), scale == 1 / 127
    ([64, -127], True)
    """
    c = np.asarray(c, np.float64)
    scale = scale_from_threshold(float(np.abs(c).max(initial=0.0)), bits)
    return quantize(c, scale, bits), scale


def matmul(a, b, a_zp: int = 0, b_zp: int = 0):
    """The exact int64 product of two code tensors less their zero points (``numpy.matmul`` batching):
    the accumulator of a matmul of two activations, at scale ``a_scale * b_scale``.

    >>> matmul(np.array([[1, 2]]), np.array([[3], [4]])).tolist()
    [[11]]
    """
    return np.matmul(np.asarray(a, np.int64) - np.int64(a_zp), np.asarray(b, np.int64) - np.int64(b_zp))


def mean_codes(q, axes, keepdims: bool = False):
    """The integer mean of codes over ``axes``: their exact sum divided with :func:`avg_pool_divide`'s
    rounding (the zero point passes through: the weights of a mean sum to one).

    >>> mean_codes(np.array([[1, 2], [4, 4]]), [1]).tolist()
    [2, 4]
    """
    q = np.asarray(q, np.int64)
    axes = tuple(int(a) % q.ndim for a in axes)
    count = int(np.prod([q.shape[a] for a in axes]))
    return avg_pool_divide(q.sum(axis=axes, keepdims=keepdims), count)


#: Fraction bits of the bilinear weights of :func:`resize_linear_weights`: an 8-bit code times two
#: weights of 2^10 stays below 2^27 (int32); wider codes interpolate in int64.
RESIZE_FRAC_BITS = 10


def _resize_source(out_size: int, in_size: int, mode: str):
    """Source coordinate of every output index, in float32 and in the order TVM's ``resize2d`` computes it."""
    x = np.arange(out_size, dtype=np.float32)
    scale = np.float32(in_size) / np.float32(out_size)
    if mode == "half_pixel":
        return (x + np.float32(0.5)) * scale - np.float32(0.5)
    if mode == "pytorch_half_pixel":
        return (x + np.float32(0.5)) * scale - np.float32(0.5) if out_size > 1 else np.zeros_like(x)
    if mode == "align_corners":
        return np.float32(in_size - 1) / np.float32(max(out_size - 1, 1)) * x
    if mode == "asymmetric":
        return scale * x
    if mode == "tf_half_pixel_for_nn":
        return (x + np.float32(0.5)) * scale
    raise ConfigError(f"resize: coordinate transformation {mode!r} has no integer rule")


def resize_nearest_indices(in_size: int, out_size: int, mode: str, rounding: str = "") -> np.ndarray:
    """The input index each output index copies in a nearest-neighbour resize along one axis (int32),
    as TVM's ``image.resize2d`` picks it (its coordinate transformation and rounding method).

    >>> resize_nearest_indices(4, 8, "asymmetric", "floor").tolist()
    [0, 0, 1, 1, 2, 2, 3, 3]
    """
    in_size, out_size = int(in_size), int(out_size)
    if mode == "asymmetric" and rounding in ("", "floor") and out_size % in_size == 0:
        # TVM divides integers here (an integral upscale): exact, no float at all.
        idx = np.arange(out_size) // (out_size // in_size)
    else:
        x = _resize_source(out_size, in_size, mode)
        rounding = rounding or ("round" if mode == "align_corners" else "floor")
        eps = np.float32(1e-5)
        if rounding == "round":
            idx = np.round(x)            # TVM's te.round: half to even, like numpy
        elif rounding == "round_prefer_floor":
            idx = np.ceil(x - np.float32(0.5))
        elif rounding == "round_prefer_ceil":
            idx = np.floor(x + np.float32(0.5))
        elif rounding == "floor":
            idx = np.floor(x + eps)
        elif rounding == "ceil":
            idx = np.ceil(x - eps)
        else:
            raise ConfigError(f"resize: rounding method {rounding!r} has no integer rule")
    return np.clip(idx, 0, in_size - 1).astype(np.int32)


def resize_linear_weights(in_size: int, out_size: int, mode: str, frac_bits: int = RESIZE_FRAC_BITS):
    """Bilinear interpolation along one axis in integers: ``(i0, i1, w0, w1)`` (int32 vectors over the
    output), with ``out[k] = w0[k] * x[i0[k]] + w1[k] * x[i1[k]]`` in units of ``2^-frac_bits`` and
    ``w0 + w1 == 2^frac_bits`` exactly (so a zero point passes through). Edges clamp as TVM does.

    >>> [v.tolist() for v in resize_linear_weights(2, 4, "half_pixel", 2)]
    [[0, 0, 0, 1], [0, 1, 1, 1], [1, 3, 1, 3], [3, 1, 3, 1]]
    """
    x = _resize_source(int(out_size), int(in_size), mode).astype(np.float64)
    base = np.floor(x)
    one = 1 << int(frac_bits)
    w1 = np.round((x - base) * one).astype(np.int64)
    i0 = np.clip(base, 0, in_size - 1).astype(np.int32)
    i1 = np.clip(base + 1, 0, in_size - 1).astype(np.int32)
    return i0, i1, (one - w1).astype(np.int32), w1.astype(np.int32)


def resize_work_dtype(bits: int) -> str:
    """The integer type bilinear interpolation of ``bits``-bit codes runs in (see :data:`RESIZE_FRAC_BITS`)."""
    return "int32" if int(bits) + 1 + 2 * RESIZE_FRAC_BITS <= 31 else "int64"


def resize2d_nearest(q, rows, cols):
    """Nearest-neighbour resize of NCHW codes: a copy through :func:`resize_nearest_indices` per axis."""
    return np.asarray(q)[:, :, rows][:, :, :, cols]


def resize2d_linear(q, rows, cols, frac_bits: int = RESIZE_FRAC_BITS):
    """Bilinear resize of NCHW codes with the integer weights of :func:`resize_linear_weights` per axis
    (``rows``, ``cols``: their 4-tuples): rows first, then columns, then one rounding shift by
    ``2 * frac_bits`` (round half up). The result stays in the input's range and scale.

    >>> rows = cols = resize_linear_weights(2, 4, "half_pixel")
    >>> resize2d_linear(np.array([[[[0, 4], [8, 12]]]]), rows, cols)[0, 0].tolist()
    [[0, 1, 3, 4], [2, 3, 5, 6], [6, 7, 9, 10], [8, 9, 11, 12]]
    """
    q = np.asarray(q, np.int64)
    r0, r1, rw0, rw1 = (np.asarray(v, np.int64) for v in rows)
    c0, c1, cw0, cw1 = (np.asarray(v, np.int64) for v in cols)
    t = q[:, :, r0] * rw0[:, None] + q[:, :, r1] * rw1[:, None]
    t = t[:, :, :, c0] * cw0 + t[:, :, :, c1] * cw1
    return rounding_right_shift(t, 2 * int(frac_bits))
