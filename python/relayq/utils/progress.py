"""Progress of long work (calibration, AdaRound, tuning, builds): tqdm bars on a terminal, log lines elsewhere.

On a terminal (stderr is a TTY) :class:`Progress` draws a `tqdm <https://tqdm.github.io>`_ bar. Where
stderr is a file or a pipe (CI, a log) a redrawn bar would fill the log with carriage returns, so it
writes plain lines through the ``"relayq"`` logger instead: one at most every
:attr:`Progress.LOG_INTERVAL` seconds, and one when it ends with the count and the elapsed time. :func:`stage` times a
step that has no count (lowering, compiling, exporting): a line when it starts and one with its time.

Example::

    with Progress("calibrating, batch", total=100) as p:
        for batch in data:
            ...
            p.step()
    with stage("compiling for x86-avx2"):
        ex = tvm.compile(mod, target)
"""
from __future__ import annotations

import contextlib
import sys
import time

from .log import get_logger

_log = get_logger("progress")


def _is_tty(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


class Progress:
    """A progress counter; silent when ``enabled`` is False.

    ``stream``: where the tqdm bar goes (default stderr); the plain lines go through logging.
    ``start``: a ``time.perf_counter()`` value to count the elapsed time from, when the work began
    before the counter (e.g. with a compile step), so that the reported time is the whole time.
    """

    #: Redraw a terminal bar at most this often (seconds).
    MIN_INTERVAL = 0.5
    #: Without a terminal: a line at most this often (seconds); CI logs should not get one per batch.
    LOG_INTERVAL = 10.0

    def __init__(self, label: str, total: int | None = None, enabled: bool = True, stream=None,
                 start: float | None = None):
        self.label, self.total, self.enabled = label, total, enabled
        self.stream = stream or sys.stderr
        self.count = 0
        self.start = time.perf_counter() if start is None else start
        self._last = time.perf_counter()
        self._bar = None
        self.note = ""
        if not enabled:
            return
        if _is_tty(self.stream):
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=f"relayq: {label}", file=self.stream, mininterval=self.MIN_INTERVAL,
                             leave=True, dynamic_ncols=True)
            if start is not None:
                self._bar.start_t -= time.perf_counter() - start      # the bar's clock starts at the work

    @property
    def elapsed(self) -> float:
        """Seconds since the work began."""
        return time.perf_counter() - self.start

    def _counted(self) -> str:
        of = f"/{self.total}" if self.total else ""
        return f"{self.count}{of} ({self.elapsed:.1f} s)"

    def __enter__(self):
        return self

    def step(self, n: int = 1, note: str = "") -> None:
        """Count ``n`` more units of work; ``note`` is shown beside the count (e.g. the best latency so far)."""
        self.count += n
        self.note = note
        if not self.enabled:
            return
        if self._bar is not None:
            if note:
                self._bar.set_postfix_str(note, refresh=False)
            self._bar.update(n)
            return
        now = time.perf_counter()
        if now - self._last >= self.LOG_INTERVAL:
            self._last = now
            _log.info("%s %s%s", self.label, self._counted(), f" {note}" if note else "")

    def close(self) -> None:
        """End the bar (or write the closing line) with the total count and elapsed time."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        else:
            _log.info("%s done: %d in %.1f s%s", self.label, self.count, self.elapsed,
                      f" ({self.note})" if self.note else "")
        self.enabled = False

    def __exit__(self, *exc):
        self.close()
        return False


@contextlib.contextmanager
def stage(label: str, enabled: bool = True, logger=None):
    """Log ``label`` when a step starts and ``label: N.N s`` when it ends (also when it fails).

    Example::

        with stage("exporting model.so"):
            lib.export("model.so")
    """
    log = logger or _log
    start = time.perf_counter()
    if enabled:
        log.info("%s ...", label)
    ok = False
    try:
        yield
        ok = True
    finally:
        if enabled:
            log.info("%s: %s in %.1f s", label, "done" if ok else "failed", time.perf_counter() - start)


__all__ = ["Progress", "stage"]
