"""Progress lines for long work (calibration, tuning), printed to stderr.

Example::

    with Progress("calibrating", total=100) as p:
        for batch in data:
            ...
            p.step()
"""
from __future__ import annotations

import sys
import time


class Progress:
    """A one-line progress counter; silent when ``enabled`` is False."""

    #: Redraw at most this often (seconds): CI logs should not fill with one line per batch.
    MIN_INTERVAL = 0.5

    def __init__(self, label: str, total: int | None = None, enabled: bool = True, stream=None):
        self.label, self.total, self.enabled = label, total, enabled
        self.stream = stream or sys.stderr
        self.count, self.start, self._last = 0, time.perf_counter(), 0.0

    def __enter__(self):
        return self

    def step(self, n: int = 1, note: str = "") -> None:
        self.count += n
        now = time.perf_counter()
        if self.enabled and (now - self._last >= self.MIN_INTERVAL or self.count == self.total):
            self._last = now
            of = f"/{self.total}" if self.total else ""
            self.stream.write(f"\rrelayq: {self.label} {self.count}{of} ({now - self.start:.1f} s) {note}")
            self.stream.flush()

    def __exit__(self, *exc):
        if self.enabled and self.count:
            self.stream.write(f"\rrelayq: {self.label} done: {self.count} in {time.perf_counter() - self.start:.1f} s\n")
            self.stream.flush()
        return False
