"""End-to-end decomposition time by stage at the 1.3B Fun-InP dims with random weights (issue 8).

  python benchmarks/bench_decompose.py            # H100: 81x480x832, 2/4/50 steps; 197 frames with multidiffusion
  python benchmarks/bench_decompose.py --small    # CPU dry run with the tiny models
One object. Stages: encoders (CLIP of frame 0; the empty-prompt umT5 embedding comes from the embedding cache,
where it is computed once per installation), VAE encode (+ masks), sampler, VAE decode. Each case runs once to
compile and once timed. Writing the output files is CPU work (PyAV is not on the GPU image): see the CPU row in
docs/benchmarks.md. Writes $OUT/bench_decompose.json.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from benchmarks.common import emit, jax_peak_gb  # noqa: E402
from omnijax.xla_flags import setup_xla_flags  # noqa: E402

setup_xla_flags()


def build(small: bool):
    from omnijax.conditioning import Conditioner, EmbeddingCache
    from omnijax.models.wan import WanDiT, variant
    from omnijax.models.wan.clip import CLIPVisionTower, clip_variant
    from omnijax.models.wan.vae import WanVAE, vae_variant
    from omnijax.omnimatte.branch import EasyOmnimatte
    from omnijax.omnimatte.experts import effect_expert, quality_expert

    dt = jnp.float32 if small else jnp.bfloat16
    kw = dict(dtype=dt, param_dtype=dt)
    t = time.perf_counter()
    base = WanDiT(variant("tiny-inp" if small else "1.3b-inp"), rngs=nnx.Rngs(0), **kw)
    n = base.config.num_layers
    rank = (4, 4) if small else (128, 64)
    effect = EasyOmnimatte(base, effect_expert(n, rank=rank[0], alpha=rank[0]), rngs=nnx.Rngs(1))
    quality = EasyOmnimatte(base, quality_expert(n, rank=rank[1], alpha=rank[1]), rngs=nnx.Rngs(2))
    vae = WanVAE(vae_variant("tiny" if small else "wan2.1"), rngs=nnx.Rngs(3), **kw)
    clip = CLIPVisionTower(clip_variant("tiny" if small else "vit-h-14"), rngs=nnx.Rngs(4), **kw)
    cache = EmbeddingCache(tempfile.mkdtemp())
    cond = Conditioner(cache, image_encoder=clip, text_id="bench-random-umt5")
    text = np.random.default_rng(0).standard_normal((1, base.config.text_dim)).astype(np.float32)
    cache.store("text", cache.key("text", b"", cond.text_id), text)  # the cached empty-prompt embedding
    return (effect, quality, vae, cond), time.perf_counter() - t


def clip_and_mask(frames, h, w, seed=0):
    r = np.random.default_rng(seed)
    video = r.random((frames, h, w, 3), np.float32)
    mask = np.zeros((1, frames, h, w), np.float32)
    for f in range(frames):
        x = int((w // 4) + (w // 4) * f / max(frames - 1, 1))
        mask[0, f, h // 4: h // 2, x: x + w // 6] = 1.0
    return video, mask


def main():
    from omnijax.omnimatte.decompose import SamplerSettings

    ap = argparse.ArgumentParser()
    ap.add_argument("--small", action="store_true")
    ap.add_argument("--budget-s", type=float, default=520.0, help="start no new case after this many seconds")
    ap.add_argument("--cases", default="", help="steps:frames list, e.g. 2:81,4:81 (default: all four)")
    ap.add_argument("--scan", choices=["on", "off", "both"], default="on",
                    help="experts' blocks as lax.scan loops (Decomposer scan_blocks); both: each case twice, "
                    "on then off")
    args = ap.parse_args()
    t0 = time.perf_counter()
    models, build_s = build(args.small)
    from omnijax.omnimatte.decompose import Decomposer

    scans = {"on": [True], "off": [False], "both": [True, False]}[args.scan]
    decomposers = {scan: Decomposer(*models, scan_blocks=scan) for scan in scans}
    h, w = (64, 64) if args.small else (480, 832)
    cases = [(2, 81), (4, 81), (4, 197), (50, 81)] if not args.small else [(2, 9), (4, 9), (4, 93), (50, 9)]
    if args.cases:
        cases = [tuple(int(v) for v in c.split(":")) for c in args.cases.split(",")]
    res = dict(date=str(datetime.date.today()), device=str(jax.devices()[0].device_kind), jax=jax.__version__,
               size=[h, w], build_models_s=round(build_s, 1), cases=[])
    for (steps, frames), scan in [(c, scan) for c in cases for scan in scans]:
        dec = decomposers[scan]
        if time.perf_counter() - t0 > args.budget_s:
            res["cases"].append(dict(steps=steps, frames=frames, scan_blocks=scan, skipped="time budget"))
            continue
        video, mask = clip_and_mask(frames, h, w)
        s = SamplerSettings(steps=steps)
        first = {}
        t = time.perf_counter()
        dec(video, mask, s, timings=first)  # compile + run
        first_s = time.perf_counter() - t
        video, mask = clip_and_mask(frames, h, w, seed=1)  # a new first frame: CLIP is computed, not cached
        timed = {}
        t = time.perf_counter()
        bg, alpha = dec(video, mask, SamplerSettings(steps=steps, seed=1), timings=timed)
        total = time.perf_counter() - t
        assert bg.shape == (frames, h, w, 3) and alpha.shape == (1, frames, h, w)
        res["cases"].append(dict(steps=steps, frames=frames, scan_blocks=scan, total_s=round(total, 3),
                                 first_call_s=round(first_s, 1),
                                 first_stages_s={k: round(v, 2) for k, v in first.items()},
                                 stages_s={k: round(v, 3) for k, v in timed.items()}, peak_gb_so_far=jax_peak_gb()))
        print(res["cases"][-1], flush=True)
    res["peak_gb"] = jax_peak_gb()
    emit("bench_decompose", res)


if __name__ == "__main__":
    main()
