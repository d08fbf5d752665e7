"""The fused kernels on uint8 (asymmetric, zero-point padded) and int16 codes in and out: bit-exact with
qmath, and the u8 x s8 fast path taken exactly where vpmaddubsw cannot saturate."""
import numpy as np
import pytest

from relayq import qmath
from relayq.backend import generic, intrin, x86
from relayq.backend.generic import Codes, Requant

from .kutil import AVX2, GENERIC, VNNI, cpu_flags, rand_requant
from .test_x86 import build_and_run

HAS_AVX2 = "avx2" in cpu_flags()
HAS_VNNI = "avx512_vnni" in cpu_flags()
needs_avx2 = pytest.mark.skipif(not HAS_AVX2, reason="this CPU has no AVX2 (kernels are only compiled)")

# dtype, (lo, hi) of the input codes, pad code (the zero point), weight bits, output dtype + zero point
SCHEMES = {
    "u8_in_u8_out_w7": ("uint8", (0, 255), 131, 7, ("uint8", 128)),       # fast: 255 * 126 <= 32767
    "u8_in_u8_out_w8": ("uint8", (0, 255), 131, 8, ("uint8", 0)),         # int16 path (could saturate)
    "u8_relu_7bit_w8": ("uint8", (0, 127), 9, 8, ("uint8", 5)),           # fast: 127 * 254 <= 32767
    "s8_in_u8_out_w7": ("int8", (-127, 127), 0, 7, ("uint8", 77)),        # fast with offset 127
    "u8_in_s8_out_w4": ("uint8", (0, 255), 200, 4, ("int8", 0)),          # 4-bit weights: fast
    "s16_in_s16_out": ("int16", (-2047, 2047), 0, 8, ("int16", 0)),       # 12-bit codes: int16 path
}
EXPECTED_PATH = {"u8_in_u8_out_w7": "u8s8", "u8_in_u8_out_w8": "int16", "u8_relu_7bit_w8": "u8s8",
                 "s8_in_u8_out_w7": "u8s8", "u8_in_s8_out_w4": "u8s8", "s16_in_s16_out": "int16"}


def _scheme(rng, key, x_shape, w_shape):
    dtype, (lo, hi), pad, wbits, (odt, ozp) = SCHEMES[key]
    x = rng.integers(lo, hi + 1, x_shape).astype(dtype)
    wmax = qmath.qrange(wbits)[1]
    w = rng.integers(-wmax, wmax + 1, w_shape).astype(qmath.storage_dtype(wbits))
    # worst cases on purpose: some input codes at the top of the range, some weights at +-max
    x.reshape(-1)[::5] = hi
    w.reshape(-1)[::3] = wmax
    w.reshape(-1)[1::7] = -wmax
    olo, ohi = qmath.qrange(8 if odt != "int16" else 12, odt != "uint8")
    return x, w, Codes.of(dtype, lo, hi, pad), (odt, ozp, olo, ohi)


def _requant(rng, channels, per_channel, out):
    odt, ozp, olo, ohi = out
    base = rand_requant(rng, channels, per_channel)
    return Requant.from_arrays(base.multiplier, base.addend, base.shift, olo, ohi, ozp, odt)


def _conv_ref(x, w, b, rq, strides, padding, groups, pad_code):
    pt, pl, pb, pr = padding
    xp = np.pad(x.astype(np.int64), ((0, 0), (0, 0), (pt, pb), (pl, pr)), constant_values=pad_code)
    acc = qmath.conv2d_int(xp, w, strides, (0, 0, 0, 0), (1, 1), groups) + b.reshape(1, -1, 1, 1)
    return rq.reference(acc)


@needs_avx2
@pytest.mark.parametrize("key", list(SCHEMES))
def test_conv_codes_avx2_exact(key):
    rng = np.random.default_rng(sum(map(ord, key)))
    x, w, codes, out = _scheme(rng, key, (1, 12, 9, 9), (24, 12, 3, 3))
    b = rng.integers(-3000, 3000, 24).astype(np.int32)
    rq = _requant(rng, 24, True, out)
    kern = x86.conv2d_int8(x.shape, w, b, rq, (1, 1), (1, 1, 1, 1), (1, 1), 1, isa="avx2", codes=codes)
    assert kern.info["path"] == EXPECTED_PATH[key] and kern.out_dtype == out[0]
    got, _ = build_and_run(kern, x, AVX2)
    np.testing.assert_array_equal(got, _conv_ref(x, w, b, rq, (1, 1), (1, 1, 1, 1), 1, codes.pad))


@needs_avx2
@pytest.mark.parametrize("key", ["u8_in_u8_out_w7", "u8_in_u8_out_w8", "s16_in_s16_out"])
def test_depthwise_and_stride2_codes_exact(key):
    rng = np.random.default_rng(5 + len(key))
    x, w, codes, out = _scheme(rng, key, (1, 8, 11, 11), (8, 1, 3, 3))
    b = rng.integers(-3000, 3000, 8).astype(np.int32)
    rq = _requant(rng, 8, False, out)
    kern = x86.conv2d_int8(x.shape, w, b, rq, (2, 2), (1, 1, 1, 1), (1, 1), 8, isa="avx2", codes=codes)
    assert kern.info["path"] == "depthwise" and kern.out_dtype == out[0]
    got, _ = build_and_run(kern, x, AVX2)
    np.testing.assert_array_equal(got, _conv_ref(x, w, b, rq, (2, 2), (1, 1, 1, 1), 8, codes.pad))


@needs_avx2
@pytest.mark.parametrize("key", ["u8_in_u8_out_w7", "u8_in_u8_out_w8", "s8_in_u8_out_w7", "s16_in_s16_out"])
def test_dense_codes_avx2_exact(key):
    rng = np.random.default_rng(40 + len(key))
    x, w, codes, out = _scheme(rng, key, (3, 70), (70, 20))
    b = rng.integers(-3000, 3000, 20).astype(np.int32)
    rq = _requant(rng, 20, True, out)
    kern = x86.dense_int8(x.shape, w, b, rq, "avx2", codes=codes)
    assert kern.info["path"] == EXPECTED_PATH[key]
    got, _ = build_and_run(kern, x, AVX2)
    np.testing.assert_array_equal(got, rq.reference(x.astype(np.int64) @ w.astype(np.int64) + b))


@pytest.mark.parametrize("key", ["u8_in_u8_out_w8", "s8_in_u8_out_w7", "s16_in_s16_out"])
def test_conv_codes_vnni_and_generic(key):
    """uint8 goes straight into vpdpbusd (no offset); int16 codes take the int16 path on VNNI too; the
    portable kernel reads every code type."""
    rng = np.random.default_rng(77 + len(key))
    x, w, codes, out = _scheme(rng, key, (1, 8, 7, 7), (16, 8, 3, 3))
    b = rng.integers(-3000, 3000, 16).astype(np.int32)
    rq = _requant(rng, 16, True, out)
    ref = _conv_ref(x, w, b, rq, (1, 1), (1, 1, 1, 1), 1, codes.pad)
    kern = x86.conv2d_int8(x.shape, w, b, rq, (1, 1), (1, 1, 1, 1), (1, 1), 1, isa="vnni", codes=codes)
    if codes.dtype == "uint8":
        assert kern.info["intrin"] == intrin.VNNI_U8S8 and kern.info["offset"] == 0
    got, lib = build_and_run(kern, x, VNNI, run=HAS_VNNI)
    if HAS_VNNI:
        np.testing.assert_array_equal(got, ref)
    got, _ = build_and_run(generic.conv2d_int8(x.shape, w, b, rq, (1, 1), (1, 1, 1, 1), (1, 1), 1, codes=codes),
                           x, GENERIC)
    np.testing.assert_array_equal(got, ref)


def test_select_path_follows_the_saturation_bound():
    """vpmaddubsw is chosen exactly when (hi + offset) * (largest same-sign weight pair) <= 32767."""
    w = np.zeros((8, 4), np.int8)
    w[0, :2] = (64, 64)                                   # pair 128: 255 * 128 = 32640 fits
    assert x86.select_path("avx2", Codes.of("uint8"), w, 1) == (intrin.AVX2_U8S8, 0)
    w[0, :2] = (64, 65)                                   # 255 * 129 = 32895 would saturate
    assert x86.select_path("avx2", Codes.of("uint8"), w, 1) == (intrin.AVX2_S8S8, 0)
    assert x86.select_path("avx2", Codes.of("uint8", 0, 250), w, 1)[0] == intrin.AVX2_U8S8   # 250 * 129 fits
    w[0, :2] = (64, -65)                                  # opposite signs never add up
    assert x86.select_path("avx2", Codes.of("uint8"), w, 1)[0] == intrin.AVX2_U8S8
    w[0] = 0
    w[0, 1:3] = (100, 100)                                # channels 1 and 2 are in different pairs
    assert x86.pair_bound(w, 1) == 100
    # signed codes are shifted to unsigned: the offset is the smallest that makes them >= 0
    assert x86.select_path("avx2", Codes.of("int8", -63, 63), np.full((8, 8), 127, np.int8), 1) == \
        (intrin.AVX2_U8S8, 63)
    assert x86.select_path("avx2", Codes.of("int8", 0, 127, pad=0), np.full((8, 8), 127, np.int8), 1) == \
        (intrin.AVX2_U8S8, 0)
    assert x86.select_path("sdot", Codes.of("uint8"), w, 1) == (intrin.ARM_SDOT, -128)
    assert x86.select_path("sdot", Codes.of("int16"), w, 1) is None


@needs_avx2
def test_u8s8_at_the_saturation_edge_is_exact():
    """Every input code 255 and every weight pair summing to 128 (the largest exact case)."""
    x = np.full((1, 8, 5, 5), 255, np.uint8)
    w = np.full((8, 8, 3, 3), 64, np.int8)
    w[1::2] = -64
    b = np.zeros(8, np.int32)
    rq = Requant.from_arrays(1 << 30, 1 << 45, 46, 0, 255, 3, "uint8")
    codes = Codes.of("uint8", pad=255)
    kern = x86.conv2d_int8(x.shape, w, b, rq, (1, 1), (1, 1, 1, 1), (1, 1), 1, isa="avx2", codes=codes)
    assert kern.info["path"] == "u8s8"
    got, _ = build_and_run(kern, x, AVX2)
    np.testing.assert_array_equal(got, _conv_ref(x, w, b, rq, (1, 1), (1, 1, 1, 1), 1, 255))


# (C, O, H, W, k, padding, dilation, stride): layers the row-tiled AVX2 kernel takes (x86.rows_pays)
ROW_CASES = [
    (12, 24, 16, 16, 3, 1, 1, 1),   # 16 columns: two 8-wide vectors, no padded column
    (5, 6, 8, 24, 1, 0, 1, 1),      # 1x1, C and O not multiples of 4 (padded channels and tile)
    (8, 64, 14, 14, 3, 1, 1, 1),    # 14 columns: 2 padded ones, cut off before the output
    (4, 8, 20, 24, 3, 2, 2, 1),     # dilation 2, padding 2, non-square
    (3, 16, 31, 32, 7, 3, 1, 2),    # a stem: 3 channels, 7x7 stride 2 (column phases), odd height
    (8, 8, 16, 32, 1, 0, 1, 2),     # 1x1 stride 2 (a downsampling shortcut)
]


@needs_avx2
@pytest.mark.parametrize("key", list(SCHEMES))
@pytest.mark.parametrize("case", ROW_CASES)
def test_row_tiled_conv_exact(case, key):
    """The row-tiled kernel (weights broadcast, 8 output columns in the lanes) on every scheme, through
    vpmaddubsw (u8s8) or the exact int16 vpmaddwd: bit-exact with qmath."""
    c, o, h, w_, k, p, d, st = case
    rng = np.random.default_rng(sum(map(ord, key)) + c)
    x, w, codes, out = _scheme(rng, key, (1, c, h, w_), (o, c, k, k))
    b = rng.integers(-3000, 3000, o).astype(np.int32)
    rq = _requant(rng, o, o % 2 == 0, out)
    pads = (p, p, p, p)
    assert x86.rows_pays(o, c, k, k, h, w_, (st, st), pads, (d, d), int16=EXPECTED_PATH[key] == "int16")
    kern = x86.conv2d_int8(x.shape, w, b, rq, (st, st), pads, (d, d), 1, isa="avx2", codes=codes)
    assert kern.info["intrin"] == {"u8s8": intrin.AVX2_U8S8_ROWS, "int16": intrin.AVX2_S8S8}[EXPECTED_PATH[key]]
    assert kern.info["tiling"] == "rows" and kern.info["path"] == EXPECTED_PATH[key]
    got, _ = build_and_run(kern, x, AVX2)
    xp = np.pad(x.astype(np.int64), ((0, 0), (0, 0), (p, p), (p, p)), constant_values=codes.pad)
    acc = qmath.conv2d_int(xp, w, (st, st), (0, 0, 0, 0), (d, d), 1) + b.reshape(1, -1, 1, 1)
    np.testing.assert_array_equal(got, rq.reference(acc))


SIGN_CASES = [c for c in ROW_CASES if c[0] >= 8] + [(16, 24, 7, 7, 1, 0, 1, 1), (24, 40, 9, 9, 3, 1, 1, 2)]


@needs_avx2
@pytest.mark.parametrize("rows", [True, False])
@pytest.mark.parametrize("case", SIGN_CASES)
def test_sign_path_conv_exact(case, rows):
    """Signed int8 codes in [-127, 127] with any int8 weights take vpsignb + vpmaddubsw (path "s8sign"),
    row- or channel-tiled, bit-exact with qmath at the pair-sum worst case: inputs at +-127 against weight
    pairs of -128 and -128 (256 * 127 = 32512 <= 32767), which would saturate the u8s8 path."""
    c, o, h, w_, k, p, d, st = case
    rng = np.random.default_rng(c * 100 + o + rows)
    x = rng.integers(-127, 128, (1, c, h, w_)).astype(np.int8)
    x.reshape(-1)[::3] = 127
    x.reshape(-1)[1::3] = -127
    w = rng.integers(-128, 128, (o, c, k, k)).astype(np.int8)
    w[:, 0::4] = w[:, 1::4] = -128                   # same-sign weight pairs: the u8s8 path would saturate
    w[:, 2::4] = w[:, 3::4] = 127
    w[::3] = -w[::3].clip(-127, 127)                  # some channels with the signs the other way round
    b = rng.integers(-3000, 3000, o).astype(np.int32)
    rq = _requant(rng, o, True, ("int8", 0, -127, 127))
    codes = Codes.of("int8", -127, 127)
    pads = (p, p, p, p)
    old = x86.ROWS_KERNEL
    x86.ROWS_KERNEL = rows
    try:
        kern = x86.conv2d_int8(x.shape, w, b, rq, (st, st), pads, (d, d), 1, isa="avx2", codes=codes)
    finally:
        x86.ROWS_KERNEL = old
    assert kern.info["path"] == "s8sign"
    tiled_by_rows = rows and x86.rows_pays(o, c, k, k, h, w_, (st, st), pads, (d, d))
    assert kern.info["intrin"] == (intrin.AVX2_S8S8_SIGN_ROWS if tiled_by_rows else intrin.AVX2_S8S8_SIGN)
    got, _ = build_and_run(kern, x, AVX2)
    acc = qmath.conv2d_int(x, w, (st, st), pads, (d, d), 1) + b.reshape(1, -1, 1, 1)
    np.testing.assert_array_equal(got, rq.reference(acc))


@needs_avx2
def test_sign_path_dense_exact_and_not_for_minus_128():
    rng = np.random.default_rng(3)
    x = rng.integers(-127, 128, (3, 40)).astype(np.int8)
    w = rng.integers(-128, 128, (40, 24)).astype(np.int8)
    b = rng.integers(-3000, 3000, 24).astype(np.int32)
    rq = _requant(rng, 24, True, ("int8", 0, -127, 127))
    kern = x86.dense_int8(x.shape, w, b, rq, "avx2", codes=Codes.of("int8", -127, 127))
    assert kern.info["path"] == "s8sign"
    got, _ = build_and_run(kern, x, AVX2)
    np.testing.assert_array_equal(got, rq.reference(x.astype(np.int64) @ w + b))
    # a code of -128 would negate to itself under vpsignb: such inputs keep the int16 path
    assert x86.dense_int8(x.shape, w, b, rq, "avx2", codes=Codes.of("int8")).info["path"] == "int16"


# (C, O, H, W, k, pad, dilation, stride): stems of 1-4 input channels
STEM_CASES = [
    (3, 64, 31, 32, 7, 3, 1, 2),     # ResNet's 7x7 stride-2 stem (odd height)
    (3, 32, 17, 18, 3, 1, 1, 2),     # MobileNet's 3x3 stride-2 stem
    (1, 8, 12, 20, 5, 2, 1, 1),      # one channel, 5x5, stride 1
    (4, 12, 15, 13, 3, 2, 2, 1),     # four channels, dilation 2
]


@needs_avx2
@pytest.mark.parametrize("codes_key", ["s8_sym", "s8_full", "u8"])
@pytest.mark.parametrize("case", STEM_CASES)
def test_stem_folds_column_taps_into_channels_exact(case, codes_key):
    """A stem (<= STEM_FOLD_CHANNELS input channels) is computed as a conv of C * KW channels and one column
    tap where that reaches a byte path: the sign path for symmetric int8 codes (unfolded it had the int16
    path); codes reaching -128 and uint8 codes with 8-bit weights stay on the unfolded int16 path.
    Bit-exact with qmath in every case, padding included."""
    c, o, h, w_, k, p, d, st = case
    rng = np.random.default_rng(c * 100 + o)
    lo, hi, dtype, pad = {"s8_sym": (-127, 127, "int8", 0), "s8_full": (-128, 127, "int8", 0),
                          "u8": (0, 255, "uint8", 117)}[codes_key]
    x = rng.integers(lo, hi + 1, (1, c, h, w_)).astype(dtype)
    x.reshape(-1)[::4] = hi
    x.reshape(-1)[1::4] = lo
    w = rng.integers(-128, 128, (o, c, k, k)).astype(np.int8)
    w[:, :, :, 0::2] = -128                           # same-sign pairs along the folded channels
    b = rng.integers(-3000, 3000, o).astype(np.int32)
    rq = _requant(rng, o, True, ("int8", 0, -127, 127))
    pads = (p, p, p, p)
    kern = x86.conv2d_int8(x.shape, w, b, rq, (st, st), pads, (d, d), 1, isa="avx2",
                           codes=Codes.of(dtype, lo, hi, pad))
    if codes_key == "s8_sym" and c * k >= 8:
        assert kern.info["fold"] == k and kern.info["path"] == "s8sign"
    # a stem is folded only onto a byte path (select_path keeps int16 below 8 folded channels and where a
    # pair could saturate: codes reaching -128, uint8 codes against pairs of -128)
    if "fold" in kern.info:
        assert kern.info["path"] != "int16"
    got, _ = build_and_run(kern, x, AVX2)
    np.testing.assert_array_equal(got, _conv_ref(x, w, b, rq, (st, st), pads, 1, pad) if d == 1 else
                                  rq.reference(_dilated_ref(x, w, b, st, p, d, pad)))
    x86.STEM_FOLD = False
    try:
        plain = x86.conv2d_int8(x.shape, w, b, rq, (st, st), pads, (d, d), 1, isa="avx2",
                                codes=Codes.of(dtype, lo, hi, pad))
        assert "fold" not in plain.info
        if "fold" not in kern.info:
            assert plain.info["path"] == kern.info["path"]
        elif codes_key == "s8_sym":
            assert plain.info["path"] == "int16"          # unfolded, 3 channels: the int16 path
    finally:
        x86.STEM_FOLD = True


def _dilated_ref(x, w, b, st, p, d, pad_code):
    xp = np.pad(x.astype(np.int64), ((0, 0), (0, 0), (p, p), (p, p)), constant_values=pad_code)
    return qmath.conv2d_int(xp, w, (st, st), (0, 0, 0, 0), (d, d), 1) + b.reshape(1, -1, 1, 1)
