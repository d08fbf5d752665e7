"""ONNX input: ``from_onnx(model_or_path, shapes=None) -> (IRModule, params)`` on TVM's Relax importer.

TVM imports ``Clip`` as two opaque ``call_tir`` kernels that no quantizer can see through, so relayq
imports a ``Clip`` with constant bounds as a single ``relax.op.clip`` (ReLU6 stays one op), then imports with the initializers as parameters, so that weights come back as a
``params`` dict keyed by initializer name.

Example::

    mod, params = relayq.frontend.from_onnx("mobilenet_v2.onnx", shapes={"input": (1, 3, 224, 224)})
    qmodel = relayq.quantize_model(mod, params, dataset, "kl")
"""
from __future__ import annotations

import contextlib
import copy
import os
import warnings

import numpy as np

from ..errors import FrontendError
from .source_names import with_onnx_source_names


def _load(model_or_path):
    import onnx

    if isinstance(model_or_path, (str, os.PathLike)):
        if not os.path.exists(model_or_path):
            raise FrontendError(f"ONNX file not found: {model_or_path}")
        try:
            return onnx.load(str(model_or_path))
        except Exception as e:  # protobuf raises many kinds of errors on a corrupt file
            raise FrontendError(f"cannot read ONNX file {model_or_path}: {e}") from None
    if isinstance(model_or_path, onnx.ModelProto):
        return copy.deepcopy(model_or_path)
    raise FrontendError(f"expected an onnx.ModelProto or a path, got {type(model_or_path).__name__}")


def _clip_bounds_to_attrs(model) -> None:
    """Move constant Clip bounds from initializer inputs into ``min``/``max`` attributes, in place.

    The result is only fed to TVM's importer (with :class:`_ClipToRelax` installed), never saved.
    """
    from onnx import helper, numpy_helper

    inits = {t.name: t for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type != "Clip" or len(node.input) == 1:
            continue
        bounds = list(node.input[1:]) + [""] * (3 - len(node.input))
        if any(b and b not in inits for b in bounds[:2]):
            continue               # dynamic bounds: TVM's own converter handles them
        values = [float(numpy_helper.to_array(inits[b]).reshape(-1)[0]) if b else None for b in bounds[:2]]
        del node.input[1:]
        for attr, val in zip(("min", "max"), values):
            if val is not None:
                node.attribute.append(helper.make_attribute(attr, val))


class _ClipToRelax:
    """Converter that imports Clip with attribute bounds as ``relax.op.clip`` (one visible op)."""

    @classmethod
    def get_converter(cls, opset):
        return cls._impl

    @staticmethod
    def _impl(bb, inputs, attr, params):
        from tvm import relax

        if len(inputs) > 1 and any(i is not None for i in inputs[1:]):
            raise FrontendError("Clip with dynamic bounds is not supported by relayq's importer")
        lo = float(attr.get("min", -np.inf))
        hi = float(attr.get("max", np.inf))
        return relax.op.clip(inputs[0], lo, hi)


@contextlib.contextmanager
def _relayq_converters():
    """Install relayq's converters into TVM's (pinned, 0.27) ONNX importer for one import."""
    from tvm.relax.frontend.onnx import onnx_frontend

    original = onnx_frontend._get_convert_map

    def patched():
        table = dict(original())
        table["Clip"] = _ClipToRelax
        return table

    onnx_frontend._get_convert_map = patched
    try:
        with warnings.catch_warnings():
            # The importer's checker flags the min/max attributes that relayq itself put on Clip.
            warnings.filterwarnings("ignore", message="Unrecognized attribute: (min|max) for operator Clip")
            yield
    finally:
        onnx_frontend._get_convert_map = original


def from_onnx(model_or_path, shapes: dict | None = None):
    """Import an ONNX model as ``(IRModule, params)``.

    ``shapes`` (input name -> shape) overrides or completes the shapes declared in the model.

    Example::

        mod, params = from_onnx(onnx_model)
        print(mod)                      # main(input, <weights>...)
    """
    from tvm import relax
    from tvm.relax.frontend.onnx import from_onnx as tvm_from_onnx

    model = _load(model_or_path)
    _clip_bounds_to_attrs(model)
    init_names = {t.name for t in model.graph.initializer}
    graph_inputs = [i.name for i in model.graph.input if i.name not in init_names]
    shapes = dict(shapes or {})
    for name in shapes:
        if name not in graph_inputs:
            raise FrontendError(f"shape given for {name!r}, which is not an input of the ONNX model "
                                f"(inputs: {graph_inputs})")
    shape_dict = {}
    for inp in model.graph.input:
        if inp.name in init_names:
            continue
        if inp.name in shapes:
            shape_dict[inp.name] = list(shapes[inp.name])
            continue
        dims = inp.type.tensor_type.shape.dim
        if any(not d.HasField("dim_value") for d in dims):
            raise FrontendError(f"ONNX input {inp.name!r} has a dynamic shape: pass shapes={{{inp.name!r}: (...)}}")
        shape_dict[inp.name] = [d.dim_value for d in dims]
    try:
        with _relayq_converters():
            mod = tvm_from_onnx(model, shape_dict=shape_dict, keep_params_in_input=True)
    except Exception as e:
        raise FrontendError(f"TVM's ONNX importer failed: {e}") from None
    mod = with_onnx_source_names(model, mod)        # the user's node / initializer names, for every message
    mod, detached = relax.frontend.detach_params(mod)
    func = mod["main"]
    values = detached.get("main", [])
    num_input = int(func.attrs["num_input"]) if "num_input" in func.attrs else len(graph_inputs)
    names = [p.name for p in func.params[num_input:]]
    params = {n: v.numpy() for n, v in zip(names, values)}
    return mod, params
