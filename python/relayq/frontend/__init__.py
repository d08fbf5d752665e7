"""Frontends: each turns a framework's model into ``(IRModule, params)`` for :func:`relayq.quantize_model`."""
from .onnx import from_onnx


def from_mxnet(symbol, arg_params=None, aux_params=None, shapes=None):
    """Import an MXNet symbol and its params without MXNet; see :mod:`relayq.frontend.mxnet`."""
    from .mxnet import from_mxnet as _impl

    return _impl(symbol, arg_params, aux_params, shapes)


def from_tflite(path_or_bytes, shapes=None, layout="NCHW"):
    """Import a float32 TFLite model (needs the ``tflite`` extra); see :mod:`relayq.frontend.tflite`."""
    from .tflite import from_tflite as _impl

    return _impl(path_or_bytes, shapes, layout)


def from_torch(module, example_inputs):
    """Export a torch module and import it; see :mod:`relayq.frontend.torch`."""
    from .torch import from_torch as _impl

    return _impl(module, example_inputs)


__all__ = ["from_onnx", "from_mxnet", "from_tflite", "from_torch"]
