"""DiffDecompose on one GPU at the FLUX.1-dev dims (12B, random bf16 weights), 512x512, batch 1:
  1. prompt encoding: T5-XXL (512 tokens) + CLIP-L, then both released (as launch/decompose_image.py does);
  2. one decomposition end to end by stage: VAE encode of the composite, 28 Euler steps of both layers jointly
     (one compiled loop; text + composite + foreground + background = 512 + 3 x 1024 tokens), VAE decode of the
     two layers; peak memory;
  3. one training step (LoRA rank 128 on the image stream, all three image segments adapted, per-block remat,
     AdamW): time, MFU, memory. `step_s` is the step as tasks/trainer.py's loop runs it (the host reads a step's
     metrics after dispatching the next); `step_synced_s` waits for every step before dispatching the next.
     The batch holds latents already encoded (the trainer's VAE pass is excluded: stage 2's encode time x 3 is
     its cost).

  python benchmarks/bench_diffdecompose.py           # H200/H100 (about 4 minutes; ~60 GB peak)
  python benchmarks/bench_diffdecompose.py --tiny    # CPU dry run on the tiny variants
Writes $OUT/bench_diffdecompose.json.

Sections run text -> sampling -> training and each releases its models' extra state before the next; JAX's peak
counter cannot be reset, so the peak read after a section is that section's peak (each needs more than the one
before). MFU counts the model FLOPs of 2 forward passes per training step (the forward and the input gradients;
the frozen weights take no weight gradients; attention's backward is twice its forward; the adapters' own work
is counted, 3x their forward) against 989 TFLOP/s: `benchmarks.common.flux_flops`, checked against the matmuls of
the traced step in tests/benchmarks/test_flop_model.py. Recomputation is not model work, so a remat step's extra
forward is counted only in `hfu` (hardware FLOPs utilisation). Random weights make values meaningless.

  --skip-sampling      train step only;  --profile     device kernel time of the step by kind and name;
  --bare-grad          also time the bare value_and_grad of the loss (no optimizer, guard or metrics)
  --gating mask,slice  one training-step case per way of gating the adapters of partly adapted token axes
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

import omnijax.layers.lora as lora_module  # noqa: E402
from benchmarks.common import H100_BF16_PEAK, emit, flux_flops, jax_peak_gb, profile_kernels, random_module  # noqa: E402
from omnijax.diffdecompose.model import DiffDecomposer, ICDSettings, decompose_loss  # noqa: E402
from omnijax.diffdecompose.sampling import Decomposer  # noqa: E402
from omnijax.models.flux import variant  # noqa: E402
from omnijax.models.flux.clip_text import CLIPTextModel, clip_text_variant  # noqa: E402
from omnijax.models.flux.dit import FluxDiT  # noqa: E402
from omnijax.models.flux.lora import FluxLoRA, lora_spec  # noqa: E402
from omnijax.models.flux.vae import FluxVAE, flux_vae_variant  # noqa: E402
from omnijax.models.wan.umt5 import UMT5Encoder, umt5_variant  # noqa: E402
from omnijax.training.step import make_train_step  # noqa: E402

DEFAULT_MASK_COVERAGE = lora_module.MASK_COVERAGE

PROMPT = ("Three sub-images. <image-1>: a semi-transparent watermark logo with text, <image-2>: a natural "
          "photograph, <image-3>: The overlapped of <image-1> and <image-2> by alpha blending.")


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
    p.add_argument("--skip-sampling", action="store_true", help="time the training step only")
    p.add_argument("--profile", action="store_true", help="device kernel time of the training step by kind/name")
    p.add_argument("--bare-grad", action="store_true", help="also time value_and_grad of the loss alone")
    p.add_argument("--gating", default="auto", help="comma list of auto, mask, slice: how partly adapted token "
                   "axes gate the LoRA (one training-step case each; the first is `train_step`)")
    p.add_argument("--timed-steps", type=int, default=None, help="warm training steps timed (10; tiny: --n)")
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
    if not args.skip_sampling:
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
    tokens = 3 * (lat // 2) ** 2
    lora_tokens = tokens * sum(model.settings.lora_on) // 3
    flops = flux_flops(tokens, txt.shape[1], dit_cfg, lora_train=True, lora=lora, lora_tokens=lora_tokens)
    # + the recomputed forward with "full"; a partial policy recomputes an unknown share (not reported)
    hw_flops = {"none": flops, "full": flops + flux_flops(tokens, txt.shape[1], dit_cfg, lora=lora,
                                                          lora_tokens=lora_tokens)}.get(args.remat)
    cases = {}
    for gating in args.gating.split(","):
        # How the adapters of partly adapted token axes are gated (omnijax.layers.lora.TokenGated): "auto" the
        # library's rule, "mask" / "slice" one way everywhere (same values; a new compile per way).
        lora_module.MASK_COVERAGE = {"auto": DEFAULT_MASK_COVERAGE, "mask": 0.0, "slice": 1.01}[gating]
        optimizer = nnx.Optimizer(model, optax.adamw(1e-4), wrt=nnx.LoRAParam)
        step, state = make_train_step(model, optimizer, loss)
        rng = jax.random.key(1)
        t = time.perf_counter()
        compiled = step.compile(state, batch, rng)
        compile_s = time.perf_counter() - t
        mem = compiled.memory_analysis()
        state, metrics = step(state, batch, rng)
        jax.block_until_ready(metrics)
        timed_steps = args.timed_steps or (n if tiny else 10)
        ts = []
        for i in range(timed_steps):  # each step waited for: its time includes the host's dispatch of the next
            t = time.perf_counter()
            state, metrics = step(state, batch, jax.random.fold_in(rng, i))
            jax.block_until_ready(metrics)
            ts.append(time.perf_counter() - t)
        synced_s = float(np.median(ts))
        # As tasks/trainer.py runs its loop: a step's metrics are read (the non-finite guard) after the next step
        # is dispatched, so the device never waits for the host between steps.
        t, previous = time.perf_counter(), None
        for i in range(timed_steps):
            state, metrics = step(state, batch, jax.random.fold_in(rng, 100 + i))
            if previous is not None:
                bool(previous["finite"])
            previous = metrics
        bool(previous["finite"])
        step_s = (time.perf_counter() - t) / timed_steps
        case = dict(
            tokens=dict(text=int(txt.shape[1]), image=tokens), remat=args.remat, gating=gating,
            step_s=round(step_s, 4), step_synced_s=round(synced_s, 4), step_synced_min_s=round(min(ts), 4),
            compile_s=round(compile_s, 1), tflop_per_step=round(flops / 1e12, 2),
            mfu=round(flops / step_s / H100_BF16_PEAK, 4), mfu_synced=round(flops / synced_s / H100_BF16_PEAK, 4),
            hfu=None if hw_flops is None else round(hw_flops / step_s / H100_BF16_PEAK, 4),
            loss=float(metrics["loss"]), finite=bool(metrics["finite"]), peak_gb=jax_peak_gb(),
            compiled_temp_gb=None if mem is None else round(getattr(mem, "temp_size_in_bytes", 0) / 2**30, 2),
            compiled_args_gb=None if mem is None else round(getattr(mem, "argument_size_in_bytes", 0) / 2**30, 2))
        print(case, flush=True)
        if args.profile:
            holder = {"state": state}

            def one_step(step=step, holder=holder, rng=rng):
                holder["state"], m = step(holder["state"], batch, rng)
                return m

            case["profile"] = profile_kernels(one_step, 3, tempfile.mkdtemp(prefix="dd-profile-"))
            state = holder["state"]
            print({k: v for k, v in case["profile"].items() if k != "top"}, flush=True)
        cases[gating] = case
        model, _ = step.merge(state)  # the state was donated: the next case starts from its arrays
        del step, state, compiled, optimizer
        gc.collect()
    lora_module.MASK_COVERAGE = DEFAULT_MASK_COVERAGE
    result["train_step"] = cases[args.gating.split(",")[0]]
    result["train_step_by_gating"] = cases
    if args.bare_grad:
        # The same loss and gradients without the optimizer, the non-finite guard and the metrics.
        graphdef, lparams, rest = nnx.split(model, nnx.LoRAParam, ...)
        grad = jax.jit(jax.value_and_grad(lambda p, r, b, k: loss(nnx.merge(graphdef, p, r), b, k)))
        bare = lambda: grad(lparams, rest, batch, jax.random.key(1))
        first, warm, _ = timed(bare, max(n, 3))
        result["bare_value_and_grad"] = dict(step_s=round(warm, 4), mfu=round(flops / warm / H100_BF16_PEAK, 4),
                                             first_call_s=round(first, 1))
        print(result["bare_value_and_grad"], flush=True)
        if args.profile:
            result["bare_value_and_grad"]["profile"] = profile_kernels(bare, 3, tempfile.mkdtemp(prefix="dd-bare-"))
    emit("bench_diffdecompose", result)
    return result


if __name__ == "__main__":
    main()
