"""Wan2.1 VAE encode/decode speed and peak memory: omnijax WanVAE (JAX) vs diffusers AutoencoderKLWan (PyTorch).

Cases (random weights, bf16 weights and compute, batch 1):
  480p: encode 81x480x832 and decode its 21x60x104 latents, streamed (omnijax "stream" mode; diffusers' own
        frame-chunked loop), no tiling.
  720p: encode and decode 81x720x1280, spatially tiled (omnijax TileSpec() default: tiles <= 64 latents, overlap
        >= 12; diffusers enable_tiling() default: 256 px tiles, 192 px stride). The two tilings differ.
Each JAX case runs in its own process, because JAX's peak_bytes_in_use cannot be reset; PyTorch runs its cases in
one process with torch.cuda.reset_peak_memory_stats(). Time is the median of --reps runs after one warm-up (for
JAX the warm-up is the compile, reported separately).

Usage (one H100, ~4 min):  python benchmarks/bench_vae.py            # prints JSON, writes $OUT/vae.json
CPU dry run of the same code on tiny sizes:  python benchmarks/bench_vae.py --small
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks.common import emit  # noqa: E402

SIZES = {"480p": (81, 480, 832), "720p": (81, 720, 1280)}
SMALL_SIZES = {"480p": (9, 32, 48), "720p": (9, 64, 96)}
CASES = [("encode", "480p"), ("decode", "480p"), ("encode", "720p"), ("decode", "720p")]
BUDGET_S = 215  # stop starting new cases after this many seconds (the whole script must stay under ~4 min)


def _shapes(small: bool, res: str):
    f, h, w = (SMALL_SIZES if small else SIZES)[res]
    return (1, f, h, w, 3), (1, (f - 1) // 4 + 1, h // 8, w // 8, 16)


def run_jax_case(what: str, res: str, small: bool, reps: int, *, mode: str = "stream", fps: int = 1) -> dict:
    if small:
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    sys.path.insert(0, ROOT)
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from omnijax.models.wan.vae import WanVAE, vae_variant
    from omnijax.models.wan.vae_tiling import TileSpec
    from omnijax.params import build_with_params, param_shapes

    cfg = vae_variant("tiny" if small else "wan2.1")
    # Random weights drawn on the host: JAX's own random init compiles a threefry program per parameter shape
    # (tens of seconds on a CPU), which would only add noise to the benchmark's wall time.
    make = lambda: WanVAE(cfg, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    weights = {k: (float(k.endswith("scale")) + 0.02 * rng.standard_normal(shape, np.float32)).astype(dtype)
               for k, (shape, dtype) in param_shapes(nnx.eval_shape(make)).items()}  # norm gammas around 1
    model = build_with_params(make, weights)
    graphdef, state = nnx.split(model)
    video_shape, latent_shape = _shapes(small, res)
    # 720p is tiled; in --small the frames are tiny, so force a small tile layout to run the same code path.
    tile = None if res == "480p" else (TileSpec(tile=6, overlap=2) if small else TileSpec())
    if what == "encode":
        x = jnp.asarray(rng.uniform(-1, 1, video_shape), jnp.bfloat16)
        fn = lambda s, x: nnx.merge(graphdef, s).encode(x, mode=mode, tile=tile, frames_per_step=fps)
    else:
        x = jnp.asarray(rng.standard_normal(latent_shape), jnp.float32)
        fn = lambda s, x: nnx.merge(graphdef, s).decode(x, mode=mode, tile=tile, frames_per_step=fps)
    # On the CPU dry run, XLA's cheapest optimisation level compiles ~3x faster (the numbers mean nothing there).
    opts = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True} if small else None
    t0 = time.perf_counter()
    compiled = jax.jit(fn).lower(state, x).compile(compiler_options=opts)
    compile_s = time.perf_counter() - t0
    jax.block_until_ready(compiled(state, x))  # warm-up
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        out = jax.block_until_ready(compiled(state, x))
        times.append(time.perf_counter() - t0)
    stats = jax.devices()[0].memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    return dict(time_s=statistics.median(times), times_s=times, compile_s=compile_s, mode=mode, frames_per_step=fps,
                peak_gb=None if peak is None else peak / 1e9, out_shape=list(out.shape),
                finite=bool(jnp.isfinite(out).all()), tile=None if tile is None else vars(tile),
                params_gb=sum(v.nbytes for v in jax.tree.leaves(state)) / 1e9, device=str(jax.devices()[0]))


def run_torch_cases(cases, small: bool, reps: int, deadline: float) -> dict:
    import numpy as np
    import torch
    from diffusers import AutoencoderKLWan

    dev = "cuda" if torch.cuda.is_available() and not small else "cpu"
    ref = AutoencoderKLWan(base_dim=8 if small else 96).to(dev, torch.bfloat16).eval()
    results = {}
    for what, res in cases:
        name = f"{what}_{res}"
        if time.time() > deadline:
            results[name] = {"skipped": "time budget"}
            continue
        if res == "720p":
            if small:
                ref.enable_tiling(tile_sample_min_height=48, tile_sample_min_width=48, tile_sample_stride_height=32,
                                  tile_sample_stride_width=32)
            else:
                ref.enable_tiling()
        else:
            ref.disable_tiling()
        video_shape, latent_shape = _shapes(small, res)
        rng = np.random.default_rng(0)
        if what == "encode":
            x = torch.from_numpy(rng.uniform(-1, 1, video_shape).astype(np.float32)).permute(0, 4, 1, 2, 3)
            call = lambda x: ref.encode(x).latent_dist.mode()
        else:
            x = torch.from_numpy(rng.standard_normal(latent_shape).astype(np.float32)).permute(0, 4, 1, 2, 3)
            call = lambda x: ref.decode(x).sample
        x = x.to(dev, torch.bfloat16).contiguous()
        sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
        with torch.no_grad():
            call(x)  # warm-up
            sync()
            if dev == "cuda":
                torch.cuda.reset_peak_memory_stats()
            times = []
            for _ in range(reps):
                t0 = time.perf_counter()
                out = call(x)
                sync()
                times.append(time.perf_counter() - t0)
        peak = torch.cuda.max_memory_allocated() / 1e9 if dev == "cuda" else None
        results[name] = dict(time_s=statistics.median(times), times_s=times, peak_gb=peak,
                             out_shape=list(out.shape), tiled=res == "720p")
    results["device"] = torch.cuda.get_device_name() if dev == "cuda" else "cpu"
    return results


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", action="store_true", help="tiny model and sizes on CPU (dry run)")
    ap.add_argument("--reps", type=int, default=2)
    # One JAX case in this process: what:res[:mode[:frames_per_step]], e.g. decode:480p:stream:2 or decode:480p:whole.
    ap.add_argument("--case")
    ap.add_argument("--skip-torch", action="store_true")
    args = ap.parse_args()
    if args.case:
        what, res, *variant = args.case.split(":")  # what:res[:mode[:frames_per_step]]
        mode, fps = (variant + ["stream", "1"][len(variant):])[:2]
        print("RESULT " + json.dumps(run_jax_case(what, res, args.small, args.reps, mode=mode, fps=int(fps))))
        return
    start = time.time()
    deadline = start + (BUDGET_S if not args.small else 1800)  # --small on a shared CPU is compile-bound
    out = {"benchmark": "wan2.1 vae", "small": args.small, "dtype": "bfloat16", "reps": args.reps, "jax": {}}
    for what, res in CASES:
        name = f"{what}_{res}"
        if time.time() > deadline:
            out["jax"][name] = {"skipped": "time budget"}
            continue
        cmd = [sys.executable, os.path.abspath(__file__), "--case", f"{what}:{res}", "--reps", str(args.reps)]
        proc = subprocess.run(cmd + (["--small"] if args.small else []), capture_output=True, text=True,
                              timeout=max(30, deadline + 60 - time.time()))
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        out["jax"][name] = json.loads(lines[-1][7:]) if lines else {"error": proc.stderr[-2000:]}
    if not args.skip_torch:
        try:
            out["torch"] = run_torch_cases(CASES, args.small, args.reps, deadline)
        except Exception as e:  # a missing diffusers must not lose the JAX numbers
            out["torch"] = {"error": f"{type(e).__name__}: {e}"}
        for name, j in out["jax"].items():
            t = out["torch"].get(name, {})
            if "time_s" in j and "time_s" in t:
                out.setdefault("speedup_vs_torch", {})[name] = t["time_s"] / j["time_s"]
    out["wall_s"] = time.time() - start
    emit("vae", out)


if __name__ == "__main__":
    main()
