"""TFLite input: ``from_tflite(path_or_bytes, shapes=None) -> (IRModule, params)`` on TVM's Relax importer.

TVM's importer (``tvm.relax.frontend.tflite``) reads the flatbuffer through the ``tflite`` package (the
generated schema, pure Python: ``pip install relayq[tflite]``). relayq imports **float32** models:

1. **load** the bytes (a path or the bytes themselves); a missing or non-TFLite file names its path;
2. **check ops**: every operator TVM's importer lacks is named, with its count, in one
   :class:`~relayq.errors.UnsupportedOpError`;
3. **import**: the graph keeps TFLite's NHWC layout at its inputs and outputs (the calling convention);
   the weights are constants in the module, so ``params`` is empty;
4. **NCHW**: ``relayq.transform``'s quantizer wants NCHW / OIHW convolutions, so every conv2d is
   converted with ``relax.transform.ConvertLayout`` and the transposes between consecutive convs
   cancel out; only the model's edges keep one ``permute_dims`` each.

Example::

    mod, params = relayq.frontend.from_tflite("mobilenet_v2.tflite")
    qmodel = relayq.quantize_model("mobilenet_v2.tflite", dataset=calib_batches_nhwc)
"""
from __future__ import annotations

import collections
import os

from ..errors import FrontendError, UnsupportedOpError
from .detect import check_model_path

#: The pinned schema package (pyproject.toml's ``tflite`` extra).
TFLITE_PACKAGE = "tflite==2.18.0"
#: TFLite flatbuffers carry their file identifier at offset 4.
_MAGIC = b"TFL3"
#: TFLite TensorType -> numpy dtype name, for the input check.
_FLOAT32 = 0
#: Node names listed per unsupported op type before "...".
_NAMES_SHOWN = 3
#: Layouts ConvertLayout gives the convs: what relayq's annotate quantizes.
_NCHW_LAYOUTS = {"relax.nn.conv2d": ["NCHW", "OIHW"]}


def _import_tflite():
    try:
        import tflite  # noqa: F401
    except ImportError:
        raise FrontendError(f"reading TFLite models needs the 'tflite' package (the flatbuffer schema): "
                            f"pip install 'relayq[tflite]' (or pip install {TFLITE_PACKAGE})") from None
    return tflite


def _load(path_or_bytes):
    """``(bytes, where)``."""
    if isinstance(path_or_bytes, (bytes, bytearray, memoryview)):
        data, where = bytes(path_or_bytes), "TFLite model (bytes)"
    elif isinstance(path_or_bytes, (str, os.PathLike)):
        path = check_model_path(path_or_bytes)
        with open(path, "rb") as f:
            data = f.read()
        where = f"TFLite file {path}"
    else:
        raise FrontendError(f"expected a .tflite path or its bytes, got {type(path_or_bytes).__name__}")
    if len(data) < 8 or data[4:8] != _MAGIC:
        raise FrontendError(f"{where} is not a TFLite flatbuffer (no 'TFL3' identifier at byte 4)")
    return data, where


def _parse(data, where):
    tflite = _import_tflite()
    try:
        model = tflite.Model.GetRootAs(data, 0)
        if model.SubgraphsLength() < 1:
            raise ValueError("it has no subgraph")
        model.Subgraphs(0).TensorsLength()
    except Exception as e:  # a truncated flatbuffer fails in struct unpacking / index errors
        raise FrontendError(f"cannot read {where}: corrupt TFLite flatbuffer ({type(e).__name__}: {e})") from None
    return model


def _check_inputs(model, where) -> None:
    sub = model.Subgraphs(0)
    for i in sub.InputsAsNumpy():
        t = sub.Tensors(int(i))
        if t.Type() != _FLOAT32:
            raise FrontendError(f"input {t.Name().decode()!r} of {where} is not float32 (TFLite type "
                                f"{t.Type()}): relayq imports float32 TFLite models and quantizes them itself")


def _check_ops(model, where) -> None:
    from tvm import relax
    from tvm.relax.frontend.tflite import tflite_frontend as tf

    sub = model.Subgraphs(0)
    conv = tf.OperatorConverter(model, sub, tf.ExprTable(), relax.BlockBuilder())
    missing = collections.defaultdict(list)
    for k in range(sub.OperatorsLength()):
        op = sub.Operators(k)
        code = conv.get_op_code_str(op)
        if code not in conv.convert_map:
            outs = op.OutputsAsNumpy()
            name = sub.Tensors(int(outs[0])).Name().decode() if len(outs) else f"#{k}"
            missing[code].append(name)
    if missing:
        parts = []
        for code, names in sorted(missing.items()):
            shown = ", ".join(repr(n) for n in names[:_NAMES_SHOWN]) + (", ..." if len(names) > _NAMES_SHOWN else "")
            parts.append(f"{code} x{len(names)} ({shown})")
        total = sum(len(v) for v in missing.values())
        raise UnsupportedOpError(f"{where} uses {len(missing)} op type(s) that relayq cannot import "
                                 f"({total} node(s)): {'; '.join(parts)}")


def _input_shapes(model, shapes, where) -> dict | None:
    if not shapes:
        return None
    sub = model.Subgraphs(0)
    names = [sub.Tensors(int(i)).Name().decode() for i in sub.InputsAsNumpy()]
    for name in shapes:
        if name not in names:
            raise FrontendError(f"shape given for {name!r}, which is not an input of {where} (inputs: {names})")
    return {k: tuple(int(d) for d in v) for k, v in shapes.items()}


def _bias_to_rank4(mod):
    """``add(x, const[C])`` with a 4-D ``x`` -> ``add(x, const[1, 1, 1, C])``.

    TFLite's importer adds conv biases as 1-D constants; ConvertLayout cannot give a 1-D operand a
    layout, so it would keep the bias add (and the ReLU after it) in NHWC between two transposes.
    As a rank-4 constant it is converted (and folded) with the conv.
    """
    import tvm
    from tvm import relax
    from tvm.relax.dpl import is_const, is_op, rewrite_call, wildcard

    x, b = wildcard(), is_const()
    pat = is_op("relax.add")(x, b)

    def rewrite(expr, m):
        xv, bv = m[x], m[b]
        if len(bv.ty.shape.values) != 1 or xv.ty.ndim != 4:
            return expr
        return relax.op.add(xv, relax.const(bv.value.numpy().reshape(1, 1, 1, -1)))

    funcs = {gv: rewrite_call(pat, rewrite, f) if isinstance(f, relax.Function) else f
             for gv, f in mod.functions_items()}
    return tvm.IRModule(funcs, attrs=mod.attrs)


def to_nchw(mod):
    """Convert every NHWC conv2d to NCHW / OIHW and cancel the transposes between them.

    The inputs and outputs keep their layout; each conv chain gets one ``permute_dims`` in and one out
    (elementwise ops, pools and reshapes in between are converted too, where TVM knows how).
    """
    from tvm import relax

    mod = relax.transform.ConvertLayout(_NCHW_LAYOUTS)(_bias_to_rank4(mod))
    # The weights' permute_dims fold into the constants.
    mod = relax.transform.FoldConstant()(mod)
    mod = _clip_through_transposes(mod)
    mod = relax.transform.DeadCodeElimination()(mod)
    return mod


def _clip_through_transposes(mod):
    """``permute_dims(clip(permute_dims(x, p)), q)`` with ``q`` undoing ``p`` -> ``clip(x)``.

    ConvertLayout leaves ``clip`` (TFLite's fused ReLU6) in the old layout between two transposes;
    clip is elementwise, so it commutes with them, and without them the quantizer sees conv -> clip.
    """
    import tvm
    from tvm import relax
    from tvm.relax.dpl import is_op, rewrite_call, wildcard

    x = wildcard()
    inner = is_op("relax.permute_dims")(x)
    clip = is_op("relax.clip")(inner, wildcard(), wildcard())
    outer = is_op("relax.permute_dims")(clip)

    def rewrite(expr, m):
        p, q = m[inner].attrs.axes, m[outer].attrs.axes
        if p is None or q is None:
            return expr
        p, q = [int(a) for a in p], [int(a) for a in q]
        if [p[i] for i in q] != list(range(len(p))):
            return expr
        c = m[clip]
        return relax.op.clip(m[x], c.args[1], c.args[2])

    funcs = {gv: rewrite_call(outer, rewrite, f) if isinstance(f, relax.Function) else f
             for gv, f in mod.functions_items()}
    return tvm.IRModule(funcs, attrs=mod.attrs)


def from_tflite(path_or_bytes, shapes: dict | None = None, layout: str = "NCHW"):
    """Import a float32 TFLite model (a ``.tflite`` path or its bytes) as ``(IRModule, params)``.

    ``shapes`` (input name -> shape) overrides the shapes stored in the model. ``layout="NCHW"`` (the
    default) converts the convolutions to NCHW so that relayq can quantize them; ``"NHWC"`` keeps
    TFLite's layout throughout. Either way the model's inputs and outputs stay NHWC. The weights are
    constants inside the module; ``params`` is ``{}``.

    Example::

        mod, params = from_tflite("model.tflite")
        lib = relayq.build(mod, params=params)
        y = lib(x_nhwc)
    """
    if layout not in ("NCHW", "NHWC"):
        raise FrontendError(f"layout must be 'NCHW' or 'NHWC', got {layout!r}")
    data, where = _load(path_or_bytes)
    model = _parse(data, where)
    _check_inputs(model, where)
    _check_ops(model, where)
    shape_dict = _input_shapes(model, shapes, where)
    from tvm.relax.frontend.tflite import from_tflite as tvm_from_tflite

    try:
        mod = tvm_from_tflite(model, shape_dict=shape_dict)
    except NotImplementedError as e:       # TVM's OpNotImplemented (an unsupported variant of an op)
        raise UnsupportedOpError(f"cannot import {where}: {_first_line(e)}") from None
    except Exception as e:
        raise FrontendError(f"TVM's TFLite importer failed on {where}: {_first_line(e)}") from None
    func = mod["main"]
    # The importer also lists every weight in a "params" attribute although they are inline constants.
    if func.attrs is not None and "params" in func.attrs:
        mod["main"] = func.without_attr("params")
    if layout == "NCHW":
        mod = to_nchw(mod)
    return mod, {}


def _first_line(e) -> str:
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0] if not text.startswith("Traceback") else text.splitlines()[-1]
