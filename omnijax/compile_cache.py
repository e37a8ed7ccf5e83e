"""JAX's persistent compilation cache for the command-line tools: a second run of the same shapes reads the
compiled programs from disk instead of compiling them again.

The folder is per user: $XDG_CACHE_HOME/omnijax/jax, or ~/.cache/omnijax/jax when XDG_CACHE_HOME is unset.
JAX's defaults keep only programs that took >= 1 s to compile; a decomposition also runs many small programs
(VAE chunks, resizes, the conditioning glue) whose compiles add up, so every program is kept here
(min compile time 0, any entry size). Entries are keyed by the program, the JAX/XLA versions and the device,
so a stale or foreign entry is never used; JAX writes each entry atomically.
"""

from __future__ import annotations

import os

import jax


def default_dir() -> str:
    """$XDG_CACHE_HOME/omnijax/jax, else ~/.cache/omnijax/jax."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "omnijax", "jax")


def enable(directory: str | None = "default") -> str | None:
    """Turns the persistent compilation cache on at `directory` ("default": `default_dir()`; None: off).

    Call before the first compilation (JAX reads the setting when it first compiles). Returns the folder used,
    or None when disabled. A folder that cannot be created raises OSError (callers report it as bad input).
    """
    if directory is None:
        jax.config.update("jax_enable_compilation_cache", False)
        return None
    directory = os.path.abspath(default_dir() if directory == "default" else directory)
    os.makedirs(directory, exist_ok=True)
    if not os.access(directory, os.W_OK | os.X_OK):
        raise PermissionError(f"compilation cache {directory}: not writable")
    jax.config.update("jax_enable_compilation_cache", True)
    jax.config.update("jax_compilation_cache_dir", directory)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return directory


def entries(directory: str) -> int:
    """How many compiled programs the cache folder holds (for reports and tests)."""
    if not os.path.isdir(directory):
        return 0
    return sum(1 for n in os.listdir(directory) if not n.startswith(".") and "-atime" not in n)
