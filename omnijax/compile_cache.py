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
import threading

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


# JAX's own monitoring events of a compilation (jax._src.dispatch / compiler), by the names reports use.
_DURATIONS = {"/jax/core/compile/jaxpr_trace_duration": "trace",
              "/jax/core/compile/jaxpr_to_mlir_module_duration": "lower",
              "/jax/core/compile/backend_compile_duration": "compile_or_load",
              "/jax/compilation_cache/cache_retrieval_time_sec": "cache_read"}
_COUNTS = {"/jax/compilation_cache/cache_hits": "cache_hits", "/jax/compilation_cache/cache_misses": "cache_misses"}


class CompileClock:
    """Seconds JAX spent tracing, lowering and compiling (or loading from the persistent cache) since `start()`.

    `totals()` -> {"trace", "lower", "compile_or_load" (XLA compile, or the cache key, read and load on a hit),
    "cache_read" (part of compile_or_load), "cache_hits", "cache_misses", "programs"}; `programs()` the same
    seconds per program name. Listens to JAX's monitoring events, so it sees every jit in the process, the
    library's and the caller's alike.
    """

    def __init__(self):
        self._totals: dict[str, float] = {}
        self._by_program: dict[str, dict[str, float]] = {}
        self._lock = threading.Lock()  # events come from any thread that compiles; reports read from another
        self._on = False

    def start(self) -> CompileClock:
        if not self._on:
            from jax import monitoring

            monitoring.register_event_duration_secs_listener(self._duration)
            monitoring.register_event_listener(self._event)
            self._on = True
        return self

    def _duration(self, event: str, seconds: float, *, fun_name: str | None = None, **_) -> None:
        name = _DURATIONS.get(event)
        if name is None:
            return
        with self._lock:
            self._totals[name] = self._totals.get(name, 0.0) + seconds
            if fun_name is not None and name != "cache_read":
                # JAX names a trace by the function ("run") and its lowering and compile by the module ("jit(run)").
                key = fun_name[4:-1] if fun_name.startswith("jit(") and fun_name.endswith(")") else fun_name
                program = self._by_program.setdefault(key, {})
                program[name] = program.get(name, 0.0) + seconds
            if name == "compile_or_load":
                self._totals["programs"] = self._totals.get("programs", 0) + 1

    def _event(self, event: str, **_) -> None:
        name = _COUNTS.get(event)
        if name is not None:
            with self._lock:
                self._totals[name] = self._totals.get(name, 0) + 1

    def programs(self, top: int | None = None) -> dict:
        """{program name: {"trace", "lower", "compile_or_load": seconds}}, the costliest first (`top` of them).
        Names are the jitted functions' (`run`, `vae_decode`, `<lambda>`); programs of one name add up."""
        with self._lock:
            rows = sorted(((n, dict(r)) for n, r in self._by_program.items()), key=lambda kv: -sum(kv[1].values()))
        return {name: {k: round(v, 3) for k, v in row.items()} for name, row in rows[:top]}

    def totals(self) -> dict:
        out = {k: 0.0 for k in ("trace", "lower", "compile_or_load", "cache_read")}
        out |= {"cache_hits": 0, "cache_misses": 0, "programs": 0}
        with self._lock:
            totals = dict(self._totals)
        for k, v in totals.items():
            out[k] = round(v, 3) if isinstance(v, float) else v
        return out
