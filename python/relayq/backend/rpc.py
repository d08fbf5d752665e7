"""Remote devices through TVM's RPC tracker: tuning measured on them, and models run on them.

A fleet of boards runs TVM's RPC servers, each registered with a tracker under a *device key*
(``rk3588``, ``pi4`` ...). relayq talks to the tracker only; the tracker hands out a free board of the
key for each session.

* Tuning: ``relayq.build(..., tune_trials=N, rpc="host:port", device_key="rk3588")`` measures every
  MetaSchedule candidate on the boards through meta-schedule's ``RPCRunner`` (as many at once as the
  key has servers). The candidates are compiled here with relayq's builder and linked here into a
  shared library (with the cross compiler for an ARM target), so a board needs no compiler.
* Running: :func:`remote` exports a compiled model, uploads it to one board, runs it with the board's
  Relax VM on the given inputs and returns the outputs and the latency measured there.

Errors name the tracker, the key and what the tracker reports: :class:`TrackerUnreachableError`,
:class:`NoFreeDeviceError` (both :class:`RemoteError`); a malformed ``rpc`` string is a
:class:`ConfigError`.

Example::

    lib = relayq.build(qmodel, target="arm-dotprod", tune_trials=200, tuning_log="tuning/rk3588",
                       rpc="10.0.0.5:9190", device_key="rk3588")
    res = relayq.remote(lib, rpc="10.0.0.5:9190", device_key="rk3588", inputs=images)
    print(res.median_ms, (res.outputs.argmax(1) == labels).mean())
"""
from __future__ import annotations

import dataclasses
import os
import re
import socket
import struct
import tempfile
from typing import NamedTuple

import numpy as np
import tvm
from tvm import relax

from ..errors import ConfigError, DatasetError, ModelError, NoFreeDeviceError, RemoteError, TrackerUnreachableError

#: Seconds to open a TCP connection to the tracker: a tracker on a LAN answers in milliseconds.
CONNECT_TIMEOUT = 10.0
#: Seconds to wait for a free device of the key (boards may be busy with other users' sessions).
DEVICE_TIMEOUT = 60.0
#: Seconds a :func:`remote` session may last before the server ends it (upload + load + runs).
SESSION_TIMEOUT = 600
#: Seconds one tuning measurement (session, upload, load, timed runs) may last on a board.
MEASURE_TIMEOUT = 60
#: The tracker's default port (``python -m tvm.exec.rpc_tracker``), used when ``rpc`` names no port.
DEFAULT_TRACKER_PORT = 9190


@dataclasses.dataclass(frozen=True)
class TrackerAddress:
    """Where the RPC tracker listens."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


_RPC_ADDRESS = re.compile(r"^(?:\[(?P<v6>[^\]\s]+)\]|(?P<host>[^:\s\[\]]+))(?::(?P<port>\d+))?$")


def parse_rpc(rpc) -> TrackerAddress:
    """The tracker address of an ``rpc`` argument: ``"host:port"``, ``"host"`` (port 9190),
    ``"[::1]:9190"``, a ``(host, port)`` pair or a :class:`TrackerAddress`.

    >>> str(parse_rpc("10.0.0.5:9190"))
    '10.0.0.5:9190'
    """
    if isinstance(rpc, TrackerAddress):
        return rpc
    if isinstance(rpc, (tuple, list)) and len(rpc) == 2:
        host, port = rpc
    elif isinstance(rpc, str):
        # "host", "host:port", "[v6 address]" or "[v6 address]:port"
        m = _RPC_ADDRESS.match(rpc.strip())
        host = (m.group("v6") or m.group("host")) if m else ""
        port = (m.group("port") or DEFAULT_TRACKER_PORT) if m else None
    else:
        raise ConfigError(f"rpc must be a 'host:port' string (the RPC tracker's address), got "
                          f"{type(rpc).__name__} {rpc!r}")
    try:
        port = int(port)
    except (TypeError, ValueError):
        port = -1
    if not isinstance(host, str) or not host or any(c.isspace() for c in host) or not 0 < port < 65536:
        raise ConfigError(f"rpc={rpc!r} is not a tracker address: expected 'host:port', e.g. "
                          f"'10.0.0.5:{DEFAULT_TRACKER_PORT}' (the host and port of python -m tvm.exec.rpc_tracker)")
    return TrackerAddress(host, port)


def check_device_key(device_key) -> str:
    """The device key as given, or a :class:`ConfigError` when it is missing or not a plain name."""
    if not isinstance(device_key, str) or not device_key.strip() or any(c.isspace() for c in device_key):
        raise ConfigError(f"device_key must name the device kind its RPC servers registered with "
                          f"(rpc_server --key NAME), got {device_key!r}")
    return device_key


def _tracker_socket(tracker: TrackerAddress, timeout: float) -> socket.socket:
    """An open tracker connection past the handshake, or :class:`TrackerUnreachableError`."""
    from tvm.rpc import base

    try:
        sock = socket.create_connection((tracker.host, tracker.port), timeout=timeout)
    except OSError as e:
        reason = e.strerror or str(e) or type(e).__name__
        raise TrackerUnreachableError(
            f"no RPC tracker answers at {tracker} ({reason}); start one there with "
            f"`python -m tvm.exec.rpc_tracker --host 0.0.0.0 --port {tracker.port}`, or correct rpc=") from None
    try:
        sock.sendall(struct.pack("<i", base.RPC_TRACKER_MAGIC))
        magic = struct.unpack("<i", base.recvall(sock, 4))[0]
    except (OSError, RuntimeError) as e:
        sock.close()
        raise TrackerUnreachableError(f"{tracker} accepted a connection but did not answer as an RPC tracker "
                                      f"({e or type(e).__name__})") from None
    if magic != base.RPC_TRACKER_MAGIC:
        sock.close()
        raise TrackerUnreachableError(f"{tracker} is not a TVM RPC tracker (wrong handshake): is it an RPC "
                                      "server's port? rpc= takes the tracker's")
    return sock


def tracker_summary(rpc, timeout: float = CONNECT_TIMEOUT) -> dict:
    """The tracker's own summary: ``{"queue_info": {key: {"free", "pending"}}, "server_info": [...]}``.

    >>> # relayq.backend.rpc.tracker_summary("10.0.0.5:9190")["queue_info"]
    """
    from tvm.rpc import base

    tracker = parse_rpc(rpc)
    sock = _tracker_socket(tracker, timeout)
    try:
        base.sendjson(sock, [base.TrackerCode.SUMMARY])
        code, summary = base.recvjson(sock)
    except (OSError, RuntimeError, ValueError) as e:
        raise TrackerUnreachableError(f"the tracker at {tracker} did not send its summary ({e})") from None
    finally:
        sock.close()
    if code != base.TrackerCode.SUCCESS:
        raise TrackerUnreachableError(f"the tracker at {tracker} refused the summary request")
    return summary


def key_status(summary: dict, device_key: str) -> dict:
    """``{"servers": [addresses], "total", "free", "pending"}`` of one key in a tracker summary."""
    servers = [":".join(map(str, s.get("addr", ()))) for s in summary.get("server_info", ())
               if s.get("key") == "server:" + device_key]
    queue = summary.get("queue_info", {}).get(device_key, {})
    return {"servers": sorted(servers), "total": len(servers), "free": int(queue.get("free", 0)),
            "pending": int(queue.get("pending", 0))}


def describe_summary(summary: dict) -> str:
    """One line per key: ``'rk3588': 2 servers, 1 free, 0 pending requests``."""
    keys = {s["key"].split(":", 1)[1] for s in summary.get("server_info", ()) if ":" in s.get("key", "")}
    keys |= {k for k, q in summary.get("queue_info", {}).items() if q.get("free") or q.get("pending")}
    if not keys:
        return "no RPC server is registered with it"
    parts = []
    for k in sorted(keys):
        st = key_status(summary, k)
        parts.append(f"{k!r}: {st['total']} server(s), {st['free']} free, {st['pending']} pending request(s)")
    return "; ".join(parts)


def check_devices(rpc, device_key: str, timeout: float = CONNECT_TIMEOUT) -> dict:
    """:func:`key_status` of ``device_key``; :class:`NoFreeDeviceError` when no server has that key.

    >>> # check_devices("10.0.0.5:9190", "rk3588")["total"]   # number of boards
    """
    tracker = parse_rpc(rpc)
    summary = tracker_summary(tracker, timeout)
    status = key_status(summary, check_device_key(device_key))
    if status["total"] == 0:
        raise NoFreeDeviceError(
            f"the tracker at {tracker} has no server registered with key {device_key!r}: it reports "
            f"{describe_summary(summary)}. Start `python -m tvm.exec.rpc_server --tracker {tracker} "
            f"--key {device_key}` on the device, or correct device_key")
    return status


@dataclasses.dataclass
class RemoteSession:
    """An RPC session on one device handed out by the tracker."""

    session: object            # tvm.rpc.RPCSession
    server: str                # the device's "host:port" as the tracker reported it
    device_key: str
    tracker: TrackerAddress

    def where(self) -> str:
        return f"device {self.server} (key {self.device_key!r}, tracker {self.tracker})"


def request_device(rpc, device_key: str, *, timeout: float = DEVICE_TIMEOUT,
                   session_timeout: float = SESSION_TIMEOUT, priority: int = 1) -> RemoteSession:
    """A session on a free device of ``device_key``, waiting at most ``timeout`` seconds for one.

    ``session_timeout`` bounds the session itself: the server ends it after that many seconds.

    >>> # s = request_device("10.0.0.5:9190", "rk3588"); s.session.cpu(0)
    """
    from tvm import rpc as tvm_rpc
    from tvm.rpc import base

    tracker = parse_rpc(rpc)
    check_devices(tracker, device_key)
    sock = _tracker_socket(tracker, CONNECT_TIMEOUT)
    try:
        base.sendjson(sock, [base.TrackerCode.REQUEST, device_key, "", priority])
        sock.settimeout(timeout)
        try:
            reply = base.recvjson(sock)
        except TimeoutError:
            status = key_status(tracker_summary(tracker), device_key)
            raise NoFreeDeviceError(
                f"no {device_key!r} device became free within {timeout:g} s: the tracker at {tracker} reports "
                f"{status['total']} server(s) with that key, {status['free']} free, {status['pending']} pending "
                "request(s) (other sessions hold them; raise timeout= or wait)") from None
    except OSError as e:
        raise TrackerUnreachableError(f"the tracker at {tracker} dropped the request for {device_key!r} ({e})") from None
    finally:
        sock.close()        # a request still pending is dropped by the tracker with its connection
    if not (isinstance(reply, list) and reply and reply[0] == base.TrackerCode.SUCCESS):
        raise RemoteError(f"the tracker at {tracker} refused the request for {device_key!r}: {reply!r}")
    host, port, matchkey = reply[1]
    server = f"{host}:{port}"
    try:
        session = tvm_rpc.connect(host, port, matchkey, session_timeout=session_timeout)
    except Exception as e:  # noqa: BLE001 - TVM raises plain errors for network failures
        raise RemoteError(f"the tracker at {tracker} assigned device {server} for key {device_key!r}, but "
                          f"connecting to it failed: {_first_line(e)} (can this machine reach {host}? a server "
                          "behind NAT needs rpc_server --custom-addr)") from None
    return RemoteSession(session, server, device_key, tracker)


def _first_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    # TVM errors end with the useful line after a traceback: prefer a line naming the error type.
    named = [ln for ln in lines if "Error" in ln.split(":", 1)[0]]
    return (named[-1] if named else lines[-1] if lines else type(e).__name__)[:300]


# ---------------------------------------------------------------------------------------------------
# Running a compiled model on a device

class RemoteResult(NamedTuple):
    """What :func:`remote` returns.

    ``outputs``: numpy (one array for a single-output model, else a list, as ``CompiledModel.__call__``);
    ``median_ms``: median latency of ``main`` on the device (None when ``repeat=0``); ``times_ms``: every
    timed repeat; ``server``: the device that ran it (``host:port`` as the tracker reported it).
    """

    outputs: object
    median_ms: float | None
    times_ms: tuple
    server: str


def _device_type(target) -> str:
    """The runtime device type string of a target (``"cpu"`` for LLVM targets of any architecture)."""
    kind = None
    if isinstance(target, tvm.target.Target):
        kind = target.kind.name
    elif isinstance(target, str) and target:
        try:
            kind = tvm.target.Target(target).kind.name
        except Exception:  # noqa: BLE001 - an unparsable target string from an old export: assume a CPU
            kind = None
    return {None: "cpu", "llvm": "cpu", "c": "cpu"}.get(kind, kind)


def _check_lib(lib) -> None:
    if isinstance(lib, (str, os.PathLike)):
        if not os.path.isfile(os.fspath(lib)):
            raise ModelError(f"no compiled model at {os.fspath(lib)}")
    elif not all(hasattr(lib, a) for a in ("executable", "specs", "target", "export")):
        raise ConfigError(f"remote expects a compiled model (relayq.build's result) or the path of an exported "
                          f"library, got {type(lib).__name__}")


def _library_file(lib, workdir: str, cross_compile) -> tuple:
    """(path of a shared library, input specs, target) of a compiled model or an exported file."""
    _check_lib(lib)
    if isinstance(lib, (str, os.PathLike)):
        import json

        path = os.fspath(lib)
        meta_path = path + ".json"
        if not os.path.isfile(meta_path):
            raise ModelError(f"{meta_path} (the input description written by CompiledModel.export) is missing")
        with open(meta_path) as f:
            meta = json.load(f)
        return path, [(n, tuple(s), d) for n, s, d in meta["inputs"]], meta.get("target")
    path = os.path.join(workdir, "relayq_model.so")
    if cross_compile is None:
        lib.export(path)
    else:
        lib.export(path, cross_compile=cross_compile)
    return path, list(lib.specs), lib.target


def _dims_match(shape, expected) -> bool:
    if len(shape) != len(expected):
        return False
    # A dimension that is not a fixed int (a symbolic batch) accepts any size.
    return all(not isinstance(e, (int, np.integer)) or e < 0 or int(e) == s for s, e in zip(shape, expected))


def input_arrays(inputs, specs: list) -> list:
    """The model's inputs in order, as C-contiguous numpy arrays checked against ``specs``.

    ``inputs``: one array (single-input models), a tuple/list in input order, a dict name -> array, or
    None (zeros of the input shapes: for a latency-only run).

    >>> [a.shape for a in input_arrays(None, [("x", (1, 3), "float32")])]
    [(1, 3)]
    """
    names = [s[0] for s in specs]
    if inputs is None:
        if not all(isinstance(d, (int, np.integer)) and d >= 0 for _, shape, _ in specs for d in shape):
            raise DatasetError(f"the model's inputs {names} have symbolic dimensions: pass inputs= to remote")
        return [np.zeros(tuple(shape), dtype) for _, shape, dtype in specs]
    if isinstance(inputs, dict):
        if sorted(inputs, key=str) != sorted(names):
            raise DatasetError(f"remote inputs {sorted(inputs, key=str)} do not match the model inputs {names}")
        arrays = [inputs[n] for n in names]
    elif isinstance(inputs, (list, tuple)) and len(names) != 1:
        if len(inputs) != len(names):
            raise DatasetError(f"remote got {len(inputs)} inputs, the model has {len(names)}: {names}")
        arrays = list(inputs)
    elif isinstance(inputs, (list, tuple)) and len(inputs) == 1:
        arrays = list(inputs)
    else:
        arrays = [inputs]
    out = []
    for (name, shape, dtype), a in zip(specs, arrays):
        a = np.asarray(a.numpy() if hasattr(a, "numpy") and not isinstance(a, np.ndarray) else a)
        if not _dims_match(a.shape, shape):
            raise DatasetError(f"remote input {name!r} has shape {a.shape}, the model expects {tuple(shape)}")
        if a.dtype != np.dtype(dtype):
            if a.dtype.kind == "f" and np.dtype(dtype).kind == "f":
                a = a.astype(dtype)
            else:
                raise DatasetError(f"remote input {name!r} has dtype {a.dtype}, the model expects {dtype}")
        out.append(np.ascontiguousarray(a))
    return out


def remote(lib, rpc, device_key: str, inputs=None, *, number: int = 10, repeat: int = 3,
           timeout: float = DEVICE_TIMEOUT, session_timeout: float = SESSION_TIMEOUT,
           cross_compile=None) -> RemoteResult:
    """Run a compiled model on a device of ``device_key`` behind the RPC tracker at ``rpc``.

    ``lib``: what ``relayq.build`` returns (any object with ``executable``, ``specs``, ``target`` and
    ``export(path)``; an ARM build is exported with the cross compiler), or the path of a library written
    by ``CompiledModel.export`` (with its ``.json`` beside it). The library is uploaded to a free
    device, loaded by the device's Relax VM and run once on ``inputs`` (one array, a tuple in input
    order, a dict by name, or None for zeros); then TVM's time evaluator runs it ``repeat`` times
    ``number`` times on the device (``repeat=0``: no timing). ``timeout``: seconds to wait for a free
    device.

    Example::

        res = relayq.remote(lib, rpc="10.0.0.5:9190", device_key="rk3588", inputs=x)
        np.testing.assert_array_equal(res.outputs, expected); print(f"{res.median_ms:.2f} ms on {res.server}")
    """
    tracker = parse_rpc(rpc)
    check_device_key(device_key)
    for name, value in (("number", number), ("repeat", repeat)):
        if not isinstance(value, (int, np.integer)) or value < (1 if name == "number" else 0):
            raise ConfigError(f"remote {name}= must be an int >= {1 if name == 'number' else 0}, got {value!r}")
    _check_lib(lib)
    check_devices(tracker, device_key)           # fail fast, before exporting, when no device can run it
    with tempfile.TemporaryDirectory(prefix="relayq_remote_") as workdir:
        path, specs, target = _library_file(lib, workdir, cross_compile)
        arrays = input_arrays(inputs, specs)
        rs = request_device(tracker, device_key, timeout=timeout, session_timeout=session_timeout)
        return _run(rs, path, target, arrays, int(number), int(repeat))


def _run(rs: RemoteSession, path: str, target, arrays: list, number: int, repeat: int) -> RemoteResult:
    sess = rs.session
    remote_name = os.path.basename(path)
    try:
        sess.upload(path, remote_name)
        module = sess.load_module(remote_name)
    except Exception as e:  # noqa: BLE001
        raise RemoteError(f"{rs.where()} could not load the model library: {_first_line(e)} (is the library "
                          f"built for that device? target {_target_text(target)})") from None
    try:
        dev = sess.device(_device_type(target), 0)
        vm = relax.VirtualMachine(module, dev)
        vm.set_input("main", *[tvm.runtime.tensor(a, dev) for a in arrays])
        vm.invoke_stateful("main")
        outputs = _fetch_outputs(vm.module, "main")
        times = ()
        if repeat:
            timer = vm.time_evaluator("invoke_stateful", dev, number=number, repeat=repeat)
            times = tuple(float(t) * 1e3 for t in timer("main").results)
    except Exception as e:  # noqa: BLE001
        raise RemoteError(f"running the model on {rs.where()} failed: {_first_line(e)}") from None
    finally:
        try:
            sess.remove(remote_name)
        except Exception:  # noqa: BLE001 - the session's folder is deleted by the server anyway
            pass
    median = float(np.median(times)) if times else None
    return RemoteResult(outputs[0] if len(outputs) == 1 else outputs, median, times, rs.server)


def _fetch_outputs(vm_module, func_name: str, index: tuple = ()) -> list:
    """The outputs of the last ``invoke_stateful`` as a flat list of numpy arrays.

    Read one tensor at a time, as ``VirtualMachine.get_outputs`` does (RPC cannot return a tuple of
    remote tensors), but without its self-referencing closure: that cycle would keep the session, and
    so the device, busy until the garbage collector runs.
    """
    arity = vm_module["get_output_arity"](func_name, *index)
    if arity == -1:
        return [vm_module["get_output"](func_name, *index).numpy()]
    out = []
    for i in range(arity):
        out.extend(_fetch_outputs(vm_module, func_name, (*index, i)))
    return out


def _target_text(target) -> str:
    if isinstance(target, tvm.target.Target):
        mtriple = target.attrs.get("mtriple", "") if target.kind.name == "llvm" else ""
        return f"{target.kind.name}" + (f" {mtriple}" if mtriple else "")
    return str(target)


# ---------------------------------------------------------------------------------------------------
# Measuring tuning candidates on devices

def _make_export(cross_compiler: str | None):
    # A closure (pickled by value): builder workers link a shared library here, with the target's
    # cross compiler, so that the devices load it without a compiler of their own.
    def export(mod):
        import os as _os
        import tempfile as _tempfile

        from tvm.support import cc

        path = _os.path.join(_tempfile.mkdtemp(prefix="relayq_candidate_"), "candidate.so")
        mod.export_library(path, fcompile=cc.cross_compiler(cross_compiler) if cross_compiler else None)
        return path

    return export


class RemoteDevices:
    """The devices of one key behind a tracker, as the place MetaSchedule measures candidates.

    Checks at construction that the tracker answers and has servers with the key.

    >>> # devs = RemoteDevices("10.0.0.5:9190", "rk3588"); devs.status["total"]
    """

    def __init__(self, rpc, device_key: str):
        self.tracker = parse_rpc(rpc)
        self.device_key = check_device_key(device_key)
        self.status = check_devices(self.tracker, self.device_key)

    def __str__(self) -> str:
        return f"{self.device_key!r} devices at {self.tracker}"

    @property
    def label(self) -> str:
        """How tuning records measured here are labelled: ``rpc key 'rk3588'``."""
        return f"rpc key {self.device_key!r}"

    def num_threads(self) -> int:
        """The TVM thread pool size of one device (its worker cores)."""
        rs = request_device(self.tracker, self.device_key, session_timeout=MEASURE_TIMEOUT)
        try:
            return int(rs.session.get_function("runtime.NumThreads")())
        except Exception as e:  # noqa: BLE001
            raise RemoteError(f"{rs.where()} did not report its thread count: {_first_line(e)}") from None

    def tuning_target(self, target: tvm.target.Target) -> tvm.target.Target:
        """``target`` with ``num-cores`` (which MetaSchedule needs) taken from a device when unset."""
        if target.attrs.get("num-cores"):
            return target
        config = dict(target.export())
        config["num-cores"] = self.num_threads()
        return tvm.target.Target(config)

    def builder(self, target: tvm.target.Target, f_build, max_workers: int, timeout_sec: float):
        """relayq's MetaSchedule builder, linking each candidate for the devices' architecture."""
        from tvm.s_tir import meta_schedule as ms

        from .presets import default_cross_compile

        cross = default_cross_compile(target)         # None for this machine's own architecture
        return ms.builder.LocalBuilder(f_build=f_build, f_export=_make_export(cross), max_workers=max_workers,
                                       timeout_sec=timeout_sec)

    def runner(self, evaluator_config, max_parallel: int):
        """Meta-schedule's RPC runner on this key: one measurement per free device at a time."""
        from tvm.s_tir import meta_schedule as ms

        config = ms.runner.RPCConfig(tracker_host=self.tracker.host, tracker_port=self.tracker.port,
                                     tracker_key=self.device_key, session_timeout_sec=MEASURE_TIMEOUT)
        workers = max(1, min(self.status["total"], max_parallel))
        return ms.runner.RPCRunner(rpc_config=config, evaluator_config=evaluator_config, max_workers=workers)
