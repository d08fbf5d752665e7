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
