"""Small torch-exported ONNX models with the names a user's model has (for the source-name tests)."""
import io

import numpy as np


def hardswish_net(seed=0, hardswish=True):
    """conv -> HardSwish -> conv -> ReLU -> flatten -> Linear, exported to ONNX by torch (legacy exporter).

    Node names: ``/features/features.0/Conv``, ``/features/features.1/HardSwish``,
    ``/features/features.2/Conv``, ``/features/features.3/Relu``, ``/fc/Gemm``; initializers
    ``features.0.weight`` ... ``fc.bias``. With ``hardswish=False`` the first activation is a ReLU
    (``/features/features.1/Relu``): every op quantizes. Returns ``(onnx.ModelProto, torch module)``.
    """
    import onnx
    import torch
    from torch import nn

    torch.manual_seed(seed)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Hardswish() if hardswish else nn.ReLU(),
                                          nn.Conv2d(8, 8, 3, padding=1), nn.ReLU())
            self.fc = nn.Linear(8 * 8 * 8, 10)

        def forward(self, x):
            return self.fc(self.features(x).flatten(1))

    net = Net().eval()
    f = io.BytesIO()
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (torch.zeros(1, 3, 8, 8),), f, input_names=["input"], opset_version=17,
                          dynamo=False, do_constant_folding=False)
    return onnx.load_from_string(f.getvalue()), net


def set_initializer(model, name, fn):
    """A copy of ``model`` with initializer ``name`` replaced by ``fn(array)``."""
    import copy

    from onnx import numpy_helper

    model = copy.deepcopy(model)
    for i, t in enumerate(model.graph.initializer):
        if t.name == name:
            arr = fn(numpy_helper.to_array(t).copy())
            model.graph.initializer[i].CopyFrom(numpy_helper.from_array(np.asarray(arr, np.float32), name))
            return model
    raise KeyError(name)


def batches(n=2, seed=1):
    rng = np.random.RandomState(seed)
    return [rng.randn(1, 3, 8, 8).astype("float32") for _ in range(n)]


def tiny_conv_net(size=16, seed=0):
    """conv(+bias) -> ReLU -> conv (stride 2) -> ReLU -> GlobalAveragePool -> Flatten -> Gemm, built with
    onnx.helper (no torch): input ``image`` (1, 3, size, size), output ``logits`` (1, 10); node names
    ``conv1``, ``conv2``, ``gap``, ``fc``. Returns the ``onnx.ModelProto``."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.RandomState(seed)
    weights = {"w1": rng.randn(8, 3, 3, 3) * 0.3, "b1": rng.randn(8) * 0.1, "w2": rng.randn(8, 8, 3, 3) * 0.2,
               "fc": rng.randn(10, 8) * 0.3, "fcb": rng.randn(10) * 0.1}
    inits = [numpy_helper.from_array(v.astype("float32"), k) for k, v in weights.items()]
    nodes = [helper.make_node("Conv", ["image", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             helper.make_node("Conv", ["r1", "w2"], ["c2"], pads=[1, 1, 1, 1], strides=[2, 2], name="conv2"),
             helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
             helper.make_node("GlobalAveragePool", ["r2"], ["g"], name="gap"),
             helper.make_node("Flatten", ["g"], ["f"], name="flatten"),
             helper.make_node("Gemm", ["f", "fc", "fcb"], ["logits"], transB=1, name="fc")]
    graph = helper.make_graph(nodes, "tiny_conv_net",
                              [helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 3, size, size])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 10])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model
