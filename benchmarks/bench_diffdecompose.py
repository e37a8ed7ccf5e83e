"""DiffDecompose on one GPU at the FLUX.1-dev dims (12B, random bf16 weights), 512x512, batch 1:
  1. prompt encoding: T5-XXL (512 tokens) + CLIP-L, then both released (as launch/decompose_image.py does);
  2. one decomposition end to end by stage: VAE encode of the composite, 28 Euler steps of both layers jointly
     (one compiled loop; text + composite + foreground + background = 512 + 3 x 1024 tokens), VAE decode of the
     two layers; peak memory;
  3. one training step (LoRA rank 128 on the image stream, all three image segments adapted, per-block remat,
     AdamW): time, MFU, memory. The batch holds latents already encoded (the trainer's VAE pass is excluded:
     stage 2's encode time x 3 is its cost).

  python benchmarks/bench_diffdecompose.py           # H200/H100 (about 4 minutes; ~60 GB peak)
  python benchmarks/bench_diffdecompose.py --tiny    # CPU dry run on the tiny variants
Writes $OUT/bench_diffdecompose.json.

Sections run text -> sampling -> training and each releases its models' extra state before the next; JAX's peak
counter cannot be reset, so the peak read after a section is that section's peak (each needs more than the one
before). MFU counts the model FLOPs of 2 forward passes per training step (the forward and the input gradients;
the frozen weights take no weight gradients) against 989 TFLOP/s; recomputation is not model work, so a remat
step's extra forward is counted only in `hfu` (hardware FLOPs utilisation): linear layers 24·D² FLOPs per token per
block (both block kinds) + attention 4·J²·D per block, LoRA excluded. Random weights make values meaningless.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

from benchmarks.common import H100_BF16_PEAK, emit, jax_peak_gb, random_module  # noqa: E402
from omnijax.diffdecompose.model import DiffDecomposer, ICDSettings, decompose_loss  # noqa: E402
from omnijax.diffdecompose.sampling import Decomposer  # noqa: E402
from omnijax.models.flux import variant  # noqa: E402
from omnijax.models.flux.clip_text import CLIPTextModel, clip_text_variant  # noqa: E402
from omnijax.models.flux.dit import FluxDiT  # noqa: E402
from omnijax.models.flux.lora import FluxLoRA, lora_spec  # noqa: E402
from omnijax.models.flux.vae import FluxVAE, flux_vae_variant  # noqa: E402
from omnijax.models.wan.umt5 import UMT5Encoder, umt5_variant  # noqa: E402
from omnijax.training.step import make_train_step  # noqa: E402

PROMPT = ("Three sub-images. <image-1>: a semi-transparent watermark logo with text, <image-2>: a natural "
          "photograph, <image-3>: The overlapped of <image-1> and <image-2> by alpha blending.")


def forward_flops(cfg, txt_len: int, img_tokens: int) -> float:
    j = txt_len + img_tokens
    blocks = cfg.depth + cfg.depth_single_blocks
    return float(blocks * (24 * cfg.hidden_size**2 * j + 4 * j * j * cfg.hidden_size))


def build(ctor, tiny: bool):
    """The module of ctor(): eagerly for tiny, else random weights drawn leaf by leaf on the device
    (benchmarks.common.random_module: a jitted init of the 12B DiT compiled for 5 min 40 s)."""
    return ctor() if tiny else random_module(ctor)


def timed(fn, n: int):
    """(first call s, median of n warm calls s, last output)."""
    t = time.perf_counter()
    out = jax.block_until_ready(fn())
    first = time.perf_counter() - t
    ts = []
    for _ in range(n):
        t = time.perf_counter()
        out = jax.block_until_ready(fn())
        ts.append(time.perf_counter() - t)
    return first, float(np.median(ts)), out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="tiny variants on CPU (dry run)")
    p.add_argument("--size", type=int, default=None, help="image side (512; 64 tiny)")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (28; 2 tiny)")
    p.add_argument("--rank", type=int, default=None, help="LoRA rank (128; 4 tiny)")
    p.add_argument("--n", type=int, default=None, help="warm repetitions (3; 1 tiny)")
    p.add_argument("--attention", default="auto")
    p.add_argument("--remat", default="none", help="training step: none, full or a jax.checkpoint_policies name "
                   "(docs/benchmarks.md: no remat is 28 %% faster at 512² and fits 80 GB)")
    p.add_argument("--no-text", action="store_true", help="skip T5/CLIP (random prompt embeddings of their shape)")
    args = p.parse_args(argv)
    tiny = args.tiny
    size, steps = args.size or (64 if tiny else 512), args.steps or (2 if tiny else 28)
    rank, n = args.rank or (4 if tiny else 128), args.n or (1 if tiny else 3)
    dtype = jnp.float32 if tiny else jnp.bfloat16
    kw = dict(dtype=dtype, param_dtype=dtype)
    result = dict(date=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                  device=str(jax.devices()[0].device_kind), tiny=tiny, size=size, sampling_steps=steps, lora_rank=rank)

    # ---------------------------------------------------------------- 1. text encoders (then released)
    from converters.tokenizer import build_tiny_tokenizer, load_tokenizer
    from omnijax.models.flux.pipeline import FluxConditioner

    tok = load_tokenizer(build_tiny_tokenizer(tempfile.mkdtemp(prefix="omnijax-tok-") + "/tok"))
    t5_cfg = umt5_variant("tiny-t5" if tiny else "t5-v1.1-xxl")
    clip_cfg = clip_text_variant("tiny" if tiny else "clip-l")
    max_length = 16 if tiny else 512
    if args.no_text:
        rng = np.random.default_rng(0)
        txt = rng.standard_normal((1, max_length, t5_cfg.d_model)).astype(np.float32)
        y = rng.standard_normal((1, clip_cfg.width)).astype(np.float32)
    else:
        t = time.perf_counter()
        t5 = build(lambda: UMT5Encoder(t5_cfg, rngs=nnx.Rngs(2), **kw), tiny)
        clip = build(lambda: CLIPTextModel(clip_cfg, rngs=nnx.Rngs(3), **kw), tiny)
        result["build_text_encoders_s"] = round(time.perf_counter() - t, 2)
        cond = FluxConditioner(None, t5, tok, clip, tok, max_length)
        first, warm, (txt, y) = timed(lambda: cond([PROMPT]), n)
        result["encode_prompt"] = dict(first_call_s=round(first, 3), warm_s=round(warm, 4), peak_gb=jax_peak_gb())
        t5 = clip = cond = None  # released before the DiT is built
        gc.collect()

    # ---------------------------------------------------------------- 2. sampling, by stage
    vae_cfg = flux_vae_variant("tiny" if tiny else "flux")
    z = vae_cfg.z_dim
    dit_cfg = (variant("tiny", in_channels=4 * z, out_channels=4 * z, vec_in_dim=clip_cfg.width,
                       context_in_dim=t5_cfg.d_model) if tiny else variant("dev"))
    t = time.perf_counter()
    dit = build(lambda: FluxDiT(dit_cfg, rngs=nnx.Rngs(0), **kw), tiny)
    vae = build(lambda: FluxVAE(vae_cfg, rngs=nnx.Rngs(1), **kw), tiny)
    lora = build(lambda: FluxLoRA(dit_cfg, lora_spec(dit_cfg, rank), dtype=dtype, param_dtype=jnp.float32,
                                  rngs=nnx.Rngs(4)), tiny)
    model = DiffDecomposer(dit, lora, ICDSettings())
    jax.block_until_ready(nnx.state(model))
    result["build_dit_vae_lora_s"] = round(time.perf_counter() - t, 2)
    result["lora_params"] = int(sum(x.size for x in jax.tree.leaves(nnx.state(lora, nnx.LoRAParam))))
    composite = np.random.default_rng(0).uniform(0, 1, (1, size, size, 3)).astype(np.float32)
    dec = Decomposer(model, vae, num_steps=steps, guidance=3.5, attention_backend=args.attention)
    t = time.perf_counter()
    dec(composite, txt, y)
    first_total = time.perf_counter() - t
    runs = [dec(composite, txt, y, seed=i + 1)["timings"] for i in range(n)]
    stages = {k: round(float(np.median([r[k] for r in runs])), 4) for k in runs[0]}
    result["decompose"] = dict(first_call_total_s=round(first_total, 2), warm_stages_s=stages,
                               warm_total_s=round(sum(stages.values()), 3),
                               per_step_ms=round(1e3 * stages["sample_s"] / steps, 2), peak_gb=jax_peak_gb())
    del dec
    gc.collect()

    # ---------------------------------------------------------------- 3. one training step
    lat = size // vae_cfg.spatial_factor
    k = jax.random.split(jax.random.key(0), 3)
    latent = lambda i: jax.random.normal(k[i], (1, lat, lat, z))
    batch = dict(z_composite=latent(0), z_foreground=latent(1), z_background=latent(2), txt=jnp.asarray(txt, dtype),
                 y=jnp.asarray(y, jnp.float32))
    remat = {"full": True, "none": False}.get(args.remat, args.remat)
    loss = lambda m, b, r: decompose_loss(m, b, r, remat=remat, attention_backend=args.attention)[0]
    optimizer = nnx.Optimizer(model, optax.adamw(1e-4), wrt=nnx.LoRAParam)
    step, state = make_train_step(model, optimizer, loss)
    rng = jax.random.key(1)
    t = time.perf_counter()
    compiled = step.compile(state, batch, rng)
    compile_s = time.perf_counter() - t
    mem = compiled.memory_analysis()
    state, metrics = step(state, batch, rng)
    jax.block_until_ready(metrics)
    ts = []
    for i in range(max(n, 3) if not tiny else n):
        t = time.perf_counter()
        state, metrics = step(state, batch, jax.random.fold_in(rng, i))
        jax.block_until_ready(metrics)
        ts.append(time.perf_counter() - t)
    step_s = float(np.median(ts))
    tokens = 3 * (lat // 2) ** 2
    flops = 2 * forward_flops(dit_cfg, txt.shape[1], tokens)
    # + the recomputed forward with "full"; a partial policy recomputes an unknown share (not reported)
    hw_flops = {"none": flops, "full": 1.5 * flops}.get(args.remat)
    result["train_step"] = dict(
        tokens=dict(text=int(txt.shape[1]), image=tokens), remat=args.remat, step_s=round(step_s, 4),
        compile_s=round(compile_s, 1),
        tflop_per_step=round(flops / 1e12, 2), mfu=round(flops / step_s / H100_BF16_PEAK, 4),
        hfu=None if hw_flops is None else round(hw_flops / step_s / H100_BF16_PEAK, 4),
        loss=float(metrics["loss"]), finite=bool(metrics["finite"]), peak_gb=jax_peak_gb(),
        compiled_temp_gb=None if mem is None else round(getattr(mem, "temp_size_in_bytes", 0) / 2**30, 2),
        compiled_args_gb=None if mem is None else round(getattr(mem, "argument_size_in_bytes", 0) / 2**30, 2))
    emit("bench_diffdecompose", result)
    return result


if __name__ == "__main__":
    main()
