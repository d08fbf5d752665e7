"""ONNX input: ``from_onnx(model_or_path, shapes=None) -> (IRModule, params)`` on TVM's Relax importer.

One pipeline, one step per function:

1. **load** the file (or copy the ``ModelProto``); a missing, empty or corrupt file names its path;
2. **normalize** what exporters write, with the static input shapes: initializers listed as graph inputs
   (``keep_initializers_as_inputs=True``) become plain initializers, then `onnxslim`_ turns ``Constant``
   nodes into initializers, folds shape-computing subgraphs (``Shape -> Gather -> Concat`` ...) so that
   Pad, Reshape, Expand, Slice, Resize and Clip get constant arguments, and drops Identity / Dropout;
   the user's node names and initializer names are kept (graph fusion, common-subexpression elimination
   and weight tying are off, since they rename nodes or merge weights);
3. **check ops**: every op type that neither TVM's importer nor relayq can convert is named, with its
   count, in one :class:`~relayq.errors.UnsupportedOpError`;
4. **import** with TVM's importer plus relayq's converters (:mod:`relayq.frontend.onnx_ops`): TVM
   imports ``Clip`` and constant ``Pad`` as opaque ``call_tir`` kernels that no quantizer can see
   through, so relayq imports them as ``relax.op.clip`` (ReLU6 stays one op) and ``relax.op.nn.pad``;
   ``LSTM`` and ``GRU``, which TVM lacks, are unrolled over time into matmul / sigmoid / tanh;
5. **detach params**: the weights come back as a ``params`` dict keyed by ONNX initializer name.

Folding evaluates the constant subgraphs with ONNX Runtime when it is installed (``pip install
onnxruntime``); without it, Constant nodes, Identity and Dropout are still normalized, but a shape
computation that TVM's importer cannot follow raises a FrontendError that says so.

.. _onnxslim: https://pypi.org/project/onnxslim/

Example::

    mod, params = relayq.frontend.from_onnx("mobilenet_v2.onnx", shapes={"input": (1, 3, 224, 224)})
    qmodel = relayq.quantize_model(mod, params, dataset, "kl")
"""
from __future__ import annotations

import collections
import contextlib
import copy
import io
import logging
import os
import warnings

import numpy as np

from ..errors import FrontendError, UnsupportedOpError
from .detect import check_model_path
from .onnx_ops import CONVERTERS
from .source_names import with_onnx_source_names

#: onnxslim passes that stay off: fusion and CSE rename or merge the user's nodes, weight tying merges
#: equal initializers (and so drops names that params are keyed by).
_SLIM_SKIPPED = ["graph_fusion", "subexpression_elimination", "weight_tying"]
#: Ops that TVM's importer handles outside its converter table.
_DIRECT_OPS = {"Constant", "If"}
#: onnxslim's symbolic shape inference gives up (returns None) below this opset; older models are
#: normalized without it.
_SLIM_MIN_SHAPE_INFER_OPSET = 7
#: Node names listed per unsupported op type before "...".
_NAMES_SHOWN = 3


def _load(model_or_path):
    """``(ModelProto, where)``: a private copy of the model, and how messages name it."""
    import onnx

    if isinstance(model_or_path, onnx.ModelProto):
        model, where = copy.deepcopy(model_or_path), f"ONNX model {model_or_path.graph.name or '(unnamed graph)'!r}"
    elif isinstance(model_or_path, (str, os.PathLike)):
        path = check_model_path(model_or_path)
        where = f"ONNX file {path}"
        try:
            model = onnx.load(path)
        except Exception as e:  # protobuf raises many kinds of errors on a corrupt file
            raise FrontendError(f"cannot read {where}: not a valid ONNX protobuf ({e})") from None
    else:
        raise FrontendError(f"expected an onnx.ModelProto or a path, got {type(model_or_path).__name__}")
    # Random bytes can parse as a protobuf with unknown fields only: a model has a version and a graph.
    if model.ir_version <= 0 or not model.HasField("graph"):
        raise FrontendError(f"{where} is not an ONNX model: it has no IR version or no graph")
    return model, where


def _input_shapes(model, shapes, where) -> dict:
    """Static shape of every data input: ``shapes`` first, then the shapes declared in the model."""
    init_names = {t.name for t in model.graph.initializer}
    graph_inputs = [i for i in model.graph.input if i.name not in init_names]
    names = [i.name for i in graph_inputs]
    shapes = dict(shapes or {})
    for name in shapes:
        if name not in names:
            raise FrontendError(f"shape given for {name!r}, which is not an input of {where} (inputs: {names})")
    shape_dict = {}
    for inp in graph_inputs:
        dims = inp.type.tensor_type.shape.dim
        if inp.name in shapes:
            try:
                shape = [int(d) for d in shapes[inp.name]]
            except (TypeError, ValueError):
                raise FrontendError(f"shapes[{inp.name!r}] must be a sequence of ints, got {shapes[inp.name]!r}") from None
            if dims and len(dims) != len(shape):
                raise FrontendError(f"shapes[{inp.name!r}] = {tuple(shape)} has rank {len(shape)}, but input "
                                    f"{inp.name!r} of {where} has rank {len(dims)}")
            shape_dict[inp.name] = shape
            continue
        if any(not d.HasField("dim_value") for d in dims):
            declared = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in dims]
            raise FrontendError(f"input {inp.name!r} of {where} has a dynamic shape {declared}: pass "
                                f"shapes={{{inp.name!r}: (...)}}")
        shape_dict[inp.name] = [d.dim_value for d in dims]
    return shape_dict


def _normalize(model, shape_dict: dict, where):
    """The model as TVM's importer wants it: static input shapes, constants folded, no no-op nodes."""
    init_names = {t.name for t in model.graph.initializer}
    # keep_initializers_as_inputs=True lists every weight as a graph input too; to TVM that is a second
    # parameter of the same name.
    data_inputs = [i for i in model.graph.input if i.name not in init_names]
    del model.graph.input[:]
    model.graph.input.extend(data_inputs)
    for inp in model.graph.input:
        dims = inp.type.tensor_type.shape.dim
        del dims[:]
        for d in shape_dict[inp.name]:
            dims.add().dim_value = int(d)
    # A value_info of the old (dynamic) shapes would contradict the static ones: let inference redo them.
    del model.graph.value_info[:]
    try:
        import onnxslim
    except ImportError:  # pragma: no cover - onnxslim is a core dependency
        warnings.warn("relayq: onnxslim is not installed; ONNX models are imported without normalization")
        return model
    # onnxslim sets its logger's level for the call (a subgraph it cannot evaluate is logged, then left
    # as it is): give the user's level back afterwards.
    log = logging.getLogger("onnxslim")
    level = log.level
    try:
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            slim = onnxslim.slim(model, skip_optimizations=_SLIM_SKIPPED,
                                 no_shape_infer=_opset(model) < _SLIM_MIN_SHAPE_INFER_OPSET)
    except Exception as e:  # a model onnxslim cannot handle may still import: TVM's importer decides
        warnings.warn(f"relayq: onnxslim could not normalize {where} ({type(e).__name__}: {e}); importing it as is")
        return model
    finally:
        log.setLevel(level)
    return slim if slim is not None else model


def _opset(model) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)


def _convert_map() -> dict:
    from tvm.relax.frontend.onnx import onnx_frontend

    return {**onnx_frontend._get_convert_map(), **_RELAYQ_CONVERTERS}


def _check_ops(model, where) -> None:
    """Raise one UnsupportedOpError naming every op type that cannot be imported, with counts and nodes."""
    known = set(_convert_map()) | _DIRECT_OPS
    missing = collections.defaultdict(list)
    for i, node in enumerate(model.graph.node):
        if node.op_type not in known or node.domain not in ("", "ai.onnx"):
            key = node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}.{node.op_type}"
            missing[key].append(node.name or f"#{i}")
    if not missing:
        return
    parts = []
    for op, nodes in sorted(missing.items()):
        shown = ", ".join(repr(n) for n in nodes[:_NAMES_SHOWN]) + (", ..." if len(nodes) > _NAMES_SHOWN else "")
        parts.append(f"{op} x{len(nodes)} ({shown})")
    total = sum(len(v) for v in missing.values())
    raise UnsupportedOpError(f"{where} uses {len(missing)} op type(s) that relayq cannot import "
                             f"({total} node(s)): {'; '.join(parts)}")


def _clip_bounds_to_attrs(model) -> None:
    """Move constant Clip bounds from initializer inputs into ``min``/``max`` attributes, in place.

    The result is only fed to TVM's importer (with relayq's Clip converter installed), never saved.
    """
    from onnx import helper, numpy_helper

    inits = {t.name: t for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type != "Clip" or len(node.input) == 1:
            continue
        bounds = list(node.input[1:]) + [""] * (3 - len(node.input))
        if any(b and b not in inits for b in bounds[:2]):
            continue               # computed bounds: the Clip converter names the node
        values = [float(numpy_helper.to_array(inits[b]).reshape(-1)[0]) if b else None for b in bounds[:2]]
        del node.input[1:]
        for attr, val in zip(("min", "max"), values):
            if val is not None:
                node.attribute.append(helper.make_attribute(attr, val))


#: relayq's converters, installed over TVM's for one import: op type -> converter class.
_RELAYQ_CONVERTERS = CONVERTERS


class _NodeFailure(Exception):
    """A converter failed: carries the ONNX op type and node name up through TVM's importer."""

    def __init__(self, op, node, error):
        super().__init__(f"{op} {node}")
        self.op, self.node, self.error = op, node, error


def _named(op_type, converter):
    """Wrap a converter class so that a failure names the ONNX node being converted."""

    class Named:
        @classmethod
        def get_converter(cls, opset):
            def run(bb, inputs, attr, params):
                try:
                    return converter.get_converter(opset)(bb, inputs, attr, params)
                except Exception as e:
                    raise _NodeFailure(op_type, attr.get("tvm_custom", {}).get("name", ""), e) from None

            return run

    return Named


@contextlib.contextmanager
def _relayq_converters():
    """Install relayq's converters (and node-naming wrappers) into TVM's ONNX importer for one import."""
    from tvm.relax.frontend.onnx import onnx_frontend

    original = onnx_frontend._get_convert_map
    table = {op: _named(op, conv) for op, conv in {**original(), **_RELAYQ_CONVERTERS}.items()}
    onnx_frontend._get_convert_map = lambda: table
    try:
        with warnings.catch_warnings():
            # The importer's checker flags the min/max attributes that relayq itself put on Clip.
            warnings.filterwarnings("ignore", message="Unrecognized attribute: (min|max) for operator Clip")
            yield
    finally:
        onnx_frontend._get_convert_map = original


def _import(model, shape_dict: dict, where):
    """TVM's importer with relayq's converters; a failure names the ONNX node where it happened."""
    from tvm.relax.frontend.onnx import from_onnx as tvm_from_onnx

    _clip_bounds_to_attrs(model)
    try:
        # The importer prints the inputs of a failing converter: the error below says it better.
        with _relayq_converters(), contextlib.redirect_stdout(io.StringIO()):
            return tvm_from_onnx(model, shape_dict=shape_dict, keep_params_in_input=True)
    except _NodeFailure as f:
        msg = f"cannot import node {f.node!r} ({f.op}) of {where}: {_first_line(f.error)}"
        if isinstance(f.error, NotImplementedError):        # TVM's OpNotImplemented is one too
            raise UnsupportedOpError(msg) from None
    except Exception as e:
        msg = f"TVM's ONNX importer failed on {where}: {_first_line(e)}"
    if not _has_onnxruntime():
        msg += (" (relayq folds shape computations with onnxslim, which evaluates them with onnxruntime: "
                "`pip install onnxruntime` may let this model import)")
    raise FrontendError(msg)


def _has_onnxruntime() -> bool:
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def _first_line(e) -> str:
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0] if not text.startswith("Traceback") else text.splitlines()[-1]


def _detach_params(mod):
    """``(mod, params)``: ``main(inputs..., weights...)`` and the weights keyed by initializer name.

    Weights that no binding reads are dropped from both: after folding, initializers such as a
    Reshape's target shape (``/Concat_3_output_0``) or Pad's pads are read at import time only (the
    importer turns them into attributes). Graph inputs are always kept, used or not (they are the
    calling convention).
    """
    from tvm import relax

    mod, detached = relax.frontend.detach_params(mod)
    func = mod["main"]
    num_input = int(func.attrs["num_input"]) if func.attrs is not None and "num_input" in func.attrs else 0
    weights = list(zip(func.params[num_input:], detached.get("main", [])))
    used = set(relax.analysis.free_vars(func.body))
    kept = [(var, value) for var, value in weights if var in used]
    if len(kept) < len(weights):
        func = relax.Function(list(func.params[:num_input]) + [var for var, _ in kept], func.body,
                              func.ret_ty, func.is_pure, func.attrs, func.span)
        mod["main"] = func          # detach_params returned a module of our own
    params = {var.name: value.numpy() for var, value in kept}
    return mod, params


def from_onnx(model_or_path, shapes: dict | None = None):
    """Import an ONNX model (a path or an ``onnx.ModelProto``) as ``(IRModule, params)``.

    ``shapes`` (input name -> shape) overrides or completes the shapes declared in the model. The
    file's format is checked from its content, so the file may have any name.

    Example::

        mod, params = from_onnx("model.onnx", shapes={"input": (8, 3, 224, 224)})
        print(mod)                      # main(input, <weights>...)
        params["conv1.weight"].shape    # keyed by ONNX initializer name
    """
    model, where = _load(model_or_path)
    shape_dict = _input_shapes(model, shapes, where)
    model = _normalize(model, shape_dict, where)
    _check_ops(model, where)
    mod = _import(model, shape_dict, where)
    mod = with_onnx_source_names(model, mod)        # the user's node / initializer names, for every message
    return _detach_params(mod)
