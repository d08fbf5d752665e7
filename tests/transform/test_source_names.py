"""The source model's names (ONNX node / initializer names) travel from import to every message and report."""
import warnings

import numpy as np
import pytest

import relayq
from relayq.runtime import compile_host
from relayq.transform.annotate import annotate, layer_aliases, layer_sources, layers
from relayq.transform.prepare import prepare

from helpers import assert_three_ways
from onnx_nets import batches, hardswish_net, set_initializer

pytest.importorskip("torch")
CFG = relayq.QConfig(show_progress=False)
HS = "/features/features.1/HardSwish"
CONV1 = "/features/features.2/Conv"


@pytest.fixture(scope="module")
def net():
    return hardswish_net()[0]


def _annotate(model, config=CFG):
    mod, params = relayq.frontend.from_onnx(model)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        annotated = annotate(prepare(mod, params), config)
    return annotated, [w for w in rec if issubclass(w.category, relayq.FloatFallbackWarning)]


def test_layers_carry_onnx_node_and_initializer_names(net):
    annotated, _ = _annotate(net)
    src = layer_sources(annotated)
    assert src["conv2d_1"].node == CONV1 and src["conv2d_1"].weight == "features.2.weight"
    assert src["conv2d_1"].bias == "features.2.bias"
    assert src["dense_0"].node == "/fc/Gemm" and src["dense_0"].weight == "fc.weight"
    assert layer_aliases(annotated)["conv2d_0"] == ["/features/features.0/Conv", "features.0.weight"]


def test_fallback_warning_groups_ops_by_onnx_node(net):
    # HardSwish is quantized (a table); skipping the op type keeps its four ops in float.
    _, warned = _annotate(net, CFG.replace(skip_ops=("elementwise",)))
    assert len(warned) == 1
    assert f'HardSwish "{HS}" (4 ops: add, clip, divide, multiply)' in str(warned[0].message)


def test_skip_layers_accepts_onnx_node_names(net):
    annotated, warned = _annotate(net, CFG.replace(skip_layers=(CONV1,)))
    assert sorted(layers(annotated)) == ["conv2d_0", "dense_0", "elementwise_0"]     # elementwise_0: HardSwish
    assert f'Conv "{CONV1}" (2 ops: add, nn.conv2d)' in str(warned[0].message)


def test_nan_initializer_error_names_the_initializer(net):
    bad = set_initializer(net, "features.2.weight", lambda a: np.where(np.arange(a.size).reshape(a.shape) == 5,
                                                                       np.nan, a))
    with pytest.raises(relayq.DatasetError) as e:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            relayq.quantize_model(bad, None, batches(), "naive", CFG)
    msg = str(e.value)
    assert "conv2d_1:w" in msg and f'ONNX node "{CONV1}"' in msg and 'weight "features.2.weight"' in msg
    assert "NaN" in msg


def test_summary_shows_source_names(net):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = relayq.quantize_model(net, None, batches(), "naive", CFG)
    text = q.summary()
    assert f'conv2d_1 (ONNX node "{CONV1}", weight "features.2.weight")' in text
    assert 'dense_0 (ONNX node "/fc/Gemm", weight "fc.weight")' in text


def test_bias_too_large_for_int32_is_clamped_with_a_warning_and_stays_exact():
    # A bias of 2000 at s_x*s_w ~ 1e-7 is ~2e10 codes: far beyond int32. relayq clamps it and says where.
    # (ReLU instead of HardSwish: the numpy reference executes quantized graphs, not float HardSwish.)
    big = set_initializer(hardswish_net(hardswish=False)[0], "features.2.bias", lambda a: np.where(np.arange(a.size) == 3, 2000.0, a))
    big = set_initializer(big, "features.2.weight", lambda a: a * 1e-3)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        q = relayq.quantize_model(big, None, batches(), "naive", CFG)
    clamps = [w for w in rec if issubclass(w.category, relayq.BiasClampWarning)]
    assert len(clamps) == 1
    msg = str(clamps[0].message)
    assert f'conv2d_1 (ONNX node "{CONV1}", weight "features.2.weight")' in msg
    assert 'bias "features.2.bias"' in msg and "clamped 1 of 8" in msg and "channel 3" in msg
    lib = relayq.build(q)
    sim = compile_host(q.simulated)
    rng = np.random.RandomState(5)
    for _ in range(2):
        x = rng.randn(1, 3, 8, 8).astype("float32")
        assert_three_ways(q, lib, sim, x)


#: relayq layer type -> the ONNX op type of the node it must name.
_LAYER_NODE = {"conv2d": "Conv", "add": "Add", "global_avg_pool": "GlobalAveragePool", "dense": "Gemm"}


def _mobilenet_v2_onnx(kind):
    import torch

    from relayq.testing import torchvision_zoo, zoo

    torch.manual_seed(0)
    net = torchvision_zoo.import_torchvision().mobilenet_v2(weights=None).eval()
    if kind == "torch":             # torch's exporter folds every BatchNorm into its conv's bias
        return torchvision_zoo.onnx_export(net, np.zeros((1, 3, 64, 64), np.float32))
    # relayq's hand-built graph keeps Conv -> BatchNormalization: prepare folds them, re-emitting every conv.
    return zoo.mobilenet_v2({k: v.numpy() for k, v in net.state_dict().items()})


@pytest.mark.parametrize("kind", ["zoo", pytest.param("torch", marks=pytest.mark.slow)])
def test_mobilenet_v2_every_layer_names_its_own_onnx_node(kind):
    """Each of MobileNetV2's 52 convs, 10 adds, pool and Gemm names the ONNX node it came from, no other:
    binding names that BatchNorm folding reused once pointed an add at a Conv and biases at other weights."""
    model = _mobilenet_v2_onnx(kind)
    annotated, _ = _annotate(model)
    nodes = {n.name: n for n in model.graph.node}
    src = layer_sources(annotated)
    kinds = layers(annotated)
    assert sorted(set(kinds.values())) == sorted(_LAYER_NODE) and list(kinds.values()).count("add") == 10
    assert set(src) == set(kinds)
    for layer, op in kinds.items():
        s = src[layer]
        node = nodes[s.node]
        assert node.op_type == _LAYER_NODE[op] == s.op_type, layer
        if op in ("conv2d", "dense"):
            assert s.weight == node.input[1], layer
            # A bias name only where the node reads one (torch's own folding gives every conv a bias,
            # sometimes through an Identity of a shared initializer; a BatchNorm that relayq folds has none).
            expected_bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
            assert s.bias == expected_bias, layer
    assert len({s.node for s in src.values()}) == len(src)          # no two layers share a node
    # The adds keep graph order: add_k is the k-th two-input Add of the graph.
    adds = [n.name for n in model.graph.node if n.op_type == "Add"]
    assert [src[f"add_{k}"].node for k in range(10)] == adds
