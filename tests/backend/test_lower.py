"""lower_quantized / lower_float on hand-built realized Relax modules: exactness and structure."""
import numpy as np
import pytest
import tvm
from tvm import relax

from relayq.backend import lower as L

from .kutil import AVX2, GENERIC, VNNI, build_chain, call_tir_outputs, conv_layer, cpu_flags, dense_layer, run_module

HAS_AVX2 = "avx2" in cpu_flags()
HAS_VNNI = "avx512_vnni" in cpu_flags()


def _net(rng, relu_last=False):
    """conv3x3(C=3, signed input) -> dw3x3 s2 -> 1x1 -> maxpool -> reshape -> dense -> dense."""
    layers = [
        conv_layer(rng, 3, 16, 3, 1, 1, relu=True, per_channel=True),
        conv_layer(rng, 16, 16, 3, 2, 1, groups=16, relu=True),
        conv_layer(rng, 16, 24, 1, 1, 0, per_channel=True, relu=True),
        dense_layer(rng, 24 * 4, 20, per_channel=False, relu=False),
        dense_layer(rng, 20, 10, per_channel=True, relu=relu_last),
    ]

    def pool_flat(bb, y):
        y = bb.emit(relax.op.nn.max_pool2d(y, (2, 2), (2, 2)))
        return bb.emit(relax.op.reshape(y, (1, 24 * 4)))

    mod = build_chain((1, 3, 9, 9), layers, {2: pool_flat})

    def reference(x):
        y = x
        for i, layer in enumerate(layers):
            y = layer.reference(y)
            if i == 2:
                y = y[:, :, :4, :4].reshape(1, 24, 2, 2, 2, 2).max(axis=(3, 5)).reshape(1, -1)
        return y

    return mod, reference


PRESETS = [("x86-avx2", AVX2, HAS_AVX2), ("x86-vnni", VNNI, HAS_VNNI), ("generic", GENERIC, True)]


@pytest.mark.parametrize("kind,target,can_run", PRESETS, ids=[p[0] for p in PRESETS])
def test_lowered_network_is_bit_exact(kind, target, can_run):
    if not can_run:
        pytest.skip(f"{kind} kernels cannot run on this CPU")
    rng = np.random.default_rng(21)
    mod, reference = _net(rng)
    stats = []
    lowered = L.lower_quantized(mod, kind, stats=stats)
    assert len(stats) == 5
    x = rng.integers(-127, 128, (1, 3, 9, 9)).astype(np.int8)
    out, _ = run_module(lowered, target, x)
    np.testing.assert_array_equal(out, reference(x))
    # the unlowered realized graph agrees too (the reference is the graph's semantics)
    out0, _ = run_module(mod, GENERIC, x)
    np.testing.assert_array_equal(out0, out)


def test_structure_no_int32_between_ops():
    rng = np.random.default_rng(22)
    mod, _ = _net(rng)
    stats = []
    lowered = L.lower_quantized(mod, "x86-avx2", stats=stats)
    calls = call_tir_outputs(lowered)
    assert len(calls) == 5 and all(dt == "int8" for _, dt in calls)
    dtypes, ops = [], []

    def visit(e):
        if isinstance(e, relax.Call):
            dtypes.append(str(e.ty.dtype) if hasattr(e.ty, "dtype") else "")
            if isinstance(e.op, tvm.ir.Op):
                ops.append(e.op.name)
    relax.analysis.post_order_visit(lowered["main"], visit)
    assert "int32" not in dtypes and "int64" not in dtypes
    assert "relax.nn.conv2d" not in ops and "relax.matmul" not in ops
    assert "relax.nn.max_pool2d" in ops          # unmatched ops stay
    for gv, f in lowered.functions_items():
        if isinstance(f, tvm.tirx.PrimFunc):
            assert bool(f.attrs["tirx.is_scheduled"])
            assert str(f.attrs["global_symbol"]) == gv.name_hint
    # non-negativity: the first conv sees the signed graph input, the 1x1 conv a ReLU-clipped value,
    # the first dense a max-pooled ReLU value, the last dense a value clipped at -127
    by_symbol = {s["symbol"]: s for s in stats}
    order = [by_symbol[name] for name, _ in calls]
    assert [s["nonneg"] for s in order] == [False, True, True, True, False]
    assert order[0]["intrin"].endswith("s8s8s32_avx2") and order[2]["intrin"].endswith("u8s8s32_avx2")
    # the last dense: codes proven in [-127, 127] take the exact vpsignb path (x86.select_path)
    assert order[3]["intrin"].endswith("u8s8s32_avx2") and order[4]["path"] == "s8sign"


def test_partial_chain_is_left_alone():
    """A conv whose int32 accumulator has a second user is not fused (the graph stays correct)."""
    rng = np.random.default_rng(23)
    layer = conv_layer(rng, 4, 8, 3, 1, 1)
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 4, 6, 6), "int8"))
    with bb.function("main", [x]):
        with bb.dataflow():
            acc = bb.emit(relax.op.nn.conv2d(x, relax.const(layer.weight), padding=(1, 1, 1, 1), out_dtype="int32"))
            extra = bb.emit(relax.op.sum(acc))
            out = bb.emit_output(relax.Tuple([acc, extra]))
        bb.emit_func_output(out)
    mod = bb.get()
    lowered = L.lower_quantized(mod, "x86-avx2")
    assert call_tir_outputs(lowered) == []


def _float_net(rng):
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 3, 8, 8), "float32"))
    w1 = rng.standard_normal((8, 3, 3, 3)).astype(np.float32)
    b1 = rng.standard_normal((1, 8, 1, 1)).astype(np.float32)
    w2 = rng.standard_normal((8, 1, 3, 3)).astype(np.float32)
    w3 = rng.standard_normal((10, 8 * 16)).astype(np.float32)
    b3 = rng.standard_normal((10,)).astype(np.float32)
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit(relax.op.nn.conv2d(x, relax.const(w1), padding=(1, 1, 1, 1)))
            y = bb.emit(relax.op.add(y, relax.const(b1)))
            y = bb.emit(relax.op.nn.relu(y))
            y = bb.emit(relax.op.nn.conv2d(y, relax.const(w2), strides=(2, 2), padding=(1, 1, 1, 1), groups=8))
            y = bb.emit(relax.op.clip(y, 0.0, 6.0))
            y = bb.emit(relax.op.reshape(y, (1, 128)))
            y = bb.emit(relax.op.matmul(y, relax.op.permute_dims(relax.const(w3))))
            y = bb.emit(relax.op.add(y, relax.const(b3)))
            out = bb.emit_output(y)
        bb.emit_func_output(out)
    return bb.get()


@pytest.mark.parametrize("kind,target,can_run", PRESETS, ids=[p[0] for p in PRESETS])
def test_lower_float_matches_tvm(kind, target, can_run):
    if not can_run:
        pytest.skip(f"{kind} kernels cannot run on this CPU")
    rng = np.random.default_rng(24)
    mod = _float_net(rng)
    stats = []
    lowered = L.lower_float(mod, kind, stats=stats)
    assert sorted(s["kind"] for s in stats) == ["conv2d", "conv2d", "dense"]
    x = rng.standard_normal((1, 3, 8, 8)).astype(np.float32)
    out, _ = run_module(lowered, target, x)
    ref, _ = run_module(mod, GENERIC, x)
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4)


def test_presets():
    assert str(L.target_from_preset("x86-avx2").attrs["mcpu"]) == "core-avx2"
    assert str(L.target_from_preset("x86-vnni").attrs["mcpu"]) == "cascadelake"
    assert L.target_from_preset("cuda-dp4a").kind.name == "cuda"
    assert L.best_host_preset() in L.TARGET_KINDS
    with pytest.raises(ValueError):
        L.lower_quantized(tvm.IRModule(), "x86-sse")


def test_code_ranges_are_sound():
    """The proven ranges the u8 x s8 path relies on: clips narrow, casts that could wrap and sums that could
    leave int32 widen to the whole dtype, realize's rounding average keeps its input's range."""
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 4, 6, 6), "int8"))
    with bb.function("main", [x]):
        with bb.dataflow():
            c = bb.emit(relax.op.clip(x, 0, 100))
            wide = bb.emit(relax.op.astype(x, "int32"))
            wrap = bb.emit(relax.op.astype(bb.emit(relax.op.add(wide, relax.const(np.int32(200)))), "uint8"))
            total = bb.emit(relax.op.sum(relax.op.astype(c, "int32"), axis=[2, 3], keepdims=True))
            cnt, half = relax.const(np.int32(36)), relax.const(np.int32(18))
            pos = bb.emit(relax.op.floor_divide(relax.op.add(total, half), cnt))
            neg = bb.emit(relax.op.negative(relax.op.floor_divide(relax.op.add(relax.op.negative(total), half), cnt)))
            avg = bb.emit(relax.op.astype(bb.emit(relax.op.where(relax.op.greater_equal(total, relax.const(np.int32(0))),
                                                                  pos, neg)), "int8"))
            big = bb.emit(relax.op.add(wide, relax.const(np.int32(2 ** 31 - 100))))
            out = bb.emit_output(relax.Tuple([c, wrap, avg, big]))
        bb.emit_func_output(out)
    g = L._Graph(bb.get()["main"])
    assert g.code_range(c) == (0, 100)
    assert g.code_range(wrap) == (0, 255)           # -128 + 200 .. 127 + 200 does not fit uint8
    assert g.code_range(avg) == (0, 100)
    assert g.code_range(big) == (-2 ** 31, 2 ** 31 - 1)


def test_padded_average_pool_keeps_its_input_range():
    """Realize's average pool with padding and count_include_pad=False (a unit-weight depthwise conv, + half,
    floor_divide by per-position counts, the negative branch, where): position by position the rounded
    average stays within the input's codes, [0, 127] -> [0, 127] (one interval for all positions gave
    [0, 286]: the interior's largest sum over a corner's count). Checked against the op run on extreme inputs."""
    c, h, k, st, p = 3, 5, 3, 2, 1
    ones = np.ones((c, 1, k, k), np.int32)
    valid = np.pad(np.ones((h, h), np.int64), p)
    oh = (h + 2 * p - k) // st + 1
    count = np.array([[valid[i * st:i * st + k, j * st:j * st + k].sum() for j in range(oh)] for i in range(oh)])
    cnt = relax.const(np.broadcast_to(count, (1, c, oh, oh)).astype(np.int32))
    half = relax.const(np.broadcast_to(count // 2, (1, c, oh, oh)).astype(np.int32))
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, c, h, h), "uint8"))
    with bb.function("main", [x]):
        with bb.dataflow():
            q = bb.emit(relax.op.clip(x, 0, 127))
            total = bb.emit(relax.op.nn.conv2d(q, relax.const(ones), strides=(st, st), padding=(p, p, p, p),
                                               groups=c, out_dtype="int32"))
            pos = bb.emit(relax.op.floor_divide(bb.emit(relax.op.add(total, half)), cnt))
            neg = bb.emit(relax.op.negative(bb.emit(relax.op.floor_divide(
                bb.emit(relax.op.add(bb.emit(relax.op.negative(total)), half)), cnt))))
            test = bb.emit(relax.op.greater_equal(total, relax.const(np.int32(0))))
            avg = bb.emit(relax.op.where(test, pos, neg))
            out = bb.emit_output(bb.emit(relax.op.astype(avg, "uint8")))
        bb.emit_func_output(out)
    mod = bb.get()
    g = L._Graph(mod["main"])
    assert g.code_range(avg) == (0, 127) and g.code_range(out) == (0, 127)
    got = np.concatenate([run_module(mod, GENERIC, np.full((1, c, h, h), v, np.uint8))[0].reshape(-1)
                          for v in (0, 127, 255)])
    assert got.min() >= 0 and got.max() <= 127


def test_shift_only_requant_is_rewritten_exactly():
    """Power-of-two requantization (M = 1) runs as M = 2^30 on the 32-bit split path, with the same results."""
    from relayq.backend.generic import Requant

    rng = np.random.default_rng(5)
    t = np.concatenate([rng.integers(-2 ** 31, 2 ** 31, 20000), [-2 ** 31, 2 ** 31 - 1, 0, -1, 1]]).astype(np.int64)
    for shift in (2, 7, 20, 33):
        m, r, s = (np.asarray([v], np.int64) for v in (1, 1 << (shift - 1), shift))
        m2, r2, s2 = L._split_friendly(m, r, s)
        assert Requant.from_arrays(m2, r2, s2, -127, 127).split_shift
        np.testing.assert_array_equal((t * m2 + r2) >> s2, (t + r) >> s)
    m, r, s = (np.asarray([v], np.int64) for v in (1, 0, 0))
    assert L._split_friendly(m, r, s) == (m, r, s)          # no shift: nothing to gain, left as it is


@pytest.mark.skipif(not HAS_AVX2, reason="this CPU has no AVX2")
def test_nd_dense_is_one_2d_kernel():
    """A dense layer over [batch, tokens, features] (a transformer's, when no prepare flattened it) is one
    relayq kernel over batch * tokens rows (17: padded to whole row tiles), int8 bit-exact, fp32 close."""
    rng = np.random.default_rng(31)
    layer = dense_layer(rng, 24, 20)
    mod = build_chain((1, 17, 24), [layer])
    stats = []
    lowered = L.lower_quantized(mod, "x86-avx2", stats=stats)
    assert [s["kind"] for s in stats] == ["dense"] and stats[0]["tile"][0] == 6
    assert [d for _, d in call_tir_outputs(lowered)] == ["int8"]
    x = rng.integers(-127, 128, (1, 17, 24)).astype(np.int8)
    out, _ = run_module(lowered, AVX2, x)
    np.testing.assert_array_equal(out, layer.reference(x))

    bb = relax.BlockBuilder()
    xf = relax.Var("x", relax.TensorType((2, 9, 24), "float32"))
    w, b = rng.standard_normal((24, 20)).astype(np.float32), rng.standard_normal(20).astype(np.float32)
    with bb.function("main", [xf]):
        with bb.dataflow():
            y = bb.emit(relax.op.matmul(xf, relax.const(w)))
            y = bb.emit(relax.op.nn.relu(bb.emit(relax.op.add(y, relax.const(b)))))
            out = bb.emit_output(y)
        bb.emit_func_output(out)
    fmod, stats = bb.get(), []
    lowered = L.lower_float(fmod, "x86-avx2", stats=stats)
    assert [s["kind"] for s in stats] == ["dense"]
    xv = rng.standard_normal((2, 9, 24)).astype(np.float32)
    got, _ = run_module(lowered, AVX2, xv)
    np.testing.assert_allclose(got, np.maximum(xv.astype(np.float64) @ w + b, 0), rtol=1e-4, atol=1e-4)
