"""Table lookups and products of quantized tensors: the realized Relax chains are lowered to relayq's
kernels (:mod:`relayq.backend.elementwise`), bit-exact with the chains TVM's default pipeline runs."""
import numpy as np
import pytest
import tvm
from tvm import relax

from relayq import qmath
from relayq.backend import lower as L

from .kutil import AVX2, GENERIC, cpu_flags, run_module

R = relax.op
TARGETS = [("avx2", AVX2, "x86-avx2", "avx2" in cpu_flags()), ("generic", GENERIC, "generic", True)]
DEFAULT_SMALL_ELEMENTWISE = L.SMALL_ELEMENTWISE


@pytest.fixture(autouse=True)
def every_elementwise_layer_a_kernel(monkeypatch):
    """These tests check relayq's elementwise kernels on small tensors: lower every integer lookup / product
    / add to its kernel, whatever its size (below lower.SMALL_ELEMENTWISE they are otherwise left to TVM's
    fusion; test_small_elementwise_chain_is_fused_and_exact covers that path)."""
    monkeypatch.setattr(L, "SMALL_ELEMENTWISE", 0)


def _lut_module(shape, in_dtype, table, qmin):
    """realize's table lookup: take(table, astype(q, int32) - qmin)."""
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(shape, in_dtype))
    with bb.function("main", [x]):
        with bb.dataflow():
            i = bb.emit(R.astype(x, "int32"))
            if qmin:
                i = bb.emit(R.subtract(i, relax.const(np.int32(qmin))))
            out = bb.emit_output(bb.emit(R.take(relax.const(table), i, axis=0, mode="clip")))
        bb.emit_func_output(out)
    return bb.get()


def _mul_module(a_shape, b_shape, m, s, lo=-127, hi=127):
    """realize's product of two int8 tensors, requantized: astype int32 x2, multiply, * M + R >> S, clip, int8."""
    bb = relax.BlockBuilder()
    a = relax.Var("a", relax.TensorType(a_shape, "int8"))
    b = relax.Var("b", relax.TensorType(b_shape, "int8"))
    with bb.function("main", [a, b]):
        with bb.dataflow():
            p = bb.emit(R.multiply(bb.emit(R.astype(a, "int32")), bb.emit(R.astype(b, "int32"))))
            t = bb.emit(R.multiply(bb.emit(R.astype(p, "int64")), relax.const(np.int64(m), "int64")))
            t = bb.emit(R.add(t, relax.const(np.int64(1 << (s - 1)), "int64")))
            t = bb.emit(R.right_shift(t, relax.const(np.int64(s), "int64")))
            out = bb.emit_output(bb.emit(R.astype(bb.emit(R.clip(t, lo, hi)), "int8")))
        bb.emit_func_output(out)
    return bb.get()


@pytest.mark.parametrize("name,target,kind,ok", TARGETS)
@pytest.mark.parametrize("in_dtype,bits,signed", [("int8", 8, True), ("uint8", 8, False), ("int8", 4, True),
                                                  ("int16", 12, True)])
def test_lut_kernel_is_exact_over_every_code(name, target, kind, ok, in_dtype, bits, signed):
    if not ok:
        pytest.skip(f"no {name} on this CPU")
    lo, hi = qmath.qrange(bits, signed)
    out_dtype = qmath.storage_dtype(bits, signed)
    table = qmath.lut_table(np.tanh, bits, 3.0 / hi, bits, 1.0 / hi, 0, 0, signed, signed).astype(out_dtype)
    codes = np.arange(lo, hi + 1)
    shape = (1, 2, 1, codes.size)
    x = np.broadcast_to(codes, shape).astype(in_dtype)
    mod = _lut_module(shape, in_dtype, table, lo)
    stats = []
    lowered = L.lower_quantized(mod, kind, stats=stats)
    assert [s["kind"] for s in stats] == ["lut"]
    assert L.lowered_kernels(lowered) and "take" not in lowered["main"].script()
    got, _ = run_module(lowered, target, x)
    want, _ = run_module(mod, target, x)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(got, qmath.lut_lookup(x, table, bits, signed).astype(out_dtype))


@pytest.mark.parametrize("name,target,kind,ok", TARGETS)
@pytest.mark.parametrize("a_shape,b_shape", [((1, 16, 7, 9), (1, 16, 1, 1)), ((2, 8, 4, 4), (2, 8, 4, 4)),
                                             ((1, 1, 1, 5), (1, 6, 3, 5))])
def test_multiply_kernel_is_exact_with_broadcasting(name, target, kind, ok, a_shape, b_shape):
    if not ok:
        pytest.skip(f"no {name} on this CPU")
    rng = np.random.RandomState(0)
    a = rng.randint(-127, 128, a_shape).astype(np.int8)
    b = rng.randint(-127, 128, b_shape).astype(np.int8)
    m, s = qmath.quantize_multiplier(0.05 * (1 / 127) / 0.04)
    mod = _mul_module(a_shape, b_shape, m, s, lo=0)
    stats = []
    lowered = L.lower_quantized(mod, kind, stats=stats)
    assert [st["kind"] for st in stats] == ["multiply"]
    got, _ = run_module(lowered, target, a, b)
    want, _ = run_module(mod, target, a, b)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(got, qmath.multiply(a, b, 0.05, 1 / 127, 0.04, 0, 127))


def _requant_term(bb, q, m, s):
    """realize's rescale of one add operand: ((int64(q) * m) + 2^(s-1)) >> s."""
    t = bb.emit(R.multiply(bb.emit(R.astype(q, "int64")), relax.const(np.int64(m), "int64")))
    return bb.emit(R.right_shift(bb.emit(R.add(t, relax.const(np.int64(1 << (s - 1)), "int64"))),
                                 relax.const(np.int64(s), "int64")))


def _lstm_cell_module(hidden, tables, muls):
    """An LSTM cell as realize emits it, on int8 gates [1, 4 * hidden] and cell state [1, hidden]:
    four slices, a table lookup on each (sigmoid / tanh), c' = f * c + i * g (two products and an add),
    h' = o * tanh(c')."""
    bb = relax.BlockBuilder()
    gates = relax.Var("gates", relax.TensorType((1, 4 * hidden), "int8"))
    cell = relax.Var("cell", relax.TensorType((1, hidden), "int8"))

    def lut(q, table):
        i = bb.emit(R.subtract(bb.emit(R.astype(q, "int32")), relax.const(np.int32(-128))))
        return bb.emit(R.take(relax.const(table), i, axis=0, mode="clip"))

    def mul(a, b, m, s):
        p = bb.emit(R.multiply(bb.emit(R.astype(a, "int32")), bb.emit(R.astype(b, "int32"))))
        t = _requant_term(bb, p, m, s)
        return bb.emit(R.astype(bb.emit(R.clip(t, -127, 127)), "int8"))

    with bb.function("main", [gates, cell]):
        with bb.dataflow():
            i, f, g, o = (lut(bb.emit(R.strided_slice(gates, [1], [k * hidden], [(k + 1) * hidden])), tables[k])
                          for k in range(4))
            fc, ig = mul(f, cell, *muls[0]), mul(i, g, *muls[1])
            t = bb.emit(R.add(_requant_term(bb, fc, 1 << 30, 14), _requant_term(bb, ig, 1 << 29, 14)))
            t = bb.emit(R.right_shift(bb.emit(R.add(t, relax.const(np.int64(1 << 15), "int64"))),
                                      relax.const(np.int64(16), "int64")))
            c2 = bb.emit(R.astype(bb.emit(R.clip(t, -127, 127)), "int8"))
            h2 = mul(o, lut(c2, tables[1]), *muls[2])
            out = bb.emit_output(relax.Tuple([h2, c2]))
        bb.emit_func_output(out)
    return bb.get()


@pytest.mark.skipif("avx2" not in cpu_flags(), reason="no AVX2 on this CPU")
def test_small_elementwise_chain_is_fused_and_exact(monkeypatch):
    """Below SMALL_ELEMENTWISE outputs, an LSTM cell's lookups, products and add are not opaque kernels of
    their own: TVM fuses the whole cell into one function, and the result is the realized graph's."""
    from relayq.backend import presets

    monkeypatch.setattr(L, "SMALL_ELEMENTWISE", DEFAULT_SMALL_ELEMENTWISE)
    hidden, rng = 96, np.random.RandomState(1)
    codes = np.arange(-128, 128)
    tables = [np.clip(np.round(127 / (1 + np.exp(-codes / 32))), -127, 127).astype(np.int8),
              np.clip(np.round(127 * np.tanh(codes / 40)), -127, 127).astype(np.int8)] * 2
    mod = _lstm_cell_module(hidden, tables, [qmath.quantize_multiplier(0.9 / 127) for _ in range(3)])
    stats = []
    lowered = L.lower_quantized(mod, "x86-avx2", stats=stats)
    assert sorted(st["kind"] for st in stats) == ["lut"] * 5 and all(st["fusable"] for st in stats)
    assert not L.lowered_kernels(lowered) and "take" not in lowered["main"].script()
    with AVX2:
        built = presets.relax_pipeline(AVX2)(lowered)
    prim = [gv.name_hint for gv, f in built.functions_items() if isinstance(f, tvm.tirx.PrimFunc)]
    # (two: the new cell state is an output and the input of the last lookup; 9 kernels without fusion)
    assert len(prim) <= 2 and all(n.startswith("fused_") for n in prim), prim
    gates = rng.randint(-128, 128, (1, 4 * hidden)).astype(np.int8)
    cell = rng.randint(-127, 128, (1, hidden)).astype(np.int8)
    ex = tvm.compile(lowered, target=AVX2, relax_pipeline=presets.relax_pipeline(AVX2))
    got = relax.VirtualMachine(ex, tvm.cpu())["main"](tvm.runtime.tensor(gates), tvm.runtime.tensor(cell))
    ex0 = tvm.compile(mod, target=AVX2, relax_pipeline=relax.get_default_pipeline(AVX2))
    want = relax.VirtualMachine(ex0, tvm.cpu())["main"](tvm.runtime.tensor(gates), tvm.runtime.tensor(cell))
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g.numpy(), w.numpy())
    assert np.abs(got[0].numpy().astype(int)).max() > 10          # not a degenerate (all-zero) cell
    # the same cell on a big state is lowered to relayq's kernels
    big = L.lower_quantized(_lstm_cell_module(DEFAULT_SMALL_ELEMENTWISE, tables, [(1 << 30, 31)] * 3), "x86-avx2")
    assert len(L.lowered_kernels(big)) == 5 + 3 + 1


@pytest.mark.skipif("avx2" not in cpu_flags(), reason="no AVX2 on this CPU")
@pytest.mark.parametrize("case", [(16, 24, 14, 14, 3, 1, 1), (8, 16, 10, 12, 1, 1, 0), (3, 16, 17, 18, 3, 2, 1)],
                         ids=["3x3", "1x1", "stem"])
def test_lookup_after_a_conv_is_fused_into_its_epilogue(case):
    """A table lookup (hardswish, SiLU ...) right after an int8 conv is one kernel (FUSE_LUT_INTO_CONV): the
    conv's requantized codes look up the table in the epilogue; bit-exact with the realized graph, for the
    row- and channel-tiled kernels and the folded stem, large enough to stay a kernel (not left to fusion)."""
    from .kutil import conv_layer

    c, o, h, w, k, st, p = case
    rng = np.random.default_rng(c + o)
    table = rng.integers(-127, 128, 255).astype(np.int8)
    x = rng.integers(-127, 128, (1, c, h, w)).astype(np.int8)

    def lookup(bb, q):
        i = bb.emit(R.subtract(bb.emit(R.astype(q, "int32")), relax.const(np.int32(-127))))
        return bb.emit(R.take(relax.const(table), i, axis=0, mode="clip"))

    layer = conv_layer(rng, c, o, k=k, stride=st, pad=p)
    bb = relax.BlockBuilder()
    xv = relax.Var("x", relax.TensorType(x.shape, "int8"))
    with bb.function("main", [xv]):
        with bb.dataflow():
            # symmetric codes (never -128): the byte paths and the folded stem apply
            out = bb.emit_output(lookup(bb, layer.emit(bb, bb.emit(R.clip(xv, -127, 127)))))
        bb.emit_func_output(out)
    mod = bb.get()
    stats = []
    lowered = L.lower_quantized(mod, "x86-avx2", stats=stats)
    assert [s["kind"] for s in stats] == ["conv2d"] and stats[0]["lut"] == 256    # the table over all int8 codes
    assert (stats[0].get("tiling"), stats[0].get("fold")) == {"3x3": ("rows", None), "1x1": (None, None),
                                                              "stem": ("rows", 3)}[f"{k}x{k}" if c > 3 else "stem"]
    assert len(L.lowered_kernels(lowered)) == 1 and "take" not in lowered["main"].script()
    got, _ = run_module(lowered, AVX2, x)
    want, _ = run_module(mod, AVX2, x)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(got, table[np.clip(layer.reference(x).astype(int) + 127, 0, 254)])
    assert len(set(got.reshape(-1).tolist())) > 20                        # the table is really read
