"""Test and benchmark helpers: reference models, offline real data, and a torch-free checkpoint reader.

* :mod:`relayq.testing.zoo` -- MobileNetV2 (real ImageNet weights) and ResNet-18 (seeded random
  weights) emitted as ONNX models that run in ONNX Runtime and import into TVM;
* :mod:`relayq.testing.data` -- 20 labelled ImageNet samples and 100 calibration photos, read from
  offline pip packages, with torchvision's preprocessing;
* :mod:`relayq.testing.pth` -- ``load_state_dict`` for PyTorch ``.pth`` files without torch.

Nothing here downloads anything; the loaders raise a clear error (and ``has_*`` helpers say whether
to skip) when an optional package is absent.

Example::

    >>> from relayq.testing import zoo, data
    >>> if zoo.has_mobilenet_weights() and data.has_imagenet_samples():   # doctest: +SKIP
    ...     model = zoo.mobilenet_v2(batch=20)
    ...     images, labels = data.imagenet_labelled()
"""
from . import data, pth, zoo
from .data import calibration_photos, has_calibration_photos, has_imagenet_samples, imagenet_labelled, preprocess
from .pth import load_state_dict
from .zoo import has_mobilenet_weights, mobilenet_v2, mobilenet_v2_weights_path, resnet18

__all__ = [
    "data",
    "pth",
    "zoo",
    "calibration_photos",
    "has_calibration_photos",
    "has_imagenet_samples",
    "has_mobilenet_weights",
    "imagenet_labelled",
    "load_state_dict",
    "mobilenet_v2",
    "mobilenet_v2_weights_path",
    "preprocess",
    "resnet18",
]
