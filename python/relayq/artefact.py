"""The portable quantized artefact: a realized integer model with its weights bit-packed at their width.

A compiled library (``CompiledModel.export``) holds every weight as a full byte, laid out for the
kernels. :func:`save` writes the realized integer model itself instead: the graph (TVM JSON, weights
lifted out) and each weight's codes packed to exactly ``bits`` bits (:func:`relayq.qmath.pack_codes`),
so 4-bit weights take half the bytes of int8 and 2-bit ones a quarter. :func:`load` unpacks and binds
them back, giving a :class:`~relayq.api.QuantizedModel` that :func:`relayq.build` compiles to the same
integers as the original.

Example::

    report = relayq.artefact.save(qmodel, "mobilenet_w4a8.rqz")
    print(report)                        # bytes: packed weights, the same at int8, at fp32, file size
    lib = relayq.build(relayq.artefact.load("mobilenet_w4a8.rqz"))
"""
from __future__ import annotations

import io
import json
import os
import zipfile

import numpy as np
import tvm
from tvm import relax

from . import qmath
from .errors import ModelError
from .transform.common import bindings, main_function, op_name

#: Format version written into every artefact (bumped when the layout changes).
FORMAT_VERSION = 1


@relax.expr_functor.mutator
class _LiftWeights(relax.PyExprMutator):
    """Replace the given constants by variables (the weights become parameters of ``main``)."""

    def __init__(self, mod, table):
        super().__init__(mod)
        self.table = table                     # [(constant, var)]

    def visit_generic_const_(self, c):
        for const, var in self.table:
            if c.same_as(const):
                return var
        return c


def _weight_constants(mod, qmodel):
    """``[(constant, point name, bits)]`` for the integer weights of conv2d / matmul in ``main``."""
    out, taken = [], set()
    for b in bindings(main_function(mod)):
        if op_name(b.value) not in ("relax.nn.conv2d", "relax.matmul") or len(b.value.args) < 2:
            continue
        w = b.value.args[1]
        if not isinstance(w, tvm.ir.GenericConst) or not str(w.ty.dtype).startswith("int"):
            continue
        value = w.value.numpy()
        for name, codes in qmodel.params.items():
            if name in taken or not name.endswith(":w") or codes.shape != value.shape:
                continue
            if np.array_equal(codes, value):
                out.append((w, name, qmodel.qpoints[name].bits))
                taken.add(name)
                break
    return out


def save(qmodel, path: str) -> dict:
    """Write ``qmodel`` (a :class:`~relayq.api.QuantizedModel`) to ``path`` with bit-packed weights.

    Returns a size report in bytes: ``packed_weights``, ``int8_weights`` (the same codes one per
    byte), ``fp32_weights``, ``file``.
    """
    if not getattr(qmodel, "quantized", False):
        raise ModelError("only a quantized model can be saved as a relayq artefact")
    mod = qmodel.realized
    func = main_function(mod)
    consts = _weight_constants(mod, qmodel)
    table = [(c, relax.Var(f"relayq_w{i}", c.ty)) for i, (c, _, _) in enumerate(consts)]
    body = _LiftWeights(mod, table).visit_expr(func.body)
    n_inputs = len(func.params)
    lifted = relax.Function(list(func.params) + [v for _, v in table], body, func.ret_ty, True, func.attrs)
    lifted = lifted.with_attr("num_input", n_inputs)
    graph = tvm.ir.save_json(tvm.IRModule({"main": lifted}))
    meta = {"format": FORMAT_VERSION, "inputs": n_inputs, "weights": []}
    report = {"packed_weights": 0, "int8_weights": 0, "fp32_weights": 0}
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as z:
        # The graph text compresses well; packed bit streams do not, so they are stored as they are.
        z.writestr("graph.json", graph, compress_type=zipfile.ZIP_DEFLATED)
        for i, (c, name, bits) in enumerate(consts):
            codes = c.value.numpy()
            packed = qmath.pack_codes(codes, bits)
            z.writestr(f"w{i}.bin", packed.tobytes())
            meta["weights"].append({"point": name, "bits": bits, "shape": list(codes.shape),
                                    "dtype": str(codes.dtype)})
            report["packed_weights"] += packed.nbytes
            report["int8_weights"] += codes.size * (1 if bits <= 8 else 2)
            report["fp32_weights"] += codes.size * 4
        z.writestr("meta.json", json.dumps(meta, indent=1), compress_type=zipfile.ZIP_DEFLATED)
        z.writestr("qpoints.json", json.dumps([_qpoint_json(p) for p in qmodel.qpoints.values()]),
                   compress_type=zipfile.ZIP_DEFLATED)
    report["file"] = os.path.getsize(path)
    return report


def _qpoint_json(p) -> dict:
    def plain(v):
        if isinstance(v, tuple):
            return [float(x) for x in v]
        return np.asarray(v, dtype=np.float64).tolist()

    return {"name": p.name, "role": p.role, "method": p.method, "threshold": plain(p.threshold),
            "scale": plain(p.scale), "bits": p.bits, "signed": p.signed, "axis": p.axis, "zero_point": p.zero_point}


def load(path: str):
    """Read an artefact written by :func:`save`; returns a QuantizedModel ready for :func:`relayq.build`."""
    from .api import QuantizedModel
    from .transform.calibrate import QPoint

    if not os.path.exists(path):
        raise ModelError(f"no relayq artefact at {path}")
    try:
        with zipfile.ZipFile(path) as z:
            meta = json.loads(z.read("meta.json"))
            graph = z.read("graph.json").decode()
            blobs = [z.read(f"w{i}.bin") for i in range(len(meta["weights"]))]
            qps = json.loads(z.read("qpoints.json"))
    except (zipfile.BadZipFile, KeyError, ValueError) as e:
        raise ModelError(f"{path} is not a relayq artefact: {e}") from None
    if meta.get("format") != FORMAT_VERSION:
        raise ModelError(f"{path}: artefact format {meta.get('format')} is not {FORMAT_VERSION}")
    mod = tvm.ir.load_json(graph)
    func = mod["main"]
    weights = func.params[meta["inputs"]:]
    binding, params = {}, {}
    for var, w, blob in zip(weights, meta["weights"], blobs):
        n = int(np.prod(w["shape"]))
        codes = qmath.unpack_codes(np.frombuffer(blob, dtype=np.uint8), w["bits"], n)
        arr = codes.astype(w["dtype"]).reshape(w["shape"])
        binding[var.name] = tvm.runtime.tensor(arr)
        params[w["point"]] = arr
    mod = relax.transform.BindParams("main", binding)(mod)
    func = mod["main"].without_attr("num_input")
    mod = tvm.IRModule({"main": func})
    qpoints = {}
    for d in qps:
        t = tuple(d["threshold"]) if d["role"] == "act" and not d["signed"] else np.asarray(d["threshold"])
        t = float(t) if isinstance(t, np.ndarray) and t.ndim == 0 else t
        s = np.asarray(d["scale"])
        qpoints[d["name"]] = QPoint(d["name"], d["role"], d["method"], t, float(s) if s.ndim == 0 else s,
                                    d["bits"], d["signed"], d["axis"], d["zero_point"])
    return QuantizedModel(realized=mod, params=params, prepared=None, annotated=None, simulated=None,
                          qpoints=qpoints, calibration="loaded", config=None)
