"""Record which node of the source model each binding of an imported ``main`` came from.

TVM's Relax importers keep no node names: the ONNX importer names every binding ``lv<k>`` and the
weights after their initializers (``onnx::`` prefix dropped). The record is rebuilt after the import:

* weights: a parameter is an initializer; the nodes that read it are its source;
* every other binding: the ONNX importer converts the nodes in graph order and each converter emits
  its bindings in one run, so the bindings are cut into runs, one per node, by a scan that checks data
  flow (a binding reads only its node's inputs, weights and earlier bindings of the same run) and the
  Relax ops each ONNX op type is known to emit (:data:`ONNX_EMITS`). Where the scan cannot decide it
  leaves a binding unnamed rather than guess.

Example::

    record = onnx_source_names(model_proto, mod)       # from_onnx attaches it to main
"""
from __future__ import annotations

from ..utils.names import attach

#: ONNX op type -> the Relax ops (without "relax.") its TVM converter emits. Op types not listed may
#: emit anything; listed ones let the scan tell where one node's run ends and the next begins.
ONNX_EMITS = {
    "Conv": {"nn.conv1d", "nn.conv2d", "nn.conv3d", "reshape", "add"},
    "ConvTranspose": {"nn.conv2d_transpose", "reshape", "add"},
    "Gemm": {"permute_dims", "matmul", "multiply", "add"},
    "MatMul": {"matmul"},
    "HardSwish": {"add", "clip", "divide", "multiply"},
    "HardSigmoid": {"add", "clip", "multiply"},
    "Relu": {"nn.relu"}, "Clip": {"clip"}, "Sigmoid": {"sigmoid"}, "Tanh": {"tanh"},
    "Add": {"add"}, "Sub": {"subtract"}, "Mul": {"multiply"}, "Div": {"divide"},
    "MaxPool": {"nn.max_pool2d"}, "AveragePool": {"nn.avg_pool2d"},
    "GlobalAveragePool": {"mean", "nn.adaptive_avg_pool2d"},
    "Flatten": {"reshape", "flatten"}, "Reshape": {"reshape"}, "Concat": {"concat"},
    "Transpose": {"permute_dims"}, "Softmax": {"nn.softmax"},
    "BatchNormalization": {"nn.batch_norm", None},
}

#: ONNX op types whose converter may emit nothing for a data input (an identity, a reshape to the same
#: shape). Every other type listed in :data:`ONNX_EMITS` emits at least one binding when it reads data.
MAY_VANISH = {"Identity", "Dropout", "Reshape", "Flatten", "Cast", "Squeeze", "Unsqueeze", "Transpose"}


def _bindings(func):
    return [b for block in func.body.blocks for b in block.bindings]


def _reads(e) -> list:
    from tvm import relax

    if isinstance(e, relax.Var):
        return [e]
    out = []
    if isinstance(e, relax.Tuple):
        for f in e.fields:
            out += _reads(f)
    elif isinstance(e, relax.Call):
        for a in e.args:
            out += _reads(a)
    elif isinstance(e, relax.TupleGetItem):
        out += _reads(e.tuple_value)
    return out


def _op(e):
    import tvm
    from tvm import relax

    if isinstance(e, relax.Call) and isinstance(e.op, tvm.ir.Op):
        return e.op.name[len("relax."):] if e.op.name.startswith("relax.") else e.op.name
    return None


def _later_item(e) -> bool:
    """A tuple item other than the first (a BatchNormalization's running statistics)."""
    from tvm import relax

    return isinstance(e, relax.TupleGetItem) and int(e.index) > 0


def onnx_source_names(model, mod) -> dict:
    """The source-name record (see :mod:`relayq.utils.names`) of ``mod`` imported from ONNX ``model``.

    >>> # onnx_source_names(model, mod)["vars"]["lv6"] == ["/features/2/HardSwish", "HardSwish", []]
    """
    func = mod["main"]
    graph = model.graph
    init_names = [t.name for t in graph.initializer]
    init_set = set(init_names)
    params = {p.name: p for p in func.params}
    # tensor name -> the Relax vars that hold it (a set: pass-through nodes forward their input's vars)
    holds = {}
    data_inputs = [i.name for i in graph.input if i.name not in init_set]
    n_in = int(func.attrs["num_input"]) if func.attrs is not None and "num_input" in func.attrs else len(data_inputs)
    for name, p in zip(data_inputs, func.params[:n_in]):
        holds[name] = {p}
    param_of = {}
    for name in init_names:
        p = params.get(name.removeprefix("onnx::"))
        if p is not None:
            holds[name] = {p}
            param_of[name] = p
    nodes = list(graph.node)
    record_params = {}
    for node in nodes:
        for t in node.input:
            if t in param_of:
                record_params.setdefault(param_of[t].name, [t, node.name, node.op_type])

    binds = _bindings(func)
    owner = [None] * len(binds)            # binding index -> node index
    runs = {}                              # node index -> list of binding indices
    cur = -1

    def allowed(j, h):
        out = set()
        for t in nodes[j].input:
            out |= h.get(t, set())
        return out

    def fits(j, k, h):
        emits = ONNX_EMITS.get(nodes[j].op_type)
        if emits is not None and _op(binds[k].value) not in emits:
            return False
        ok = allowed(j, h) | {binds[i].var for i in runs.get(j, ())}
        return all(v in ok for v in _reads(binds[k].value))

    def must_emit(j, h):
        node = nodes[j]
        return node.op_type in ONNX_EMITS and node.op_type not in MAY_VANISH and not runs.get(j) \
            and any(h.get(t) - set(param_of.values()) for t in node.input if t in h)

    def close(j, h):
        run = runs.get(j)
        if run:
            # The node's output is its run's last binding, except after a tuple's further items:
            # BatchNormalization's output is item 0 of the tuple, items 1 and 2 (its statistics) follow it.
            out = next((binds[i].var for i in reversed(run) if not _later_item(binds[i].value)), binds[run[-1]].var)
            for t in nodes[j].output:
                h[t] = {out}
        else:                               # Identity, Dropout, shape computations folded away
            passed = set()
            for t in nodes[j].input:
                passed |= h.get(t, set())
            for t in nodes[j].output:
                h.setdefault(t, passed)

    for k in range(len(binds)):
        stay = cur >= 0 and fits(cur, k, holds)
        ahead, nxt = dict(holds), None
        if cur >= 0:
            close(cur, ahead)
        for j in range(cur + 1, len(nodes)):
            if fits(j, k, ahead):
                nxt = j
                break
            if must_emit(j, ahead):
                break              # binding k cannot come from beyond a node that has emitted nothing yet
            close(j, ahead)
        # A binding that reads nothing (a constant) cannot tell nodes apart: it stays where it is.
        if nxt is not None and (not stay or _reads(binds[k].value)):
            holds = ahead
            cur = nxt
        elif not stay:
            # A node's last expression can be emitted late, by the first node that reads it.
            late = next((j for j in sorted(runs, reverse=True) if fits(j, k, holds)), None)
            if late is not None:
                runs[late].append(k)
                owner[k] = late
                for t in nodes[late].output:
                    holds[t] = {binds[k].var}
            continue
        runs.setdefault(cur, []).append(k)
        owner[k] = cur
    variables = {}
    for k, j in enumerate(owner):
        if j is None:
            continue
        inits = [t for t in nodes[j].input if t in param_of and param_of[t] in _reads(binds[k].value)]
        variables[binds[k].var.name] = [nodes[j].name, nodes[j].op_type, inits]
    return {"framework": "ONNX", "vars": variables, "params": record_params}


def with_onnx_source_names(model, mod):
    """``mod`` with the record of :func:`onnx_source_names` attached to ``main`` (best effort)."""
    try:
        return attach(mod, onnx_source_names(model, mod))
    except Exception:  # names are a courtesy: a graph the scan does not understand keeps none
        return mod


def torch_source_names(exported_program, module, mod) -> dict:
    """The source-name record of ``mod`` imported from a ``torch.export`` program: module paths of weights.

    Parameters are placeholders such as ``p_features_0_weight`` for ``features.0.weight``; the module
    path ``features.0`` and its class (``Conv2d``) name the layer that reads it.
    """
    sig = exported_program.graph_signature
    targets = dict(getattr(sig, "inputs_to_parameters", {}))
    targets.update(getattr(sig, "inputs_to_buffers", {}))
    modules = dict(module.named_modules())
    names = {p.name for p in mod["main"].params}
    record_params = {}
    for placeholder, target in targets.items():
        if placeholder not in names:
            continue
        path = target.rsplit(".", 1)[0] if "." in target else ""
        sub = modules.get(path)
        record_params[placeholder] = [target, path, type(sub).__name__ if sub is not None else None]
    return {"framework": "torch", "vars": {}, "params": record_params}
