"""Does a program compiled while the GPU is busy run slower? The Wan2.1 VAE decoder (81x480x832, 4 latent frames
per step, random weights, bf16) compiled cold, with its convolutions autotuned either on an idle GPU or while another
thread keeps the GPU busy with matmuls (as the Decomposer now compiles the decoder while the sampler runs), then
timed warm. One compile per process: run it once per mode, in fresh processes (XLA keeps autotune results in the
process; no persistent cache is used).

  python3 benchmarks/bench_compile_under_load.py idle
  python3 benchmarks/bench_compile_under_load.py busy
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from benchmarks.common import emit, random_module  # noqa: E402
from omnijax.models.wan.vae import WanVAE, vae_variant  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("mode", choices=["idle", "busy"])
    p.add_argument("--repeats", type=int, default=6)
    a = p.parse_args(argv)
    vae = random_module(lambda: WanVAE(vae_variant("wan2.1"), rngs=nnx.Rngs(0), dtype=jnp.bfloat16,
                                       param_dtype=jnp.bfloat16))
    graphdef, state = nnx.split(vae)
    decode = jax.jit(lambda s, z: nnx.merge(graphdef, s).decode(z, frames_per_step=4))
    z = jax.random.normal(jax.random.key(1), (1, 21, 60, 104, 16), jnp.float32)
    stop, load = threading.Event(), None
    if a.mode == "busy":
        matmuls = jax.jit(lambda x: [x := (x @ x) * 1e-3 for _ in range(20)][-1])
        x = jnp.ones((8192, 8192), jnp.bfloat16)
        jax.block_until_ready(matmuls(x))

        def keep_busy():
            while not stop.is_set():
                jax.block_until_ready(matmuls(x))

        load = threading.Thread(target=keep_busy)
        load.start()
    start = time.perf_counter()
    compiled = decode.lower(state, z).compile()
    compile_s = time.perf_counter() - start
    stop.set()
    if load is not None:
        load.join()
    jax.block_until_ready(compiled(state, z))
    runs = []
    for _ in range(a.repeats):
        start = time.perf_counter()
        jax.block_until_ready(compiled(state, z))
        runs.append(round(time.perf_counter() - start, 4))
    print(f"{a.mode}: compile {compile_s:.1f} s, decode {runs}, median {sorted(runs)[len(runs) // 2]}", flush=True)
    emit(f"bench_compile_under_load_{a.mode}", {"mode": a.mode, "compile_s": round(compile_s, 1), "decode_s": runs})
    return 0


if __name__ == "__main__":
    sys.exit(main())
