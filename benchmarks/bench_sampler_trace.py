"""Seconds JAX takes to trace (and, with --lower, to lower) the decomposition sampler, the host work a new process
pays before the persistent compilation cache can even be asked. Abstract models (nnx.eval_shape): no weights, no
device work, so it runs on any machine's CPU and measures that machine's Python.

  python benchmarks/bench_sampler_trace.py                       # 1.3B Fun-InP experts, 81x480x832, one object
  python benchmarks/bench_sampler_trace.py --variant tiny-inp --frames 5 --height 32 --width 64   # quick dry run
  A/B of two checkouts on one machine: run it from each, alternating (PYTHONPATH=<checkout> python <checkout>/...).
Each repeat builds a new Decomposer (a new sampler: traced afresh). Prints the seconds; $OUT/bench_sampler_trace.json
when $OUT is set.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from benchmarks.common import emit  # noqa: E402
from omnijax.models.wan import WanDiT, variant  # noqa: E402
from omnijax.models.wan.vae import WanVAE, vae_variant  # noqa: E402
from omnijax.omnimatte.branch import EasyOmnimatte  # noqa: E402
from omnijax.omnimatte.decompose import Decomposer  # noqa: E402
from omnijax.omnimatte.experts import effect_expert, quality_expert  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variant", default="1.3b-inp")
    p.add_argument("--frames", type=int, default=81)
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--width", type=int, default=832)
    p.add_argument("--repeats", type=int, default=4, help="timed repeats after one untimed")
    p.add_argument("--attention", default="xla", help="the DiT's attention backend (fa3/cudnn need a GPU)")
    p.add_argument("--lower", action="store_true", help="also lower each trace to StableHLO")
    a = p.parse_args(argv)
    kw = dict(dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)

    def build():
        base = WanDiT(variant(a.variant), rngs=nnx.Rngs(0), **kw)
        n = base.config.num_layers
        return (EasyOmnimatte(base, effect_expert(n, rank=128, alpha=128.0), rngs=nnx.Rngs(1)),
                EasyOmnimatte(base, quality_expert(n, rank=64, alpha=64.0), rngs=nnx.Rngs(2)))

    effect, quality = nnx.eval_shape(build)
    vae = nnx.eval_shape(lambda: WanVAE(vae_variant("wan2.1"), rngs=nnx.Rngs(3), **kw))
    cfg = effect.base.config
    S = jax.ShapeDtypeStruct
    t, h, w = (a.frames - 1) // 4 + 1, a.height // 8, a.width // 8
    z = {name: S((1, t, h, w, 16), jnp.float32) for name in ("background", "alpha")}

    def once():
        dec = Decomposer(effect, quality, vae, None, attention_backend=a.attention)
        cond = {"params": dec._state, "y": S((1, t, h, w, cfg.in_dim - 16), jnp.bfloat16),
                "context": S((1, 1, cfg.text_dim), jnp.float32), "clip": S((1, 257, cfg.image_dim), jnp.float32)}
        start = time.perf_counter()
        traced = dec._sample.jitted.trace(z, S((3,), jnp.float32), S((), jnp.int32), cond, windows=None)
        out = {"trace_s": round(time.perf_counter() - start, 3)}
        if a.lower:
            start = time.perf_counter()
            traced.lower()
            out["lower_s"] = round(time.perf_counter() - start, 3)
        return out

    once()
    runs = [once() for _ in range(a.repeats)]
    for r in runs:
        print(r, flush=True)
    emit("bench_sampler_trace", {"variant": a.variant, "clip": [a.frames, a.height, a.width],
                                 "attention": a.attention, "runs": runs})
    return 0


if __name__ == "__main__":
    sys.exit(main())
