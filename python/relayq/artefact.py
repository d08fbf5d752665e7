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

The file is checked when read: ``meta.json`` carries the format version and the sha256 of every other
member (graph, quantization points, each weight blob), so a truncated or altered weight is an
:class:`~relayq.errors.ArtefactError` naming the file, the blob and its weight, not a reshape error.
:func:`save` writes a temporary file beside the target and renames it into place: an interrupted save
leaves the old file (or none), never half of one.
"""
from __future__ import annotations

import json
import os
import zipfile
import zlib

import numpy as np
import tvm
from tvm import relax

from . import qmath
from .errors import ArtefactError, ModelError
from .transform.common import bindings, main_function, op_name
from .utils.files import atomic_output, sha256_bytes

#: Format version written into every artefact (bumped when the layout changes). 2 added the sha256 of
#: every member to meta.json; version 1 files (no checksums) are still read, their blob sizes checked.
FORMAT_VERSION = 2
#: Versions :func:`load` reads.
READABLE_FORMATS = (1, 2)


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
    meta = {"format": FORMAT_VERSION, "inputs": n_inputs, "weights": [], "sha256": {}}
    report = {"packed_weights": 0, "int8_weights": 0, "fp32_weights": 0}
    qpoints = json.dumps([_qpoint_json(p) for p in qmodel.qpoints.values()])
    path = os.fspath(path)
    with atomic_output(path, "quantized model") as tmp:
        try:
            with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) as z:
                # The graph text compresses well; packed bit streams do not, so they are stored as they are.
                _write_member(z, meta, "graph.json", graph.encode(), zipfile.ZIP_DEFLATED)
                for i, (c, name, bits) in enumerate(consts):
                    codes = c.value.numpy()
                    packed = qmath.pack_codes(codes, bits)
                    _write_member(z, meta, f"w{i}.bin", packed.tobytes(), zipfile.ZIP_STORED)
                    meta["weights"].append({"point": name, "bits": bits, "shape": list(codes.shape),
                                            "dtype": str(codes.dtype)})
                    report["packed_weights"] += packed.nbytes
                    report["int8_weights"] += codes.size * (1 if bits <= 8 else 2)
                    report["fp32_weights"] += codes.size * 4
                _write_member(z, meta, "qpoints.json", qpoints.encode(), zipfile.ZIP_DEFLATED)
                z.writestr("meta.json", json.dumps(meta, indent=1), compress_type=zipfile.ZIP_DEFLATED)
        except OSError as e:        # a full disk, a quota: name the file the user asked for, not the temporary
            raise ArtefactError(f"cannot write the quantized model to {path}: {e.strerror or e}") from None
    report["file"] = os.path.getsize(path)
    return report


def _write_member(z, meta, name: str, data: bytes, compress_type) -> None:
    z.writestr(name, data, compress_type=compress_type)
    meta["sha256"][name] = sha256_bytes(data)


def _qpoint_json(p) -> dict:
    def plain(v):
        if isinstance(v, tuple):
            return [float(x) for x in v]
        return np.asarray(v, dtype=np.float64).tolist()

    return {"name": p.name, "role": p.role, "method": p.method, "threshold": plain(p.threshold),
            "scale": plain(p.scale), "bits": p.bits, "signed": p.signed, "axis": p.axis, "zero_point": p.zero_point}


def _read_member(z, path: str, name: str, sums: dict, version: int, what: str = "", size: int | None = None) -> bytes:
    """A member's bytes, checked against meta.json's size and sha256 (ArtefactError naming the file, the
    member and ``what`` it holds)."""
    label = f"{name}{what}"
    try:
        data = z.read(name)
    except KeyError:
        raise ArtefactError(f"{path}: member {label} is missing: the file is truncated or not a relayq artefact") from None
    if size is not None and len(data) != size:
        raise ArtefactError(f"{path}: {label} has {len(data)} bytes, {size} expected: the file is truncated or corrupt")
    if version >= 2:
        if name not in sums:
            raise ArtefactError(f"{path}: meta.json records no checksum for {label}: the file is corrupt")
        if sha256_bytes(data) != sums[name]:
            raise ArtefactError(f"{path}: {label} does not match the sha256 recorded in meta.json: the file is "
                                "corrupt or was altered")
    return data


def _read_blob(z, path: str, i: int, w: dict, sums: dict, version: int) -> bytes:
    """Weight blob ``w{i}.bin``, checked: exactly ceil(size * bits / 8) bytes, and its sha256."""
    n = int(np.prod(w["shape"]))
    what = f" (weight {w.get('point')!r}, {w['bits']}-bit {tuple(w['shape'])})"
    return _read_member(z, path, f"w{i}.bin", sums, version, what, (n * int(w["bits"]) + 7) // 8)


def load(path: str):
    """Read an artefact written by :func:`save`; returns a QuantizedModel ready for :func:`relayq.build`.

    Every member is checked against meta.json (format version, sha256, weight blob sizes): a damaged
    file raises :class:`~relayq.errors.ArtefactError` naming the file, the member and its weight.

    Example::

        qmodel = relayq.artefact.load("model_w4a8.rqz")
    """
    from .api import QuantizedModel
    from .transform.calibrate import QPoint

    path = os.fspath(path)
    if os.path.isdir(path):
        raise ArtefactError(f"{path} is a directory, not a relayq artefact (.rqz written by QuantizedModel.save)")
    if not os.path.exists(path):
        raise ArtefactError(f"no relayq artefact at {path}")
    try:
        with zipfile.ZipFile(path) as z:
            meta = json.loads(z.read("meta.json"))
            if not isinstance(meta, dict):
                raise ValueError("meta.json is not a JSON object")
            version = meta.get("format")
            if version not in READABLE_FORMATS:
                raise ArtefactError(f"{path}: artefact format version {version!r} is not one this relayq reads "
                                    f"{list(READABLE_FORMATS)}: save the model again with this version")
            sums = meta.get("sha256", {}) if version >= 2 else {}
            members = {name: _read_member(z, path, name, sums, version)
                       for name in ("graph.json", "qpoints.json")}
            blobs = [_read_blob(z, path, i, w, sums, version) for i, w in enumerate(meta["weights"])]
    except ArtefactError:
        raise
    except (zipfile.BadZipFile, KeyError, ValueError, TypeError, EOFError, OSError, zlib.error) as e:
        raise ArtefactError(f"{path} is not a relayq artefact, or is truncated or corrupt: "
                            f"{type(e).__name__}: {e}") from None
    graph = members["graph.json"].decode()
    try:
        qps = json.loads(members["qpoints.json"])
    except ValueError as e:
        raise ArtefactError(f"{path}: qpoints.json is not valid JSON ({e})") from None
    try:
        mod = tvm.ir.load_json(graph)
    except Exception as e:  # noqa: BLE001 - TVM raises its own errors for bad JSON
        raise ArtefactError(f"{path}: graph.json is not a TVM module: {str(e).strip().splitlines()[-1:]}") from None
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
