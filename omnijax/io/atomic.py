"""Atomic writes: a file (or folder) appears complete under its name or not at all."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile


def _umask() -> int:
    # os.umask can only be read by setting it; set it back at once (no thread writes files in between here).
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _apply_umask(tmp: str, *, directory: bool) -> None:
    """mkstemp/mkdtemp create 0600/0700 (private to the owner); give the result the mode a plain open/mkdir
    would have under the user's umask, so outputs are as readable as any other file the user writes (files
    inside a temporary folder were made by open/mkdir or a nested atomic_path, already umask'd)."""
    os.chmod(tmp, (0o777 if directory else 0o666) & ~_umask())


@contextlib.contextmanager
def atomic_path(path: str, *, directory: bool = False):
    """Yields a temporary sibling path to write; on success it is renamed to `path` (replacing it).

    The temporary lives in the same folder, so the rename is atomic on one filesystem; on error it is removed.
    The result gets the user's umask mode (not mkstemp's 0600 / mkdtemp's 0700).
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
        _apply_umask(tmp, directory=directory)
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


def unwritable(path: str) -> str | None:
    """Why `path` (a file or folder to create or replace) cannot be written, or None: checked before any model is
    built, so a bad output place costs no minutes of loading and compiling."""
    path = os.path.abspath(path)
    parent = os.path.dirname(path)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        return f"{parent} is a file, not a folder"
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"{parent} is not writable"
    return None
