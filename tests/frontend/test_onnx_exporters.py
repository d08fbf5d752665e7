"""ONNX files as torch's exporter writes them: Constant nodes, shape-computing subgraphs, Identity/Dropout.

The MobileNetV2 block (Clip bounds from Constant nodes), the padding computed from shapes and
keep_initializers_as_inputs failed to import before the graph was normalized; the reshape-from-shape,
channel-shuffle and Dropout/Identity nets are regression cases of the same kind. Each must import, match
ONNX Runtime in float, quantize from the ONNX path with a few random calibration batches, build, and
stay close to FP32 in INT8.
"""
import numpy as np
import pytest

import relayq

torch = pytest.importorskip("torch", reason="the test models are exported from torch")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime", reason="ONNX Runtime is the float reference")
nn, F = torch.nn, torch.nn.functional
# torch 2.13 warns that dynamo=False is the legacy exporter: it is the one users' files come from.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

#: Float import against ONNX Runtime (both fp32; only summation order differs).
RTOL, ATOL = 1e-4, 1e-5
#: INT8 against FP32 on tiny random nets.
MIN_COSINE = 0.99
SHAPE = (2, 3, 16, 16)


class MobileNetV2Block(nn.Module):
    """Inverted residual with ReLU6 (exported as Clip with Constant-node bounds), then a classifier."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU6())
        self.expand = nn.Sequential(nn.Conv2d(8, 16, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU6())
        self.dw = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1, groups=16, bias=False), nn.BatchNorm2d(16),
                                nn.ReLU6())
        self.project = nn.Sequential(nn.Conv2d(16, 8, 1, bias=False), nn.BatchNorm2d(8))
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        x = self.stem(x)
        x = x + self.project(self.dw(self.expand(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class PadFromShape(nn.Module):
    """Pads H and W up to a multiple of 8, the amounts computed from ``x.shape`` ("Dynamic pads")."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, stride=2)

    def forward(self, x):
        h, w = x.shape[2], x.shape[3]
        x = F.pad(x, (0, (8 - (w + 3) % 8) % 8, 0, (8 - (h + 3) % 8) % 8))
        return torch.relu(self.conv(x))


class ReshapeFromShape(nn.Module):
    """``x.reshape(x.shape[0], -1)`` and a view after flatten (Shape -> Gather -> Concat -> Reshape)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc1 = nn.Linear(4 * 8 * 8, 32)
        self.fc2 = nn.Linear(32, 6)

    def forward(self, x):
        x = F.max_pool2d(torch.relu(self.conv(x)), 2)
        x = x.reshape(x.shape[0], -1)
        x = torch.relu(self.fc1(x))
        x = torch.flatten(x, 1).view(x.size(0), 4, 8)
        return self.fc2(x.view(x.size(0), -1))


class ChannelShuffle(nn.Module):
    """ShuffleNet's channel shuffle, written with sizes read from the tensor (no torchvision)."""

    def __init__(self, groups=2):
        super().__init__()
        self.groups = groups
        self.c1 = nn.Conv2d(3, 8, 1)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1, groups=2)

    def forward(self, x):
        x = torch.relu(self.c1(x))
        b, c, h, w = x.size()
        x = x.view(b, self.groups, c // self.groups, h, w).transpose(1, 2).contiguous().view(b, -1, h, w)
        return torch.relu(self.c2(x))


class WithDropout(nn.Module):
    """A net with Dropout; torch drops it in eval exports, so the test puts Dropout and Identity back."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(8 * 16 * 16, 4)

    def forward(self, x):
        x = self.drop(torch.relu(self.conv(x)))
        return self.fc(torch.flatten(x, 1))


class TwoConvs(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        return self.c2(torch.relu(self.c1(x)))


def _export(net, path, **kw):
    torch.manual_seed(0)
    for p in net.parameters():          # deterministic weights (the module was built before the seed)
        p.data = torch.randn_like(p) * (1.0 / max(1, p[0].numel()) ** 0.5)
    net.eval()
    torch.onnx.export(net, torch.randn(*SHAPE), str(path), dynamo=False, opset_version=17,
                      input_names=["input"], output_names=["output"], **kw)
    return onnx.load(str(path))


def _with_identity_and_dropout(model):
    """Insert Identity and an inference-mode Dropout after the first node, as tf2onnx and training exports write."""
    from onnx import helper

    first = model.graph.node[0]
    old = first.output[0]
    first.output[0] = old + "_pre_identity"
    model.graph.node.insert(1, helper.make_node("Identity", [first.output[0]], [old + "_pre_dropout"],
                                                name="user_identity"))
    model.graph.node.insert(2, helper.make_node("Dropout", [old + "_pre_dropout"], [old], name="user_dropout"))
    return model


def _batches(n=4, seed=1):
    rng = np.random.RandomState(seed)
    return [rng.randn(*SHAPE).astype("float32") for _ in range(n)]


def _cosine(a, b):
    a, b = a.ravel().astype("float64"), b.ravel().astype("float64")
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-12))


CASES = {
    "mobilenet_v2_block_relu6": (MobileNetV2Block, {}),
    "pad_from_shape": (PadFromShape, {}),
    "reshape_from_shape": (ReshapeFromShape, {}),
    "channel_shuffle": (ChannelShuffle, {}),
    "dropout_and_identity": (WithDropout, {}),
    "keep_initializers_as_inputs": (MobileNetV2Block, {"keep_initializers_as_inputs": True}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_exported_net_imports_quantizes_and_matches(tmp_path, case):
    cls, kw = CASES[case]
    path = tmp_path / f"{case}.onnx"
    model = _export(cls(), path, **kw)
    if case == "dropout_and_identity":
        model = _with_identity_and_dropout(model)
        assert {"Dropout", "Identity"} <= {n.op_type for n in model.graph.node}
        onnx.save(model, str(path))
    inits = {t.name for t in model.graph.initializer}

    mod, params = relayq.frontend.from_onnx(str(path))
    # Weights keep their ONNX initializer names.
    weights = {n for n in inits if "weight" in n}
    assert weights and weights <= set(params)
    assert mod["main"].params[0].name == "input"

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = _batches(1, seed=7)[0]
    ref = sess.run(None, {"input": x})[0]
    out = relayq.build(mod, params=params)(x)
    np.testing.assert_allclose(out, ref, rtol=RTOL, atol=ATOL)

    q = relayq.quantize_model(str(path), dataset=_batches())
    assert q.layers, "nothing was quantized"
    assert _cosine(relayq.build(q)(x), ref) > MIN_COSINE


def test_normalization_keeps_user_node_and_initializer_names(tmp_path):
    from relayq.frontend import onnx as fe

    path = tmp_path / "m.onnx"
    model = _export(MobileNetV2Block(), path)
    kept_ops = {"Conv", "Clip", "Add", "Gemm", "GlobalAveragePool", "Flatten"}
    names = {n.name for n in model.graph.node if n.op_type in kept_ops}
    loaded, where = fe._load(str(path))
    shapes = fe._input_shapes(loaded, None, where)
    norm = fe._normalize(loaded, shapes, where)
    ops = [n.op_type for n in norm.graph.node]
    assert "Constant" not in ops and "Identity" not in ops
    assert names <= {n.name for n in norm.graph.node}
    assert {t.name for t in model.graph.initializer} <= {t.name for t in norm.graph.initializer}


def test_keep_initializers_as_inputs_gives_one_parameter_per_weight(tmp_path):
    model = _export(TwoConvs(), tmp_path / "k.onnx", keep_initializers_as_inputs=True)
    assert {"c1.weight", "c2.bias"} <= {i.name for i in model.graph.input}
    mod, params = relayq.frontend.from_onnx(str(tmp_path / "k.onnx"))
    names = [p.name for p in mod["main"].params]
    assert names == ["input", "c1.weight", "c1.bias", "c2.weight", "c2.bias"]
    assert set(params) == {"c1.weight", "c1.bias", "c2.weight", "c2.bias"}


def test_without_onnxruntime_constants_still_fold_and_shape_errors_say_why(tmp_path, monkeypatch):
    """The core install has no onnxruntime: Constant nodes still become initializers; a shape computation
    that only evaluation can fold raises a FrontendError that names the missing package."""
    import sys

    block = _export(MobileNetV2Block(), tmp_path / "b.onnx")
    pad = _export(PadFromShape(), tmp_path / "p.onnx")
    monkeypatch.setitem(sys.modules, "onnxruntime", None)      # import onnxruntime -> ImportError
    mod, params = relayq.frontend.from_onnx(block)
    assert "R.clip(" in str(mod)
    with pytest.raises(relayq.FrontendError, match="onnxruntime"):
        relayq.frontend.from_onnx(pad)
