"""Flux.1 around the transformer, on one GPU, JAX vs PyTorch with the same random bf16 weights, in one process:
  1. VAE encode and decode at 1024x1024 (omnijax FluxVAE vs diffusers AutoencoderKL, Flux config);
  2. T5-XXL on 512 tokens and CLIP-L on 77 (vs transformers T5EncoderModel / CLIPTextModel);
  3. text-to-image at 1024x1024, 28 steps, FLUX.1-dev dims (12B), guidance 3.5: time by stage (encode prompt,
     sample, decode) vs diffusers' FluxPipeline built from the same modules.

  python benchmarks/bench_flux_pipeline.py           # H200/H100: full sizes (about 5 minutes, ~80 GB peak)
  python benchmarks/bench_flux_pipeline.py --tiny    # CPU dry run on the tiny variants (about a minute)
Writes $OUT/bench_flux_pipeline.json.

Sections run in the order VAE -> text encoders -> DiT and each is released before the next, so JAX's peak counter
(which cannot be reset) read after a section is that section's peak (each needs more than the previous one); the
PyTorch peak is reset per section. Warm times are medians of --n runs after a warm-up call (JAX: the first call
compiles; its time is reported as first_call_s). The sampler is timed as one call of all 28 steps. The text-to-image
stages use the text encoders, DiT and VAE of this same run; "total" is the sum of the three warm stage times.
The DiTs of the two frameworks have independent random weights (same shapes); the VAE and text encoders are
converted from the PyTorch ones. Tokenizers: a tiny locally trained one (no hub access); prompts are padded to
512 / 77 tokens, so the work is the real work. Random weights make values meaningless; rel_err fields are
bf16-vs-bf16 sanity checks, not parity (that is tested in f32 in tests/).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import os
import sys
import tempfile
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # torch shares the GPU
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from flax import nnx  # noqa: E402

from benchmarks.common import emit, jax_peak_gb, random_module  # noqa: E402
from converters import load_clip_text, load_flux_vae, load_t5  # noqa: E402
from converters.tokenizer import build_tiny_tokenizer, load_tokenizer  # noqa: E402
from omnijax.models.flux import FluxDiT, variant  # noqa: E402
from omnijax.models.flux.clip_text import clip_text_variant  # noqa: E402
from omnijax.models.flux.pipeline import (  # noqa: E402
    FluxConditioner,
    decode_latents,
    latent_size,
    sample_latents,
)
from omnijax.models.flux.vae import flux_vae_variant  # noqa: E402
from omnijax.models.wan.umt5 import umt5_variant  # noqa: E402

PROMPT = "a red fox standing in fresh snow at dawn, soft light, high detail"


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def timed(fn, n: int, sync) -> tuple[float, float, object]:
    """(first call s, median warm s, last result) of fn(); `sync` waits for the device."""
    t = time.perf_counter()
    out = sync(fn())
    first = time.perf_counter() - t
    ts = []
    for _ in range(n):
        t = time.perf_counter()
        out = sync(fn())
        ts.append(time.perf_counter() - t)
    return first, float(np.median(ts)), out


def torch_sync(dev):
    def sync(x):
        if dev == "cuda":
            torch.cuda.synchronize()
        return x
    return sync


def torch_peak(dev):
    return round(torch.cuda.max_memory_allocated() / 2**30, 2) if dev == "cuda" else None


def reset_torch_peak(dev):
    if dev == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def pretransposed(module) -> dict:
    """The state dict with every 2-D Linear weight stored transposed on the device (same values, strides swapped).

    The converter transposes torch's [O, I] weights to [I, O] kernels; on the host that is a strided copy of
    0.1-0.5 GB/s for bf16, minutes for T5-XXL. Swapping the strides on the GPU first makes the converter's
    transpose a contiguous view, so conversion is only the device -> host -> device copy.
    """
    return {k: v.t().contiguous().t() if v.ndim == 2 and k.endswith("weight") and "embed" not in k
            and "shared" not in k and "relative_attention_bias" not in k else v
            for k, v in module.state_dict().items()}


def build_torch(ctor, dev, dtype):
    torch.set_default_dtype(dtype)
    try:
        with torch.device(dev):
            return ctor().eval()
    finally:
        torch.set_default_dtype(torch.float32)


def sizes(tiny: bool) -> dict:
    if tiny:
        return dict(image=64, t5_tokens=64, dit=variant("tiny", in_channels=64, out_channels=64, vec_in_dim=32),
                    vae=flux_vae_variant("tiny"), t5=umt5_variant("tiny-t5"), clip=clip_text_variant("tiny"), steps=2)
    return dict(image=1024, t5_tokens=512, dit=variant("dev"), vae=flux_vae_variant("flux"),
                t5=umt5_variant("t5-v1.1-xxl"), clip=clip_text_variant("clip-l"), steps=28)


# ------------------------------------------------------------------------------------------------ 1. VAE
def torch_vae(cfg, dev, dtype):
    from diffusers import AutoencoderKL

    n = len(cfg.dim_mult)
    return build_torch(lambda: AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n, block_out_channels=tuple(cfg.base_dim * m for m in cfg.dim_mult),
        layers_per_block=cfg.num_res_blocks, latent_channels=cfg.z_dim, norm_num_groups=cfg.groups,
        use_quant_conv=False, use_post_quant_conv=False, scaling_factor=cfg.scaling_factor,
        shift_factor=cfg.shift_factor), dev, dtype)


def bench_vae(s, dev, n, ref):
    cfg = s["vae"]
    _, vae = load_flux_vae(ref.state_dict(), cfg, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    size = s["image"]
    x = np.random.default_rng(0).uniform(-1, 1, (1, size, size, 3)).astype(np.float32)
    enc = nnx.jit(lambda m, a: m.encode(a))
    dec = nnx.jit(lambda m, z: m.decode(z, tile=None))
    xj = jnp.asarray(x, jnp.bfloat16)
    e_first, e_warm, z = timed(lambda: enc(vae, xj), n, jax.block_until_ready)
    d_first, d_warm, img = timed(lambda: dec(vae, z), n, jax.block_until_ready)
    out = {"image": size, "jax": {"encode_ms": e_warm * 1e3, "encode_first_call_s": e_first,
                                  "decode_ms": d_warm * 1e3, "decode_first_call_s": d_first, "peak_gb": jax_peak_gb()}}
    reset_torch_peak(dev)
    xt = torch.from_numpy(x).permute(0, 3, 1, 2).to(dev, torch.bfloat16)
    zt = torch.from_numpy(np.array(z, np.float32)).permute(0, 3, 1, 2).to(dev, torch.bfloat16)
    with torch.inference_mode():
        _, te, mean = timed(lambda: ref.encode(xt).latent_dist.mean, n, torch_sync(dev))
        _, td, timg = timed(lambda: ref.decode(zt / cfg.scaling_factor + cfg.shift_factor).sample, n, torch_sync(dev))
    out["torch"] = {"encode_ms": te * 1e3, "decode_ms": td * 1e3, "peak_gb": torch_peak(dev)}
    want_z = ((mean.float() - cfg.shift_factor) * cfg.scaling_factor).permute(0, 2, 3, 1).cpu().numpy()
    out["rel_err_encode"] = rel(z, want_z)
    out["rel_err_decode"] = rel(img, timg.float().clamp(-1, 1).permute(0, 2, 3, 1).cpu().numpy())
    out["ratio_jax_over_torch"] = {"encode": e_warm / te, "decode": d_warm / td}
    return out, vae


# ------------------------------------------------------------------------------------- 2. text encoders
def torch_t5(cfg, dev, dtype):
    from transformers import T5Config, T5EncoderModel

    hf = T5Config(vocab_size=cfg.vocab_size, d_model=cfg.d_model, d_kv=cfg.d_kv, d_ff=cfg.d_ff,
                  num_layers=cfg.num_layers, num_heads=cfg.num_heads, feed_forward_proj="gated-gelu", dropout_rate=0.0)
    model = build_torch(lambda: T5EncoderModel(hf), dev, dtype)
    with torch.no_grad():  # T5-style scales (the default init overflows the residual of a 24-layer stack)
        for name, p in model.named_parameters():
            if "layer_norm" in name:
                p.fill_(1.0)
            else:
                p.normal_(0.0, p.shape[-1] ** -0.5 if p.ndim == 2 and "relative" not in name else 0.1)
                if name.endswith("SelfAttention.q.weight"):
                    p.mul_(cfg.d_kv ** -0.5)
    return model


def torch_clip(cfg, dev, dtype):
    from transformers import CLIPTextConfig, CLIPTextModel

    hf = CLIPTextConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.width, intermediate_size=cfg.mlp_dim,
                        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
                        max_position_embeddings=cfg.max_positions, hidden_act=cfg.activation,
                        eos_token_id=cfg.eos_token_id, bos_token_id=0, pad_token_id=0)
    return build_torch(lambda: CLIPTextModel(hf), dev, dtype)


def bench_encoders(s, dev, n, t5_ref, clip_ref, tok):
    t = time.perf_counter()
    _, t5 = load_t5(pretransposed(t5_ref), s["t5"], dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    convert_s = time.perf_counter() - t
    _, clip = load_clip_text(clip_ref.state_dict(), s["clip"], dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    length = s["t5_tokens"]
    ids = np.random.default_rng(1).integers(2, s["t5"].vocab_size, (1, length)).astype(np.int32)
    cids = np.random.default_rng(2).integers(3, s["clip"].vocab_size - 1, (1, 77)).astype(np.int32)
    f_t5, f_clip = nnx.jit(lambda m, a: m(a)), nnx.jit(lambda m, a: m(a)[1])
    ij, cj = jnp.asarray(ids), jnp.asarray(cids)
    t_first, t_warm, h = timed(lambda: f_t5(t5, ij), n, jax.block_until_ready)
    c_first, c_warm, pooled = timed(lambda: f_clip(clip, cj), n, jax.block_until_ready)
    out = {"t5_tokens": length, "t5_convert_s": convert_s,
           "jax": {"t5_ms": t_warm * 1e3, "t5_first_call_s": t_first, "clip_ms": c_warm * 1e3,
                                        "clip_first_call_s": c_first, "peak_gb": jax_peak_gb()}}
    reset_torch_peak(dev)
    it, ct = torch.from_numpy(ids).long().to(dev), torch.from_numpy(cids).long().to(dev)
    with torch.inference_mode():
        _, tt, th = timed(lambda: t5_ref(input_ids=it).last_hidden_state, n, torch_sync(dev))
        _, tc, tp = timed(lambda: clip_ref(input_ids=ct).pooler_output, n, torch_sync(dev))
    out["torch"] = {"t5_ms": tt * 1e3, "clip_ms": tc * 1e3, "peak_gb": torch_peak(dev)}
    out["rel_err_t5"] = rel(np.asarray(h, np.float32), th.float().cpu().numpy())
    out["rel_err_clip_pooled"] = rel(np.asarray(pooled, np.float32), tp.float().cpu().numpy())
    out["ratio_jax_over_torch"] = {"t5": t_warm / tt, "clip": c_warm / tc}
    # The pipeline's prompt-encoding stage: tokenize + both encoders, as FluxConditioner runs it (no cache).
    cond = FluxConditioner(None, t5, tok, clip, tok, length)
    e_first, e_warm, (txt, y) = timed(lambda: cond([PROMPT]), n, lambda x: x)
    out["jax"]["encode_prompt_stage_s"] = e_warm
    return out, (txt, y), e_warm


# ------------------------------------------------------------------------------------------- 3. the DiT
def torch_dit(cfg, dev, dtype):
    from diffusers import FluxTransformer2DModel

    return build_torch(lambda: FluxTransformer2DModel(
        patch_size=1, in_channels=cfg.in_channels, out_channels=cfg.out_channels, num_layers=cfg.depth,
        num_single_layers=cfg.depth_single_blocks, attention_head_dim=cfg.head_dim, num_attention_heads=cfg.num_heads,
        joint_attention_dim=cfg.context_in_dim, pooled_projection_dim=cfg.vec_in_dim,
        guidance_embeds=cfg.guidance_embed, axes_dims_rope=tuple(cfg.axes_dim)), dev, dtype)


def bench_text_to_image(s, dev, n, dit_ref, vae, vae_ref, t5_ref, clip_ref, tok, txt, y, jax_encode_s):
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    # Independent random weights, initialised on the device: converting 24 GB through the host (the fused q/k/v
    # views copy strided bf16 at well under 1 GB/s) would cost minutes of a benchmark that only times the DiT.
    t = time.perf_counter()
    dit = random_module(lambda: FluxDiT(s["dit"], dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0)))
    jax.block_until_ready(nnx.state(dit))
    init_s = time.perf_counter() - t
    h, w = latent_size(vae.config, s["image"], s["image"])
    steps = s["steps"]
    txt, y = jnp.asarray(txt, jnp.bfloat16), jnp.asarray(y, jnp.bfloat16)
    sample = lambda: sample_latents(dit, txt, y, h=h, w=w, num_steps=steps, guidance=3.5, seed=0)
    s_first, s_warm, packed = timed(sample, max(1, n // 2), jax.block_until_ready)
    d_first, d_warm, _ = timed(lambda: decode_latents(vae, packed, h=h, w=w), n, lambda x: x)
    jax_out = {"dit_random_init_s": init_s, "encode_prompt_s": jax_encode_s, "sample_s": s_warm,
               "sample_first_call_s": s_first, "decode_s": d_warm, "decode_first_call_s": d_first,
               "total_s": jax_encode_s + s_warm + d_warm, "peak_gb": jax_peak_gb()}

    reset_torch_peak(dev)
    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True,
                                            base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                                            max_image_seq_len=4096)
    pipe = FluxPipeline(scheduler=sched, vae=vae_ref, text_encoder=clip_ref, tokenizer=tok, text_encoder_2=t5_ref,
                        tokenizer_2=tok, transformer=dit_ref)
    pipe.set_progress_bar_config(disable=True)
    sync = torch_sync(dev)
    with torch.inference_mode():
        _, te, (pe, pooled, _) = timed(lambda: pipe.encode_prompt(PROMPT, PROMPT, device=dev,
                                                                  max_sequence_length=s["t5_tokens"]), n, sync)
        kw = dict(prompt_embeds=pe, pooled_prompt_embeds=pooled, height=s["image"], width=s["image"],
                  guidance_scale=3.5, output_type="latent")
        pipe(**kw, num_inference_steps=2)  # warm-up (kernels, allocator)
        sync(None)
        ts = []
        for _ in range(max(1, n // 2)):
            t = time.perf_counter()
            lat = sync(pipe(**kw, num_inference_steps=steps).images)
            ts.append(time.perf_counter() - t)
        tsample = float(np.median(ts))

        def decode():
            z = pipe._unpack_latents(lat, s["image"], s["image"], pipe.vae_scale_factor)
            return vae_ref.decode(z / vae_ref.config.scaling_factor + vae_ref.config.shift_factor).sample

        _, td, _ = timed(decode, n, sync)
    torch_out = {"encode_prompt_s": te, "sample_s": tsample, "decode_s": td, "total_s": te + tsample + td,
                 "peak_gb": torch_peak(dev)}
    return {"image": s["image"], "steps": steps, "dit_params": sum(p.numel() for p in dit_ref.parameters()),
            "jax": jax_out, "torch": torch_out,
            "ratio_jax_over_torch": {k: jax_out[k] / torch_out[k] for k in ("encode_prompt_s", "sample_s",
                                                                           "decode_s", "total_s")}}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--tiny", action="store_true", help="tiny variants on CPU (a dry run of this script)")
    p.add_argument("--n", type=int, default=3, help="warm runs per timing (the 28-step sampler runs n // 2)")
    args = p.parse_args()
    dev = "cpu" if args.tiny or not torch.cuda.is_available() else "cuda"
    s = sizes(args.tiny)
    tok = load_tokenizer(build_tiny_tokenizer(os.path.join(tempfile.mkdtemp(), "tok")))
    tok.model_max_length = 77  # diffusers pads CLIP prompts to model_max_length
    result = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "jax": jax.__version__,
              "torch": torch.__version__, "device": str(jax.devices()[0].device_kind), "tiny": args.tiny}
    bf16 = torch.bfloat16
    vae_ref = torch_vae(s["vae"], dev, bf16)
    result["vae"], vae = bench_vae(s, dev, args.n, vae_ref)
    gc.collect()
    t5_ref, clip_ref = torch_t5(s["t5"], dev, bf16), torch_clip(s["clip"], dev, bf16)
    result["text_encoders"], (txt, y), encode_s = bench_encoders(s, dev, args.n, t5_ref, clip_ref, tok)
    gc.collect()  # the JAX encoders are unreachable now: freed before the DiT arrives (as the CLI does)
    dit_ref = torch_dit(s["dit"], dev, bf16)
    result["text_to_image"] = bench_text_to_image(s, dev, args.n, dit_ref, vae, vae_ref, t5_ref, clip_ref, tok,
                                                  txt, y, encode_s)
    emit("bench_flux_pipeline", result)


if __name__ == "__main__":
    main()
