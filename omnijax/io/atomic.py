"""Atomic writes: a file (or folder) appears complete under its name or not at all."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile


@contextlib.contextmanager
def atomic_path(path: str, *, directory: bool = False):
    """Yields a temporary sibling path to write; on success it is renamed to `path` (replacing it).

    The temporary lives in the same folder, so the rename is atomic on one filesystem; on error it is removed.
    With `directory`, the temporary is a created folder and an existing `path` folder is replaced.
    """
    path = os.path.abspath(path)
    parent, name = os.path.split(path)
    os.makedirs(parent, exist_ok=True)
    if directory:
        tmp = tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=parent)
    else:
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.tmp-", suffix=os.path.splitext(name)[1], dir=parent)
        os.close(fd)
    try:
        yield tmp
        if directory and os.path.isdir(path):
            old = tempfile.mkdtemp(prefix=f".{name}.old-", dir=parent)
            os.replace(path, os.path.join(old, name))
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
        elif os.path.exists(tmp):
            os.remove(tmp)
        raise


def atomic_write(path: str, data: str | bytes) -> str:
    """Writes text or bytes to `path` atomically. Returns the path."""
    with atomic_path(path) as tmp, open(tmp, "wb" if isinstance(data, bytes) else "w") as f:
        f.write(data)
    return path
