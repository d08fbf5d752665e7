"""Kernel-level tests of relayq.backend.x86 / generic / intrin: bit-exactness vs qmath and asm checks."""
import numpy as np
import pytest
import tvm

from relayq import qmath
from relayq.backend import generic, intrin, x86

from .kutil import AVX2, GENERIC, VNNI, cpu_flags, rand_requant

HAS_AVX2 = "avx2" in cpu_flags()
HAS_VNNI = "avx512_vnni" in cpu_flags()
needs_avx2 = pytest.mark.skipif(not HAS_AVX2, reason="this CPU has no AVX2 (kernels are only compiled)")

# (C, O, H, W, k, stride, pad, groups, per_channel)
CONV_CASES = [
    (4, 16, 9, 9, 3, 1, 1, 1, False),    # 3x3, padding, tile column padding (OW=9)
    (3, 8, 10, 11, 3, 2, 1, 1, True),    # stride 2, C=3 (channel padding to kp), non-square
    (16, 24, 7, 7, 1, 1, 0, 1, True),    # 1x1, O not a multiple of 16 (VNNI lanes)
    (8, 8, 9, 9, 3, 2, 1, 8, True),      # depthwise stride 2
    (6, 6, 5, 5, 3, 1, 1, 6, False),     # depthwise stride 1 (a small map: one epilogue per channel)
    (8, 8, 12, 13, 3, 1, 1, 8, True),    # depthwise stride 1, a map above x86.DW_SMALL_MAP (per row)
    (8, 8, 21, 20, 3, 2, 1, 8, False),   # depthwise stride 2 above DW_SMALL_MAP (padded copy, then phases)
    (8, 12, 6, 6, 3, 1, 1, 2, True),     # grouped (generic fallback)
]
# (M, K, N, per_channel): 17 and 7 rows pad to whole register tiles (x86._dense_tiles: the padded rows are
# computed from the last real row and never stored)
DENSE_CASES = [(3, 40, 20, True), (1, 64, 24, False), (4, 100, 33, True), (17, 48, 40, True), (7, 24, 10, False)]


def build_and_run(kernel, x, target, run=True):
    lib = tvm.compile(tvm.IRModule({"main": kernel.finalize("kmain")}), target=target)
    if not run:
        return None, lib
    dev = tvm.cpu()
    args = [tvm.runtime.tensor(x, dev)] + [tvm.runtime.tensor(np.ascontiguousarray(c), dev) for c in kernel.consts]
    out = tvm.runtime.tensor(np.zeros(kernel.out_shape, kernel.out_dtype), dev)
    lib.mod["kmain"](*args, out)
    return out.numpy(), lib


def conv_case(rng, case, nonneg):
    c, o, h, w, k, s, p, g, pc = case
    x = rng.integers(0 if nonneg else -127, 128, (1, c, h, w)).astype(np.int8)
    wt = rng.integers(-127, 128, (o, c // g, k, k)).astype(np.int8)
    b = rng.integers(-3000, 3000, o).astype(np.int32)
    rq = rand_requant(rng, o, pc, lo=0 if nonneg else -127)
    acc = qmath.conv2d_int(x, wt, (s, s), (p, p, p, p), (1, 1), g) + b.reshape(1, -1, 1, 1)
    ref = qmath.requantize(acc, rq.multiplier, rq.shift, rq.lo, rq.hi, axis=1 if pc else None).astype(np.int8)
    return x, wt, b, rq, ref


def test_intrinsics_registered_once():
    from tvm import s_tir
    assert intrin.register_all() == []
    for name in (intrin.AVX2_U8S8, intrin.AVX2_S8S8, intrin.VNNI_U8S8):
        assert s_tir.TensorIntrin.get(name) is not None
    # the pmaddubsw bound that makes the u8 path exact for codes in [0, 127]
    assert 2 * 127 * 128 < 32767


def test_intrinsic_selection():
    assert x86.select_intrin("avx2", True) == (intrin.AVX2_U8S8, False)
    assert x86.select_intrin("avx2", False) == (intrin.AVX2_S8S8, False)
    assert x86.select_intrin("vnni", True) == (intrin.VNNI_U8S8, False)
    assert x86.select_intrin("vnni", False) == (intrin.VNNI_U8S8, True)


@needs_avx2
@pytest.mark.parametrize("nonneg", [True, False])
@pytest.mark.parametrize("case", CONV_CASES)
def test_conv_int8_avx2_exact(case, nonneg):
    rng = np.random.default_rng(hash((case, nonneg)) % 2**32)
    x, wt, b, rq, ref = conv_case(rng, case, nonneg)
    c, o, h, w, k, s, p, g, pc = case
    kern = x86.conv2d_int8(x.shape, wt, b, rq, (s, s), (p, p, p, p), (1, 1), g, isa="avx2", nonneg=nonneg)
    out, _ = build_and_run(kern, x, AVX2)
    np.testing.assert_array_equal(out, ref)


@needs_avx2
def test_u8_path_saturation_is_avoided_for_negative_inputs():
    """Full-range negative inputs through the s8s8 path are exact (pmaddubsw would saturate)."""
    rng = np.random.default_rng(7)
    x = np.full((1, 8, 6, 6), -127, np.int8)
    wt = np.full((8, 8, 3, 3), -127, np.int8)
    b = np.zeros(8, np.int32)
    rq = generic.Requant.from_arrays(1 << 30, 1 << 40, 41, -127, 127)
    kern = x86.conv2d_int8(x.shape, wt, b, rq, (1, 1), (1, 1, 1, 1), (1, 1), 1, isa="avx2", nonneg=False)
    out, _ = build_and_run(kern, x, AVX2)
    acc = qmath.conv2d_int(x, wt, (1, 1), (1, 1, 1, 1))
    np.testing.assert_array_equal(out, qmath.requantize(acc, 1 << 30, 41, -127, 127).astype(np.int8))
    del rng


@needs_avx2
@pytest.mark.parametrize("nonneg", [True, False])
@pytest.mark.parametrize("case", DENSE_CASES)
def test_dense_int8_avx2_exact(case, nonneg):
    m, k, n, pc = case
    rng = np.random.default_rng(hash((case, nonneg)) % 2**32)
    x = rng.integers(0 if nonneg else -127, 128, (m, k)).astype(np.int8)
    w = rng.integers(-127, 128, (k, n)).astype(np.int8)
    b = rng.integers(-3000, 3000, n).astype(np.int32)
    rq = rand_requant(rng, n, pc)
    out, _ = build_and_run(x86.dense_int8(x.shape, w, b, rq, "avx2", nonneg), x, AVX2)
    ref = qmath.requantize(x.astype(np.int64) @ w + b, rq.multiplier, rq.shift, rq.lo, rq.hi,
                           axis=1 if pc else None)
    np.testing.assert_array_equal(out, ref.astype(np.int8))


@pytest.mark.parametrize("nonneg", [True, False])
def test_vnni_kernels(nonneg):
    """Compile for cascadelake, check vpdpbusd in the asm; run and compare where the CPU has VNNI."""
    rng = np.random.default_rng(11 + nonneg)
    for case in (CONV_CASES[0], CONV_CASES[1], CONV_CASES[2]):
        x, wt, b, rq, ref = conv_case(rng, case, nonneg)
        c, o, h, w, k, s, p, g, pc = case
        kern = x86.conv2d_int8(x.shape, wt, b, rq, (s, s), (p, p, p, p), (1, 1), g, isa="vnni", nonneg=nonneg)
        out, lib = build_and_run(kern, x, VNNI, run=HAS_VNNI)
        assert "vpdpbusd" in lib.mod.inspect_source("asm")
        if HAS_VNNI:
            np.testing.assert_array_equal(out, ref)
    x = rng.integers(0 if nonneg else -127, 128, (2, 72)).astype(np.int8)
    w = rng.integers(-127, 128, (72, 40)).astype(np.int8)
    b = rng.integers(-3000, 3000, 40).astype(np.int32)
    rq = rand_requant(rng, 40, True)
    out, lib = build_and_run(x86.dense_int8(x.shape, w, b, rq, "vnni", nonneg), x, VNNI, run=HAS_VNNI)
    assert "vpdpbusd" in lib.mod.inspect_source("asm")
    if HAS_VNNI:
        ref = qmath.requantize(x.astype(np.int64) @ w + b, rq.multiplier, rq.shift, rq.lo, rq.hi, axis=1)
        np.testing.assert_array_equal(out, ref.astype(np.int8))
    else:
        pytest.skip("compiled and asm-checked only: this CPU has no avx512_vnni")


def test_avx2_asm_uses_the_intended_instructions():
    rng = np.random.default_rng(3)
    rq = rand_requant(rng, 16, False)
    wt = rng.integers(-127, 128, (16, 8, 3, 3)).astype(np.int8)
    b = np.zeros(16, np.int32)
    shape = (1, 8, 8, 8)
    _, lib_u8 = build_and_run(x86.conv2d_int8(shape, wt, b, rq, (1, 1), (1, 1, 1, 1), (1, 1), 1, "avx2", True),
                              None, AVX2, run=False)
    _, lib_s8 = build_and_run(x86.conv2d_int8(shape, wt, b, rq, (1, 1), (1, 1, 1, 1), (1, 1), 1, "avx2", False),
                              None, AVX2, run=False)
    asm_u8, asm_s8 = lib_u8.mod.inspect_source("asm"), lib_s8.mod.inspect_source("asm")
    assert "vpmaddubsw" in asm_u8 and "vpmaddwd" in asm_u8
    assert "vpmaddubsw" not in asm_s8 and "vpmaddwd" in asm_s8


def _conv_f32_ref(x, w, b, s, p, g, act):
    acc = np.zeros(1)
    x64, w64 = x.astype(np.float64), w.astype(np.float64)
    n, c, h, wd = x.shape
    o, cg, kh, kw = w.shape
    xp = np.pad(x64, ((0, 0), (0, 0), (p, p), (p, p)))
    oh, ow = (h + 2 * p - kh) // s + 1, (wd + 2 * p - kw) // s + 1
    acc = np.zeros((n, o, oh, ow))
    og = o // g
    for gi in range(g):
        for i in range(kh):
            for j in range(kw):
                patch = xp[:, gi * cg:(gi + 1) * cg, i:i + s * (oh - 1) + 1:s, j:j + s * (ow - 1) + 1:s]
                acc[:, gi * og:(gi + 1) * og] += np.einsum("nchw,oc->nohw", patch, w64[gi * og:(gi + 1) * og, :, i, j])
    y = acc + b.reshape(1, -1, 1, 1)
    return np.clip(y, act[0], act[1]) if act else y


@needs_avx2
@pytest.mark.parametrize("isa", ["avx2", "vnni"])
def test_fp32_kernels(isa):
    if isa == "vnni" and not {"avx512f", "avx512bw"} <= cpu_flags():
        pytest.skip("AVX-512 fp32 kernels need an AVX-512 CPU to run")
    target = AVX2 if isa == "avx2" else VNNI
    rng = np.random.default_rng(5)
    for (c, o, h, w, k, s, p, g, _), act in zip(CONV_CASES, [(0.0, 6.0), None, (0.0, np.inf)] * 2):
        x = rng.standard_normal((1, c, h, w)).astype(np.float32)
        wt = rng.standard_normal((o, c // g, k, k)).astype(np.float32)
        b = rng.standard_normal(o).astype(np.float32)
        out, _ = build_and_run(x86.conv2d_fp32(x.shape, wt, b, act, (s, s), (p, p, p, p), (1, 1), g, isa), x, target)
        np.testing.assert_allclose(out, _conv_f32_ref(x, wt, b, s, p, g, act), rtol=1e-4, atol=1e-4)
    for m in (3, 17):             # 17 rows: padded to whole row tiles
        x = rng.standard_normal((m, 70)).astype(np.float32)
        w = rng.standard_normal((70, 37)).astype(np.float32)
        b = rng.standard_normal(37).astype(np.float32)
        kern = x86.dense_fp32(x.shape, w, b, (0.0, np.inf), isa)
        assert kern.info["tile"][0] == min(m, 6)
        out, _ = build_and_run(kern, x, target)
        np.testing.assert_allclose(out, np.maximum(x.astype(np.float64) @ w + b, 0), rtol=1e-4, atol=1e-4)


def test_generic_kernels_exact():
    rng = np.random.default_rng(9)
    for case in (CONV_CASES[1], CONV_CASES[3], CONV_CASES[5]):
        x, wt, b, rq, ref = conv_case(rng, case, False)
        c, o, h, w, k, s, p, g, pc = case
        out, _ = build_and_run(generic.conv2d_int8(x.shape, wt, b, rq, (s, s), (p, p, p, p), (1, 1), g), x, GENERIC)
        np.testing.assert_array_equal(out, ref)
    x = rng.integers(-127, 128, (2, 30)).astype(np.int8)
    w = rng.integers(-127, 128, (30, 9)).astype(np.int8)
    b = rng.integers(-3000, 3000, 9).astype(np.int32)
    rq = rand_requant(rng, 9, True)
    out, _ = build_and_run(generic.dense_int8(x.shape, w, b, rq), x, GENERIC)
    ref = qmath.requantize(x.astype(np.int64) @ w + b, rq.multiplier, rq.shift, rq.lo, rq.hi, axis=1)
    np.testing.assert_array_equal(out, ref.astype(np.int8))


def test_pick_tile_w():
    assert x86.pick_tile_w(56) == 8
    assert x86.pick_tile_w(14) == 7
    assert x86.pick_tile_w(9) in x86.TILE_W_CANDIDATES


def test_dp4a_leaf_import_is_fast():
    import time
    t = time.time()
    names = intrin.dp4a_intrinsics()
    assert names["s8s8"] == "dp4a_s8s8s32"
    assert time.time() - t < 5.0   # the full tvm.s_tir.tensor_intrin package takes ~40 s


# (C, O, H, W, k, stride, pad, groups, per_channel, kernel): layers whose accumulators are small enough for
# a short multiplier (qmath.requant_multiplier_bits), so that the kernels requantize in int32
INT32_REQUANT_CASES = [
    (16, 24, 9, 9, 1, 1, 0, 1, True, "chan"),     # 1x1, channel tile
    (16, 24, 8, 16, 1, 1, 0, 1, False, "rows"),   # 1x1, row tile
    (2, 8, 10, 11, 3, 2, 1, 1, True, "chan"),     # strided 3x3, channel padding: 18 taps
    (8, 8, 12, 13, 3, 1, 1, 8, True, "dw"),       # depthwise, per-row epilogue
    (6, 6, 5, 5, 3, 1, 1, 6, False, "dw"),        # depthwise, small map
]


@needs_avx2
@pytest.mark.parametrize("nonneg", [True, False])
@pytest.mark.parametrize("case", INT32_REQUANT_CASES)
def test_int32_requant_exact(case, nonneg):
    """Short multipliers put the requantization on int32 (info["int32_requant"]), bit-exact with qmath's
    int64 arithmetic, also for inputs that drive the accumulator to its bound (all codes at full scale
    with one-signed weights) and with the bias folded into the addend."""
    c, o, h, w, k, s, p, g, pc, tiling = case
    rng = np.random.default_rng(2 * INT32_REQUANT_CASES.index(case) + nonneg)
    lo = 0 if nonneg else -127
    wt = rng.integers(-127, 128, (o, c // g, k, k)).astype(np.int8)
    wt[0] = np.abs(wt[0])                         # channel 0 reaches +bound, channel 1 -bound on full inputs
    wt[1] = -np.abs(wt[1])
    b = rng.integers(-3000, 3000, o).astype(np.int32)
    codes = generic.Codes.of("int8", lo=lo)
    bound = generic.kernel_acc_bound(wt, (1, 2, 3), codes, b)
    bits = qmath.requant_multiplier_bits(int(bound.max()), 8)
    assert bits < qmath.MULTIPLIER_BITS
    m, sh = qmath.quantize_multipliers(rng.uniform(2e-4, 2e-3, o if pc else 1), bits)
    rq = generic.Requant.from_arrays(m, np.left_shift(np.int64(1), sh - 1), sh, lo, 127)
    assert rq.int32_requant(bound).int32_exact
    old = x86.ROWS_KERNEL
    x86.ROWS_KERNEL = tiling == "rows"
    try:
        kern = x86.conv2d_int8((1, c, h, w), wt, b, rq, (s, s), (p, p, p, p), (1, 1), g, isa="avx2", codes=codes)
    finally:
        x86.ROWS_KERNEL = old
    assert kern.info["int32_requant"]
    assert (kern.info.get("tiling") == "rows") == (tiling == "rows")
    assert kern.info.get("tap_pairs", False) == (tiling == "dw")     # int16 sums of two taps (exact here)
    for x in (rng.integers(lo, 128, (1, c, h, w)).astype(np.int8), np.full((1, c, h, w), 127, np.int8)):
        out, _ = build_and_run(kern, x, AVX2)
        acc = qmath.conv2d_int(x, wt, (s, s), (p, p, p, p), (1, 1), g) + b.reshape(1, -1, 1, 1)
        ref = qmath.requantize(acc, rq.multiplier, rq.shift, rq.lo, rq.hi, axis=1 if pc else None)
        np.testing.assert_array_equal(out, ref.astype(np.int8))


@needs_avx2
@pytest.mark.parametrize("nonneg", [True, False])
def test_int32_requant_dense_exact(nonneg):
    rng = np.random.default_rng(11 + nonneg)
    lo = 0 if nonneg else -127
    x = rng.integers(lo, 128, (3, 20)).astype(np.int8)
    w = rng.integers(-127, 128, (20, 24)).astype(np.int8)
    b = rng.integers(-3000, 3000, 24).astype(np.int32)
    codes = generic.Codes.of("int8", lo=lo)
    bound = generic.kernel_acc_bound(w, (0,), codes, b)
    m, sh = qmath.quantize_multipliers(rng.uniform(2e-4, 2e-3, 24), qmath.requant_multiplier_bits(int(bound.max()), 8))
    rq = generic.Requant.from_arrays(m, np.left_shift(np.int64(1), sh - 1), sh, lo, 127)
    kern = x86.dense_int8(x.shape, w, b, rq, "avx2", codes=codes)
    assert kern.info["int32_requant"]
    out, _ = build_and_run(kern, x, AVX2)
    ref = qmath.requantize(x.astype(np.int64) @ w + b, rq.multiplier, rq.shift, rq.lo, rq.hi, axis=1)
    np.testing.assert_array_equal(out, ref.astype(np.int8))


def test_int32_requant_needs_the_proof():
    """A bound one unit too large for int32 keeps the int64 requantization."""
    rq = generic.Requant.from_arrays(2000, 1 << 20, 21, -127, 127)
    edge = ((1 << 31) - 1 - (1 << 20)) // 2000
    assert rq.int32_requant(edge).int32_exact
    assert not rq.int32_requant(edge + 1).int32_exact
    assert not generic.Requant.from_arrays(3, 1 << 31, 32, -127, 127).int32_requant(10).int32_exact


def test_depthwise_tap_pairs_only_where_int16_is_exact():
    """uint8 codes up to 255 with two weights of 127 could overflow an int16 pair sum: that layer keeps
    int32 products and is still exact; int8 codes take the pairs."""
    rng = np.random.default_rng(5)
    wt = np.full((8, 1, 3, 3), 127, np.int8)
    wt[:, :, 1, 1] = rng.integers(-127, 128, (8, 1))
    b = rng.integers(-3000, 3000, 8).astype(np.int32)
    rq = rand_requant(rng, 8, True, lo=0, hi=255)
    rq = generic.Requant.from_arrays(rq.multiplier, rq.addend, rq.shift, 0, 255, zp=3, out_dtype="uint8")
    for codes, pairs in ((generic.Codes.of("uint8", pad=128), False), (generic.Codes.of("int8", lo=-127), True)):
        kern = x86.depthwise_int8((1, 8, 9, 10), wt, b, rq, (1, 1), (1, 1, 1, 1), (1, 1), codes=codes)
        assert kern.info["tap_pairs"] == pairs
        x = rng.integers(codes.lo, codes.hi + 1, (1, 8, 9, 10)).astype(codes.dtype)
        out, _ = build_and_run(kern, x, AVX2)
        xp = np.pad(x.astype(np.int64) - codes.pad, ((0, 0), (0, 0), (1, 1), (1, 1))) + codes.pad
        acc = qmath.conv2d_int(xp, wt, (1, 1), (0, 0, 0, 0), (1, 1), 8) + b.reshape(1, -1, 1, 1)
        np.testing.assert_array_equal(out, rq.reference(acc))


def test_tiny_kernels_stay_on_one_thread():
    """A kernel with less work than generic.PARALLEL_MIN_MACS never launches the thread pool; a large one
    is parallel. Both compute the same codes."""
    rng = np.random.default_rng(3)
    rq = rand_requant(rng, 64, True)
    for m, k, parallel in ((1, 96, False), (64, 512, True)):
        w = rng.integers(-127, 128, (k, 64)).astype(np.int8)
        kern = x86.dense_int8((m, k), w, np.zeros(64, np.int32), rq, "avx2", True)
        assert (m * k * 64 >= generic.PARALLEL_MIN_MACS) == parallel
        assert ("T.parallel" in kern.func.script()) == parallel
        if HAS_AVX2:
            x = rng.integers(0, 128, (m, k)).astype(np.int8)
            out, _ = build_and_run(kern, x, AVX2)
            ref = qmath.requantize(x.astype(np.int64) @ w, rq.multiplier, rq.shift, rq.lo, rq.hi, axis=1)
            np.testing.assert_array_equal(out, ref.astype(np.int8))
