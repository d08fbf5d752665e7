"""Pad as one visible ``relax.op.nn.pad``, and no unused parameters left after folding.

TVM imports every Pad as an opaque ``call_tir`` of ``topi.nn.pad``; relayq converts constant-mode
Pad with constant pads (what onnxslim leaves of torch's ``F.pad``) to ``R.nn.pad`` and leaves reflect /
edge Pads to TVM. Folding turns shape computations into initializers that the importer reads once
(a Reshape's target, Pad's pads); they must not stay as parameters of ``main`` or keys of ``params``.
"""
import numpy as np
import pytest

import relayq

torch = pytest.importorskip("torch", reason="the test models are exported from torch")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime", reason="ONNX Runtime is the float reference")
nn, F = torch.nn, torch.nn.functional
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

RTOL, ATOL = 1e-4, 1e-5
SHAPE = (1, 3, 10, 10)


class Pads(nn.Module):
    """A zero pad before a conv, a constant 0.5 pad on an activation, and (optionally) a reflect pad."""

    def __init__(self, reflect=False):
        super().__init__()
        self.reflect = reflect
        self.conv = nn.Conv2d(3, 4, 3)
        self.conv2 = nn.Conv2d(4, 4, 3)

    def forward(self, x):
        x = torch.relu(self.conv(F.pad(x, (1, 2, 0, 3))))
        x = F.pad(x, (2, 2, 1, 1), value=0.5)
        if self.reflect:
            x = F.pad(x, (1, 1, 1, 1), mode="reflect")
        return self.conv2(x)


class ReshapeFromShape(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 10 * 10, 5)

    def forward(self, x):
        x = torch.relu(self.conv(x))
        return self.fc(x.reshape(x.shape[0], -1))


def _export(net, path):
    torch.manual_seed(0)
    for p in net.parameters():
        p.data = torch.randn_like(p) * 0.3
    torch.onnx.export(net.eval(), torch.randn(*SHAPE), str(path), dynamo=False, opset_version=17,
                      input_names=["input"], output_names=["output"])
    return onnx.load(str(path))


def _check_float(path, mod, params):
    x = np.random.RandomState(4).randn(*SHAPE).astype("float32")
    ref = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    np.testing.assert_allclose(relayq.build(mod, params=params)(x), ref, rtol=RTOL, atol=ATOL)


def test_constant_pad_imports_as_relax_pad_and_matches(tmp_path):
    path = tmp_path / "pad.onnx"
    assert "Pad" in {n.op_type for n in _export(Pads(), path).graph.node}
    mod, params = relayq.frontend.from_onnx(str(path))
    text = str(mod)
    assert text.count("R.nn.pad(") == 2 and "call_tir" not in text
    assert "pad_value=0.5" in text
    _check_float(path, mod, params)


def test_reflect_pad_stays_on_tvms_converter(tmp_path):
    path = tmp_path / "reflect.onnx"
    _export(Pads(reflect=True), path)
    mod, params = relayq.frontend.from_onnx(str(path))
    text = str(mod)
    assert text.count("R.nn.pad(") == 2 and text.count("call_tir") == 1
    _check_float(path, mod, params)


@pytest.mark.parametrize("net", [ReshapeFromShape, Pads])
def test_folded_shape_constants_are_not_left_as_parameters(tmp_path, net):
    path = tmp_path / "m.onnx"
    model = _export(net(), path)
    mod, params = relayq.frontend.from_onnx(str(path))
    from tvm import relax

    func = mod["main"]
    names = [p.name for p in func.params]
    assert names[0] == "input"
    used = {v.name for v in relax.analysis.free_vars(func.body)}
    assert set(names[1:]) == set(params) <= used
    # Every real weight keeps its name; nothing named after a shape computation is left.
    weights = {t.name for t in model.graph.initializer if t.name.endswith((".weight", ".bias"))}
    assert weights <= set(params)
    assert not [n for n in params if "Concat" in n or "Constant" in n or "pad" in n.lower()]
    _check_float(path, mod, params)


def test_unused_graph_inputs_are_kept(tmp_path):
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])
    unused = helper.make_tensor_value_info("unused", TensorProto.FLOAT, [4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])
    shape = onnx.numpy_helper.from_array(np.array([3, 2], "int64"), "shape_const")
    back = onnx.numpy_helper.from_array(np.array([2, 3], "int64"), "shape_back")
    nodes = [helper.make_node("Reshape", ["x", "shape_const"], ["r"], name="r"),
             helper.make_node("Reshape", ["r", "shape_back"], ["y"], name="back")]
    model = helper.make_model(helper.make_graph(nodes, "g", [x, unused], [y], [shape, back]),
                              opset_imports=[helper.make_opsetid("", 14)])
    model.ir_version = 8
    from relayq.frontend import onnx as fe

    # onnxslim itself drops unused graph inputs; the pruning step alone must keep them.
    shapes = {"x": [2, 3], "unused": [4]}
    mod, params = fe._detach_params(fe._import(model, shapes, "test model"))
    assert [p.name for p in mod["main"].params] == ["x", "unused"]
    assert params == {}
