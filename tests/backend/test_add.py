"""Quantized residual add: the standalone kernel and the add fused into the x86 conv epilogue.

Both must be bit-exact with :func:`relayq.qmath.add` (the realized graph's semantics).
"""
import numpy as np
import pytest
from tvm import relax

import tvm
from relayq import qmath
from relayq.backend import generic as G
from relayq.backend import lower as L

from .kutil import AVX2, GENERIC, VNNI, conv_layer, cpu_flags, run_module

HAS_AVX2 = "avx2" in cpu_flags()
HAS_VNNI = "avx512_vnni" in cpu_flags()
TARGETS = [("avx2", AVX2, HAS_AVX2), ("vnni", VNNI, HAS_VNNI), ("generic", GENERIC, True)]


@pytest.fixture(autouse=True)
def every_elementwise_layer_a_kernel(monkeypatch):
    """These tests check relayq's elementwise kernels on small tensors: lower every integer lookup / product
    / add to its kernel, whatever its size (below lower.SMALL_ELEMENTWISE they are otherwise left to TVM's
    fusion; test_small_elementwise_chain_is_fused_and_exact covers that path)."""
    monkeypatch.setattr(L, "SMALL_ELEMENTWISE", 0)


def _spec(sa, sb, so, zps=(0, 0, 0), lo=-127, hi=127, dtypes=("int8", "int8"), out_dtype="int8"):
    terms = []
    for sc, zp in zip((sa, sb), zps[:2]):
        m, s = qmath.add_rescale_params(sc, so)
        terms.append(G.AddTerm(zp, m, 1 << (s - 1), s))
    ranges = [(int(np.iinfo(d).min), int(np.iinfo(d).max)) for d in dtypes]
    return G.AddRequant(terms, 1 << (qmath.ADD_EXTRA_BITS - 1), qmath.ADD_EXTRA_BITS, zps[2], lo, hi, out_dtype,
                        ranges)


# (scale a, scale b, scale out, zero points, clip, operand dtypes, out dtype)
CASES = [
    (0.05, 0.03, 0.06, (0, 0, 0), (-127, 127), ("int8", "int8"), "int8"),
    (0.05, 0.03, 0.06, (0, 0, 0), (0, 127), ("int8", "int8"), "int8"),
    (0.011, 0.2, 0.013, (0, 0, 0), (-127, 127), ("int8", "int8"), "int8"),
    (0.02, 0.5, 0.03, (128, 77, 100), (0, 255), ("uint8", "uint8"), "uint8"),
    (0.001, 0.3, 0.9, (3, 0, 0), (-127, 127), ("uint8", "int8"), "int8"),
    (1.0, 0.001, 0.001, (0, 0, 0), (-127, 127), ("int8", "int8"), "int8"),     # int64 path
]


def _all_pairs(dta, dtb):
    ia, ib = np.iinfo(dta), np.iinfo(dtb)
    a = np.repeat(np.arange(ia.min, ia.max + 1), 256).astype(dta).reshape(1, 256, 16, 16)
    b = np.tile(np.arange(ib.min, ib.max + 1), 256).astype(dtb).reshape(1, 256, 16, 16)
    return a, b


def test_add_spec_reference_matches_qmath():
    for sa, sb, so, zps, (lo, hi), dts, odt in CASES:
        spec = _spec(sa, sb, so, zps, lo, hi, dts, odt)
        a, b = _all_pairs(*dts)
        ref = qmath.add(a, b, sa, sb, so, lo, hi, zps[0], zps[1], zps[2])
        np.testing.assert_array_equal(spec.reference([a, b]), ref)
    assert _spec(0.05, 0.03, 0.06).int32_ok
    assert not _spec(1.0, 0.001, 0.001).int32_ok


@pytest.mark.parametrize("isa,target,can_run", TARGETS, ids=[t[0] for t in TARGETS])
def test_standalone_add_kernel_exhaustive(isa, target, can_run):
    if not can_run:
        pytest.skip(f"{isa} cannot run on this CPU")
    for sa, sb, so, zps, (lo, hi), dts, odt in CASES:
        spec = _spec(sa, sb, so, zps, lo, hi, dts, odt)
        a, b = _all_pairs(*dts)
        ref = qmath.add(a, b, sa, sb, so, lo, hi, zps[0], zps[1], zps[2]).astype(odt)
        for int32 in ((True, False) if spec.int32_ok else (False,)):
            k = G.add_int8(a.shape, list(dts), spec)
            if not int32:   # force the int64 form of the same chain
                from tvm import te
                ins = [te.placeholder(a.shape, d) for d in dts]
                out = te.compute(a.shape, lambda *i: G.add_requant_expr([t[i] for t in ins], spec, int32=False))
                k = G.Kernel(te.create_prim_func(ins + [out]), [], a.shape, odt)
            lib = tvm.compile(tvm.IRModule({"main": k.func}), target=target)
            o = tvm.runtime.tensor(np.zeros(a.shape, odt))
            lib["main"](tvm.runtime.tensor(a), tvm.runtime.tensor(b), o)
            np.testing.assert_array_equal(o.numpy(), ref, err_msg=f"{(sa, sb, so, zps)} int32={int32}")


def _term(bb, q, sc, so, zp=0):
    m, s = qmath.add_rescale_params(sc, so)
    t = bb.emit(relax.op.astype(q, "int64"))
    if zp:
        t = bb.emit(relax.op.subtract(t, relax.const(zp, "int64")))
    t = bb.emit(relax.op.multiply(t, relax.const(m, "int64")))
    t = bb.emit(relax.op.add(t, relax.const(1 << (s - 1), "int64")))
    return bb.emit(relax.op.right_shift(t, relax.const(s, "int64")))


def _block(rng, c, skip_conv, lo, hw=10):
    """x -> conv(relu) -> conv ; skip = x or conv1x1(x) ; add (realize's chain) -> clip -> int8."""
    l1, l2 = conv_layer(rng, c, c, relu=True), conv_layer(rng, c, c, per_channel=True)
    ls = conv_layer(rng, c, c, k=1, pad=0)
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, c, hw, hw), "int8"))
    with bb.function("main", [x]):
        with bb.dataflow():
            y2 = l2.emit(bb, l1.emit(bb, x))
            sk = ls.emit(bb, x) if skip_conv else x
            t = bb.emit(relax.op.add(_term(bb, sk, 0.05, 0.07), _term(bb, y2, 0.03, 0.07)))
            t = bb.emit(relax.op.add(t, relax.const(1 << 15, "int64")))
            t = bb.emit(relax.op.right_shift(t, relax.const(16, "int64")))
            t = bb.emit(relax.op.clip(t, lo, 127))
            out = bb.emit_output(bb.emit(relax.op.astype(t, "int8")))
        bb.emit_func_output(out)

    def reference(xv):
        s = ls.reference(xv) if skip_conv else xv
        return qmath.add(s, l2.reference(l1.reference(xv)), 0.05, 0.03, 0.07, lo, 127).astype(np.int8)

    return bb.get(), reference


PRESETS = [("x86-avx2", AVX2, HAS_AVX2), ("x86-vnni", VNNI, HAS_VNNI), ("generic", GENERIC, True)]


@pytest.mark.parametrize("kind,target,can_run", PRESETS, ids=[p[0] for p in PRESETS])
@pytest.mark.parametrize("mode", ["fuse", "standalone"])
@pytest.mark.parametrize("skip_conv", [False, True], ids=["identity", "conv_skip"])
@pytest.mark.parametrize("hw", [10, 16], ids=["channel_tile", "row_tile"])
def test_residual_add_lowering_is_bit_exact(kind, target, can_run, mode, skip_conv, hw, monkeypatch):
    """10 x 10 rows take the x86 channel-tiled conv, 16 x 16 the row-tiled one (``x86.rows_pays``)."""
    if not can_run:
        pytest.skip(f"{kind} kernels cannot run on this CPU")
    monkeypatch.setattr(L, "RESIDUAL_ADD", mode)
    rng = np.random.default_rng(5)
    mod, reference = _block(rng, 16, skip_conv, 0 if skip_conv else -127, hw)
    stats = []
    lowered = L.lower_quantized(mod, kind, stats=stats)
    kinds = [s["kind"] for s in stats]
    if mode == "fuse" and kind.startswith("x86"):
        assert kinds.count("conv2d+add") == 1 and "add" not in kinds
    else:
        assert kinds.count("add") == 1 and "conv2d+add" not in kinds
    # nothing of the int64 chain is left to TVM
    assert "int64" not in lowered["main"].script()
    if kind == "x86-avx2":
        rows = [s for s in stats if s.get("intrin") == "relayq_dot_8x4_s8u8s32_rows_avx2"]
        assert bool(rows) == (hw == 16), stats
    x = rng.integers(-127, 128, (1, 16, hw, hw)).astype(np.int8)
    out, _ = run_module(lowered, target, x)
    np.testing.assert_array_equal(out, reference(x))


def test_conv_output_with_another_user_is_not_fused(monkeypatch):
    """The add is still lowered (standalone) but the conv keeps its own output when it has 2 users."""
    monkeypatch.setattr(L, "RESIDUAL_ADD", "fuse")
    rng = np.random.default_rng(6)
    c = 8
    l1 = conv_layer(rng, c, c)
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, c, 6, 6), "int8"))
    with bb.function("main", [x]):
        with bb.dataflow():
            y = l1.emit(bb, x)
            t = bb.emit(relax.op.add(_term(bb, x, 0.05, 0.07), _term(bb, y, 0.03, 0.07)))
            t = bb.emit(relax.op.right_shift(bb.emit(relax.op.add(t, relax.const(1 << 15, "int64"))),
                                             relax.const(16, "int64")))
            a = bb.emit(relax.op.astype(bb.emit(relax.op.clip(t, -127, 127)), "int8"))
            out = bb.emit_output(relax.Tuple([a, y]))
        bb.emit_func_output(out)
    stats = []
    lowered = L.lower_quantized(bb.get(), "x86-avx2", stats=stats)
    assert sorted(s["kind"] for s in stats) == ["add", "conv2d"]
    if HAS_AVX2:
        xv = rng.integers(-127, 128, (1, c, 6, 6)).astype(np.int8)
        ex = tvm.compile(lowered, target=AVX2, relax_pipeline=relax.get_default_pipeline(AVX2))
        outs = relax.VirtualMachine(ex, tvm.cpu())["main"](tvm.runtime.tensor(xv))
        yv = l1.reference(xv)
        np.testing.assert_array_equal(outs[1].numpy(), yv)
        np.testing.assert_array_equal(outs[0].numpy(), qmath.add(xv, yv, 0.05, 0.03, 0.07, -127, 127))
