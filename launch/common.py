"""What the entry points share: XLA flags, model loading (tiny random or checkpoints), the conditioner."""

from __future__ import annotations

import os
import sys

# Measured on an H100 (docs/benchmarks.md): cuBLAS beats XLA's Triton GEMMs on the DiT's large matmuls.
_XLA_DEFAULTS = ("--xla_gpu_enable_triton_gemm=false",)


def setup_xla_flags():
    """Adds omnijax's default XLA flags unless the user set them. Call before jax initialises a backend."""
    flags = os.environ.get("XLA_FLAGS", "")
    for f in _XLA_DEFAULTS:
        if f.split("=")[0] not in flags:
            flags = f"{flags} {f}".strip()
    os.environ["XLA_FLAGS"] = flags


setup_xla_flags()  # at import, before any jax computation initialises the backend
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

DTYPES = {"bf16": jnp.bfloat16, "f32": jnp.float32}
LOADERS = {"wan_dit": "load_wan_dit", "wan_vae": "load_wan_vae", "umt5": "load_umt5", "wan_clip": "load_wan_clip",
           "flux_dit": "load_flux_dit", "flux_vae": "load_flux_vae", "t5": "load_t5", "clip_l": "load_clip_text"}


def load_model(kind: str, source: str, dtype=jnp.bfloat16):
    """(config, model) from an omnijax checkpoint directory (launch/convert.py) or the original PyTorch files."""
    import converters
    from omnijax.checkpoint import load_pretrained

    if os.path.isdir(source) and os.path.isfile(os.path.join(source, "omnijax.json")):
        return load_pretrained(source, kind=kind, dtype=dtype, param_dtype=dtype)
    return getattr(converters, LOADERS[kind])(source, dtype=dtype, param_dtype=dtype, progress=True)


def tiny_models(seed: int = 0, dtype=jnp.float32):
    """Random tiny models of every kind (tests, smoke runs, demos): (WanDiT, WanVAE, UMT5Encoder, CLIPVisionTower)."""
    from omnijax.models.wan import WanDiT, variant
    from omnijax.models.wan.clip import CLIPVisionTower, clip_variant
    from omnijax.models.wan.umt5 import UMT5Encoder, umt5_variant
    from omnijax.models.wan.vae import WanVAE, vae_variant

    kw = dict(dtype=dtype, param_dtype=dtype)
    return (WanDiT(variant("tiny-inp"), rngs=nnx.Rngs(seed), **kw),
            WanVAE(vae_variant("tiny"), rngs=nnx.Rngs(seed + 1), **kw),
            UMT5Encoder(umt5_variant("tiny"), rngs=nnx.Rngs(seed + 2), **kw),
            CLIPVisionTower(clip_variant("tiny"), rngs=nnx.Rngs(seed + 3), **kw))


def conditioner(cache_dir: str | None, *, text_encoder=None, image_encoder=None, tokenizer_dir: str | None = None,
                tiny: bool = False):
    """A Conditioner reading/writing the embedding cache; tiny=True builds the tiny tokenizer on first use."""
    from converters.tokenizer import build_tiny_tokenizer, load_tokenizer
    from omnijax.conditioning import Conditioner, EmbeddingCache

    if tiny and tokenizer_dir is None:
        tokenizer_dir = os.path.join(cache_dir or os.path.expanduser("~/.cache/omnijax"), "tiny_tokenizer")
        if not os.path.isdir(tokenizer_dir):
            build_tiny_tokenizer(tokenizer_dir)
    return Conditioner(EmbeddingCache(cache_dir) if cache_dir else None, text_encoder=text_encoder,
                       image_encoder=image_encoder,
                       tokenizer=load_tokenizer(tokenizer_dir) if tokenizer_dir else None)
