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


# LoRA targets that adapt the modulation Linear: it maps the G + 1 conditioning vectors, not the tokens.
_ROW_TARGETS = ("img_mod.lin", "txt_mod.lin", "modulation.lin")


def flux_flops(img_tokens: int, txt_tokens: int, cfg, *, lora_train: bool = False, lora=None,
               lora_tokens: int = 0) -> float:
    """Model FLOPs of one Flux forward, or of a LoRA training step's forward and backward (frozen base).

    Forward: per-token linears, 12 D² MACs per token per block (double and single blocks alike, spec §4.4), plus
    joint attention 4 J² D per block; embedders, modulation and the final layer are < 0.1 % and not counted.
    lora_train: the frozen linears' backward computes activation gradients only (1x their forward, no weight
    gradients); attention's backward is 2x its forward (dQ, dK, dV, dP: four J x J products against two).
    lora (a FluxLoRA) with lora_tokens (the tokens its adapters act on): each token-level adapter of rank r on an
    I -> O Linear costs 2 r (I + O) FLOPs per token forward and 3x that in a training step (activation and weight
    gradients); adapters of the modulation Linears act on G + 1 vectors, not tokens, and are not counted.
    Recomputation (remat) is hardware work, not model work, and is never counted."""
    j, d = img_tokens + txt_tokens, cfg.hidden_size
    blocks = cfg.depth + cfg.depth_single_blocks
    linear, attn = blocks * 2 * 12 * d * d * j, blocks * 4 * j * j * d
    adapters = 0
    if lora is not None:
        for path, ad in lora.adapters().items():
            if not path.endswith(_ROW_TARGETS):
                adapters += 2 * ad.rank * (ad.in_features + ad.out_features) * lora_tokens
    if lora_train:
        return float(2 * linear + 3 * attn + 3 * adapters)
    return float(linear + attn + adapters)


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


KERNEL_KINDS = (("attention", ("fmha", "flash", "cudnn", "attention", "mosaic")),
                ("gemm", ("gemm", "nvjet", "xmma", "cutlass", "cublas", "sm90_", "sm80_")),
                ("copy/transpose", ("copy", "transpose", "memcpy", "memset", "dynamic_update_slice", "concatenate")))


def kernel_kind(name: str) -> str:
    low = name.lower()
    for kind, keys in KERNEL_KINDS:
        if any(k in low for k in keys):
            return kind
    return "fusion/other"


def profile_kernels(fn, n: int, log_dir: str, top: int = 30) -> dict:
    """Runs fn() n times under jax.profiler and sums the device's kernel time by kernel name and kind.

    Returns {"calls", "device_busy_ms_per_call", "device_span_ms_per_call", "by_kind_ms_per_call",
    "top": [(name, ms per call, count)]}.
    Reads the Perfetto trace JAX writes (kernels on the device's streams); None where no device track exists
    (CPU runs)."""
    import glob
    import gzip

    import jax

    jax.block_until_ready(fn())  # compiled and warm before the trace
    with jax.profiler.trace(log_dir, create_perfetto_trace=True):
        for _ in range(n):
            jax.block_until_ready(fn())
    paths = sorted(glob.glob(os.path.join(log_dir, "**", "perfetto_trace.json.gz"), recursive=True))
    if not paths:
        return {"calls": n, "error": f"no perfetto trace under {log_dir}"}
    with gzip.open(paths[-1], "rt") as f:
        events = json.load(f)
    events = events["traceEvents"] if isinstance(events, dict) else events
    names = {e["pid"]: e.get("args", {}).get("name", "") for e in events
             if e.get("ph") == "M" and e.get("name") == "process_name"}
    device = {pid for pid, name in names.items() if "gpu" in name.lower() or "/device:" in name.lower()}
    totals: dict[str, list] = {}
    start, end = float("inf"), float("-inf")
    for e in events:
        if e.get("ph") == "X" and e.get("pid") in device and "dur" in e:
            t = totals.setdefault(e["name"], [0.0, 0])
            t[0] += e["dur"] / 1e3
            t[1] += 1
            start, end = min(start, float(e["ts"])), max(end, float(e["ts"]) + float(e["dur"]))
    if not totals:
        return {"calls": n, "device_tracks": sorted(names.values()), "error": "no kernel events on a device track"}
    kinds: dict[str, float] = {}
    for name, (ms, _) in totals.items():
        kinds[kernel_kind(name)] = kinds.get(kernel_kind(name), 0.0) + ms / n
    ranked = sorted(totals.items(), key=lambda kv: -kv[1][0])[:top]
    # busy: kernel time summed (kernels on several streams may overlap); span: first kernel start to last kernel
    # end over the n calls, so span - busy is the device's idle time between kernels and between calls.
    return {"calls": n, "device_busy_ms_per_call": round(sum(v[0] for v in totals.values()) / n, 2),
            "device_span_ms_per_call": round((end - start) / 1e3 / n, 2),
            "by_kind_ms_per_call": {k: round(v, 2) for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])},
            "top": [(name[:120], round(ms / n, 3), count // n) for name, (ms, count) in ranked]}
