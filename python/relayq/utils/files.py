"""Writing model files atomically, and their checksums.

Example::

    with atomic_output("model.rqz") as tmp:      # a temporary file beside model.rqz
        write_zip(tmp)                            # if this raises, model.rqz is untouched
    digest = sha256_file("model.rqz")
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import uuid

from ..errors import ArtefactError

#: Bytes read at a time when hashing (libraries reach hundreds of MB; never read them whole).
_HASH_CHUNK = 1 << 20


def sha256_file(path: str) -> str:
    """The hex sha256 of a file's bytes.

    >>> len(sha256_file(__file__))
    64
    """
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_HASH_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def sha256_bytes(data: bytes) -> str:
    """The hex sha256 of ``data``.

    >>> sha256_bytes(b"")[:8]
    'e3b0c442'
    """
    return hashlib.sha256(data).hexdigest()


@contextlib.contextmanager
def atomic_output(path: str, what: str = "file"):
    """Yield a temporary path in ``path``'s directory; when the block ends without an error the temporary
    file replaces ``path`` (``os.replace``: readers see the old file or the new one, never half of one),
    otherwise it is removed and ``path`` is left as it was.

    A path that cannot be written (no such directory, no permission, ``/proc``) raises
    :class:`~relayq.errors.ArtefactError` naming it, before anything is written. The temporary keeps
    ``path``'s extension (TVM's ``export_library`` picks the linker by it).

    Example::

        with atomic_output("lib.so", "compiled model") as tmp:
            executable.export_library(tmp)
    """
    path = os.fspath(path)
    if not os.path.basename(path) or os.path.isdir(path):
        raise ArtefactError(f"cannot write the {what} to {path}: it is a directory, give a file name")
    directory = os.path.dirname(os.path.abspath(path))
    base, ext = os.path.splitext(os.path.basename(path))
    tmp = os.path.join(directory, f".{base}.{uuid.uuid4().hex[:12]}.tmp{ext}")
    try:
        # O_EXCL: never clobber anything; mode 0o666 so the umask applies as to any new file.
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    except OSError as e:
        raise ArtefactError(f"cannot write the {what} to {path}: {e.strerror or e}") from None
    try:
        yield tmp
        try:
            os.replace(tmp, path)
        except OSError as e:
            raise ArtefactError(f"cannot write the {what} to {path}: {e.strerror or e}") from None
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
