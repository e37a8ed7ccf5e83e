"""Shared benchmark helpers: timing, memory, FLOPs, JSON output."""

from __future__ import annotations

import json
import os
import time

import numpy as np

from omnijax.io.atomic import atomic_path, atomic_write

H100_BF16_PEAK = 989e12


def time_jax(fn, *args, n: int = 5) -> float:
    """Median wall time (s) of fn(*args) after one warm-up (compile) call."""
    import jax

    jax.block_until_ready(fn(*args))
    ts = []
    for _ in range(n):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        ts.append(time.perf_counter() - t)
    return float(np.median(ts))


def time_torch(fn, n: int = 5) -> float:
    import torch

    fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(n):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        torch.cuda.synchronize()
        ts.append(s.elapsed_time(e) / 1e3)
    return float(np.median(ts))


def jax_peak_gb() -> float | None:
    import jax

    stats = jax.devices()[0].memory_stats() or {}
    v = stats.get("peak_bytes_in_use")
    return None if v is None else round(v / 2**30, 2)


def wan_forward_flops(n_tokens: int, dim: int, ffn: int, layers: int, ctx_tokens: int = 769) -> float:
    """Model FLOPs of one Wan DiT forward (linear layers + self/cross attention), as in shared/gpu/NOTES.md."""
    per_block = (n_tokens * 2 * (4 * dim**2 + 2 * dim**2 + 2 * dim * ffn) + 4 * n_tokens**2 * dim
                 + 4 * n_tokens * ctx_tokens * dim)
    return float(layers * per_block)


def save(name: str, result: dict) -> str:
    """When $OUT is set, writes the result atomically to $OUT/<name>.json (e.g. after each part of a long run, so a
    run cut off by a time limit keeps what it measured). Returns the JSON text."""
    text = json.dumps(result, indent=1, default=float)
    out = os.environ.get("OUT")
    if out:
        os.makedirs(out, exist_ok=True)
        atomic_write(os.path.join(out, f"{name}.json"), text)
    return text


def emit(name: str, result: dict):
    """Prints the result as JSON and saves it (see `save`)."""
    print(save(name, result))


def random_module(ctor, seed: int = 0):
    """The module `ctor()` builds, with random weights drawn leaf by leaf on the default device.

    Jitting a whole 12B-parameter init compiles one huge program (bench_diffdecompose's took 5 min 40 s on the
    H200; a plain nnx.jit of FluxDiT 189 s). Here the module is built abstractly (nnx.eval_shape) and each leaf is
    drawn by a small op: kernels N(0, 1/fan_in), norm scales 1, everything else 0. Benchmarks only: the values are
    not those of the module's own initialisers.
    """
    import jax
    import jax.numpy as jnp
    from flax import nnx

    graphdef, state = nnx.split(nnx.eval_shape(ctor))
    leaves, key = [], jax.random.key(seed)
    for i, (path, var) in enumerate(nnx.to_flat_state(state)):
        v = var.get_value()
        if path[-1] in ("kernel", "embedding") and len(v.shape) >= 2:
            arr = jax.random.normal(jax.random.fold_in(key, i), v.shape, v.dtype) * (v.shape[-2] ** -0.5)
        else:
            arr = jnp.ones(v.shape, v.dtype) if path[-1] == "scale" else jnp.zeros(v.shape, v.dtype)
        leaves.append((path, var.replace(arr)))
    return nnx.merge(graphdef, nnx.from_flat_state(leaves))


def rel_l2(x, ref) -> float:
    """|x - ref| / |ref| in float64 (the memorisation checks' distance)."""
    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    return float(np.linalg.norm(x - ref) / np.linalg.norm(ref))


def plot_curves(path: str, panels: list) -> None:
    """Loss curves as one PNG, written atomically: `panels` = [(title, {label: [[step, value], ...]})], one axis
    each, log scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(4.3 * len(panels) + 0.4, 3.4), squeeze=False)
    for ax, (title, curves) in zip(axes[0], panels):
        for label, curve in curves.items():
            if curve:
                x, y = np.asarray(curve, np.float64).T
                ax.plot(x, y, label=label, lw=1)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.set_yscale("log")
        if len(curves) > 1:
            ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=90, format="png")
    plt.close(fig)
