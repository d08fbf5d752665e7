"""Read PyTorch checkpoints (``torch.save`` of a state_dict) into numpy arrays, without torch.

Two on-disk formats exist and both are read:

* the zip format (PyTorch >= 1.6): a zip archive ``<name>/data.pkl`` (the pickled object, whose tensors
  refer to storages by key) plus one raw little-endian file ``<name>/data/<key>`` per storage;
* the legacy format (older PyTorch, e.g. the official torchvision ``mobilenet_v2-b0353104.pth``): a
  stream of pickles ``magic, protocol, sys_info, object, storage_keys`` followed by each storage's raw
  bytes, each preceded by its element count as an int64.

Unpickling is restricted: only the handful of globals a state_dict needs (``OrderedDict``, the tensor
rebuild helpers, the typed storage classes) are resolved to local stand-ins; anything else raises
:class:`relayq.errors.ModelError` naming the global, so a malicious checkpoint cannot run code.

Example::

    >>> from relayq.testing import pth, zoo
    >>> sd = pth.load_state_dict(zoo.mobilenet_v2_weights_path())   # doctest: +SKIP
    >>> sd["features.0.0.weight"].shape                                # doctest: +SKIP
    (32, 3, 3, 3)
"""
from __future__ import annotations

import collections
import io
import os
import pickle
import struct
import zipfile

import numpy as np

from ..errors import ModelError

__all__ = ["load_state_dict"]

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001

# torch storage class name -> numpy dtype ("bfloat16" is read as uint16 and widened to float32).
_STORAGE_DTYPES = {
    "FloatStorage": np.dtype("<f4"),
    "DoubleStorage": np.dtype("<f8"),
    "HalfStorage": np.dtype("<f2"),
    "BFloat16Storage": np.dtype("<u2"),
    "LongStorage": np.dtype("<i8"),
    "IntStorage": np.dtype("<i4"),
    "ShortStorage": np.dtype("<i2"),
    "CharStorage": np.dtype("i1"),
    "ByteStorage": np.dtype("u1"),
    "BoolStorage": np.dtype("?"),
}


class _StorageType:
    """Stand-in for a torch storage class such as ``torch.FloatStorage``: only its dtype matters."""

    def __init__(self, name: str):
        self.name = name
        self.dtype = _STORAGE_DTYPES[name]

    def __repr__(self):
        return f"torch.{self.name}"


class _Storage:
    """A flat storage: its element dtype and (once read) its data as a 1-D numpy array."""

    def __init__(self, stype: _StorageType, key: str, numel: int):
        self.stype = stype
        self.key = key
        self.numel = numel
        self.array: np.ndarray | None = None


class _StorageView:
    """A legacy storage view: ``numel`` elements of ``base`` from element ``offset``."""

    def __init__(self, base: _Storage, offset: int, numel: int):
        self.base = base
        self.offset = offset
        self.numel = numel
        self.stype = base.stype


class _LazyTensor:
    """A tensor whose storage bytes may not be read yet (legacy files store them after the pickle)."""

    def __init__(self, storage, offset, size, stride):
        self.storage = storage
        self.offset = int(offset)
        self.size = tuple(int(s) for s in size)
        self.stride = tuple(int(s) for s in stride)

    def materialize(self) -> np.ndarray:
        st = self.storage
        offset = self.offset
        if isinstance(st, _StorageView):
            offset += st.offset
            st = st.base
        flat = st.array
        if flat is None:
            raise ModelError(f"checkpoint: storage {st.key!r} was referenced but its data is missing")
        dtype = flat.dtype
        if any(n == 0 for n in self.size):
            last = offset - 1  # an empty tensor touches nothing
        else:
            last = offset + sum((n - 1) * s for n, s in zip(self.size, self.stride))
        if offset < 0 or last >= flat.size or any(s < 0 for s in self.stride):
            raise ModelError(
                f"checkpoint: tensor (offset {offset}, size {self.size}, stride {self.stride}) lies "
                f"outside its storage {st.key!r} of {flat.size} elements"
            )
        base = flat[offset:]
        view = np.lib.stride_tricks.as_strided(
            base, shape=self.size, strides=tuple(s * dtype.itemsize for s in self.stride), writeable=False
        )
        out = np.array(view, copy=True, order="C")
        if st.stype.name == "BFloat16Storage":
            out = (out.astype(np.uint32) << 16).view(np.float32)
        return out.astype(out.dtype.newbyteorder("="), copy=False)


def _rebuild_tensor(storage, storage_offset, size, stride):
    return _LazyTensor(storage, storage_offset, size, stride)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None,
                       metadata=None):
    return _LazyTensor(storage, storage_offset, size, stride)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None):
    return data


def _rebuild_parameter_with_state(data, requires_grad=False, backward_hooks=None, state=None):
    return data


_SAFE_GLOBALS = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter_with_state,
}
for _name in _STORAGE_DTYPES:
    _SAFE_GLOBALS[("torch", _name)] = _StorageType(_name)


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only the globals of a state_dict and hands storages to ``load_storage``."""

    def __init__(self, file, load_storage, where: str):
        super().__init__(file)
        self._load_storage = load_storage
        self._where = where

    def find_class(self, module, name):
        try:
            return _SAFE_GLOBALS[(module, name)]
        except KeyError:
            raise ModelError(
                f"{self._where}: refusing to unpickle global {module}.{name} (only state_dict tensors, "
                "storages and OrderedDict are allowed)"
            ) from None

    def persistent_load(self, pid):
        if not isinstance(pid, tuple) or not pid or pid[0] != "storage":
            raise ModelError(f"{self._where}: unsupported persistent id {pid!r}")
        return self._load_storage(pid)


def _materialize(obj):
    """Replace every lazy tensor inside (nested dicts/lists/tuples of) ``obj`` with its numpy array."""
    if isinstance(obj, _LazyTensor):
        return obj.materialize()
    if isinstance(obj, dict):
        out = type(obj)() if isinstance(obj, collections.OrderedDict) else {}
        for k, v in obj.items():
            out[k] = _materialize(v)
        return out
    if isinstance(obj, list):
        return [_materialize(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_materialize(v) for v in obj)
    return obj


def _storage_type_of(pid, where) -> _StorageType:
    stype = pid[1]
    if not isinstance(stype, _StorageType):
        raise ModelError(f"{where}: unsupported storage type {stype!r}")
    return stype


def _load_zip(path: str) -> object:
    where = f"checkpoint {path}"
    with zipfile.ZipFile(path) as zf:
        names = zf.namelist()
        pkls = [n for n in names if n.endswith("/data.pkl") or n == "data.pkl"]
        if len(pkls) != 1:
            raise ModelError(f"{where}: expected exactly one data.pkl in the archive, found {len(pkls)}")
        prefix = pkls[0][: -len("data.pkl")]
        byteorder = "little"
        if prefix + "byteorder" in names:
            byteorder = zf.read(prefix + "byteorder").decode().strip()
        storages: dict[str, _Storage] = {}

        def load_storage(pid):
            if len(pid) != 5:
                raise ModelError(f"{where}: malformed storage id {pid!r}")
            stype = _storage_type_of(pid, where)
            key, numel = str(pid[2]), int(pid[4])
            if key not in storages:
                member = f"{prefix}data/{key}"
                try:
                    raw = zf.read(member)
                except KeyError:
                    raise ModelError(f"{where}: storage file {member} is missing") from None
                dtype = stype.dtype if byteorder == "little" else stype.dtype.newbyteorder(">")
                if len(raw) < numel * dtype.itemsize:
                    raise ModelError(
                        f"{where}: storage {key} has {len(raw)} bytes, expected {numel * dtype.itemsize}"
                    )
                st = _Storage(stype, key, numel)
                st.array = np.frombuffer(raw, dtype=dtype, count=numel)
                storages[key] = st
            return storages[key]

        with zf.open(pkls[0]) as f:
            obj = _RestrictedUnpickler(io.BytesIO(f.read()), load_storage, where).load()
    return _materialize(obj)


def _load_legacy(path: str) -> object:
    where = f"checkpoint {path}"
    with open(path, "rb") as f:
        def plain(what):
            # magic, protocol, sys_info and the key list contain only builtins: no globals allowed.
            try:
                return _RestrictedUnpickler(f, _no_storage, where).load()
            except ModelError:
                raise
            except Exception as e:
                raise ModelError(f"{where}: cannot read the {what}: {e}") from e

        def _no_storage(pid):
            raise ModelError(f"{where}: unexpected storage reference in the header")

        if plain("magic number") != _LEGACY_MAGIC:
            raise ModelError(f"{where}: not a PyTorch checkpoint (bad magic number)")
        protocol = plain("protocol version")
        if protocol != _LEGACY_PROTOCOL:
            raise ModelError(f"{where}: unsupported legacy protocol version {protocol!r}")
        sys_info = plain("system info")
        if isinstance(sys_info, dict) and not sys_info.get("little_endian", True):
            raise ModelError(f"{where}: big-endian checkpoints are not supported")

        storages: dict[str, _Storage] = {}

        def load_storage(pid):
            if len(pid) != 6:
                raise ModelError(f"{where}: malformed storage id {pid!r}")
            stype = _storage_type_of(pid, where)
            key, numel, view = str(pid[2]), int(pid[4]), pid[5]
            if key not in storages:
                storages[key] = _Storage(stype, key, numel)
            base = storages[key]
            if view is None:
                return base
            _view_key, view_offset, view_numel = view
            return _StorageView(base, int(view_offset), int(view_numel))

        try:
            obj = _RestrictedUnpickler(f, load_storage, where).load()
        except ModelError:
            raise
        except Exception as e:
            raise ModelError(f"{where}: cannot unpickle the checkpoint: {e}") from e
        keys = plain("storage key list")
        for key in keys:
            key = str(key)
            if key not in storages:
                raise ModelError(f"{where}: storage {key} has data but no tensor uses it")
            st = storages[key]
            head = f.read(8)
            if len(head) != 8:
                raise ModelError(f"{where}: truncated before storage {key}")
            (numel,) = struct.unpack("<q", head)
            nbytes = numel * st.stype.dtype.itemsize
            raw = f.read(nbytes)
            if len(raw) != nbytes or numel < st.numel:
                raise ModelError(f"{where}: storage {key} is truncated ({len(raw)} of {nbytes} bytes)")
            st.array = np.frombuffer(raw, dtype=st.stype.dtype, count=numel)
    return _materialize(obj)


def load_state_dict(path) -> dict[str, np.ndarray]:
    """Read a PyTorch checkpoint (zip or legacy format) into ``{name: numpy array}``, without torch.

    Tensors come back as fresh, contiguous, native-endian numpy arrays of the stored dtype (float32
    stays float32, ``num_batches_tracked`` stays int64; bfloat16 is widened to float32). A checkpoint
    that holds ``{"state_dict": {...}}`` or ``{"model": {...}}`` returns the inner dict. Any global
    other than the tensor/storage helpers raises :class:`relayq.errors.ModelError` naming it.

    Example::

        >>> sd = load_state_dict("mobilenet_v2-b0353104.pth")      # doctest: +SKIP
        >>> len(sd), sd["classifier.1.weight"].shape               # doctest: +SKIP
        (314, (1000, 1280))
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ModelError(f"checkpoint {path}: no such file")
    if zipfile.is_zipfile(path):
        obj = _load_zip(path)
    else:
        obj = _load_legacy(path)
    if isinstance(obj, dict) and not all(isinstance(v, np.ndarray) for v in obj.values()):
        # A training checkpoint such as {"state_dict": {...}, "epoch": 3}: return the weights.
        for inner in ("state_dict", "model"):
            if isinstance(obj.get(inner), dict):
                obj = obj[inner]
                break
    if not isinstance(obj, dict):
        raise ModelError(f"checkpoint {path}: holds a {type(obj).__name__}, not a state_dict")
    out = {}
    for k, v in obj.items():
        if not isinstance(v, np.ndarray):
            raise ModelError(f"checkpoint {path}: entry {k!r} is a {type(v).__name__}, not a tensor")
        out[str(k)] = v
    return out
