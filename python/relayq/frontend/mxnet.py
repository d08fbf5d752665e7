"""MXNet input without MXNet: ``from_mxnet(symbol, arg_params, aux_params, shapes) -> (IRModule, params)``.

The symbol is MXNet's JSON graph (a ``*-symbol.json`` path, the JSON text, or an ``mxnet.sym.Symbol``),
and the weights come from MXNet's binary ``.params`` format, which :func:`load_params` reads with numpy
alone. Layers are emitted in the same Relax form as the ONNX and PyTorch importers, so that
:func:`relayq.transform.prepare` folds BatchNorm and the annotator finds every layer:

* ``Convolution`` -> ``conv2d`` (NCHW/OIHW), then ``add(conv, reshape(bias, (1, C, 1, 1)))``;
* ``BatchNorm`` -> ``nn.batch_norm(..., training=False)`` + ``TupleGetItem 0`` (moving statistics; with
  ``fix_gamma`` -- MXNet's default -- gamma is 1);
* ``FullyConnected`` -> ``linear(x, W, b)`` (``permute_dims`` + ``matmul`` + ``add``).

Every weight is a parameter of ``main`` named after the MXNet weight (``conv0_weight``,
``bn0_moving_mean`` ...); the data inputs come first and carry the ``num_input`` attribute.

Example::

    mod, params = relayq.frontend.from_mxnet("resnet-symbol.json", "resnet-0000.params",
                                             shapes={"data": (1, 3, 224, 224)})
    qmodel = relayq.quantize_model(mod, params, dataset, "kl")
"""
from __future__ import annotations

import ast
import json
import os
import struct

import numpy as np

from ..errors import FrontendError, ModelError, UnsupportedOpError

# --------------------------------------------------------------------------------------------------
# The .params reader

#: File header of an NDArray list (``mx.nd.save`` / ``save_checkpoint``).
LIST_MAGIC = 0x112
#: Per-array header magics: v1 (int64 shape), v2 (+ storage type), v3 (numpy shape semantics).
_V1, _V2, _V3 = 0xF993FAC8, 0xF993FAC9, 0xF993FACA
#: mshadow type flag -> numpy dtype (12, bfloat16, is widened to float32 by hand).
_DTYPES = {0: np.float32, 1: np.float64, 2: np.float16, 3: np.uint8, 4: np.int32, 5: np.int8, 6: np.int64,
           7: np.bool_, 8: np.int16, 9: np.uint16, 10: np.uint32, 11: np.uint64, 12: "bfloat16"}
_STORAGE = {0: "default", 1: "row_sparse", 2: "csr"}


class _Reader:
    """A bounds-checked little-endian cursor over the bytes of a ``.params`` file."""

    def __init__(self, data: bytes, where: str):
        self.data, self.pos, self.where = data, 0, where

    def take(self, n: int, what: str) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise FrontendError(f"truncated or corrupt MXNet .params file {self.where}: needed {n} bytes for "
                                f"{what} at offset {self.pos}, but the file has {len(self.data)} bytes")
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def unpack(self, fmt: str, what: str):
        vals = struct.unpack("<" + fmt, self.take(struct.calcsize("<" + fmt), what))
        return vals[0] if len(vals) == 1 else vals

    def shape(self, what: str, wide: bool = True) -> tuple | None:
        """A TShape: int32 ndim, then int64 dims (``wide``) or uint32 dims (legacy)."""
        ndim = self.unpack("i", what + " rank")
        if ndim < 0:
            return None                     # unknown shape (numpy semantics)
        if ndim > 32:
            raise FrontendError(f"corrupt MXNet .params file {self.where}: {what} has rank {ndim}")
        dims = self.unpack(f"{ndim}{'q' if wide else 'I'}", what) if ndim else ()
        return tuple(int(d) for d in (dims if isinstance(dims, tuple) else (dims,)))


def _read_array(r: _Reader, index: int):
    what = f"array #{index}"
    magic = r.unpack("I", what + " header")
    if magic in (_V2, _V3):
        stype = r.unpack("i", what + " storage type")
        if stype != 0:
            raise FrontendError(f"MXNet .params file {r.where}: {what} uses {_STORAGE.get(stype, stype)} storage; "
                                "only dense arrays are supported (convert with .tostype('default') before saving)")
        shape = r.shape(what + " shape")
        if shape is None or (magic == _V2 and len(shape) == 0) or any(d < 0 for d in shape):
            return None                     # an empty (never allocated) NDArray
    elif magic == _V1:
        shape = r.shape(what + " shape")
        if not shape:
            return None
    else:                                   # oldest format: the magic is the rank, dims are uint32
        if magic > 32:
            raise FrontendError(f"corrupt MXNet .params file {r.where}: bad header {magic:#x} for {what}")
        shape = tuple(int(d) for d in np.frombuffer(r.take(4 * magic, what + " shape"), "<u4"))
        if not shape:
            return None
    r.unpack("ii", what + " context")       # dev_type, dev_id: always loaded on the host
    flag = r.unpack("i", what + " dtype")
    if flag not in _DTYPES:
        raise FrontendError(f"MXNet .params file {r.where}: {what} has unknown dtype flag {flag}")
    dtype = _DTYPES[flag]
    count = int(np.prod(shape, dtype=np.int64))
    if dtype == "bfloat16":
        raw = np.frombuffer(r.take(2 * count, what + " data"), "<u2")
        return (raw.astype(np.uint32) << 16).view(np.float32).reshape(shape)
    dt = np.dtype(dtype).newbyteorder("<")
    raw = np.frombuffer(r.take(dt.itemsize * count, what + " data"), dt)
    return raw.astype(np.dtype(dtype)).reshape(shape)


def load_params(path) -> dict:
    """Read an MXNet ``.params`` file (``mx.nd.save`` / ``mx.model.save_checkpoint``) into numpy arrays.

    Returns name -> array with the names as stored (``"arg:conv0_weight"``, ``"aux:bn0_moving_mean"`` for a
    checkpoint); a file saved from a list has no names, and its arrays are keyed ``"0"``, ``"1"``, ...

    Example::

        params = load_params("resnet-0000.params")
        params["arg:conv0_weight"].shape        # (64, 3, 7, 7)
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FrontendError(f"MXNet .params file not found: {path}")
    with open(path, "rb") as f:
        data = f.read()
    r = _Reader(data, path)
    header, _reserved = r.unpack("QQ", "file header")
    if header != LIST_MAGIC:
        raise FrontendError(f"{path} is not an MXNet .params file (header {header:#x}, expected {LIST_MAGIC:#x})")
    n = r.unpack("Q", "array count")
    if n > len(data):
        raise FrontendError(f"corrupt MXNet .params file {path}: claims {n} arrays")
    arrays = [_read_array(r, i) for i in range(n)]
    n_names = r.unpack("Q", "name count")
    if n_names not in (0, n):
        raise FrontendError(f"corrupt MXNet .params file {path}: {n} arrays but {n_names} names")
    names = []
    for i in range(n_names):
        length = r.unpack("Q", f"length of name #{i}")
        names.append(r.take(length, f"name #{i}").decode("utf-8", errors="replace"))
    if not names:
        names = [str(i) for i in range(n)]
    return {k: v for k, v in zip(names, arrays) if v is not None}


def _as_numpy(value, name: str) -> np.ndarray:
    if hasattr(value, "asnumpy"):           # mxnet NDArray
        value = value.asnumpy()
    elif hasattr(value, "numpy") and not isinstance(value, np.ndarray):
        value = value.numpy()
    try:
        return np.asarray(value)
    except Exception as e:
        raise FrontendError(f"param {name!r} is not an array ({type(value).__name__}): {e}") from None


def _collect_params(*sources) -> dict:
    """Merge arg/aux params (dicts, ``.params`` paths, or (arg, aux) pairs); drop ``arg:``/``aux:`` prefixes."""
    out = {}
    for src in sources:
        if src is None:
            continue
        if isinstance(src, (tuple, list)):
            out.update(_collect_params(*src))
            continue
        if isinstance(src, (str, os.PathLike)):
            src = load_params(src)
        if not hasattr(src, "items"):
            raise FrontendError(f"MXNet params must be a dict, a .params path or None, got {type(src).__name__}")
        for key, value in src.items():
            name = str(key)
            if name.startswith(("arg:", "aux:")):
                name = name[4:]
            out[name] = _as_numpy(value, name)
    return out


# --------------------------------------------------------------------------------------------------
# The symbol


def _load_symbol(symbol) -> dict:
    where = ""                  # the file, when the symbol came from one: errors name it
    if hasattr(symbol, "tojson"):
        text = symbol.tojson()
    elif isinstance(symbol, dict):
        return symbol
    elif isinstance(symbol, (str, os.PathLike)):
        s = os.fspath(symbol)
        if s.lstrip().startswith("{"):
            text = s
        elif os.path.isfile(s):
            where = f" {s}"
            with open(s) as f:
                text = f.read()
        elif os.path.isdir(s):
            raise FrontendError(f"{s} is a directory, not an MXNet symbol file")
        else:
            raise FrontendError(f"MXNet symbol file not found: {s}")
    else:
        raise FrontendError("expected an MXNet symbol: a JSON path, a JSON string or an mxnet.sym.Symbol, "
                            f"got {type(symbol).__name__}")
    try:
        graph = json.loads(text)
    except ValueError as e:
        raise FrontendError(f"cannot parse the MXNet symbol JSON{where}: {e}") from None
    if not isinstance(graph, dict) or not isinstance(graph.get("nodes"), list) or "heads" not in graph:
        raise FrontendError(f"the MXNet symbol JSON{where} has no 'nodes' / 'heads': not a symbol file")
    return graph


def _attrs(node: dict) -> dict:
    # "attrs" since MXNet 0.12; older files use "attr" or "param".
    return dict(node.get("attrs") or node.get("attr") or node.get("param") or {})


def _value(text):
    """MXNet attribute text -> Python value: ``"(3, 3)"`` -> (3, 3), ``"True"`` -> True, ``"1e-5"`` -> 1e-5."""
    if not isinstance(text, str):
        return text
    t = text.strip()
    low = t.lower()
    if low in ("true", "false"):
        return low == "true"
    if low == "none":
        return None
    try:
        return ast.literal_eval(t)
    except (ValueError, SyntaxError):
        return t


class _Node:
    def __init__(self, index: int, raw: dict):
        self.index = index
        self.op = raw.get("op", "null")
        self.name = raw.get("name", f"node{index}")
        self.attrs = {k: _value(v) for k, v in _attrs(raw).items()}
        self.inputs = [(int(e[0]), int(e[1]) if len(e) > 1 else 0) for e in raw.get("inputs", [])]

    def get(self, key, default=None):
        v = self.attrs.get(key)
        return default if v is None else v

    def flag(self, key, default: bool) -> bool:
        v = self.attrs.get(key)
        if v is None:
            return default
        return bool(int(v)) if isinstance(v, (int, float)) else bool(v)

    def tuple(self, key, default, ndim: int = 2):
        v = self.attrs.get(key)
        if v is None or v == ():
            return tuple(default)
        if isinstance(v, (int, float)):
            return (int(v),) * ndim
        return tuple(int(i) for i in v)

    def where(self) -> str:
        return f"{self.op} node {self.name!r}"


#: op -> indices of inputs that are weights (so a missing one is a missing weight, not an unshaped input)
_WEIGHT_SLOTS = {"Convolution": (1, 2), "FullyConnected": (1, 2), "BatchNorm": (1, 2, 3, 4)}
#: ops whose inputs past the first are labels, unused at inference
_LABEL_OPS = ("SoftmaxOutput", "Softmax")


def _used_inputs(node: _Node) -> list:
    if node.op in _LABEL_OPS:
        return node.inputs[:1]
    if node.op == "BatchNorm":
        return node.inputs[:5]
    return node.inputs


# --------------------------------------------------------------------------------------------------
# Converters: (bb, node, inputs) -> Relax expr. ``inputs`` are Relax exprs of the used inputs.


def _shape(e) -> tuple:
    return tuple(int(s) for s in e.ty.shape.values)


def _conv(bb, node, inputs, ctx):
    from tvm import relax

    kernel = node.tuple("kernel", ())
    if len(kernel) != 2:
        raise FrontendError(f"{node.where()}: only 2-D convolution is supported (kernel {kernel})")
    layout = node.get("layout", "NCHW")
    if layout != "NCHW":
        raise FrontendError(f"{node.where()}: layout {layout} is not supported (NCHW only)")
    x, w = inputs[0], inputs[1]
    num_filter = int(node.get("num_filter", _shape(w)[0]))
    if _shape(w)[0] != num_filter or tuple(_shape(w)[2:]) != kernel:
        raise ModelError(f"{node.where()}: weight {ctx.input_name(node, 1)!r} has shape {_shape(w)}, expected "
                         f"({num_filter}, C/groups, {kernel[0]}, {kernel[1]})")
    y = bb.emit(relax.op.nn.conv2d(x, w, strides=node.tuple("stride", (1, 1)), padding=node.tuple("pad", (0, 0)),
                                   dilation=node.tuple("dilate", (1, 1)), groups=int(node.get("num_group", 1))))
    if not node.flag("no_bias", False):
        b = bb.emit(relax.op.reshape(inputs[2], (1, num_filter, 1, 1)))
        y = bb.emit(relax.op.add(y, b))
    return y


def _batch_norm(bb, node, inputs, ctx):
    from tvm import relax

    x, gamma, beta, mean, var = inputs[:5]
    axis = int(node.get("axis", 1))
    channels = _shape(x)[axis]
    if node.flag("fix_gamma", True):        # MXNet's default: gamma is fixed at 1 whatever was saved
        gamma = relax.const(np.ones(channels, "float32"))
    eps = float(node.get("eps", 1e-3))
    bn = bb.emit(relax.op.nn.batch_norm(x, gamma, beta, mean, var, axis=axis, epsilon=eps, training=False))
    return bb.emit(relax.TupleGetItem(bn, 0))


def _activation(bb, node, inputs, ctx, act_type=None):
    from tvm import relax

    x = inputs[0]
    act = act_type or node.get("act_type", "relu")
    if act == "relu":
        return bb.emit(relax.op.nn.relu(x))
    if act == "sigmoid":
        return bb.emit(relax.op.sigmoid(x))
    if act == "tanh":
        return bb.emit(relax.op.tanh(x))
    if act == "softrelu":
        return bb.emit(relax.op.nn.softplus(x))
    if act == "softsign":
        return bb.emit(relax.op.divide(x, relax.op.add(relax.op.abs(x), relax.const(1.0, "float32"))))
    raise UnsupportedOpError(f"{node.where()}: act_type={act!r} is not supported "
                             "(relu, sigmoid, tanh, softrelu, softsign)")


def _leaky_relu(bb, node, inputs, ctx):
    from tvm import relax

    act = node.get("act_type", "leaky")
    if act != "leaky":
        raise UnsupportedOpError(f"{node.where()}: LeakyReLU act_type={act!r} is not supported (leaky only)")
    return bb.emit(relax.op.nn.leakyrelu(inputs[0], float(node.get("slope", 0.25))))


def _pooling(bb, node, inputs, ctx):
    from tvm import relax

    x = inputs[0]
    pool_type = node.get("pool_type", "max")
    if pool_type not in ("max", "avg"):
        raise UnsupportedOpError(f"{node.where()}: pool_type={pool_type!r} is not supported (max, avg)")
    if node.get("layout", "NCHW") not in ("NCHW",) or len(_shape(x)) != 4:
        raise FrontendError(f"{node.where()}: only 2-D NCHW pooling is supported (input {_shape(x)})")
    if node.flag("global_pool", False):
        if pool_type == "avg":
            return bb.emit(relax.op.nn.adaptive_avg_pool2d(x, (1, 1)))
        h, w = _shape(x)[2:]
        return bb.emit(relax.op.nn.max_pool2d(x, (h, w), (1, 1)))
    kernel = node.tuple("kernel", ())
    if len(kernel) != 2:
        raise FrontendError(f"{node.where()}: only 2-D pooling is supported (kernel {kernel})")
    stride = node.tuple("stride", (1, 1))
    pad = node.tuple("pad", (0, 0))
    convention = node.get("pooling_convention", "valid")
    if convention not in ("valid", "full"):
        raise UnsupportedOpError(f"{node.where()}: pooling_convention={convention!r} is not supported (valid, full)")
    ceil_mode = convention == "full"
    if ceil_mode:
        # "full" is ceil((H + 2p - k) / s) + 1; when every window already fits that is "valid" too, which
        # keeps the op in the form the quantizer knows (avg_pool2d without ceil_mode).
        h, w = _shape(x)[2:]
        ceil_mode = any((d + 2 * p - k) % s for d, p, k, s in zip((h, w), pad, kernel, stride))
    if pool_type == "max":
        return bb.emit(relax.op.nn.max_pool2d(x, kernel, stride, pad, ceil_mode=ceil_mode))
    include_pad = node.flag("count_include_pad", True)
    return bb.emit(relax.op.nn.avg_pool2d(x, kernel, stride, pad, ceil_mode=ceil_mode,
                                          count_include_pad=include_pad))


def _flatten_2d(bb, x):
    from tvm import relax

    shape = _shape(x)
    if len(shape) == 2:
        return x
    return bb.emit(relax.op.reshape(x, (shape[0], int(np.prod(shape[1:], dtype=np.int64)))))


def _fully_connected(bb, node, inputs, ctx):
    from tvm import relax

    x, w = inputs[0], inputs[1]
    if node.flag("flatten", True):
        x = _flatten_2d(bb, x)
    num_hidden = int(node.get("num_hidden", _shape(w)[0]))
    if len(_shape(w)) != 2 or _shape(w)[0] != num_hidden or _shape(w)[1] != _shape(x)[-1]:
        raise ModelError(f"{node.where()}: weight {ctx.input_name(node, 1)!r} has shape {_shape(w)}, expected "
                         f"({num_hidden}, {_shape(x)[-1]})")
    bias = None if node.flag("no_bias", False) else inputs[2]
    return bb.emit(relax.op.linear(x, w, bias))


def _binary(fn_name):
    def convert(bb, node, inputs, ctx):
        from tvm import relax

        return bb.emit(getattr(relax.op, fn_name)(inputs[0], inputs[1]))

    return convert


def _scalar(fn_name, reverse=False):
    def convert(bb, node, inputs, ctx):
        from tvm import relax

        s = relax.const(float(node.get("scalar", 0.0)), "float32")
        a, b = (s, inputs[0]) if reverse else (inputs[0], s)
        return bb.emit(getattr(relax.op, fn_name)(a, b))

    return convert


def _flatten(bb, node, inputs, ctx):
    return _flatten_2d(bb, inputs[0])


def _concat(bb, node, inputs, ctx):
    from tvm import relax

    dim = int(node.get("dim", 1))
    return bb.emit(relax.op.concat(list(inputs), axis=dim))


def _softmax(bb, node, inputs, ctx):
    from tvm import relax

    x = inputs[0]
    t = node.get("temperature")
    if t is not None and float(t) != 1.0:
        x = bb.emit(relax.op.divide(x, relax.const(float(t), "float32")))
    return bb.emit(relax.op.nn.softmax(x, axis=int(node.get("axis", -1))))


def _softmax_output(bb, node, inputs, ctx):
    """SoftmaxOutput at inference: a softmax over the last axis (MXNet flattens to 2-D keeping the last
    axis, so for the usual (N, classes) input that is axis 1), or over axis 1 with ``multi_output``."""
    from tvm import relax

    axis = 1 if node.flag("multi_output", False) else -1
    return bb.emit(relax.op.nn.softmax(inputs[0], axis=axis))


def _softmax_activation(bb, node, inputs, ctx):
    """SoftmaxActivation: over axis 1 in ``channel`` mode, else per instance (the last axis, as MXNet's 2-D view)."""
    from tvm import relax

    axis = 1 if node.get("mode", "instance") == "channel" else -1
    return bb.emit(relax.op.nn.softmax(inputs[0], axis=axis))


def _clip(bb, node, inputs, ctx):
    from tvm import relax

    lo, hi = node.get("a_min"), node.get("a_max")
    if lo is None or hi is None:
        raise FrontendError(f"{node.where()}: clip needs a_min and a_max")
    return bb.emit(relax.op.clip(inputs[0], float(lo), float(hi)))


def _identity(bb, node, inputs, ctx):
    return inputs[0]


_CONVERTERS = {
    "Convolution": _conv,
    "BatchNorm": _batch_norm,
    "Activation": _activation,
    "relu": lambda bb, n, i, c: _activation(bb, n, i, c, "relu"),
    "sigmoid": lambda bb, n, i, c: _activation(bb, n, i, c, "sigmoid"),
    "tanh": lambda bb, n, i, c: _activation(bb, n, i, c, "tanh"),
    "LeakyReLU": _leaky_relu,
    "Pooling": _pooling,
    "FullyConnected": _fully_connected,
    "elemwise_add": _binary("add"), "_Plus": _binary("add"), "_plus": _binary("add"),
    "broadcast_add": _binary("add"), "broadcast_plus": _binary("add"), "_add": _binary("add"),
    "elemwise_sub": _binary("subtract"), "_Minus": _binary("subtract"), "_minus": _binary("subtract"),
    "broadcast_sub": _binary("subtract"), "broadcast_minus": _binary("subtract"), "_sub": _binary("subtract"),
    "elemwise_mul": _binary("multiply"), "_Mul": _binary("multiply"), "_mul": _binary("multiply"),
    "broadcast_mul": _binary("multiply"),
    "_plus_scalar": _scalar("add"), "_minus_scalar": _scalar("subtract"), "_rminus_scalar": _scalar("subtract", True),
    "_mul_scalar": _scalar("multiply"), "_div_scalar": _scalar("divide"),
    "Flatten": _flatten, "flatten": _flatten,
    "Concat": _concat, "concat": _concat,
    "softmax": _softmax,
    "SoftmaxOutput": _softmax_output, "Softmax": _softmax_output,
    "SoftmaxActivation": _softmax_activation,
    "Dropout": _identity, "_copy": _identity, "identity": _identity, "BlockGrad": _identity,
    "stop_gradient": _identity,
    "clip": _clip,
}

#: The MXNet ops :func:`from_mxnet` imports.
SUPPORTED_OPS = tuple(sorted(_CONVERTERS))


class _Context:
    def __init__(self, nodes):
        self.nodes = nodes

    def input_name(self, node: _Node, slot: int) -> str:
        return self.nodes[node.inputs[slot][0]].name


def from_mxnet(symbol, arg_params=None, aux_params=None, shapes: dict | None = None):
    """Import an MXNet model as ``(IRModule, params)`` without importing MXNet.

    Args:
        symbol: a ``*-symbol.json`` path, the JSON text, or an ``mxnet.sym.Symbol`` (anything with ``tojson()``).
        arg_params / aux_params: dicts name -> numpy array or mxnet NDArray, or ``.params`` paths. A single
            checkpoint file (``arg:``/``aux:`` entries, as ``mx.model.save_checkpoint`` writes) may be passed as
            ``arg_params`` alone.
        shapes: input name -> shape for every data input (MXNet symbols carry no input shapes).

    Returns ``(mod, params)``: ``main(data..., weights...)`` and the float32 weights by parameter name.

    Example::

        mod, params = from_mxnet("model-symbol.json", "model-0000.params", shapes={"data": (8, 3, 32, 32)})
        lib = relayq.build(mod, params=params)
    """
    from tvm import relax

    graph = _load_symbol(symbol)
    nodes = [_Node(i, raw) for i, raw in enumerate(graph["nodes"])]
    heads = [(int(h[0]), int(h[1]) if len(h) > 1 else 0) for h in graph["heads"]]
    params = _collect_params(arg_params, aux_params)
    shapes = {str(k): tuple(int(d) for d in v) for k, v in dict(shapes or {}).items()}
    names = {n.name for n in nodes if n.op == "null"}
    unknown = sorted(set(shapes) - names)
    if unknown:
        raise FrontendError(f"shape given for {unknown}, not an input of the MXNet symbol "
                            f"(variables: {sorted(names - set(params))})")

    # Walk back from the heads to find the nodes inference needs (labels of SoftmaxOutput are not).
    needed = set()
    stack = [h for h, _ in heads]
    while stack:
        i = stack.pop()
        if i in needed:
            continue
        if not 0 <= i < len(nodes):
            raise FrontendError(f"the MXNet symbol refers to node #{i}, but it has {len(nodes)} nodes")
        needed.add(i)
        stack.extend(src for src, _ in _used_inputs(nodes[i]))
    for i in sorted(needed):
        node = nodes[i]
        if node.op != "null" and node.op not in _CONVERTERS:
            raise UnsupportedOpError(f"MXNet op {node.op!r} (node {node.name!r}) is not supported by relayq's "
                                     f"MXNet importer; supported ops: {', '.join(SUPPORTED_OPS)}")

    # Classify the variables by their uses: a weight slot that params do not fill is a missing weight.
    uses = {}               # variable index -> [(consumer node, input slot)]
    for i in sorted(needed):
        node = nodes[i]
        if node.op != "null":
            for slot, (src, _) in enumerate(_used_inputs(node)):
                uses.setdefault(src, []).append((node, slot))
    data_vars, weight_vars, env = [], [], {}
    for i in sorted(needed):
        node = nodes[i]
        if node.op != "null":
            continue
        node_uses = uses.get(i, [])
        if node_uses and all(u.op == "BatchNorm" and s == 1 and u.flag("fix_gamma", True) for u, s in node_uses):
            env[(i, 0)] = None              # a fixed gamma: BatchNorm uses ones, whatever was saved
            continue
        if node.name in params:
            arr = params[node.name]
            var = relax.Var(node.name, relax.TensorType(tuple(int(d) for d in arr.shape), "float32"))
            weight_vars.append(var)
        elif node.name in shapes:
            var = relax.Var(node.name, relax.TensorType(shapes[node.name], "float32"))
            data_vars.append(var)
        else:
            weight_use = [u for u, s in node_uses if s in _WEIGHT_SLOTS.get(u.op, ())]
            if weight_use:
                raise ModelError(f"weight {node.name!r} of {weight_use[0].where()} is missing from params "
                                 f"({len(params)} params given)")
            raise FrontendError(f"no shape for the MXNet input {node.name!r}: pass shapes={{{node.name!r}: (...)}}")
        env[(i, 0)] = var

    ctx = _Context(nodes)
    bb = relax.BlockBuilder()
    fparams = data_vars + weight_vars
    with bb.function("main", fparams, attrs={"num_input": len(data_vars)}):
        with bb.dataflow():
            for i in sorted(needed):
                node = nodes[i]
                if node.op == "null":
                    continue
                args = []
                for src, idx in _used_inputs(node):
                    if (src, idx) not in env:
                        raise FrontendError(f"{node.where()} uses output {idx} of {nodes[src].where()}, "
                                            "which relayq does not import (only output 0 is)")
                    args.append(env[(src, idx)])
                try:
                    out = _CONVERTERS[node.op](bb, node, args, ctx)
                except (FrontendError, ModelError):
                    raise
                except Exception as e:  # TVM's shape / type checks
                    msg = str(e).strip().splitlines()
                    raise FrontendError(f"cannot import {node.where()}: {msg[-1] if msg else type(e).__name__}") \
                        from None
                env[(i, 0)] = out
            outs = []
            for h, idx in heads:
                if (h, idx) not in env or env[(h, idx)] is None:
                    raise FrontendError(f"the symbol's output {idx} of {nodes[h].where()} is not importable")
                outs.append(env[(h, idx)])
            result = outs[0] if len(outs) == 1 else relax.Tuple(outs)
            out = bb.emit_output(result)
        bb.emit_func_output(out)
    # Drop the ``gv = lv`` alias of the output, as the other importers' modules have none.
    mod = relax.transform.CanonicalizeBindings()(bb.get())
    used = {v.name for v in weight_vars}
    out_params = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in params.items() if k in used}
    return mod, out_params


__all__ = ["from_mxnet", "load_params", "SUPPORTED_OPS"]
