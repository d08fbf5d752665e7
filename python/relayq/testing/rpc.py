"""A TVM RPC tracker and servers on this machine (127.0.0.1): try ``relayq.remote`` and remote tuning
without boards, and test them.

The tracker and each server run in their own process (TVM's ``Tracker`` / ``Server``); each server
writes its log to its own file, so a test can tell which server loaded which library. The tracker
needs the ``tornado`` package (as ``python -m tvm.exec.rpc_tracker`` does).

Example::

    from relayq.testing.rpc import LoopbackCluster
    with LoopbackCluster(key="loopback", servers=2) as cluster:
        res = relayq.remote(lib, rpc=cluster.rpc, device_key="loopback", inputs=x)
        print(cluster.loaded_modules())          # per server: the libraries it loaded
"""
from __future__ import annotations

import functools
import logging.config
import os
import re
import socket
import tempfile
import threading
import time

#: Seconds to wait for every server to register with the tracker (each process imports TVM: slow on a
#: busy 2-core machine).
STARTUP_TIMEOUT = 180.0
#: Ports tried for the tracker before giving up (each is checked free first; another process may still
#: take it between the check and the bind).
PORT_ATTEMPTS = 5


def has_tracker_support() -> bool:
    """Whether TVM's RPC tracker can run here (it needs ``tornado``)."""
    try:
        import tornado  # noqa: F401
    except ImportError:
        return False
    return True


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _server_logging(path: str):
    # A picklable stdlib callable (no relayq import in the server process): route the server's
    # "RPCServer" logger to its own file.
    return functools.partial(logging.config.dictConfig, {
        "version": 1, "disable_existing_loggers": False,
        "formatters": {"plain": {"format": "%(asctime)s %(message)s"}},
        "handlers": {"file": {"class": "logging.FileHandler", "filename": path, "formatter": "plain"}},
        "loggers": {"RPCServer": {"handlers": ["file"], "level": "INFO", "propagate": False}},
    })


class LoopbackCluster:
    """A tracker and ``servers`` RPC servers on 127.0.0.1, all registered under ``key``.

    Ports are picked free at start (no fixed port to collide with); :meth:`stop` (or leaving the
    ``with`` block) kills every process, including sessions still running.

    >>> # with LoopbackCluster(servers=2) as c: relayq.remote(lib, rpc=c.rpc, device_key=c.key, inputs=x)
    """

    def __init__(self, key: str = "loopback", servers: int = 2, log_dir: str | None = None,
                 startup_timeout: float = STARTUP_TIMEOUT):
        self.key, self.n_servers, self.startup_timeout = key, servers, startup_timeout
        self._own_dir = None if log_dir else tempfile.TemporaryDirectory(prefix="relayq_rpc_logs_")
        self.log_dir = log_dir or self._own_dir.name
        self.tracker = None
        self.servers: list = []
        self.server_logs = [os.path.join(self.log_dir, f"server{i}.log") for i in range(servers)]

    @property
    def rpc(self) -> str:
        """The tracker's address, as ``relayq.build``/``relayq.remote`` take it."""
        return f"127.0.0.1:{self.tracker.port}"

    def start(self) -> LoopbackCluster:
        """Start the tracker, then the servers (in parallel); wait until all are registered."""
        from tvm.rpc.server import Server
        from tvm.rpc.tracker import Tracker

        last = None
        for _ in range(PORT_ATTEMPTS):
            port = _free_port()
            try:
                self.tracker = Tracker("127.0.0.1", port=port, port_end=port + 1, silent=True)
                break
            except Exception as e:  # noqa: BLE001 - the port was taken after the check: try another
                last = e
        else:
            raise RuntimeError(f"could not start an RPC tracker on 127.0.0.1: {last}")
        started: list = [None] * self.n_servers
        errors: list = []

        def start_server(i):
            try:
                # Servers search for a free port from a free one: a port taken meanwhile is skipped.
                p = _free_port()
                started[i] = Server("127.0.0.1", port=p, port_end=p + 100,
                                    tracker_addr=("127.0.0.1", self.tracker.port), key=self.key,
                                    server_init_callback=_server_logging(self.server_logs[i]))
            except Exception as e:  # noqa: BLE001
                errors.append(e)

        threads = [threading.Thread(target=start_server, args=(i,)) for i in range(self.n_servers)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        self.servers = [s for s in started if s is not None]
        try:
            if errors:
                raise RuntimeError(f"could not start the RPC servers: {errors[0]}")
            self.wait_registered()
        except BaseException:
            self.stop()
            raise
        return self

    def wait_registered(self, timeout: float | None = None) -> None:
        """Block until the tracker lists every server under the key as free (servers re-register after
        each session, so tests call this between phases too); ``timeout`` defaults to the startup's."""
        from ..backend.rpc import key_status, tracker_summary

        timeout = self.startup_timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        while True:
            status = key_status(tracker_summary(self.rpc), self.key)
            if status["total"] >= self.n_servers and status["free"] >= self.n_servers:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"{status['total']} of {self.n_servers} RPC servers registered with the "
                                   f"tracker at {self.rpc}, {status['free']} free, after {timeout:g} s")
            time.sleep(0.2)

    def loaded_modules(self) -> list:
        """Per server, the file names of the libraries it loaded (in order), from its log."""
        result = []
        for path in self.server_logs:
            text = open(path).read() if os.path.exists(path) else ""
            result.append([os.path.basename(m) for m in re.findall(r"load_module (\S+)", text)])
        return result

    def stop(self) -> None:
        """Kill the servers (and their session processes) and the tracker."""
        for s in self.servers:
            s.terminate()
        self.servers = []
        if self.tracker is not None:
            self.tracker.terminate()
            self.tracker = None

    def close(self) -> None:
        """:meth:`stop`, then delete the log folder if this cluster made it."""
        self.stop()
        if self._own_dir is not None:
            self._own_dir.cleanup()
            self._own_dir = None

    def __enter__(self) -> LoopbackCluster:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()
