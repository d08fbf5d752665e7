"""LSTM and GRU, which TVM 0.27's ONNX importer lacks: relayq unrolls them over the static sequence.

torch's exporter (``dynamo=False, opset_version=17``) writes forward / bidirectional cells with
``linear_before_reset=1`` and zero initial states from ``Expand``; the reverse direction, GRU's
``linear_before_reset=0``, ``layout=1``, initial states fed as graph inputs and the three outputs
``Y, Y_h, Y_c`` are only reachable with hand-written nodes, so those are built with ``onnx.helper``.
Every model is checked against ONNX Runtime in float; one LSTM and one GRU also go through
``quantize_model`` + ``build``.
"""
import warnings

import numpy as np
import pytest

import relayq
from relayq.errors import UnsupportedOpError

torch = pytest.importorskip("torch", reason="the test models are exported from torch")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime", reason="ONNX Runtime is the float reference")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

nn = torch.nn
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

#: Float import against ONNX Runtime: the brief's bound (relative to the output's largest magnitude;
#: both are fp32 with a different summation order, measured ~1e-7).
RTOL = 1e-4
#: INT8 against FP32 on tiny random nets.
MIN_COSINE = 0.99
BATCH, STEPS, FEATURES, HIDDEN = 2, 4, 6, 8


class RNNHead(nn.Module):
    """A recurrent layer, then a Linear on every step's output (torch.onnx exports it as MatMul)."""

    def __init__(self, cell, **kw):
        super().__init__()
        self.rnn = cell(FEATURES, HIDDEN, **kw)
        self.fc = nn.Linear(HIDDEN * (2 if kw.get("bidirectional") else 1), 3)

    def forward(self, x):
        y, _ = self.rnn(x)
        return self.fc(y)


def _export(net, path, batch_first):
    torch.manual_seed(0)
    for p in net.parameters():
        p.data = torch.randn_like(p) * 0.5
    shape = (BATCH, STEPS, FEATURES) if batch_first else (STEPS, BATCH, FEATURES)
    torch.onnx.export(net.eval(), torch.randn(*shape), str(path), dynamo=False, opset_version=17,
                      input_names=["input"], output_names=["output"])
    return shape


def _rel_err(out, ref):
    return float(np.abs(np.asarray(out) - ref).max() / (np.abs(ref).max() + 1e-12))


def _cosine(a, b):
    a, b = np.asarray(a).ravel().astype("float64"), b.ravel().astype("float64")
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-12))


TORCH_CASES = {
    "lstm_1layer": (nn.LSTM, {}),
    "lstm_2layers_bidirectional_batch_first": (nn.LSTM, {"num_layers": 2, "bidirectional": True, "batch_first": True}),
    "gru_1layer_batch_first": (nn.GRU, {"batch_first": True}),
    "gru_2layers_bidirectional": (nn.GRU, {"num_layers": 2, "bidirectional": True}),
}


@pytest.mark.parametrize("case", list(TORCH_CASES))
def test_torch_rnn_imports_and_matches_onnxruntime(tmp_path, case):
    cell, kw = TORCH_CASES[case]
    path = tmp_path / f"{case}.onnx"
    shape = _export(RNNHead(cell, **kw), path, kw.get("batch_first", False))
    op = cell.__name__
    assert op in {n.op_type for n in onnx.load(str(path)).graph.node}

    mod, params = relayq.frontend.from_onnx(str(path))
    text = str(mod)
    assert "R.sigmoid" in text and "R.tanh" in text and "call_tir" not in text
    assert any(k.startswith(f"{op}_") for k in params), "the recurrent weights keep their ONNX names"

    x = np.random.RandomState(3).randn(*shape).astype("float32")
    ref = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    out = relayq.build(mod, params=params)(x)
    assert _rel_err(out, ref) <= RTOL


@pytest.mark.parametrize("case", ["lstm_2layers_bidirectional_batch_first", "gru_1layer_batch_first"])
def test_torch_rnn_quantizes_and_builds(tmp_path, case):
    cell, kw = TORCH_CASES[case]
    path = tmp_path / f"{case}.onnx"
    shape = _export(RNNHead(cell, **kw), path, kw.get("batch_first", False))
    rng = np.random.RandomState(1)
    batches = [rng.randn(*shape).astype("float32") for _ in range(4)]
    with warnings.catch_warnings():
        # the gates (split into slices, sigmoid / tanh tables, products, adds) are integer too
        warnings.simplefilter("error", relayq.errors.FloatFallbackWarning)
        q = relayq.quantize_model(str(path), dataset=batches)
    # The input projections and the recurrent matmuls (all but the first step's, whose zero state
    # folds away) are quantized dense layers, and so is the head's Linear on the (batch, steps, hidden)
    # output (an N-D linear layer, flattened to 2-D by prepare).
    dense = [n for n, t in q.layers.items() if t == "dense"]
    num_dir = 2 if kw.get("bidirectional") else 1
    layers = kw.get("num_layers", 1)
    assert len(dense) == layers * num_dir * STEPS + 1
    x = np.random.RandomState(9).randn(*shape).astype("float32")
    ref = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    assert _cosine(relayq.build(q)(x), ref) > MIN_COSINE


# ---------------------------------------------------------------------------------- hand-written nodes

def _rnn_model(op, direction, layout=0, states_as_inputs=True, seq_lens=None, **attrs):
    """One LSTM / GRU node with every output, random initializers, initial states as graph inputs."""
    rng = np.random.RandomState(5)
    gates = 4 if op == "LSTM" else 3
    dirs = 2 if direction == "bidirectional" else 1
    w = rng.randn(dirs, gates * HIDDEN, FEATURES).astype("float32") * 0.5
    r = rng.randn(dirs, gates * HIDDEN, HIDDEN).astype("float32") * 0.5
    b = rng.randn(dirs, 2 * gates * HIDDEN).astype("float32") * 0.5
    x_shape = [BATCH, STEPS, FEATURES] if layout else [STEPS, BATCH, FEATURES]
    s_shape = [BATCH, dirs, HIDDEN] if layout else [dirs, BATCH, HIDDEN]
    y_shape = [BATCH, STEPS, dirs, HIDDEN] if layout else [STEPS, dirs, BATCH, HIDDEN]
    states = ["initial_h"] + (["initial_c"] if op == "LSTM" else [])
    inputs = [helper.make_tensor_value_info("X", TensorProto.FLOAT, x_shape)]
    if states_as_inputs:
        inputs += [helper.make_tensor_value_info(s, TensorProto.FLOAT, s_shape) for s in states]
    inits = [numpy_helper.from_array(a, n) for a, n in ((w, "W"), (r, "R"), (b, "B"))]
    lens = ""
    if seq_lens is not None:
        if isinstance(seq_lens, str):
            inputs.append(helper.make_tensor_value_info("lens", TensorProto.INT32, [BATCH]))
            lens = "lens"
        else:
            inits.append(numpy_helper.from_array(np.array(seq_lens, "int32"), "lens"))
            lens = "lens"
    node_in = ["X", "W", "R", "B", lens] + (states if states_as_inputs else [])
    outs = ["Y", "Y_h"] + (["Y_c"] if op == "LSTM" else [])
    node = helper.make_node(op, node_in, outs, name=f"my_{op.lower()}", hidden_size=HIDDEN,
                            direction=direction, layout=layout, **attrs)
    outputs = [helper.make_tensor_value_info("Y", TensorProto.FLOAT, y_shape)] + \
              [helper.make_tensor_value_info(o, TensorProto.FLOAT, s_shape) for o in outs[1:]]
    graph = helper.make_graph([node], "rnn", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)])
    model.ir_version = 8
    return model, x_shape, s_shape, states


HAND_CASES = {
    "lstm_reverse": ("LSTM", "reverse", 0, {}),
    "lstm_bidirectional_layout1": ("LSTM", "bidirectional", 1, {}),
    "gru_reverse_linear_before_reset0": ("GRU", "reverse", 0, {"linear_before_reset": 0}),
    "gru_bidirectional_linear_before_reset1": ("GRU", "bidirectional", 0, {"linear_before_reset": 1}),
}


@pytest.mark.parametrize("case", list(HAND_CASES))
def test_hand_written_rnn_all_outputs_match_onnxruntime(case):
    op, direction, layout, attrs = HAND_CASES[case]
    model, x_shape, s_shape, states = _rnn_model(op, direction, layout, **attrs)
    rng = np.random.RandomState(11)
    feed = {"X": rng.randn(*x_shape).astype("float32")}
    feed.update({s: rng.randn(*s_shape).astype("float32") for s in states})
    if layout == 0:
        refs = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feed)
    else:       # ONNX Runtime refuses layout=1: run the layout-0 twin on transposed tensors
        twin = _rnn_model(op, direction, 0, **attrs)[0]
        feed0 = {"X": feed["X"].transpose(1, 0, 2), **{s: feed[s].transpose(1, 0, 2) for s in states}}
        refs = ort.InferenceSession(twin.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feed0)
        refs = [refs[0].transpose(2, 0, 1, 3)] + [r.transpose(1, 0, 2) for r in refs[1:]]

    mod, params = relayq.frontend.from_onnx(model)
    assert [p.name for p in mod["main"].params] == ["X"] + states + ["W", "R", "B"]
    outs = relayq.build(mod, params=params)(feed)
    assert len(outs) == len(refs)
    for out, ref in zip(outs, refs):
        assert np.asarray(out).shape == ref.shape
        assert _rel_err(out, ref) <= RTOL


def test_sequence_lens_equal_to_the_length_is_accepted_and_others_are_refused():
    model, x_shape, _, _ = _rnn_model("GRU", "forward", states_as_inputs=False, seq_lens=[STEPS] * BATCH)
    x = np.random.RandomState(2).randn(*x_shape).astype("float32")
    ref = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"X": x})
    mod, params = relayq.frontend.from_onnx(model)
    assert _rel_err(relayq.build(mod, params=params)(x)[0], ref[0]) <= RTOL

    short, _, _, _ = _rnn_model("LSTM", "forward", states_as_inputs=False, seq_lens=[STEPS, STEPS - 1])
    with pytest.raises(UnsupportedOpError, match=r"my_lstm.*sequence_lens"):
        relayq.frontend.from_onnx(short)
    dynamic, _, _, _ = _rnn_model("GRU", "forward", states_as_inputs=False, seq_lens="input")
    with pytest.raises(UnsupportedOpError, match=r"my_gru.*sequence_lens"):
        relayq.frontend.from_onnx(dynamic)


def test_unsupported_rnn_attributes_are_named():
    model, _, _, _ = _rnn_model("LSTM", "forward", states_as_inputs=False, input_forget=1)
    with pytest.raises(UnsupportedOpError, match=r"my_lstm.*input_forget"):
        relayq.frontend.from_onnx(model)
    model, _, _, _ = _rnn_model("GRU", "forward", states_as_inputs=False, clip=3.0)
    with pytest.raises(UnsupportedOpError, match=r"my_gru.*clip"):
        relayq.frontend.from_onnx(model)
