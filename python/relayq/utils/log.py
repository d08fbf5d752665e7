"""relayq's logging: one logger tree under ``"relayq"``, visible by default, redirectable to the application's setup.

Messages (progress of calibration and builds, reports of CLE and tuning) go to the logger ``"relayq"``
(or a child, ``"relayq.build"``...) at INFO. So that a script that configures nothing still sees them,
that logger has its own handler writing ``relayq: message`` to stderr and does not propagate (as
transformers and other libraries do: the messages are not printed twice under ``logging.basicConfig``).
:func:`use_application_logging` hands them to the application's handlers instead; silence relayq with
``logging.getLogger("relayq").setLevel(logging.WARNING)`` (or ``QConfig(show_progress=False)`` for the
progress of calibration and AdaRound).

TVM's own C++ runtime writes warnings straight to file descriptor 2 (``LOG(WARNING)``, no switch turns
them off): saving or loading a Relax VM executable writes one ``Scope Saving:`` / ``Scope Loaded:`` line
per constant. :func:`tvm_chatter_filtered` drops exactly those lines and passes every other one through.

Example::

    from relayq.utils.log import get_logger, tvm_chatter_filtered
    log = get_logger("build")
    log.info("compiling for %s", target)
    with tvm_chatter_filtered():
        executable.export_library("model.so")
"""
from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import tempfile

LOGGER_NAME = "relayq"

#: TVM runtime warnings that say nothing to a user: the VM executable (executable.cc) reports each
#: constant's memory scope when it is saved or loaded (63 lines for a MobileNetV2 export).
_TVM_CHATTER = re.compile(r"^\[\d\d:\d\d:\d\d\] \S*executable\.cc:\d+: Warning: Scope (Saving|Loaded):")


class _DefaultHandler(logging.StreamHandler):
    """relayq's stderr handler (removed by :func:`use_application_logging`)."""

    def __init__(self):
        super().__init__()
        self.setFormatter(logging.Formatter("relayq: %(message)s"))

    @property
    def stream(self):
        # Looked up at each record: tests and tools replace sys.stderr after import.
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


def _setup() -> logging.Logger:
    logger = logging.getLogger(LOGGER_NAME)
    if not any(isinstance(h, _DefaultHandler) for h in logger.handlers):
        logger.addHandler(_DefaultHandler())
    if logger.level == logging.NOTSET:
        logger.setLevel(logging.INFO)
    logger.propagate = False
    return logger


logger = _setup()


def get_logger(name: str | None = None) -> logging.Logger:
    """The ``"relayq"`` logger, or its child ``"relayq.<name>"``.

    Example::

        get_logger("calibrate").info("observed %d batches", n)
    """
    return logger if not name else logger.getChild(name)


def use_application_logging() -> None:
    """Send relayq's records to the root logger's handlers (the application's setup) instead of stderr.

    Example::

        logging.basicConfig(filename="run.log", level=logging.INFO)
        relayq.utils.log.use_application_logging()
    """
    for h in [h for h in logger.handlers if isinstance(h, _DefaultHandler)]:
        logger.removeHandler(h)
    logger.propagate = True


def is_tvm_chatter(line: str) -> bool:
    """Whether a line written by TVM's runtime is one of the warnings :func:`tvm_chatter_filtered` drops.

    >>> is_tvm_chatter("[08:22:03] /project/src/runtime/vm/executable.cc:276: Warning: Scope Saving: global")
    True
    >>> is_tvm_chatter("[08:22:03] /project/src/runtime/module.cc:10: Warning: something else")
    False
    """
    return bool(_TVM_CHATTER.match(line))


def filter_tvm_chatter(text: str) -> str:
    """``text`` without the lines :func:`is_tvm_chatter` matches (e.g. the stderr of ``relayq_run``).

    >>> filter_tvm_chatter("[08:22:03] src/runtime/vm/executable.cc:340: Warning: Scope Loaded:global\\nreal error\\n")
    'real error\\n'
    """
    return "".join(line for line in text.splitlines(keepends=True) if not is_tvm_chatter(line))


@contextlib.contextmanager
def tvm_chatter_filtered():
    """Drop TVM's ``Scope Saving`` / ``Scope Loaded`` warnings written to stderr inside the block.

    The C++ runtime writes to file descriptor 2 directly, so the descriptor is pointed at a temporary
    file for the duration of the block; afterwards every line that is not such a warning (a real TVM
    error or warning, anything Python wrote meanwhile) is written to stderr unchanged, in order.

    Example::

        with tvm_chatter_filtered():
            lib = tvm.runtime.load_module("model.so")
    """
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError, AttributeError):
        yield               # no usable descriptor 2 (a closed or odd stderr): nothing to filter
        return
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            try:
                sys.stderr.flush()
            except (OSError, ValueError):
                pass
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            kept = filter_tvm_chatter(captured.read().decode("utf-8", errors="replace"))
            if kept:
                os.write(2, kept.encode("utf-8"))


__all__ = ["LOGGER_NAME", "logger", "get_logger", "use_application_logging", "is_tvm_chatter", "filter_tvm_chatter", "tvm_chatter_filtered"]
