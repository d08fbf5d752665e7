"""Which frontend reads a model file: the format is sniffed from the content, not from the file name.

A valid ONNX file named ``model.bin`` is ONNX; a ``.onnx`` file holding MXNet JSON is MXNet. Every
path that cannot be a model (missing, a directory, empty, unknown bytes) raises a
:class:`~relayq.errors.FrontendError` that names the path.

Example::

    detect_format("mobilenet_v2.onnx")          # "onnx"
    detect_format("resnet-symbol.json")         # "mxnet"
    detect_format("model.tflite")               # "tflite"
"""
from __future__ import annotations

import json
import os

from ..errors import FrontendError

#: Bytes read to decide: enough for the TFLite identifier and the first protobuf fields.
_HEAD_BYTES = 64
#: TFLite flatbuffers carry their file identifier at offset 4.
_TFLITE_MAGIC = b"TFL3"
#: Field numbers of ``onnx.ModelProto`` that an exporter writes first (ir_version, producer_name,
#: producer_version, domain, model_version, doc_string, graph, opset_import); a serialized model starts
#: with the key byte of one of them (wire type 0 or 2).
_ONNX_FIRST_KEYS = {0x08, 0x12, 0x1A, 0x22, 0x28, 0x32, 0x3A, 0x42}

SUPPORTED = "an ONNX model (protobuf), a TFLite flatbuffer or an MXNet symbol (*-symbol.json)"


def check_model_path(path) -> str:
    """The path as a string, after checking that it names a non-empty file; raises FrontendError naming it."""
    s = os.fspath(path)
    if not os.path.exists(s):
        raise FrontendError(f"model file not found: {s}")
    if os.path.isdir(s):
        raise FrontendError(f"{s} is a directory, not a model file: pass the path of {SUPPORTED}")
    if os.path.getsize(s) == 0:
        raise FrontendError(f"model file {s} is empty (0 bytes)")
    return s


def detect_format(path) -> str:
    """``"onnx"``, ``"tflite"`` or ``"mxnet"`` for a model file, judged from its first bytes.

    Anything else raises a FrontendError naming the path.
    """
    s = check_model_path(path)
    with open(s, "rb") as f:
        head = f.read(_HEAD_BYTES)
    if head[4:8] == _TFLITE_MAGIC:
        return "tflite"
    if head.lstrip()[:1] == b"{":
        try:
            with open(s, encoding="utf-8") as f:
                graph = json.load(f)
        except ValueError as e:
            raise FrontendError(f"{s} looks like JSON but does not parse: {e}") from None
        if isinstance(graph, dict) and "nodes" in graph:
            return "mxnet"
        raise FrontendError(f"{s} is JSON but not an MXNet symbol (it has no 'nodes' list)")
    if head[0] in _ONNX_FIRST_KEYS:
        return "onnx"
    raise FrontendError(f"cannot tell the format of {s} from its content (first bytes {head[:8]!r}); "
                        f"relayq reads {SUPPORTED}")
