"""Conditioning encoders on one GPU: umT5-XXL on a 512-token prompt and the ViT-H/14 CLIP tower (31 blocks) on
one 480x832 frame, random bf16 weights; JAX time and peak memory vs transformers (PyTorch) with the same weights.

  python benchmarks/bench_encoders.py            # H100: full sizes (umT5-XXL 5.7B params, ViT-H/14)
  python benchmarks/bench_encoders.py --small    # CPU dry run on the tiny variants
Writes $OUT/bench_encoders.json. Parity here is bf16 vs bf16 (the f32 parity lives in the tests).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import os
import sys
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # torch shares the GPU
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from flax import nnx  # noqa: E402

from benchmarks.common import emit, jax_peak_gb, time_jax  # noqa: E402
from converters import load_umt5, load_wan_clip  # noqa: E402
from omnijax.models.wan.clip import clip_variant, preprocess_frames  # noqa: E402
from omnijax.models.wan.umt5 import umt5_variant  # noqa: E402
from omnijax.omnimatte.decompose import jit_module_fn  # noqa: E402


def time_torch_any(fn, dev, n=5) -> float:
    """Median seconds of fn() after a warm-up, on CUDA (events) or CPU."""
    fn()
    ts = []
    for _ in range(n):
        if dev == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if dev == "cuda":
            torch.cuda.synchronize()
        ts.append(time.perf_counter() - t)
    return float(np.median(ts))


def jitted(model):
    return jit_module_fn(model, lambda m, *a: m(*a))


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def torch_umt5(cfg, dev, dtype):
    from transformers import UMT5Config, UMT5EncoderModel

    hf = UMT5Config(vocab_size=cfg.vocab_size, d_model=cfg.d_model, d_kv=cfg.d_kv, d_ff=cfg.d_ff,
                    num_layers=cfg.num_layers, num_heads=cfg.num_heads, feed_forward_proj="gated-gelu",
                    dropout_rate=0.0)
    torch.set_default_dtype(dtype)
    try:
        with torch.device(dev):
            return UMT5EncoderModel(hf).eval()
    finally:
        torch.set_default_dtype(torch.float32)


def torch_clip(cfg, dev, dtype):
    from transformers import CLIPVisionConfig, CLIPVisionModel

    # output_layer blocks = the work Wan does (use_31_block); the post-norm is applied by transformers but is
    # negligible, and the comparison takes hidden_states[-1] (before it).
    hf = CLIPVisionConfig(hidden_size=cfg.width, intermediate_size=cfg.mlp_dim, num_hidden_layers=cfg.output_layer,
                          num_attention_heads=cfg.num_heads, image_size=cfg.image_size, patch_size=cfg.patch_size,
                          hidden_act=cfg.activation, layer_norm_eps=cfg.eps)
    torch.set_default_dtype(dtype)
    try:
        with torch.device(dev):
            return CLIPVisionModel(hf).eval()
    finally:
        torch.set_default_dtype(torch.float32)


def bench_umt5(small, dev, tdtype, jdtype, n):
    cfg = umt5_variant("tiny" if small else "xxl")
    ref = torch_umt5(cfg, dev, tdtype)
    # T5-style init scales (the default init would give a degenerate, huge residual). The query also takes the
    # extra d_kv**-0.5 of Mesh TF / transformers' T5 init: T5 does not scale its logits, so with q ~ fan-in**-0.5
    # they have std ~sqrt(d_kv) = 8, attention is near-argmax and the 24-layer stack is chaotic (f32 rounding alone
    # grows ~2x per layer; each bf16 run lands ~1.1 rel. from its own f32 run, so bf16 vs bf16 read 1.07 on H100).
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if "layer_norm" in name:
                p.fill_(1.0)
            else:
                p.normal_(0.0, p.shape[-1] ** -0.5 if p.ndim == 2 and "relative" not in name else 0.1)
                if name.endswith("SelfAttention.q.weight"):
                    p.mul_(cfg.d_kv ** -0.5)
    t = time.perf_counter()
    _, model = load_umt5({k: v for k, v in ref.state_dict().items()}, cfg, dtype=jdtype, param_dtype=jdtype)
    load_s = time.perf_counter() - t
    length = 64 if small else 512
    ids = np.random.default_rng(0).integers(2, cfg.vocab_size, (1, length)).astype(np.int32)
    mask = np.ones_like(ids)
    f = jitted(model)
    jax_s = time_jax(f, jnp.asarray(ids), jnp.asarray(mask), n=n)
    got = np.asarray(f(jnp.asarray(ids), jnp.asarray(mask)).astype(jnp.float32))
    peak = jax_peak_gb()
    tid, tmask = torch.from_numpy(ids).long().to(dev), torch.from_numpy(mask).long().to(dev)

    @torch.inference_mode()
    def call():
        return ref(input_ids=tid, attention_mask=tmask).last_hidden_state

    torch_s = time_torch_any(call, dev, n)
    want = call().float().cpu().numpy()
    torch_peak = round(torch.cuda.max_memory_allocated() / 2**30, 2) if dev == "cuda" else None
    params = sum(p.numel() for p in ref.parameters())
    return {"config": cfg.to_dict(), "params": params, "tokens": length, "convert_s": round(load_s, 1),
            "jax_ms": round(jax_s * 1e3, 2), "torch_ms": round(torch_s * 1e3, 2),
            "jax_peak_gb_so_far": peak, "torch_peak_gb_so_far": torch_peak,
            "rel_err_bf16_vs_torch": rel(got, want),
            "tflops_per_s": round(2 * params * length / jax_s / 1e12, 1)}


def clip_encoder(model):
    """(jitted fn(state, frames), state): preprocessing (bicubic squash, normalise) + tower, as the pipeline calls."""
    graphdef, state = nnx.split(model)

    @jax.jit
    def encode(state, frames):
        return nnx.merge(graphdef, state)(preprocess_frames(frames))

    return encode, state


def bench_clip(small, dev, tdtype, jdtype, n):
    cfg = clip_variant("tiny" if small else "vit-h-14")
    ref = torch_clip(cfg, dev, tdtype)
    _, model = load_wan_clip({k: v for k, v in ref.state_dict().items()}, cfg.replace(num_layers=cfg.output_layer),
                             dtype=jdtype, param_dtype=jdtype)
    frame = np.random.default_rng(1).uniform(-1, 1, (1, 480, 832, 3)).astype(np.float32)
    x = jnp.asarray(frame)
    backend = "auto"
    for attempt in ("auto", "xla"):  # cuDNN with 257 tokens x 80-wide heads: fall back to XLA if refused
        for block in model.blocks:
            block.attn.backend = attempt
        encode, state = clip_encoder(model)
        try:
            jax.block_until_ready(encode(state, x))
            break
        except Exception as e:  # noqa: BLE001 - reported in the JSON
            backend = f"xla (auto failed: {str(e).splitlines()[0][:200]})"
    backend = backend if backend != "auto" else f"auto ({jax.default_backend()}, bf16)"
    jax_s = time_jax(lambda a: encode(state, a), x, n=n)
    got = np.asarray(encode(state, x).astype(jnp.float32))
    peak = jax_peak_gb()
    pixels = torch.from_numpy(np.asarray(preprocess_frames(x))).permute(0, 3, 1, 2).to(dev, tdtype)

    @torch.inference_mode()
    def call():
        return ref(pixel_values=pixels, output_hidden_states=True).hidden_states[-1]

    torch_s = time_torch_any(call, dev, n)
    want = call().float().cpu().numpy()
    return {"config": cfg.to_dict(), "jax_ms": round(jax_s * 1e3, 2), "torch_ms_tower_only": round(torch_s * 1e3, 2),
            "jax_peak_gb_so_far": peak, "rel_err_bf16_vs_torch": rel(got, want), "out_shape": list(got.shape),
            "attention_backend": backend}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--small", action="store_true", help="tiny variants on CPU (a dry run of this script)")
    p.add_argument("--n", type=int, default=5)
    args = p.parse_args()
    dev = "cpu" if args.small or not torch.cuda.is_available() else "cuda"
    result = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "jax": jax.__version__,
              "torch": torch.__version__, "device": str(jax.devices()[0].device_kind), "small": args.small}
    # CLIP first: JAX's peak counter cannot be reset, so its peak is the CLIP figure; umT5's includes both.
    result["clip"] = bench_clip(args.small, dev, torch.bfloat16, jnp.bfloat16, args.n)
    gc.collect()  # the CLIP models are unreachable now; free them before the 11 GB umT5 pair
    if dev == "cuda":
        torch.cuda.empty_cache()
    result["umt5"] = bench_umt5(args.small, dev, torch.bfloat16, jnp.bfloat16, args.n)
    emit("bench_encoders", result)


if __name__ == "__main__":
    main()
