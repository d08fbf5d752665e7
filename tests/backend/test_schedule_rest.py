"""Every TIR function a build runs is scheduled (relayq's kernels, or :mod:`relayq.backend.schedule_rest`
for the rest), and the schedules keep the unscheduled loops' results: integers bit for bit, floats to
1e-5 of the largest magnitude."""
import numpy as np
import pytest
import tvm
from tvm import relax

from relayq.backend import lower as L
from relayq.backend import presets
from relayq.backend import schedule_rest as S

from .kutil import cpu_flags

R = relax.op
AVX2 = presets.target_from_preset("x86-avx2")
HAS_AVX2 = "avx2" in cpu_flags()
#: fp32 agreement with TVM's unscheduled loops, relative to the output's largest magnitude: the schedules
#: only change where LLVM contracts a multiply and an add into an FMA (and a matmul's summation is
#: untouched), so a few ulps.
FLOAT_TOL = 1e-5


def _const(rng, shape, scale=0.2):
    return relax.const((rng.standard_normal(shape) * scale).astype("float32"))


def zoo_like_module(seed=0):
    """A small network with one of each op a zoo network leaves to TVM: conv (relayq's kernel), layer norm,
    attention (Q @ K^T with K transposed, softmax, @ V; 13 tokens so no tile divides), GELU (erf), and an
    int8 branch: a lookup table (relayq's kernel) and a requantization of a reduced int32 product that
    relayq has no kernel for."""
    rng = np.random.default_rng(seed)
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 3, 13, 8), "float32"))
    q = relax.Var("q", relax.TensorType((1, 4, 13, 24), "int8"))
    with bb.function("main", [x, q]):
        with bb.dataflow():
            c = bb.emit(R.nn.conv2d(x, _const(rng, (16, 3, 3, 3)), padding=(1, 1)))
            c = bb.emit(R.nn.relu(bb.emit(R.add(c, _const(rng, (1, 16, 1, 1))))))
            t = bb.emit(R.permute_dims(bb.emit(R.reshape(c, (1, 16, 104))), [0, 2, 1]))     # (1, 104, 16)
            t = bb.emit(R.reshape(t, (1, 13, 8, 16)))
            t = bb.emit(R.nn.layer_norm(t, _const(rng, (16,), 1.0), _const(rng, (16,)), axes=[-1]))
            k = bb.emit(R.permute_dims(t, [0, 1, 3, 2]))                                      # (1, 13, 16, 8)
            a = bb.emit(R.nn.softmax(bb.emit(R.matmul(t, k)), axis=-1))                       # (1, 13, 8, 8)
            v = bb.emit(R.matmul(a, t))                                                        # (1, 13, 8, 16)
            e = bb.emit(R.erf(bb.emit(R.multiply(v, relax.const(np.float32(1 / np.sqrt(2)))))))
            g = bb.emit(R.multiply(v, bb.emit(R.add(e, relax.const(np.float32(1.0))))))
            g = bb.emit(R.multiply(g, relax.const(np.float32(0.5))))
            y = bb.emit(R.mean(g, axis=[1]))
            # int8: table lookup, then a product with itself requantized (x * M + R) >> S, clip, cast
            table = relax.const(rng.integers(-128, 128, 256).astype("int8"))
            i = bb.emit(R.subtract(bb.emit(R.astype(q, "int32")), relax.const(np.int32(-128))))
            u = bb.emit(R.take(table, i, axis=0, mode="clip"))
            p = bb.emit(R.multiply(bb.emit(R.astype(u, "int32")), bb.emit(R.astype(q, "int32"))))
            p = bb.emit(R.sum(bb.emit(R.permute_dims(p, [0, 2, 1, 3])), axis=[3], keepdims=True))
            r = bb.emit(R.multiply(bb.emit(R.astype(p, "int64")), relax.const(np.int64(1 << 29), "int64")))
            r = bb.emit(R.right_shift(bb.emit(R.add(r, relax.const(np.int64(1 << 37), "int64"))),
                                      relax.const(np.int64(38), "int64")))
            z = bb.emit(R.astype(bb.emit(R.clip(r, -128, 127)), "int8"))
            out = bb.emit_output(relax.Tuple([y, z]))
        bb.emit_func_output(out)
    return bb.get()


def _inputs(seed=1):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((1, 3, 13, 8)).astype("float32"),
            rng.integers(-128, 128, (1, 4, 13, 24)).astype("int8")]


def _run(mod, pipeline, args):
    ex = tvm.compile(mod, target=AVX2, relax_pipeline=pipeline)
    out = relax.VirtualMachine(ex, tvm.cpu())["main"](*[tvm.runtime.tensor(a) for a in args])
    return [o.numpy() for o in out]


def _assert_close(got, want):
    scale = max(float(np.max(np.abs(want))), 1e-30)
    assert float(np.max(np.abs(got.astype(np.float64) - want))) <= FLOAT_TOL * scale


def test_no_function_of_a_zoo_like_module_is_left_unscheduled():
    lowered = L.lower_quantized(zoo_like_module(), "x86-avx2")
    fused = S.fused_and_scheduled(lowered, AVX2)
    funcs = {gv.name_hint: f for gv, f in fused.functions_items() if isinstance(f, tvm.tirx.PrimFunc)}
    assert any(n.startswith("relayq_") for n in funcs), "the conv should be relayq's kernel"
    # the ops this test is about were all legalized into functions of their own (or fused ones)
    names = " ".join(funcs)
    for op in ("layer_norm", "softmax", "matmul", "erf", "qlut", "sum", "mean", "right_shift"):
        assert op in names, f"no function for {op}: {sorted(funcs)}"
    for name, f in funcs.items():
        assert S.is_scheduled(f), f"{name} left on TVM's unscheduled loops"
        summary = S.loop_summary(f)
        assert summary["parallel"] or summary["vectorized"] or summary["iterations"] < S.PARALLEL_MIN_ELEMENTS, \
            f"{name}: neither parallel nor vectorized ({summary})"
    big = [n for n, f in funcs.items() if not n.startswith("relayq_") and S.loop_summary(f)["vectorized"]]
    assert any("matmul" in n for n in big) and any("softmax" in n for n in big), big


@pytest.mark.skipif(not HAS_AVX2, reason="no AVX2 on this CPU")
def test_scheduled_module_equals_the_unscheduled_one():
    mod = L.lower_quantized(zoo_like_module(), "x86-avx2")
    args = _inputs()
    got = _run(mod, presets.relax_pipeline(AVX2), args)
    want = _run(mod, relax.get_default_pipeline(AVX2), args)
    _assert_close(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])      # the integer branch: bit for bit
    assert np.abs(want[1]).max() > 0, "degenerate integer output: the test would not see a wrong schedule"


def _matmul_module(a_shape, b_shape, dtype, transpose_b):
    bb = relax.BlockBuilder()
    a = relax.Var("a", relax.TensorType(a_shape, dtype))
    b = relax.Var("b", relax.TensorType(b_shape, dtype))
    with bb.function("main", [a, b]):
        with bb.dataflow():
            rhs = bb.emit(R.permute_dims(b, [0, 1, 3, 2])) if transpose_b else b
            out_dtype = "int32" if dtype == "int8" else None
            out = bb.emit_output(bb.emit(R.matmul(a, rhs, out_dtype=out_dtype)))
        bb.emit_func_output(out)
    return bb.get()


@pytest.mark.skipif(not HAS_AVX2, reason="no AVX2 on this CPU")
@pytest.mark.parametrize("dtype", ["float32", "int8"])
@pytest.mark.parametrize("m,n,k,transpose_b", [(37, 29, 20, False), (37, 29, 20, True), (8, 64, 48, False),
                                               (1, 40, 64, True)])
def test_batch_matmul_schedule_against_numpy(dtype, m, n, k, transpose_b):
    rng = np.random.default_rng(m * n + k)
    a_shape, b_shape = (2, 3, m, k), ((2, 3, n, k) if transpose_b else (2, 3, k, n))
    if dtype == "int8":
        a, b = (rng.integers(-128, 128, s).astype("int8") for s in (a_shape, b_shape))
    else:
        a, b = (rng.standard_normal(s).astype("float32") for s in (a_shape, b_shape))
    mod = _matmul_module(a_shape, b_shape, dtype, transpose_b)
    fused = S.fused_and_scheduled(mod, AVX2)
    mm = [f for gv, f in fused.functions_items() if "matmul" in gv.name_hint]
    assert mm and S.loop_summary(mm[0])["vectorized"], "the matmul did not get the tiled schedule"
    got = _run_single(mod, [a, b])
    bt = np.swapaxes(b, -1, -2) if transpose_b else b
    if dtype == "int8":
        np.testing.assert_array_equal(got, np.matmul(a.astype(np.int64), bt.astype(np.int64)))
    else:
        _assert_close(got, np.matmul(a.astype(np.float64), bt.astype(np.float64)))


def _run_single(mod, args):
    ex = tvm.compile(mod, target=AVX2, relax_pipeline=presets.relax_pipeline(AVX2))
    return relax.VirtualMachine(ex, tvm.cpu())["main"](*[tvm.runtime.tensor(a) for a in args]).numpy()


def test_pass_keeps_relayq_kernels_and_its_input():
    lowered = L.lower_quantized(zoo_like_module(), "x86-avx2")
    from tvm.relax.backend.cpu_generic import pipeline as cpu

    with AVX2:
        fused = tvm.transform.Sequential(cpu.legalize_passes(AVX2))(lowered)
    before = {gv.name_hint: f for gv, f in fused.functions_items()}
    after = S.schedule_rest(AVX2)(fused)
    for gv, f in fused.functions_items():               # the input module is unchanged
        assert f.same_as(before[gv.name_hint])
    for gv, f in after.functions_items():
        if gv.name_hint.startswith("relayq_"):
            assert f.same_as(before[gv.name_hint]), f"{gv.name_hint}: relayq's own schedule was replaced"


def test_calibration_compiles_through_the_scheduled_pipeline(monkeypatch):
    import importlib

    calibrate = importlib.import_module("relayq.transform.calibrate")
    seen = []
    real = presets.relax_pipeline

    def spy(target):
        seen.append(target)
        return real(target)

    monkeypatch.setattr(presets, "relax_pipeline", spy)
    tmod = relax.transform.BindParams("main", {})(_matmul_module((1, 1, 4, 8), (1, 1, 8, 4), "float32", False))
    fn = calibrate._compile_taps(tmod)
    a, b = np.ones((1, 1, 4, 8), "float32"), np.ones((1, 1, 8, 4), "float32")
    np.testing.assert_array_equal(fn(a, b)[0], np.full((1, 1, 4, 4), 8.0, "float32"))
    assert seen, "the tap model was not compiled through presets.relax_pipeline"


def _pool_module(shape, dtype, pool, strides, padding):
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(shape, dtype))
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit_output(R.nn.max_pool2d(x, pool, strides, padding=padding))
        bb.emit_func_output(y)
    return bb.get()


def _numpy_max_pool(x, pool, strides, padding):
    lo = np.iinfo(x.dtype).min if x.dtype.kind in "iu" else -np.inf
    t, l, b, r = padding
    xp = np.pad(x, [(0, 0), (0, 0), (t, b), (l, r)], constant_values=lo)
    oh = (xp.shape[2] - pool[0]) // strides[0] + 1
    ow = (xp.shape[3] - pool[1]) // strides[1] + 1
    out = np.full(x.shape[:2] + (oh, ow), lo, x.dtype)
    for i in range(pool[0]):
        for j in range(pool[1]):
            out = np.maximum(out, xp[:, :, i:i + strides[0] * oh:strides[0], j:j + strides[1] * ow:strides[1]])
    return out


@pytest.mark.skipif(not HAS_AVX2, reason="no AVX2 on this CPU")
@pytest.mark.parametrize("dtype", ["int8", "uint8", "float32"])
@pytest.mark.parametrize("shape,pool,strides,padding", [
    ((1, 8, 24, 24), (3, 3), (2, 2), (1, 1, 1, 1)),        # ResNet's stem pool
    ((2, 4, 17, 20), (2, 3), (1, 1), (0, 1, 1, 2)),        # uneven padding, batch 2
    ((1, 3, 9, 16), (2, 2), (2, 2), (0, 0, 0, 0)),
])
def test_max_pool_window_schedule_against_numpy(dtype, shape, pool, strides, padding):
    """Integer pools take the window-reduction schedule (vectorized across outputs) and an explicit pad
    holding the dtype's minimum; both exact (the minimum is the identity of max, and the all-minimum
    corner windows of uint8 / int8 must still give the minimum). Float pools keep the plain schedule."""
    rng = np.random.default_rng(3)
    if dtype == "float32":
        x = rng.standard_normal(shape).astype(dtype)
    else:
        info = np.iinfo(dtype)
        x = rng.integers(info.min, info.max + 1, shape).astype(dtype)
        x[..., :2, :2] = info.min                   # a corner window of nothing but the minimum
    mod = _pool_module(shape, dtype, pool, strides, padding)
    np.testing.assert_array_equal(_run_single(mod, [x]), _numpy_max_pool(x, pool, strides, padding))
    fused = S.fused_and_scheduled(mod, AVX2)
    pools = [f for gv, f in fused.functions_items()
             if isinstance(f, tvm.tirx.PrimFunc) and "max_pool" in gv.name_hint]
    assert pools and all(S.is_scheduled(f) for f in pools)
    if dtype != "float32":
        assert all(S.loop_summary(f)["vectorized"] for f in pools), "the integer pool is not vectorized"
    pads = [f for gv, f in fused.functions_items() if isinstance(f, tvm.tirx.PrimFunc) and "pad" in gv.name_hint]
    assert bool(pads) == (any(padding) and dtype != "float32")
    # the pad is a vector fill and a vector copy, not one guarded (scalarized) loop
    assert all(S.loop_summary(f)["vectorized"] >= 2 for f in pads), "the pad is not vectorized"
