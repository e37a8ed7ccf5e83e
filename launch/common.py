"""What the entry points share: omnijax's default XLA flags, set when an entry point imports this module (first).

Models come from converters.registry (one loader, one dtype table); tasks from tasks/.
"""

import os

from omnijax.xla_flags import setup_xla_flags

setup_xla_flags()  # at import, before any jax computation initialises the backend


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
