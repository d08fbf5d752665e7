"""Hand-scheduled x86 kernels: fused int8 conv2d / depthwise / dense (AVX2 or AVX-512 VNNI) and fp32.

Every int8 kernel is one PrimFunc: NCHW (or (M, K)) int8 in, NCHW (or (M, N)) int8 out, with the
int32 accumulators living only in a small register tile (no int32 tensor is written to memory):

* **conv2d, groups=1** -- a first stage packs the input into ``[N, C/kp, H+pad, W+pad, kp]`` (``kp``
  input channels contiguous, cast to uint8 where the uint8 intrinsic is used). The OIHW weight is
  packed in numpy at build time into ``[O/L, C/kp, KH, KW, L, kp]``. The main loop nest is a
  ``reg_o * L`` output channels x ``reg_w`` output columns register tile accumulated over
  (C/kp, KH, KW) with one tensor intrinsic per (L, kp) block (see :mod:`relayq.backend.intrin`).
  The tile then goes through bias + requant + clip + cast straight to the NCHW int8 output.
* **conv2d, row-tiled** (AVX2, where :func:`rows_pays`) -- the same dot products with the roles
  swapped: one output channel's ``kp`` weights broadcast, 8 neighbouring output columns in the lanes
  (input packed ``[N, C/kp, H+pad, stride phase, W', kp]``, weight ``[O, C/kp, KH, KW, kp]``). The
  accumulators hold rows of single channels, so the epilogue runs along contiguous NCHW rows, and the
  small tile (6 or 4 channels x 8 columns) stays in registers where 8 x 8 spills (1.0-1.24x per
  layer, 1 thread; :func:`_conv2d_int8_rows`, :func:`_rows_channels`).
* **depthwise** (groups == C == O) -- no tensorization: a padded int8 copy of the input and a
  ``DW_TILE``-wide vector of int32 accumulators along the output row per (channel, row).
* **dense** -- ``(M, K) x (K, N)`` with the weight packed into ``[N/L, K/kp, L, kp]`` and an
  ``mt x (nt * L)`` register tile.

Every int8 kernel reads int8, uint8 (asymmetric codes, padded with their zero point) or int16 codes
(activations above 8 bits), described by a :class:`~relayq.backend.generic.Codes` (dtype, proven range,
padding code), and writes int8 / uint8 / int16 codes (``Requant.out_dtype``, with the output zero point).
Which intrinsic computes a layer exactly (:func:`select_path`):

====================  =============================================================================
isa                   path
====================  =============================================================================
``"avx2"``            u8s8 ``vpmaddubsw`` (kp=4) on ``x + offset`` (``offset = -lo`` when the codes
                      may be negative, subtracted again as ``offset * sum(W)`` through the bias) when
                      no pair of products can saturate int16: ``(hi + offset) * P <= 32767``, ``P``
                      the largest same-sign pair of weights (see :func:`pair_bound`). That holds for
                      codes in [0, 127] with 8-bit weights (a ReLU output, 7-bit activations) and for
                      any 8-bit codes with weights of at most 7 bits. Otherwise the exact int16 path:
                      codes sign- or zero-extended to int16 + ``vpmaddwd`` (kp=2), about half the
                      speed; it is also the path of int16 codes and int16 weights.
``"vnni"``            u8s8 ``vpdpbusd`` (kp=4; no intermediate saturation) on ``x + 128`` where the
                      codes may be negative, uint8 codes as they are; int16 codes or weights take the
                      AVX2 int16 path.
``"sdot"`` (AArch64)  s8s8 ``sdot`` (kp=4) on int8 codes, on ``x - 128`` for uint8 codes above 127;
                      int16 codes or weights: the portable kernels.
====================  =============================================================================

The fp32 kernels (the fair baseline) use the same tiling with FMA on ``L`` fp32 lanes (8 for AVX2,
16 for AVX-512) and an NCHW output; conv weights are packed ``[O/L, C, KH, KW, L]``, dense weights
``[N/L, K, L]``.

Example::

    >>> import numpy as np
    >>> from relayq.backend.generic import Requant
    >>> rq = Requant.from_arrays(1 << 30, 1 << 30, 40, 0, 127)
    >>> k = conv2d_int8((1, 16, 14, 14), np.ones((32, 16, 3, 3), np.int8), np.zeros(32, np.int32), rq,
    ...                 (1, 1), (1, 1, 1, 1), (1, 1), 1, isa="avx2", nonneg=True)
    >>> k.info["intrin"], k.info["tiling"]              # 14 columns: the row-tiled kernel (rows_pays)
    ('relayq_dot_8x4_s8u8s32_rows_avx2', 'rows')
"""
from __future__ import annotations

import numpy as np
from tvm import te, tirx

from . import generic, intrin
from .generic import Codes, Kernel, Requant, act_expr, conv_out_hw, requant_expr, weight_codes

# "sdot" is AArch64 with +dotprod: the same tiling serves it (4 int32 / fp32 lanes per q register).
ISAS = ("avx2", "vnni", "sdot")
# fp32 lanes of one vector register: ymm (AVX2) / zmm (AVX-512, present on every VNNI CPU) / NEON q.
FP32_LANES = {"avx2": 8, "vnni": 16, "sdot": 4}
# Register budget: AVX2 has 16 ymm registers, AVX-512 32 zmm, AArch64 32 q registers. A tile of
# reg_o x reg_w accumulators must leave room for the weight vectors (reg_o), the broadcast input and a
# temporary or two.
MAX_ACC_REGS = {"avx2": 12, "vnni": 24, "sdot": 24}
# The int8 conv tile may go a little further on AVX2: a 16-channel x 7-column tile (14 accumulators)
# measured ~9 % faster than 8 x 8 on ResNet-18's 3x3 layers (LLVM keeps the hot part in registers).
# The fp32 kernels keep 12 (their FMA tile spills beyond it); each side gets its own best tile.
INT8_CONV_ACC_REGS = {"avx2": 14, "vnni": 24, "sdot": 24}
# Candidate register-tile widths (output columns). 7 divides every ResNet row width (56/28/14/7).
TILE_W_CANDIDATES = (8, 7, 6, 5, 4)
# Stride-1 convs on AVX2 take the row-tiled kernel (:func:`_conv2d_int8_rows`) where :func:`rows_pays`.
ROWS_KERNEL = True
# The channel-tiled kernel's intrinsic -> the row-tiled kernel's (vpmaddwd is symmetric: the same one).
ROWS_INTRIN = {intrin.AVX2_U8S8: intrin.AVX2_U8S8_ROWS, intrin.AVX2_S8S8: intrin.AVX2_S8S8,
               intrin.AVX2_S8S8_SIGN: intrin.AVX2_S8S8_SIGN_ROWS}
# Signed int8 codes in [-127, 127] take the vpsignb + vpmaddubsw path (intrin.AVX2_S8S8_SIGN) instead of
# the int16 one.
SIGN_PATH = True
# Stem convs of at most STEM_FOLD_CHANNELS input channels fold their column taps into the channels on AVX2
# (fold_stem): 3 x 7 taps fill 21 of 24 byte lanes, and the layer reaches the vpmaddubsw paths (symmetric
# int8 codes: the sign path). Measured (2 threads, this Zen 5, ms): ResNet's 7x7 stride-2 stem 1.51-1.55 ->
# 1.32, MobileNet's 3x3 stride-2 stem 0.33-0.63 -> 0.25-0.28. Where only the int16 path is exact the stem
# stays unfolded (folded it was slower).
STEM_FOLD = True
STEM_FOLD_CHANNELS = 4
# Depthwise output maps up to this many pixels (7 x 7, 8 x 8) are parallel per channel (not per row),
# with one epilogue over the whole map.
DW_SMALL_MAP = 64
# Int8 depthwise sums pairs of taps in int16 where exact (see _tap_pairs_exact).
DW_TAP_PAIRS = True
# Output columns per depthwise accumulator vector (2 ymm of int32 / 1 zmm).
DW_TILE = 16
# VNNI's uint8 shift for possibly negative inputs: x + 128 maps [-128, 127] onto [0, 255] exactly.
U8_OFFSET = 128
# vpmaddubsw adds two u8 x s8 products into an int16 with saturation: the largest pair sum that is exact.
PMADDUBSW_LIMIT = 32767
#: Kernel paths, as the lowering's statistics and the benchmark count them: "u8s8" (the fast
#: vpmaddubsw / vpdpbusd / sdot dot products), "s8sign" (vpsignb + vpmaddubsw for signed codes in
#: [-127, 127], AVX2), "int16" (the exact int16 vpmaddwd path), "depthwise"
#: (int32 vector multiply-adds), "generic" (the portable kernels: grouped convs, int16 on ARM).
PATHS = ("u8s8", "s8sign", "int16", "depthwise", "generic")


def _ceil(a, b):
    return -(-a // b) * b


def pick_tile_w(ow: int, max_w: int = 8) -> int:
    """The register-tile width that wastes the fewest padded columns (ties: the widest).

    >>> pick_tile_w(56), pick_tile_w(28), pick_tile_w(7), pick_tile_w(3)
    (8, 7, 7, 4)
    """
    best = None
    for r in TILE_W_CANDIDATES:
        if r > max_w:
            continue
        waste = _ceil(ow, r) - ow
        if best is None or waste < best[0]:
            best = (waste, r)
    return best[1]


def select_intrin(isa: str, nonneg: bool) -> tuple[str, bool]:
    """(intrinsic name, add_128_offset) for int8 codes and 8-bit weights of any value, knowing only
    the sign of the input (the conservative choice; :func:`select_path` also looks at the weights).

    >>> select_intrin("avx2", False)
    ('relayq_dot_8x2_i16_s8s8s32_avx2', False)
    >>> select_intrin("vnni", False)
    ('relayq_dot_16x4_u8s8s32_vnni', True)
    """
    if isa == "avx2":
        return (intrin.AVX2_U8S8 if nonneg else intrin.AVX2_S8S8), False
    if isa == "vnni":
        return intrin.VNNI_U8S8, not nonneg
    if isa == "sdot":
        return intrin.ARM_SDOT, False
    raise ValueError(f"unknown isa {isa!r}; known: {ISAS}")


def pair_bound(weight, axis: int) -> int:
    """The largest |sum| of a same-sign pair of weights that ``vpmaddubsw`` multiplies together:
    along the reduction ``axis`` (padded to a multiple of 4 with zeros) the weights pair up as
    (0, 1), (2, 3), ... for every other index.

    >>> pair_bound(np.array([[100, 90, -5, 7]], np.int8), 1), pair_bound(np.array([[100, -90, 5, 7]]), 1)
    (190, 100)
    """
    w = np.moveaxis(np.asarray(weight, np.int64), axis, -1)
    k = w.shape[-1]
    w = np.concatenate([w, np.zeros(w.shape[:-1] + (-k % 4,), np.int64)], axis=-1).reshape(-1, 2)
    if w.size == 0:
        return 0
    pos = np.clip(w, 0, None).sum(axis=1).max()
    neg = -np.clip(w, None, 0).sum(axis=1).min()
    return int(max(pos, neg))


def select_path(isa: str, codes: Codes, weight, axis: int) -> tuple[str, int] | None:
    """(intrinsic name, input offset) that computes a conv/dense exactly for ``codes`` and the integer
    ``weight`` (reduction along ``axis``), or None where no tensorized path applies (the portable
    kernel then). The offset is added to every input code (and padding) and taken back through the
    bias as ``offset * sum(W)``.

    >>> w = np.full((8, 16), 60, np.int8)                   # 7-bit weights: never saturate
    >>> select_path("avx2", Codes.of("uint8", pad=128), w, 1)
    ('relayq_dot_8x4_u8s8s32_avx2', 0)
    >>> select_path("avx2", Codes.of("int8", -127, 127), w, 1)
    ('relayq_dot_8x4_u8s8s32_avx2', 127)
    >>> select_path("avx2", Codes.of("uint8"), np.full((8, 16), 127, np.int8), 1)
    ('relayq_dot_8x2_i16_s8s8s32_avx2', 0)
    >>> select_path("avx2", Codes.of("int8", -127, 127), np.full((8, 16), 127, np.int8), 1)
    ('relayq_dot_8x4_s8s8s32_sign_avx2', 0)
    >>> select_path("avx2", Codes.of("int8", -127, 127), np.full((8, 3, 7, 7), 127, np.int8), 1)[0] == intrin.AVX2_S8S8
    True
    """
    if isa not in ISAS:
        raise ValueError(f"unknown isa {isa!r}; known: {ISAS}")
    weight = weight_codes(weight)
    lo, hi = codes.span
    if codes.dtype == "int16" or weight.dtype == np.int16:
        return None if isa == "sdot" else (intrin.AVX2_S8S8, 0)
    if isa == "sdot":
        return intrin.ARM_SDOT, (0 if hi <= 127 else -U8_OFFSET)
    if isa == "vnni":
        return intrin.VNNI_U8S8, (U8_OFFSET if lo < 0 else 0)
    offset = -lo if lo < 0 else 0
    if (hi + offset) * pair_bound(weight, axis) <= PMADDUBSW_LIMIT:
        return intrin.AVX2_U8S8, offset
    # (a stem's 3 input channels: the int16 path measured faster, 2.23 vs 2.60 ms on a 7x7 stride-2 layer;
    # 1x1 layers of 24-160 input channels 1.08-1.29x faster on the sign path, 1 thread)
    if SIGN_PATH and codes.dtype == "int8" and lo >= -127 and hi <= 127 and weight.shape[axis] >= 8:
        return intrin.AVX2_S8S8_SIGN, 0
    return intrin.AVX2_S8S8, 0


def path_of(name: str) -> str:
    """The :data:`PATHS` entry of an intrinsic.

    >>> path_of(intrin.AVX2_S8S8), path_of(intrin.VNNI_U8S8), path_of(intrin.AVX2_S8S8_SIGN)
    ('int16', 'u8s8', 's8sign')
    """
    if name in (intrin.AVX2_S8S8_SIGN, intrin.AVX2_S8S8_SIGN_ROWS):
        return "s8sign"
    return "int16" if name == intrin.AVX2_S8S8 else "u8s8"


def _codes(codes, nonneg):
    return codes if codes is not None else Codes.of("int8", 0 if nonneg else None)


def _input_cast(a_dtype, offset):
    def cast(v):
        if offset:
            return (v.astype("int32") + offset).astype(a_dtype)
        return v.astype(a_dtype)
    return cast


def _bias_table(rq: Requant, bias, channels: int) -> np.ndarray:
    """The ``(3, channels)`` requant table ``[M; R + bias * M; S]`` with the bias folded into the addend:
    ``(acc + b) * M + R == acc * M + (b * M + R)`` in int64 (wrapping arithmetic is a ring, so the
    bits are the same even where it wraps). The epilogue then multiplies the bare int32 accumulator:
    LLVM emits one ``vpmuldq`` per 4 lanes for ``sext(acc) * sext(M)``, where ``sext(acc) + sext(b)``
    (33 bits) took the full 64 x 64 multiply (3 ``vpmuludq`` and shifts): the epilogue was a third
    of MobileNetV2's 1x1 layers. Padded channels get M = 0, S = 1.

    >>> _bias_table(Requant.from_arrays(3, 4, 33, 0, 127), [1, 2], 3).tolist()
    [[3, 3, 0], [7, 10, 0], [33, 33, 1]]
    """
    out = np.zeros((3, channels), np.int64)
    out[2] = 1
    b = np.asarray(bias, np.int64).reshape(-1)
    n = b.size if not rq.per_channel else rq.multiplier.size
    m = np.broadcast_to(rq.multiplier, (n,))
    out[0, :n], out[2, :n] = m, np.broadcast_to(rq.shift, (n,))
    out[1, :n] = np.broadcast_to(rq.addend, (n,)) + b[:n] * m
    return out


def _offset_bias(bias, w_sum, offset):
    """bias - offset * sum(W) (int32, wrapping like the int32 adds of the kernel)."""
    b = np.asarray(bias, np.int64) - int(offset) * w_sum.astype(np.int64)
    return ((b + (1 << 31)) % (1 << 32) - (1 << 31)).astype(np.int32)


# ============================================================================ int8 conv2d (groups=1)
def conv2d_int8(x_shape, weight, bias, rq: Requant, strides, padding, dilation, groups=1, isa="avx2",
                nonneg=False, residual=None, codes: Codes | None = None, lut=None) -> Kernel:
    """Fused integer conv2d + bias + requant + clip + cast (NCHW codes in and out), tensorized for ``isa``.

    ``codes`` describes the input (:class:`~relayq.backend.generic.Codes`: int8 / uint8 / int16, range,
    padding code); without it the input is int8, non-negative where ``nonneg``. The output is
    ``rq.out_dtype`` (int8, or uint8 / int16 with ``rq.zp``). ``info["path"]`` says which dot product
    runs (see :func:`select_path`). Depthwise convs (groups == C == O) get :func:`depthwise_int8`; other
    grouped convs the portable :func:`relayq.backend.generic.conv2d_int8`.

    ``residual = (index, spec, dtype)`` (groups=1 only) fuses a quantized residual add into the
    epilogue: the requantized conv output is operand ``index`` of the
    :class:`~relayq.backend.generic.AddRequant` ``spec``, the other operand a second input tensor of
    ``dtype`` and the output's shape (call convention ``func(x, other, *consts, out)``).

    ``lut = (table, lo)`` (groups=1, no residual) fuses a following table lookup into the epilogue: the
    output is ``table[code - lo]`` in the table's dtype, the table the kernel's last constant.

    >>> # k = conv2d_int8((1, 64, 56, 56), w_oihw, b, rq, (1, 1), (1, 1, 1, 1), (1, 1), 1, "avx2", True)
    """
    weight = weight_codes(weight)
    codes = _codes(codes, nonneg)
    if lut is not None and residual is not None:
        raise ValueError("a conv kernel fuses a residual add or a table lookup, not both")
    rq = rq.int32_requant(generic.kernel_acc_bound(weight, (1, 2, 3), codes, bias))
    n, c, h, w = (int(v) for v in x_shape)
    o, cg, kh, kw = weight.shape
    chosen = select_path(isa, codes, weight, 1) if groups == 1 else None
    if chosen is None:
        if residual is not None or lut is not None:
            raise ValueError("a fused residual add or lookup needs a groups=1 conv with a tensorized path")
        if groups == c == o and cg == 1:
            return depthwise_int8(x_shape, weight, bias, rq, strides, padding, dilation, isa, codes=codes)
        k = generic.conv2d_int8(x_shape, weight, bias, rq, strides, padding, dilation, groups, codes=codes)
        k.info["path"] = "generic"
        return k
    name, offset = chosen
    folded = None
    if STEM_FOLD and ROWS_KERNEL and isa == "avx2" and residual is None:
        folded = fold_stem(x_shape, weight, strides, padding, dilation)
    if folded is not None:
        f_shape, f_weight, f_strides, f_padding, f_dilation, fold = folded
        f_name, f_offset = select_path(isa, codes, f_weight, 1)
        # (folded onto the int16 path it measured slower than unfolded: 7x7 stem 1.64-1.85 vs 1.51-1.55 ms)
        if f_name != intrin.AVX2_S8S8:
            k = _conv2d_int8_rows(f_shape, f_weight, bias, rq, f_strides, f_padding, f_dilation, isa, None,
                                  codes, f_offset, ROWS_INTRIN[f_name], fold, lut)
            k.info["fold"] = int(weight.shape[3])
            return k
    if name in ROWS_INTRIN and ROWS_KERNEL and rows_pays(o, c, kh, kw, h, w, strides, padding, dilation,
                                                         int16=name == intrin.AVX2_S8S8):
        return _conv2d_int8_rows(x_shape, weight, bias, rq, strides, padding, dilation, isa, residual, codes,
                                 offset, ROWS_INTRIN[name], lut=lut)
    lanes, kp, a_dtype = intrin.LANES[name], intrin.KPACK[name], intrin.A_DTYPE[name]
    oh, ow = conv_out_hw(h, w, kh, kw, strides, padding, dilation)
    reg_w = pick_tile_w(ow)
    ob_count = _ceil(o, lanes) // lanes
    reg_o = 2 if ob_count % 2 == 0 and 2 * reg_w <= INT8_CONV_ACC_REGS[isa] else 1
    op, cp, owp = ob_count * lanes, _ceil(c, kp), _ceil(ow, reg_w)
    sh, sw = strides
    dh, dw = dilation
    pt, pl = padding[0], padding[1]
    hp = max(h + padding[0] + padding[2], (oh - 1) * sh + (kh - 1) * dh + 1)
    wp = max(w + padding[1] + padding[3], (owp - 1) * sw + (kw - 1) * dw + 1)
    fill = codes.pad + offset

    X = te.placeholder((n, c, h, w), codes.dtype, name="x")
    w_dtype = intrin.W_DTYPE[name]
    Wk = te.placeholder((op // lanes, cp // kp, kh, kw, lanes, kp), w_dtype, name="w")
    tbl = te.placeholder((3, op), "int64", name="rq")          # with the bias (_bias_table)
    cast = _input_cast(a_dtype, offset)

    def pack(b, cb, i, j, ci):
        ch = cb * kp + ci
        ok = tirx.all(ch < c, i >= pt, i < pt + h, j >= pl, j < pl + w)
        return tirx.if_then_else(ok, cast(X[b, tirx.min(ch, c - 1), i - pt, j - pl]), tirx.const(fill, a_dtype))

    Xp = te.compute((n, cp // kp, hp, wp, kp), pack, name="pack")
    icb = te.reduce_axis((0, cp // kp), "icb")
    ry = te.reduce_axis((0, kh), "kh")
    rx = te.reduce_axis((0, kw), "kw")
    ici = te.reduce_axis((0, kp), "ici")
    acc = te.compute(
        (n, op // lanes, oh, owp, lanes),
        lambda b, ob, i, j, oi: te.sum(
            Xp[b, icb, i * sh + ry * dh, j * sw + rx * dw, ici].astype("int32")
            * Wk[ob, icb, ry, rx, oi, ici].astype("int32"), axis=[icb, ry, rx, ici]),
        name="acc")
    out, res_in, lut_in = _conv_epilogue(lambda b, oc, i, j: acc[b, oc // lanes, i, j, oc % lanes],
                                         (n, o, oh, ow), rq, tbl, residual, lut)
    args = [X] + res_in + [Wk, tbl] + lut_in + [out]
    func = te.create_prim_func(args)

    sch = generic.schedule(func, n * o * oh * ow * c * kh * kw)
    _schedule_pack(sch, "pack")
    blk = sch.get_sblock("acc")
    b_, ob, i_, j_, oi, r_icb, r_kh, r_kw, r_ici = sch.get_loops(blk)
    obo, obi = sch.split(ob, [None, reg_o])
    jo, ji = sch.split(j_, [None, reg_w])
    sch.reorder(b_, obo, i_, jo, r_icb, r_kh, r_kw, obi, ji, oi, r_ici)
    sch.parallel(sch.fuse(b_, obo, i_))
    outb = sch.get_sblock("out")
    sch.reverse_compute_at(outb, jo)
    sch.unroll(obi)
    sch.unroll(ji)
    init = sch.decompose_reduction(blk, r_icb)
    iloops = sch.get_loops(init)
    sch.vectorize(iloops[-1])
    sch.tensorize(oi, name)
    oloops = sch.get_loops(outb)
    sch.vectorize(oloops[-1])

    # numpy packing of the weight: OIHW -> [O/L, C/kp, KH, KW, L, kp]
    wpad = np.zeros((op, cp, kh, kw), weight.dtype)
    wpad[:o, :c] = weight
    wk = np.ascontiguousarray(wpad.reshape(op // lanes, lanes, cp // kp, kp, kh, kw).transpose(0, 2, 4, 5, 1, 3)
                              .astype(w_dtype))
    info = {"intrin": name, "path": path_of(name), "offset": offset, "offset128": offset == U8_OFFSET,
            "tile": (reg_o * lanes, reg_w), "lanes": lanes, "kpack": kp}
    return _conv_kernel(sch, wk, wpad, bias, rq, offset, residual, (n, o, oh, ow), isa, info, lut)


def _conv_epilogue(acc_at, out_shape, rq: Requant, tbl, residual, lut=None):
    """The output stage of both int8 conv kernels: ``requant(acc_at(b, oc, i, j))`` (the bias is in
    ``tbl``, see :func:`_bias_table`), or with ``residual = (index, spec, dtype)`` that value as operand
    ``index`` of the quantized add with a second input. ``lut = (table, lo)``: the requantized code then
    looks up ``table[code - lo]`` (a following elementwise layer, fused by the lowering's planner).
    Returns ``(out, extra_inputs, lut_inputs)``."""
    if residual is None and lut is not None:
        table, lo = lut
        tab = te.placeholder((int(table.size),), str(table.dtype), name="lut")
        return te.compute(out_shape, lambda b, oc, i, j: tab[requant_expr(acc_at(b, oc, i, j), oc, rq, tbl)
                                                             .astype("int32") - int(lo)], name="out"), [], [tab]
    if residual is None:
        return te.compute(out_shape, lambda b, oc, i, j: requant_expr(acc_at(b, oc, i, j), oc, rq, tbl),
                          name="out"), [], []
    r_index, r_spec, r_dtype = residual
    R = te.placeholder(out_shape, r_dtype, name="residual")

    def fused(b, oc, i, j):
        vals = [R[b, oc, i, j]] * 2
        vals[r_index] = requant_expr(acc_at(b, oc, i, j), oc, rq, tbl)
        return generic.add_requant_expr(vals, r_spec)

    return te.compute(out_shape, fused, name="out"), [R], []


def _conv_kernel(sch, wk, wpad, bias, rq: Requant, offset: int, residual, out_shape, isa, info,
                 lut=None) -> Kernel:
    """The finished int8 conv :class:`Kernel`: the packed weight ``wk``, the requant table with the bias
    and the input offset's compensation folded in (``wpad``: the OIHW weight padded to the kernel's
    channel counts), and the output dtype / name of a plain or residual-add conv."""
    op = wpad.shape[0]
    bpad = np.zeros(op, np.int64)
    bpad[:out_shape[1]] = np.asarray(bias, np.int64).reshape(-1)
    wsum = wpad.astype(np.int64).sum(axis=(1, 2, 3))
    consts = [wk, _bias_table(rq, _offset_bias(bpad, wsum, offset), op)]
    info["int32_requant"] = rq.int32_exact
    if lut is not None:
        info["lut"] = int(lut[0].size)
        return Kernel(sch.mod["main"], consts + [lut[0]], out_shape, str(lut[0].dtype), f"qconv2d_lut_{isa}", info)
    if residual is not None:
        info["residual_add"] = {"int32": residual[1].int32_ok}
        return Kernel(sch.mod["main"], consts, out_shape, residual[1].out_dtype, f"qconv2d_add_{isa}", info)
    return Kernel(sch.mod["main"], consts, out_shape, rq.out_dtype, f"qconv2d_{isa}", info)


class _StemFold:
    """A narrow conv's input geometry, kept by :func:`fold_stem` for the folded kernel's pack."""

    def __init__(self, x_shape, sw, dw, pl):
        self.x_shape = tuple(int(v) for v in x_shape)
        self.c, self.w = self.x_shape[1], self.x_shape[3]
        self.sw, self.dw, self.pl = int(sw), int(dw), int(pl)


def fold_stem(x_shape, weight, strides, padding, dilation):
    """A stem conv (at most STEM_FOLD_CHANNELS input channels, several column taps) as the conv the
    kernel computes: ``C * KW`` input channels (channel ``tap * C + c``) and one column tap, so that 3
    input channels x 7 taps fill 21 of 24 byte lanes instead of 3 of 4 in each of 7 taps, and the layer
    has enough channels for the vpmaddubsw paths (:func:`select_path`). Returns ``(shape, weight, strides,
    padding, dilation, fold)`` of the folded conv, or None where the layer is not a stem. Same dot
    products, same order of the integer sums per output: bit-exact.

    >>> got = fold_stem((1, 3, 224, 224), np.ones((64, 3, 7, 7), np.int8), (2, 2), (3, 3, 3, 3), (1, 1))
    >>> got[0], got[1].shape, got[2], got[3]
    ((1, 21, 224, 112), (64, 21, 7, 1), (2, 1), (3, 0, 3, 0))
    """
    n, c, h, w = (int(v) for v in x_shape)
    o, cg, kh, kw = weight.shape
    if c > STEM_FOLD_CHANNELS or cg != c or kw < 2:
        return None
    _, ow = conv_out_hw(h, w, kh, kw, strides, padding, dilation)
    folded = np.ascontiguousarray(np.asarray(weight).transpose(0, 3, 1, 2).reshape(o, kw * c, kh, 1))
    fold = _StemFold(x_shape, strides[1], dilation[1], padding[1])
    return ((n, kw * c, h, ow), folded, (strides[0], 1), (padding[0], 0, padding[2], 0), (dilation[0], 1), fold)


def rows_pays(o, c, kh, kw, h, w, strides, padding, dilation, int16: bool = False) -> bool:
    """Whether the row-tiled kernel (:func:`_conv2d_int8_rows`) beats the channel-tiled one for a layer.
    Measured on one core (``bench_kernels``-style layers, AVX2 u8s8): 1.11-1.17x faster where the
    output row is a multiple of 8 columns (MobileNetV2's 112- and 56-wide 1x1 layers, ResNet-50's 56-wide
    1x1, 3x3 at 56 / 112 equal or better) and on 3x3 layers whose row pads by at most 1/7 (ResNet-18's 28-
    and 14-wide 3x3: 1.17x); 0.77-0.98x on 1x1 layers of 28 / 14 / 7 columns and 0.92x on 3x3 at 7 (its
    8-wide vectors waste a column in 8, the channel tile's 7-wide tile none). On the exact int16 path
    (``int16``) the row tile wins wherever the layer has 64 output channels or more.

    >>> rows_pays(64, 64, 3, 3, 56, 56, (1, 1), (1,) * 4, (1, 1))
    True
    >>> rows_pays(576, 96, 1, 1, 14, 14, (1, 1), (0,) * 4, (1, 1))
    False
    """
    _, ow = conv_out_hw(h, w, kh, kw, strides, padding, dilation)
    waste = _ceil(ow, 8) - ow
    if int16:
        # the int16 path loads twice the operands per product: the row tile's fewer loads per dot
        # product win on small maps too (1x1 32-192 at 28 columns 1.87x, 64-384 at 14 1.14x, 160-960 at 7
        # 1.10x), except with few output channels (192-32 at 28: 0.87x)
        return o >= 64 or waste == 0
    return waste == 0 or (kh * kw > 1 and ow >= 14 and waste * 7 <= ow)


def _rows_channels(o: int) -> int:
    """Output channels of the row kernel's register tile (times one 8-column vector): 6 where they divide
    the layer, else 4. Measured on one core (AVX2 u8s8, ms): ResNet's 64-64 3x3 at 56 columns 8x1 1.71,
    6x1 1.47, 4x1 1.43, 4x2 1.63, 3x3 2.04; 256-256 3x3 at 14: 8x1 1.81, 6x1 1.49, 4x1 1.49; MobileNetV2's
    16-96 1x1 at 112: 8x1 0.78, 6x1 0.78, 4x1 0.85. Wider tiles run out of the 16 ymm registers (LLVM
    spills an accumulator; the ones vector of vpmaddwd and the next tap's loads take the rest)."""
    return min(6 if o % 6 == 0 else 4, o)


def _conv2d_int8_rows(x_shape, weight, bias, rq: Requant, strides, padding, dilation, isa, residual,
                      codes: Codes, offset: int, name: str, fold=None, lut=None) -> Kernel:
    """conv2d on AVX2 with the register tile along the output row: each dot product multiplies
    8 neighbouring output columns' inputs (``kp`` input channels each) by one output channel's ``kp``
    weights (broadcast), so the int32 accumulators hold rows of one channel and the epilogue (bias,
    requant, residual add) runs along contiguous NCHW rows: no transpose between the tile and the
    output, and one multiplier per channel instead of a vector of them. ``name`` is the intrinsic:
    :data:`intrin.AVX2_U8S8_ROWS` (``vpmaddubsw``, kp=4, uint8 input with the offset / zero point applied
    in the pack) or :data:`intrin.AVX2_S8S8` (the exact int16 ``vpmaddwd`` path, kp=2; it is symmetric in
    its operands). The input is packed as in :func:`conv2d_int8` (``[N, C/kp, H+pad, W+pad, kp]``), the
    weight as ``[O, C/kp, KH, KW, kp]``. Same arithmetic, same saturation bound (the weight pairs along
    the input channels are the same), bit-identical results. With a column stride the pack splits the
    columns by phase (``column = jj * sw + phase``), so that a tap's 8 output columns still read one
    contiguous vector.

    ``fold`` (a :class:`_StemFold`): the layer is a narrow stem folded into a conv of ``C * KW`` input
    channels and one column tap (see :func:`fold_stem`); the pack gathers each output column's
    ``KW`` input columns (with their padding) from the original input ``fold.x_shape``."""
    n, c, h, w = (int(v) for v in x_shape)
    o, _, kh, kw = weight.shape
    lanes, kp = 8, intrin.KPACK[name]
    a_dtype, w_dtype = intrin.A_DTYPE[name], intrin.W_DTYPE[name]     # the input's and the weight's
    oh, ow = conv_out_hw(h, w, kh, kw, strides, padding, dilation)
    chans = _rows_channels(o)
    op, cp, owp = _ceil(o, chans), _ceil(c, kp), _ceil(ow, lanes)
    sh, sw = strides
    dh, dw = dilation
    pt, pl = padding[0], padding[1]
    hp = max(h + padding[0] + padding[2], (oh - 1) * sh + (kh - 1) * dh + 1)
    wp = max(w + padding[1] + padding[3], (owp - 1) * sw + (kw - 1) * dw + 1)
    wq = max(-(-wp // sw), owp + ((kw - 1) * dw) // sw)
    fill = codes.pad + offset
    X = te.placeholder(fold.x_shape if fold else (n, c, h, w), codes.dtype, name="x")
    Wk = te.placeholder((op, cp // kp, kh, kw, kp), w_dtype, name="w")
    tbl = te.placeholder((3, op), "int64", name="rq")          # with the bias (_bias_table)
    cast = _input_cast(a_dtype, offset)

    def pack(b, cb, i, ph, jj, ci):
        ch, j = cb * kp + ci, jj * sw + ph
        if fold:
            # folded channel ch = tap * C + channel: output column j reads input column j * sw + tap * dw
            ok_ch, ch, j = ch < c, ch % fold.c, j * fold.sw + (ch // fold.c) * fold.dw
            ok = tirx.all(ok_ch, i >= pt, i < pt + h, j >= fold.pl, j < fold.pl + fold.w)
            col, wmax, cmax = j - fold.pl, fold.w, fold.c
        else:
            ok = tirx.all(ch < c, i >= pt, i < pt + h, j >= pl, j < pl + w)
            col, wmax, cmax = j - pl, w, c
        return tirx.if_then_else(ok, cast(X[b, tirx.min(ch, cmax - 1), tirx.min(tirx.max(i - pt, 0), h - 1),
                                            tirx.min(tirx.max(col, 0), wmax - 1)]), tirx.const(fill, a_dtype))

    Xp = te.compute((n, cp // kp, hp, sw, wq, kp), pack, name="pack")
    icb = te.reduce_axis((0, cp // kp), "icb")
    ry = te.reduce_axis((0, kh), "kh")
    rx = te.reduce_axis((0, kw), "kw")
    ici = te.reduce_axis((0, kp), "ici")
    # the weight first: the intrinsic's description multiplies its broadcast operand on the left
    acc = te.compute(
        (n, op, oh, owp),
        lambda b, oc, i, j: te.sum(Wk[oc, icb, ry, rx, ici].astype("int32")
                                   * Xp[b, icb, i * sh + ry * dh, (rx * dw) % sw, j + (rx * dw) // sw, ici]
                                   .astype("int32"), axis=[icb, ry, rx, ici]),
        name="acc")
    out, res_in, lut_in = _conv_epilogue(lambda b, oc, i, j: acc[b, oc, i, j], (n, o, oh, ow), rq, tbl, residual,
                                         lut)
    args = [X] + res_in + [Wk, tbl] + lut_in + [out]
    sch = generic.schedule(te.create_prim_func(args), n * o * oh * ow * c * kh * kw)
    _schedule_pack(sch, "pack")
    blk = sch.get_sblock("acc")
    b_, oc_, i_, j_, r_icb, r_kh, r_kw, r_ici = sch.get_loops(blk)
    oco, oci = sch.split(oc_, [None, chans])
    jo, ji = sch.split(j_, [None, lanes])
    sch.reorder(b_, oco, i_, jo, r_icb, r_kh, r_kw, oci, ji, r_ici)
    row = sch.fuse(b_, oco, i_)
    sch.parallel(row)
    outb = sch.get_sblock("out")
    # the epilogue once per (channel tile, row) over exactly OW columns (a padded tail would need a
    # predicate, and TVM scalarizes predicated vectors)
    sch.reverse_compute_at(outb, row)
    sch.unroll(oci)
    init = sch.decompose_reduction(blk, r_icb)
    sch.vectorize(sch.get_loops(init)[-1])
    sch.tensorize(ji, name)
    ol = sch.get_loops(outb)[-1]
    vec = next(v for v in (32, 16, 8, 4, 2, 1) if ow % v == 0) if ow > 32 else ow
    if vec < ow:
        ol = sch.split(ol, [None, vec])[1]
    sch.vectorize(ol)

    wpad = np.zeros((op, cp, kh, kw), weight.dtype)
    wpad[:o, :c] = weight
    wk = np.ascontiguousarray(wpad.reshape(op, cp // kp, kp, kh, kw).transpose(0, 1, 3, 4, 2).astype(w_dtype))
    info = {"intrin": name, "path": path_of(name), "offset": offset, "offset128": offset == U8_OFFSET,
            "tile": (chans, lanes), "lanes": lanes, "kpack": kp, "tiling": "rows"}
    return _conv_kernel(sch, wk, wpad, bias, rq, offset, residual, (n, o, oh, ow), isa, info, lut)


def _schedule_pack(sch, name):
    """Parallelize a padding/packing stage over its outer loops."""
    blk = sch.get_sblock(name)
    loops = sch.get_loops(blk)
    sch.parallel(sch.fuse(*loops[:3]))


def _schedule_padding(sch, name, outer: int = 3):
    """A padded copy ``if_then_else(in bounds, x[affine], fill)`` as two vector loops per row: the fill,
    then the in-bounds copy without a test (``decompose_padding``), parallel over the ``outer`` leading
    loops. The single guarded loop does not vectorize (TVM scalarizes a per-lane test): it took 0.13 ms
    of MobileNetV2's 0.47 ms int8 depthwise layer (144 channels, 56 x 56; 0.34 ms split, 1 thread). A
    pack split by stride phase does not fit TVM's padding pattern and keeps the guarded loop. (The conv
    packs measured no gain from the split: their layers are compute-bound.)"""
    blk = sch.get_sblock(name)
    loops = sch.get_loops(blk)
    sch.parallel(sch.fuse(*loops[:outer]))
    if not sch.can_decompose_padding(blk, sch.get_loops(blk)[1]):
        return
    # split under the parallel rows: each row is filled and copied while in L1 (a whole-buffer fill
    # first writes a large fp32 buffer twice: 0.28 -> 0.40 ms measured)
    fill = sch.decompose_padding(blk, sch.get_loops(blk)[1])
    for b in (fill, sch.get_sblock(name)):
        sch.vectorize(sch.get_loops(b)[-1])


# ============================================================================ depthwise (int8 and fp32)
def _depthwise(x_shape, weight, strides, padding, dilation, dtype, acc_dtype, fill, epilogue, extra, w_dtype=None,
               tap_pairs=False):
    n, c, h, w = (int(v) for v in x_shape)
    o, _, kh, kw = weight.shape
    oh, ow = conv_out_hw(h, w, kh, kw, strides, padding, dilation)
    tile = min(DW_TILE, _ceil(ow, 8))
    owp = _ceil(ow, tile)
    sh, sw = strides
    dh, dw = dilation
    hp = max(h + padding[0] + padding[2], (oh - 1) * sh + (kh - 1) * dh + 1)
    wp = max(w + padding[1] + padding[3], (owp - 1) * sw + (kw - 1) * dw + 1)
    X = te.placeholder((n, c, h, w), dtype, name="x")
    Wd = te.placeholder((c, kh, kw), w_dtype or dtype, name="w")
    # The padded copy is split by column phase (column = jj * sw + phase): with stride 2 the taps of
    # one output row then read contiguous vectors instead of gathering every other element.
    wq = max(-(-wp // sw), owp + ((kw - 1) * dw) // sw)
    pt, pl = padding[0], padding[1]

    # integer codes with a column stride: padded copy, then the phases (0.99 -> 0.60 ms on MobileNetV2's
    # 112 -> 56 int8 depthwise, 1 thread); fp32 stays one guarded pass (the extra copy of 4-byte values
    # measured slower: 0.81 -> 1.06 ms)
    two_stage = sw > 1 and not dtype.startswith("float")
    if not two_stage:
        def pack(b, ch, i, ph, jj):
            col = jj * sw + ph
            ok = tirx.all(i >= pt, i < pt + h, col >= pl, col < pl + w)
            # affine reads under the test (no clamping): _schedule_padding splits the border off
            return tirx.if_then_else(ok, X[b, ch, i - pt, col - pl], tirx.const(fill, dtype))

        Xp = te.compute((n, c, hp, sw, wq), pack, name="pack")
    else:
        # strided: a padded copy (split like the stride-1 pack), then the column phases without a test
        Xpad = te.compute((n, c, hp, wq * sw), lambda b, ch, i, col: tirx.if_then_else(
            tirx.all(i >= pt, i < pt + h, col >= pl, col < pl + w), X[b, ch, i - pt, col - pl],
            tirx.const(fill, dtype)), name="pad")
        Xp = te.compute((n, c, hp, sw, wq), lambda b, ch, i, ph, jj: Xpad[b, ch, i, jj * sw + ph], name="pack")
    if tap_pairs:
        # two taps' int16 products summed in int16 (the caller proved |x| (|w_a| + |w_b|) <= 32767), then
        # widened: vpmullw on 16 lanes instead of vpmulld (two uops) on 8, one widening per two taps.
        # The weight is [C, taps rounded up to even] (a zero last tap; its input index is clamped).
        taps = kh * kw
        Wd = te.placeholder((c, _ceil(taps, 2)), w_dtype or dtype, name="w")

        def tap(b, ch, i, j, t):
            t = tirx.min(t, taps - 1)
            ry, rx = t // kw, t % kw
            return Xp[b, ch, i * sh + ry * dh, (rx * dw) % sw, j + (rx * dw) // sw].astype("int16")

        rp = te.reduce_axis((0, _ceil(taps, 2) // 2), "pair")
        acc = te.compute(
            (n, c, oh, owp),
            lambda b, ch, i, j: te.sum((tap(b, ch, i, j, 2 * rp) * Wd[ch, 2 * rp].astype("int16")
                                        + tap(b, ch, i, j, 2 * rp + 1) * Wd[ch, 2 * rp + 1].astype("int16"))
                                       .astype(acc_dtype), axis=[rp]),
            name="acc")
    else:
        ry = te.reduce_axis((0, kh), "kh")
        rx = te.reduce_axis((0, kw), "kw")
        acc = te.compute(
            (n, c, oh, owp),
            lambda b, ch, i, j: te.sum(Xp[b, ch, i * sh + ry * dh, (rx * dw) % sw, j + (rx * dw) // sw]
                                       .astype(acc_dtype) * Wd[ch, ry, rx].astype(acc_dtype), axis=[ry, rx]),
            name="acc")
    out, args = epilogue(acc, (n, c, oh, ow))
    func = te.create_prim_func([X, Wd] + args + [out])
    sch = generic.schedule(func, n * c * oh * ow * kh * kw)
    if not two_stage:
        _schedule_padding(sch, "pack")
    else:
        _schedule_padding(sch, "pad")
        pk = sch.get_loops(sch.get_sblock("pack"))
        sch.parallel(sch.fuse(*pk[:3]))
        sch.vectorize(pk[-1])
    blk = sch.get_sblock("acc")
    b_, ch, i_, j_, *reds = sch.get_loops(blk)
    jo, ji = sch.split(j_, [None, tile])
    sch.reorder(b_, ch, i_, jo, *reds, ji)
    small = oh * ow <= DW_SMALL_MAP
    row = sch.fuse(b_, ch) if small else sch.fuse(b_, ch, i_)
    sch.parallel(row)
    outb = sch.get_sblock("out")
    # The epilogue runs once per output row over exactly OW columns: a tile-sized epilogue would need
    # a predicate for the padded tail (OW=56 with 16-wide tiles), and TVM scalarizes predicated vectors.
    # A small map (7 x 7) runs it once per channel over the whole map, contiguous in NCHW: vectors of
    # 49 instead of rows of 7 (MobileNetV2's 7 x 7 int8 depthwise 0.089 -> 0.059 ms, 1 thread; at 14 x 14
    # and above the per-row epilogue measured as fast or faster).
    sch.reverse_compute_at(outb, row)
    for r in reds:
        sch.unroll(r)
    sch.vectorize(ji)
    init = sch.decompose_reduction(blk, reds[0])
    sch.vectorize(sch.get_loops(init)[-1])
    ol = sch.get_loops(outb)
    ol = sch.fuse(ol[-2], ol[-1]) if small else ol[-1]
    count = oh * ow if small else ow
    vec = count if count <= 32 else next(v for v in range(32, 0, -1) if count % v == 0)
    if vec < count:
        ol = sch.split(ol, [None, vec])[1]
    sch.vectorize(ol)
    return sch.mod["main"], (n, o, oh, ow), tile


def depthwise_int8(x_shape, weight, bias, rq: Requant, strides, padding, dilation, isa="avx2",
                   codes: Codes | None = None) -> Kernel:
    """Fused integer depthwise conv (groups == C == O) + bias + requant, vectorized along the output row.

    Exact for any input codes (int32 vector multiply-adds, no intrinsic): int8, uint8 padded with
    ``codes.pad`` (the zero point), int16.

    >>> # k = depthwise_int8((1, 32, 28, 28), w_o1hw, b, rq, (2, 2), (1, 1, 1, 1), (1, 1))
    """
    weight = weight_codes(weight)
    codes = codes or Codes()
    rq = rq.int32_requant(generic.kernel_acc_bound(weight, (1, 2, 3), codes, bias))
    o = weight.shape[0]
    tbl = te.placeholder((3, o), "int64", name="rq")           # with the bias (_bias_table)

    def epi(acc, shape):
        out = te.compute(shape, lambda b, ch, i, j: requant_expr(acc[b, ch, i, j], ch, rq, tbl), name="out")
        return out, [tbl]

    pairs = DW_TAP_PAIRS and _tap_pairs_exact(weight, codes)
    func, oshape, tile = _depthwise(x_shape, weight, strides, padding, dilation, codes.dtype, "int32", codes.pad,
                                    epi, None, str(weight.dtype), tap_pairs=pairs)
    wconst = weight[:, 0]
    if pairs:
        taps = wconst.reshape(o, -1)
        wconst = np.zeros((o, _ceil(taps.shape[1], 2)), taps.dtype)
        wconst[:, :taps.shape[1]] = taps
    consts = [np.ascontiguousarray(wconst), _bias_table(rq, np.asarray(bias, np.int32).reshape(-1), o)]
    return Kernel(func, consts, oshape, rq.out_dtype, f"qdwconv2d_{isa}",
                  {"tile": tile, "path": "depthwise", "int32_requant": rq.int32_exact, "tap_pairs": pairs})


def _tap_pairs_exact(weight, codes: Codes) -> bool:
    """Whether a depthwise layer may sum two taps' products in int16: for every channel, the largest
    ``|x|`` (padding included) times its two largest ``|w|`` stays within int16. (8-bit codes and
    weights in [-127, 127] always pass: 127 * 254 = 32258.)

    >>> _tap_pairs_exact(np.full((2, 1, 3, 3), -127, np.int8), Codes.of("int8", lo=-127))
    True
    >>> _tap_pairs_exact(np.full((2, 1, 3, 3), 127, np.int8), Codes.of("uint8", pad=128))
    False
    """
    if str(weight.dtype) != "int8" or codes.dtype not in ("int8", "uint8"):
        return False
    lo, hi = codes.span
    xmax = max(abs(lo), abs(hi))
    top2 = np.sort(np.abs(weight.reshape(weight.shape[0], -1).astype(np.int64)), axis=1)[:, -2:].sum(axis=1)
    return bool(xmax * int(top2.max()) <= 32767)


def depthwise_fp32(x_shape, weight, bias, act, strides, padding, dilation, isa="avx2") -> Kernel:
    """fp32 depthwise conv + bias + clip with the same schedule as :func:`depthwise_int8`.

    >>> # k = depthwise_fp32((1, 32, 28, 28), w_o1hw, b, (0.0, 6.0), (1, 1), (1, 1, 1, 1), (1, 1))
    """
    weight = np.asarray(weight, np.float32)
    o = weight.shape[0]
    B = te.placeholder((o,), "float32", name="bias")

    def epi(acc, shape):
        return te.compute(shape, lambda b, ch, i, j: act_expr(acc[b, ch, i, j] + B[ch], act), name="out"), [B]

    func, oshape, tile = _depthwise(x_shape, weight, strides, padding, dilation, "float32", "float32", 0.0,
                                    epi, None)
    consts = [np.ascontiguousarray(weight[:, 0]), generic._fbias(bias, o)]
    return Kernel(func, consts, oshape, "float32", f"dwconv2d_fp32_{isa}", {"tile": tile})


# ============================================================================ fp32 conv2d (groups=1)
def conv2d_fp32(x_shape, weight, bias, act, strides, padding, dilation, groups=1, isa="avx2") -> Kernel:
    """fp32 conv2d + bias + clip: NCHW in/out, ``[O/L, C, KH, KW, L]`` packed weight, FMA tile.

    >>> # k = conv2d_fp32((1, 64, 56, 56), w_oihw, b, (0.0, None), (1, 1), (1, 1, 1, 1), (1, 1))
    """
    weight = np.asarray(weight, np.float32)
    n, c, h, w = (int(v) for v in x_shape)
    o, cg, kh, kw = weight.shape
    if groups != 1:
        if groups == c == o and cg == 1:
            return depthwise_fp32(x_shape, weight, bias, act, strides, padding, dilation, isa)
        return generic.conv2d_fp32(x_shape, weight, bias, act, strides, padding, dilation, groups)
    lanes = FP32_LANES[isa]
    oh, ow = conv_out_hw(h, w, kh, kw, strides, padding, dilation)
    reg_w = pick_tile_w(ow)
    ob_count = _ceil(o, lanes) // lanes
    reg_o = 2 if ob_count % 2 == 0 and 2 * reg_w <= MAX_ACC_REGS[isa] else 1
    op, owp = ob_count * lanes, _ceil(ow, reg_w)
    sh, sw = strides
    dh, dw = dilation
    hp = max(h + padding[0] + padding[2], (oh - 1) * sh + (kh - 1) * dh + 1)
    wp = max(w + padding[1] + padding[3], (owp - 1) * sw + (kw - 1) * dw + 1)
    X = te.placeholder((n, c, h, w), "float32", name="x")
    Wk = te.placeholder((op // lanes, c, kh, kw, lanes), "float32", name="w")
    B = te.placeholder((o,), "float32", name="bias")
    Xp = generic.pad_nchw(X, padding, hp, wp, 0.0, "pack")
    ic = te.reduce_axis((0, c), "ic")
    ry = te.reduce_axis((0, kh), "kh")
    rx = te.reduce_axis((0, kw), "kw")
    acc = te.compute(
        (n, op // lanes, oh, owp, lanes),
        lambda b, ob, i, j, oi: te.sum(Xp[b, ic, i * sh + ry * dh, j * sw + rx * dw] * Wk[ob, ic, ry, rx, oi],
                                       axis=[ic, ry, rx]),
        name="acc")
    out = te.compute((n, o, oh, ow), lambda b, oc, i, j: act_expr(
        acc[b, oc // lanes, i, j, oc % lanes] + B[oc], act), name="out")
    sch = generic.schedule(te.create_prim_func([X, Wk, B, out]), n * o * oh * ow * c * kh * kw)
    _schedule_pack(sch, "pack")
    blk = sch.get_sblock("acc")
    b_, ob, i_, j_, oi, r_ic, r_kh, r_kw = sch.get_loops(blk)
    obo, obi = sch.split(ob, [None, reg_o])
    jo, ji = sch.split(j_, [None, reg_w])
    sch.reorder(b_, obo, i_, jo, r_ic, r_kh, r_kw, obi, ji, oi)
    sch.parallel(sch.fuse(b_, obo, i_))
    outb = sch.get_sblock("out")
    sch.reverse_compute_at(outb, jo)
    sch.unroll(obi)
    sch.unroll(ji)
    sch.vectorize(oi)
    init = sch.decompose_reduction(blk, r_ic)
    sch.vectorize(sch.get_loops(init)[-1])
    sch.vectorize(sch.get_loops(outb)[-1])
    wpad = np.zeros((op, c, kh, kw), np.float32)
    wpad[:o] = weight
    wk = np.ascontiguousarray(wpad.reshape(op // lanes, lanes, c, kh, kw).transpose(0, 2, 3, 4, 1))
    return Kernel(sch.mod["main"], [wk, generic._fbias(bias, o)], (n, o, oh, ow), "float32",
                  f"conv2d_fp32_{isa}", {"tile": (reg_o * lanes, reg_w)})


# ============================================================================ dense
#: Register tiles (rows, lane groups) of the dense kernels for inputs of more than 3 rows, per (ISA, int8
#: or fp32), in order of preference: the first that pads the rows by less than 1/8 wins, else the one that
#: pads least. Padded rows read the last real row and are never stored. Measured on 2 threads (AMD Zen 4,
#: ms; 17 x 768 x 3072 / 128 x 384 x 1536 / 16 x 512 x 1000): AVX2 int8 6x2 0.29 / 0.50 / 0.070, 4x2
#: 0.36 / 0.49 / 0.058, 4x3 0.42 / 0.72 / 0.080 (vpmaddubsw's temporaries spill it); AVX2 fp32 6x2
#: 0.40 / 0.68 / 0.088, 4x3 0.45 / 0.66 / 0.077; VNNI int8 6x4 0.067 / 0.116 / 0.026, 4x4 0.082 / 0.120 /
#: 0.021; VNNI fp32 6x4 0.197 / 0.362 / 0.052, 8x3 0.284 / 0.351 / 0.042. One row per tile (the tile
#: when rows did not divide by 4, 3 or 2) took 0.59 (int8) and 1.10 ms (fp32) on the first shape: each
#: weight vector served one row, and a transformer's 17 tokens streamed the weights 17 times.
DENSE_ROW_TILES = {("avx2", "int8"): ((6, 2), (4, 2), (3, 3)), ("avx2", "fp32"): ((6, 2), (4, 3)),
                   ("vnni", "int8"): ((6, 4), (4, 4), (8, 3)), ("vnni", "fp32"): ((6, 4), (8, 3), (4, 6)),
                   ("sdot", "int8"): ((6, 4), (4, 4), (8, 3)), ("sdot", "fp32"): ((6, 4), (8, 3), (4, 6))}


def _dense_tiles(m, n, lanes, isa, dtype="int8"):
    """(mt, nt, mp): rows and lane-groups of the register tile and the rows padded to a multiple of mt.

    Up to 3 rows the tile takes them all (no padding); more rows take a :data:`DENSE_ROW_TILES` tile.

    >>> _dense_tiles(1, 1000, 8, "avx2"), _dense_tiles(17, 768, 8, "avx2"), _dense_tiles(16, 512, 8, "avx2")
    ((1, 4, 1), (6, 2, 18), (4, 2, 16))
    """
    if m <= 3:
        nt = max(1, min(MAX_ACC_REGS[isa] // m, 4, -(-n // lanes)))
        return m, nt, m
    tiles = DENSE_ROW_TILES[(isa, dtype)]
    mt, nt = next((t for t in tiles if (_ceil(m, t[0]) - m) * 8 < m), None) or \
        min(tiles, key=lambda t: _ceil(m, t[0]) - m)
    return mt, max(1, min(nt, -(-n // lanes))), _ceil(m, mt)


def dense_int8(x_shape, weight_kn, bias, rq: Requant | None, isa="avx2", nonneg=False,
               out_scale=None, codes: Codes | None = None) -> Kernel:
    """Fused integer dense ``(M, K) x (K, N)`` + bias + requant + clip + cast, tensorized for ``isa``.

    ``codes`` (the input's :class:`~relayq.backend.generic.Codes`) and the output dtype as in
    :func:`conv2d_int8`; without a tensorized path (int16 on ARM) the portable kernel.

    With ``rq=None`` and ``out_scale`` (a float32 scalar or ``(N,)`` vector) the epilogue dequantizes
    instead: ``float32(acc + bias) * out_scale`` (a classifier whose output stays in float), computed
    with the same two fp32 roundings as the realized ``astype`` + ``multiply``.

    >>> # k = dense_int8((1, 512), w_kn, b, rq, "avx2", nonneg=True)
    """
    weight_kn = weight_codes(weight_kn)
    codes = _codes(codes, nonneg)
    if rq is not None:
        rq = rq.int32_requant(generic.kernel_acc_bound(weight_kn, (0,), codes, bias))
    m, k = (int(v) for v in x_shape)
    n = weight_kn.shape[1]
    chosen = select_path(isa, codes, weight_kn, 0)
    if chosen is None:
        if rq is None:
            raise ValueError(f"no {isa} dense kernel for {codes.dtype} codes with a dequantizing epilogue")
        kern = generic.dense_int8(x_shape, weight_kn, bias, rq, codes=codes)
        kern.info["path"] = "generic"
        return kern
    name, offset = chosen
    lanes, kp, a_dtype = intrin.LANES[name], intrin.KPACK[name], intrin.A_DTYPE[name]
    mt, nt, mp = _dense_tiles(m, n, lanes, isa)
    np_, kpad = _ceil(n, lanes * nt), _ceil(k, kp)
    A = te.placeholder((m, k), codes.dtype, name="x")
    w_dtype = intrin.W_DTYPE[name]
    Wk = te.placeholder((np_ // lanes, kpad // kp, lanes, kp), w_dtype, name="w")
    deq = rq is None
    if deq:
        B = te.placeholder((np_,), "int32", name="bias")
        scale = np.asarray(out_scale, np.float32).reshape(-1)
        tbl = te.placeholder((np_,), "float32", name="scale") if scale.size > 1 else None
    else:
        tbl = te.placeholder((3, np_), "int64", name="rq")           # with the bias (_bias_table)
    cast = _input_cast(a_dtype, offset)
    # padded K entries meet zero weights: any fill is exact, 0 keeps the pack simple
    # (padded rows repeat the last row: their accumulators are computed and dropped)
    Ap = te.compute((mp, kpad // kp, kp), lambda i, kb, ki: tirx.if_then_else(
        kb * kp + ki < k, cast(A[tirx.min(i, m - 1), tirx.min(kb * kp + ki, k - 1)]), tirx.const(0, a_dtype)),
        name="pack")
    kb_ = te.reduce_axis((0, kpad // kp), "kb")
    ki_ = te.reduce_axis((0, kp), "ki")
    acc = te.compute((mp, np_ // lanes, lanes), lambda i, nb, ni: te.sum(
        Ap[i, kb_, ki_].astype("int32") * Wk[nb, kb_, ni, ki_].astype("int32"), axis=[kb_, ki_]), name="acc")
    if deq:
        def epi(i, j):
            v = (acc[i, j // lanes, j % lanes] + B[j]).astype("float32")
            return v * (tbl[j] if tbl is not None else tirx.const(float(scale[0]), "float32"))
        out = te.compute((m, n), epi, name="out")
    else:
        out = te.compute((m, n), lambda i, j: requant_expr(acc[i, j // lanes, j % lanes], j, rq, tbl), name="out")
    args = [A, Wk] + ([B] if deq else []) + ([tbl] if tbl is not None else []) + [out]
    sch = generic.schedule(te.create_prim_func(args), m * n * k)
    pk = sch.get_sblock("pack")
    sch.parallel(sch.get_loops(pk)[0])
    blk = sch.get_sblock("acc")
    i_, nb, ni, r_kb, r_ki = sch.get_loops(blk)
    io, ii = sch.split(i_, [None, mt])
    nbo, nbi = sch.split(nb, [None, nt])
    # column blocks outside row tiles: a thread's consecutive tiles reuse one weight block from cache
    sch.reorder(nbo, io, r_kb, ii, nbi, ni, r_ki)
    sch.parallel(sch.fuse(nbo, io))
    outb = sch.get_sblock("out")
    sch.reverse_compute_at(outb, sch.get_loops(blk)[0])
    sch.unroll(ii)
    sch.unroll(nbi)
    init = sch.decompose_reduction(blk, r_kb)
    sch.vectorize(sch.get_loops(init)[-1])
    sch.tensorize(ni, name)
    sch.vectorize(sch.get_loops(outb)[-1])
    wpad = np.zeros((kpad, np_), weight_kn.dtype)
    wpad[:k, :n] = weight_kn
    wk = np.ascontiguousarray(wpad.T.reshape(np_ // lanes, lanes, kpad // kp, kp).transpose(0, 2, 1, 3)
                              .astype(w_dtype))
    bpad = np.zeros(np_, np.int64)
    bpad[:n] = np.asarray(bias, np.int64).reshape(-1)
    b32 = _offset_bias(bpad, wpad.astype(np.int64).sum(axis=0), offset)
    if not deq:
        consts = [wk, _bias_table(rq, b32, np_)]
    else:
        consts = [wk, b32]
        if tbl is not None:
            spad = np.zeros(np_, np.float32)
            spad[:n] = scale
            consts.append(spad)
    info = {"intrin": name, "path": path_of(name), "offset": offset, "offset128": offset == U8_OFFSET,
            "tile": (mt, nt * lanes), "dequantize": deq, "int32_requant": bool(rq is not None and rq.int32_exact)}
    return Kernel(sch.mod["main"], consts, (m, n), "float32" if deq else rq.out_dtype,
                  f"qdense_deq_{isa}" if deq else f"qdense_{isa}", info)


def dense_fp32(x_shape, weight_kn, bias, act, isa="avx2") -> Kernel:
    """fp32 dense + bias + clip: weight packed ``[N/L, K, L]``, ``mt x (nt * L)`` FMA register tile.

    >>> # k = dense_fp32((1, 512), w_kn, b, None)
    """
    weight_kn = np.asarray(weight_kn, np.float32)
    m, k = (int(v) for v in x_shape)
    n = weight_kn.shape[1]
    lanes = FP32_LANES[isa]
    mt, nt, mp = _dense_tiles(m, n, lanes, isa, "fp32")
    np_ = _ceil(n, lanes * nt)
    A = te.placeholder((m, k), "float32", name="x")
    Wk = te.placeholder((np_ // lanes, k, lanes), "float32", name="w")
    B = te.placeholder((n,), "float32", name="bias")
    r = te.reduce_axis((0, k), "k")
    # (padded rows repeat the last row: their accumulators are computed and dropped)
    acc = te.compute((mp, np_ // lanes, lanes),
                     lambda i, nb, ni: te.sum(A[tirx.min(i, m - 1), r] * Wk[nb, r, ni], axis=r), name="acc")
    out = te.compute((m, n), lambda i, j: act_expr(acc[i, j // lanes, j % lanes] + B[j], act), name="out")
    sch = generic.schedule(te.create_prim_func([A, Wk, B, out]), m * n * k)
    blk = sch.get_sblock("acc")
    i_, nb, ni, r_k = sch.get_loops(blk)
    io, ii = sch.split(i_, [None, mt])
    nbo, nbi = sch.split(nb, [None, nt])
    sch.reorder(nbo, io, r_k, ii, nbi, ni)
    sch.parallel(sch.fuse(nbo, io))
    outb = sch.get_sblock("out")
    sch.reverse_compute_at(outb, sch.get_loops(blk)[0])
    sch.unroll(ii)
    sch.unroll(nbi)
    sch.vectorize(ni)
    init = sch.decompose_reduction(blk, r_k)
    sch.vectorize(sch.get_loops(init)[-1])
    sch.vectorize(sch.get_loops(outb)[-1])
    wpad = np.zeros((k, np_), np.float32)
    wpad[:, :n] = weight_kn
    wk = np.ascontiguousarray(wpad.reshape(k, np_ // lanes, lanes).transpose(1, 0, 2))
    return Kernel(sch.mod["main"], [wk, generic._fbias(bias, n)], (m, n), "float32", f"dense_fp32_{isa}",
                  {"tile": (mt, nt * lanes)})
