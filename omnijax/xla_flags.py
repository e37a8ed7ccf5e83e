"""omnijax's default XLA flags, set before jax initialises a backend (entry points and benchmarks call this)."""

from __future__ import annotations

import os

# Measured on an H100 (docs/benchmarks.md): cuBLAS beats XLA's Triton GEMMs on the DiT's large matmuls.
XLA_DEFAULTS = ("--xla_gpu_enable_triton_gemm=false",)


def setup_xla_flags() -> None:
    """Adds the defaults to $XLA_FLAGS unless the user set them. Call before the first jax computation."""
    flags = os.environ.get("XLA_FLAGS", "")
    for f in XLA_DEFAULTS:
        if f.split("=")[0] not in flags:
            flags = f"{flags} {f}".strip()
    os.environ["XLA_FLAGS"] = flags
