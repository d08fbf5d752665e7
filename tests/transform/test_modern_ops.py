"""Ops of modern networks kept integer: resize (nearest, bilinear), matmul of two activations (attention),
constants joining a merge (class token, position embedding), the LSTM's gate arithmetic (split, stack,
sigmoid / tanh tables, products), mean over any axes.

Each is checked bit for bit: the realized module (compiled and run) == the simulated module == the numpy
reference (:mod:`relayq.analysis.reference`, built on :mod:`relayq.qmath`), plus structural checks that the
realized graph holds no float version of the op.
"""
import dataclasses
import io
import warnings

import numpy as np
import pytest
from tvm import relax

import relayq
from relayq import qmath
from relayq.analysis.reference import reference_run
from relayq.runtime import compile_host
from relayq.transform import annotate, calibrate, prepare
from relayq.transform.annotate import float_ops, layers
from relayq.transform.common import bindings, dtype_of, op_name
from relayq.transform.realize import realize, simulate

from helpers import assert_three_ways

R = relax.op
CFG = relayq.QConfig(show_progress=False)


def _module(inputs, body):
    """``main(*inputs)``: each input goes through ``concat([x])`` (a quantized layer whose codes the test
    controls), then ``body(bb, *quantized)`` returns the output expressions."""
    bb = relax.BlockBuilder()
    xs = [relax.Var(f"x{i}", relax.TensorType(s, "float32")) for i, s in enumerate(inputs)]
    with bb.function("main", xs):
        with bb.dataflow():
            qs = [bb.emit(R.concat([x], axis=1)) for x in xs]
            outs = [bb.emit(e) for e in body(bb, *qs)]
            out = bb.emit_output(relax.Tuple(outs))
        bb.emit_func_output(out)
    return bb.get()


def _pin_inputs(qp, n):
    """Each input concat keeps its input point's codes: the op under test sees exactly the codes we feed."""
    for i in range(n):
        qp[f"concat_{i}:out"] = dataclasses.replace(qp[f"concat_{i}:in0"], name=f"concat_{i}:out")
    return qp


def _on_codes(x, p):
    """``x`` snapped to the codes of point ``p`` (so the float model sees exactly the quantized input)."""
    codes = qmath.quantize(x, np.float32(p.scale), p.bits, p.signed, p.zero_point)
    return ((codes - p.zero_point) * np.float32(p.scale)).astype("float32")


def _three_ways(mod, shapes, config=CFG, seed=0):
    """Quantize ``mod``; return (inputs on codes, realized, simulated and reference outputs, qpoints,
    annotated, realized module)."""
    annotated = annotate(prepare(mod, {}), config)
    rng = np.random.RandomState(seed)
    data = [[rng.uniform(-3, 3, s).astype("float32") for s in shapes] for _ in range(3)]
    _, qp = calibrate(annotated, data, "naive", config)
    qp = _pin_inputs(qp, len(shapes))
    xs = [_on_codes(rng.uniform(-3, 3, s).astype("float32"), qp[f"concat_{i}:in0"]) for i, s in enumerate(shapes)]
    realized = realize(annotated, qp)
    y_real = compile_host(realized)(*xs)
    y_sim = compile_host(simulate(annotated, qp))(*xs)
    y_ref = reference_run(annotated, qp, *xs)
    y_ref = y_ref if isinstance(y_ref, list) else [y_ref]
    for a, b, c in zip(y_real, y_sim, y_ref):
        np.testing.assert_array_equal(a, c)
        np.testing.assert_array_equal(b, a)
    return xs, y_real, qp, annotated, realized


def _float_run(mod, xs):
    return compile_host(mod)(*xs)


def _ops(mod):
    return [op_name(b.value) for b in bindings(mod["main"])]


# ----------------------------------------------------------------------------- resize
def _resize(bb, x, size, method, mode, rounding="floor"):
    return R.image.resize2d(x, size, layout="NCHW", method=method, coordinate_transformation_mode=mode,
                            rounding_method=rounding)


#: (output size, coordinate transformation, rounding): what ONNX / torch exports write, up and down.
NEAREST = [((8, 12), "asymmetric", "floor"),                 # torch nearest 2x (integer division in TVM)
           ((7, 9), "asymmetric", "floor"),
           ((9, 5), "half_pixel", "round_prefer_floor"),     # ONNX Resize's default nearest mode
           ((7, 11), "align_corners", ""),
           ((3, 4), "pytorch_half_pixel", "round_prefer_ceil"),
           ((10, 13), "tf_half_pixel_for_nn", "floor")]
LINEAR = [((8, 12), "half_pixel"), ((7, 9), "align_corners"), ((3, 17), "asymmetric")]


def test_resize_nearest_copies_codes_exactly_as_tvm_picks_them():
    shape = (1, 3, 4, 6)
    mod = _module([shape], lambda bb, x: [_resize(bb, x, s, "nearest_neighbor", m, r) for s, m, r in NEAREST])
    xs, y_real, qp, annotated, realized = _three_ways(mod, [shape])
    assert sorted(layers(annotated).values()) == ["concat"] + ["resize"] * len(NEAREST)
    # A copy of codes: equal to TVM's float resize of the same (dequantized) input, element for element.
    for got, want in zip(y_real, _float_run(mod, xs)):
        np.testing.assert_array_equal(got, want)
    ops = _ops(realized)
    assert "relax.image.resize2d" not in ops and ops.count("relax.take") == 2 * len(NEAREST)


@pytest.mark.parametrize("bits,symmetric", [(8, True), pytest.param(8, False, marks=pytest.mark.slow),
                                            pytest.param(16, True, marks=pytest.mark.slow)])
def test_resize_bilinear_integer_weights_within_one_step_of_float(bits, symmetric):
    shape = (1, 2, 5, 6)
    mod = _module([shape], lambda bb, x: [_resize(bb, x, s, "linear", m) for s, m in LINEAR])
    cfg = CFG.replace(act_bits=bits, act_symmetric=symmetric)
    xs, y_real, qp, annotated, realized = _three_ways(mod, [shape], cfg)
    step = float(qp["concat_0:in0"].scale)
    for got, want in zip(y_real, _float_run(mod, xs)):
        # the float result rounded once (half a step) plus the weights' 2^-10 rounding (a fraction of a step)
        assert np.abs(got - want).max() <= 0.5 * step + 2 * 2.0 ** -qmath.RESIZE_FRAC_BITS * np.abs(want).max() + 1e-6
    binds = bindings(realized["main"])
    assert "relax.image.resize2d" not in {op_name(b.value) for b in binds}
    work = qmath.resize_work_dtype(bits)
    assert all(dtype_of(b.var) == work for b in binds if op_name(b.value) == "relax.multiply"
               and dtype_of(b.var) != "float32")


def test_resize_weights_are_exact_for_the_2x_half_pixel_upsample():
    """The UNet / FPN case: weights 1/4 and 3/4, exact in integers, so only the final rounding differs."""
    i0, i1, w0, w1 = qmath.resize_linear_weights(4, 8, "half_pixel")
    one = 1 << qmath.RESIZE_FRAC_BITS
    assert set(w1.tolist()) == {one // 4, 3 * one // 4} and np.all(w0 + w1 == one)
    np.testing.assert_array_equal(i0, [0, 0, 0, 1, 1, 2, 2, 3])
    np.testing.assert_array_equal(i1, [0, 1, 1, 2, 2, 3, 3, 3])


# ----------------------------------------------------------------------------- matmul of two activations
@pytest.mark.parametrize("bits,symmetric", [(8, True), (8, False), pytest.param(16, True, marks=pytest.mark.slow)])
def test_matmul_of_two_activations_is_integer_and_exact(bits, symmetric):
    a_shape, b_shape = (1, 2, 6, 8), (1, 2, 8, 5)
    mod = _module([a_shape, b_shape], lambda bb, a, b: [R.matmul(a, b)])
    cfg = CFG.replace(act_bits=bits, act_symmetric=symmetric)
    xs, y_real, qp, annotated, realized = _three_ways(mod, [a_shape, b_shape], cfg)
    assert layers(annotated)["matmul_0"] == "matmul"
    # The output feeds nothing quantized: the int32 accumulator is dequantized directly, so it is the
    # float matmul of the quantized inputs up to float32 rounding.
    np.testing.assert_allclose(y_real[0], np.matmul(*xs), rtol=1e-5, atol=1e-5)
    mm = [b for b in bindings(realized["main"]) if op_name(b.value) == "relax.matmul"]
    assert len(mm) == 1
    want = "int64" if bits == 16 else "int32"      # a 16-bit product sum may leave int32
    assert dtype_of(mm[0].var) == want and all(dtype_of(a).startswith(("int", "uint")) for a in mm[0].value.args)


def test_attention_scores_requantize_and_the_mask_add_stays_float():
    """softmax(q k^T / sqrt(d) + mask) v: both matmuls integer; the mask add (read only by the softmax)
    stays float, so the mask's -10000 never becomes a scale."""
    q_shape, k_shape, v_shape, m_shape = (1, 2, 6, 8), (1, 2, 8, 6), (1, 2, 6, 8), (1, 1, 1, 6)

    def body(bb, q, k, v, mask):
        s = bb.emit(R.divide(bb.emit(R.matmul(q, k)), relax.const(np.float32(np.sqrt(8)))))
        # BERT's additive mask from a 0/1 attention mask: (m - 1) * 10000
        bias = bb.emit(R.multiply(bb.emit(R.subtract(mask, relax.const(np.float32(1)))), relax.const(np.float32(1e4))))
        a = bb.emit(R.nn.softmax(bb.emit(R.add(s, bias)), axis=-1))
        return [R.matmul(a, v)]

    bb = relax.BlockBuilder()
    xs = [relax.Var(n, relax.TensorType(s, "float32")) for n, s in zip("qkvm", (q_shape, k_shape, v_shape, m_shape))]
    with bb.function("main", xs, attrs={"num_input": 4}):
        with bb.dataflow():
            qs = [bb.emit(R.concat([x], axis=1)) for x in xs[:3]]
            out = bb.emit_output(bb.emit(body(bb, *qs, xs[3])[0]))
        bb.emit_func_output(out)
    mod = bb.get()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", relayq.FloatFallbackWarning)
        annotated = annotate(prepare(mod, {}), CFG)
    lay = layers(annotated)
    assert sorted(v for v in lay.values() if v != "concat") == ["elementwise", "matmul", "matmul"], lay
    assert dict(float_ops(prepare(mod, {}), CFG)) == {"add": 1, "multiply": 1, "subtract": 1, "nn.softmax": 1}
    rng = np.random.RandomState(0)
    mask = (np.arange(6) < 4).astype("float32").reshape(m_shape)
    data = [[rng.randn(*s).astype("float32") for s in (q_shape, k_shape, v_shape)] + [mask] for _ in range(3)]
    _, qp = calibrate(annotated, data, "naive", CFG)
    assert not any(":in" in n and "mask" in n for n in qp)
    x = [rng.randn(*s).astype("float32") for s in (q_shape, k_shape, v_shape)] + [mask]
    y = compile_host(realize(annotated, qp))(*x)[0]
    np.testing.assert_array_equal(y, compile_host(simulate(annotated, qp))(*x)[0])
    np.testing.assert_array_equal(y, reference_run(annotated, qp, *x))
    f = _float_run(mod, x)[0]
    assert np.dot(y.ravel(), f.ravel()) / np.linalg.norm(y) / np.linalg.norm(f) > 0.99


# ----------------------------------------------------------------------------- constants in merges
def test_class_token_concat_and_position_embedding_add_quantize_the_constant_at_the_output_scale():
    shape = (1, 4, 8)
    rng = np.random.RandomState(5)
    token, pos = rng.randn(1, 1, 8).astype("float32"), rng.randn(1, 5, 8).astype("float32")

    def body(bb, x):
        t = bb.emit(R.concat([relax.const(token), x], axis=1))
        u = bb.emit(R.add(t, relax.const(pos)))
        return [R.reshape(u, (1, 40))]          # a quantized reader: the add is finalized in integers

    mod = _module([shape], body)
    xs, y_real, qp, annotated, realized = _three_ways(mod, [shape])
    assert sorted(layers(annotated).values()) == ["add", "concat", "concat"]
    want = (np.concatenate([token, xs[0]], axis=1) + pos).reshape(1, 40)
    # one rounding of the concat's constant (half a step of its output), one of the add (half a step of its)
    assert np.abs(y_real[0] - want).max() <= 0.5 * float(qp["concat_1:out"].scale) + 0.5 * float(qp["add_0:out"].scale) \
        + 1e-6
    merges = [b for b in bindings(realized["main"]) if op_name(b.value) in ("relax.add", "relax.concat")]
    assert merges and all(dtype_of(b.var) != "float32" for b in merges)
    # the inputs are already quantized; neither constant has a point of its own
    assert sorted(p for p in qp if p.startswith(("add_0:", "concat_1:"))) == ["add_0:out", "concat_1:out"]


# ----------------------------------------------------------------------------- LSTM
def _lstm_net():
    import torch

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lstm = torch.nn.LSTM(8, 12, batch_first=True)
            self.fc = torch.nn.Linear(12, 3)

        def forward(self, x):
            h, _ = self.lstm(x)
            return self.fc(h.mean(dim=1))

    torch.manual_seed(0)
    return Net().eval()


@pytest.mark.slow
def test_lstm_gates_are_integer_end_to_end():
    """split -> sigmoid / tanh -> products -> add (the cell) -> stack -> mean over time: no float op left."""
    import onnx
    import torch

    net, shape = _lstm_net(), (1, 5, 8)
    f = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (torch.randn(*shape),), f, dynamo=False, opset_version=17, input_names=["x"])
    mod, params = relayq.frontend.from_onnx(onnx.load_from_string(f.getvalue()))
    prepared = prepare(mod, params)
    assert not {"relax.split", "relax.stack"} & set(_ops(prepared))
    assert not float_ops(prepared, CFG)
    rng = np.random.RandomState(0)
    data = [rng.randn(*shape).astype("float32") for _ in range(6)]
    with warnings.catch_warnings():
        warnings.simplefilter("error", relayq.FloatFallbackWarning)
        q = relayq.quantize_model(mod, params, data, "naive", CFG)
    kinds = set(q.layers.values())
    assert {"dense", "elementwise", "multiply", "add", "mean"} <= kinds, kinds
    lib, sim = relayq.build(q, target="generic"), compile_host(q.simulated)
    for _ in range(2):
        x = rng.randn(*shape).astype("float32")
        y = assert_three_ways(q, lib, sim, x)
        with torch.no_grad():
            ref = net(torch.from_numpy(x)).numpy()
        assert np.dot(y.ravel(), ref.ravel()) / np.linalg.norm(y) / np.linalg.norm(ref) > 0.99
    realized_ops = set(_ops(q.realized))
    assert not realized_ops & {"relax.sigmoid", "relax.tanh", "relax.split", "relax.stack"}


def test_split_and_stack_become_slices_and_concat_in_prepare():
    shape = (1, 8)
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(shape, "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            s = bb.emit(R.split(x, 4, axis=1))
            s2 = bb.emit(R.split(x, [3], axis=1))
            a, b, c = (bb.emit(relax.TupleGetItem(t, i)) for t, i in ((s, 0), (s, 3), (s2, 1)))
            st = bb.emit(R.stack([bb.emit(R.sigmoid(a)), b], axis=0))
            out = bb.emit_output(relax.Tuple([st, c]))
        bb.emit_func_output(out)
    mod = bb.get()
    prepared = prepare(mod, {})
    ops = _ops(prepared)
    assert "relax.split" not in ops and "relax.stack" not in ops and ops.count("relax.strided_slice") == 3
    xv = np.random.RandomState(0).randn(*shape).astype("float32")
    for got, want in zip(compile_host(prepared)(xv), compile_host(mod)(xv)):
        np.testing.assert_array_equal(got, want)


def test_mean_over_time_is_the_integer_mean_of_qmath():
    shape = (1, 5, 7)
    mod = _module([shape], lambda bb, x: [R.mean(x, axis=[1]), R.mean(x, axis=[0, 2], keepdims=True)])
    xs, y_real, qp, annotated, realized = _three_ways(mod, [shape])
    assert sorted(layers(annotated).values()) == ["concat", "mean", "mean"]
    p = qp["concat_0:in0"]
    codes = qmath.quantize(xs[0], np.float32(p.scale), p.bits)
    np.testing.assert_array_equal(y_real[0], qmath.mean_codes(codes, [1]).astype(np.float32) * np.float32(p.scale))
    assert "relax.mean" not in _ops(realized)


# ----------------------------------------------------------------------------- float-only readers
def test_dense_read_only_by_float_ops_through_a_reshape_hands_over_its_accumulator():
    """A dense whose result is reshaped and then read only by float ops (a transformer's FFN output going
    into the residual add and the LayerNorm) gets no 8-bit output point: the reshape runs in float on the
    exact accumulator ``acc * s_x * s_w``, so one scale need not cover the residual stream's outliers."""
    rng = np.random.RandomState(0)
    w = relax.const(rng.randn(16, 12).astype("float32"))
    gamma, beta = relax.const(np.ones(12, "float32")), relax.const(np.zeros(12, "float32"))

    def body(bb, x):
        y = bb.emit(R.matmul(x, w))
        r = bb.emit(R.reshape(y, (1, 6, 12)))
        return [R.nn.layer_norm(r, gamma, beta, axes=[-1])]

    mod = _module([(6, 16)], body)
    annotated = annotate(prepare(mod, {}), CFG)
    assert "dense_0" in layers(annotated) and not any(n.startswith("reshape") for n in layers(annotated))
    data = [[rng.uniform(-3, 3, (6, 16)).astype("float32")] for _ in range(3)]
    _, qp = calibrate(annotated, data, "naive", CFG)
    assert "dense_0:w" in qp and "dense_0:out" not in qp, sorted(qp)
    realized = realize(annotated, qp)
    # the reshape reads the dequantized int32 accumulator: it is float32, and no int8 tensor reaches it
    reshapes = [b for b in bindings(realized["main"]) if op_name(b.value) == "relax.reshape"]
    assert reshapes and all(dtype_of(b.var) == "float32" for b in reshapes)
    x = data[0][0]
    y_real = compile_host(realized)(x)[0]
    np.testing.assert_array_equal(compile_host(simulate(annotated, qp))(x)[0], y_real)
    # the reference's float LayerNorm rounds differently from TVM's: equal up to float32 rounding
    np.testing.assert_allclose(reference_run(annotated, qp, x), y_real, rtol=1e-5, atol=1e-5)
