"""Flux.1 text-to-image: prompts -> T5 + CLIP embeddings (cached) -> jitted flow sampler -> VAE decode.

The stages are separate functions so that a caller can release each model when its stage is done (the CLI
encodes the prompts, drops both text encoders, then loads the DiT: the 12B DiT and T5-XXL never need to be
resident together, spec §1.13) and time each stage.

Text conditioning follows diffusers' FluxPipeline / BFL: T5 v1.1 runs WITHOUT an attention mask over the prompt
padded to `max_length` (512 for dev, 256 for schnell in BFL's CLI) and its whole [max_length, 4096] output is the
DiT's text context; CLIP-L's EOS-pooled output over 77 padded tokens is the vector y. Prompts are not cleaned.

Axis letters: B batch, H/W image size, h/w latent size, L packed tokens, S text tokens, D T5 width, V CLIP width.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from omnijax.conditioning import EmbeddingCache, encoder_identity, tokenizer_fingerprint
from omnijax.models.flux.clip_text import CLIPTextModel, clip_text_variant, encode_pooled
from omnijax.models.flux.dit import FluxDiT
from omnijax.models.flux.vae import FluxVAE, flux_vae_variant, image_ids, text_ids, unpack_latents
from omnijax.models.flux.variants import variant
from omnijax.models.wan.umt5 import UMT5Encoder, tokenize, umt5_variant
from omnijax.sampling.flow import flux_sigmas, run_sampler

CLIP_MAX_LENGTH = 77


@nnx.jit
def _t5(model, ids):
    return model(ids)


def encode_t5(model: UMT5Encoder, tokenizer, prompts: Sequence[str], max_length: int = 512) -> np.ndarray:
    """T5 text context [B, max_length, D] (padded prompt, no attention mask, as Flux is trained)."""
    ids, _ = tokenize(tokenizer, prompts, max_length, clean=False)
    return np.asarray(_t5(model, jnp.asarray(ids)))


@dataclasses.dataclass
class FluxConditioner:
    """(txt [B, S, D], y [B, V]) for prompts, through an optional EmbeddingCache.

    Entries are per prompt: T5 rows [max_length, D] and the pooled CLIP vector as [1, V], keyed by each encoder's
    identity (class, config, weights fingerprint, tokenizer, max_length), so a cache filled once lets later runs
    skip loading the text encoders when `t5_id` and `clip_id` are given.
    """

    cache: EmbeddingCache | None = None
    t5: nnx.Module | None = None
    t5_tokenizer: object = None
    clip: nnx.Module | None = None
    clip_tokenizer: object = None
    max_length: int = 512
    t5_id: str | None = None
    clip_id: str | None = None

    def identities(self) -> tuple[str, str]:
        if self.t5_id is None:
            if self.t5 is None:
                raise ValueError("no T5 encoder given (needed for its identity and for cache misses)")
            self.t5_id = encoder_identity(self.t5, {"use": "flux_t5_unmasked", "max_length": self.max_length,
                                                    "tokenizer": tokenizer_fingerprint(self.t5_tokenizer)})
        if self.clip_id is None:
            if self.clip is None:
                raise ValueError("no CLIP text encoder given (needed for its identity and for cache misses)")
            self.clip_id = encoder_identity(self.clip, {"use": "flux_clip_pooled", "max_length": CLIP_MAX_LENGTH,
                                                        "tokenizer": tokenizer_fingerprint(self.clip_tokenizer)})
        return self.t5_id, self.clip_id

    def __call__(self, prompts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        prompts = list(prompts)
        if not prompts or any(not isinstance(p, str) for p in prompts):
            raise TypeError("prompts must be a non-empty sequence of strings")

        def t5(idx):
            if self.t5 is None or self.t5_tokenizer is None:
                raise ValueError("T5 embeddings are not cached and no T5 encoder/tokenizer was given")
            return list(encode_t5(self.t5, self.t5_tokenizer, [prompts[i] for i in idx], self.max_length))

        def clip(idx):
            if self.clip is None or self.clip_tokenizer is None:
                raise ValueError("CLIP embeddings are not cached and no CLIP encoder/tokenizer was given")
            pooled = encode_pooled(self.clip, self.clip_tokenizer, [prompts[i] for i in idx], CLIP_MAX_LENGTH)
            return [p[None] for p in pooled]

        everything = list(range(len(prompts)))
        if self.cache is None:
            return np.stack(t5(everything)), np.concatenate(clip(everything))
        t5_id, clip_id = self.identities()
        keys = [p.encode() for p in prompts]
        meta = lambda i: {"prompt": prompts[i]}
        txt = self.cache.get_or_compute_many("text", keys, t5_id, t5, meta)
        y = self.cache.get_or_compute_many("text", keys, clip_id, clip, meta)
        return np.stack(txt), np.concatenate(y)


def latent_size(vae_config, height: int, width: int) -> tuple[int, int]:
    """(h, w) of the latent grid for an H x W image; both must be even for the 2x2 packing."""
    f = 2 * vae_config.spatial_factor
    if height % f or width % f or height <= 0 or width <= 0:
        raise ValueError(f"image size {height}x{width} must be a positive multiple of {f} (VAE factor x 2x2 packing)")
    return height // vae_config.spatial_factor, width // vae_config.spatial_factor


def sample_latents(dit: FluxDiT, txt, y, *, h: int, w: int, num_steps: int = 28, guidance: float | None = 3.5,
                   seed: int = 0, shift: bool | None = None):
    """Packed clean latents [B, (h/2)(w/2), 4Z] for text context txt [B, S, D] and pooled y [B, V].

    shift: the resolution-dependent time shift; None = on for guidance-distilled (dev) models, off for schnell,
    as their published scheduler configs set it. guidance is ignored by schnell models.
    """
    txt = jnp.asarray(txt)
    b = txt.shape[0]
    sigmas = flux_sigmas(num_steps, (h // 2) * (w // 2), shift=dit.config.guidance_embed if shift is None else shift)
    g = guidance if dit.config.guidance_embed else None
    return run_sampler(dit, jax.random.key(seed), image_ids(h, w, batch=b), txt, text_ids(txt.shape[1], batch=b),
                       jnp.asarray(y), sigmas, g)


@nnx.jit(static_argnames=("h", "w", "tile"))
def _decode(vae, packed, h, w, tile):
    return vae.decode(unpack_latents(packed, h, w), tile=tile)


def decode_latents(vae: FluxVAE, packed, *, h: int, w: int, tile="auto") -> np.ndarray:
    """Packed latents -> images [B, H, W, 3] in [-1, 1] (f32 numpy)."""
    return np.asarray(_decode(vae, jnp.asarray(packed, jnp.float32), h, w, tile))


def to_uint8(images) -> np.ndarray:
    """[-1, 1] images -> uint8 [0, 255] (round half to even of (x + 1) * 127.5, as PIL receives diffusers' output)."""
    return np.round((np.clip(np.asarray(images, np.float32), -1, 1) + 1) * 127.5).astype(np.uint8)


def tiny_components(seed: int = 0, dtype=jnp.float32):
    """Random tiny (FluxDiT, FluxVAE, T5 encoder, CLIP text) whose widths fit each other (tests, the tiny CLI)."""
    kw = dict(dtype=dtype, param_dtype=dtype)
    t5 = UMT5Encoder(umt5_variant("tiny-t5"), rngs=nnx.Rngs(seed + 2), **kw)
    clip = CLIPTextModel(clip_text_variant("tiny"), rngs=nnx.Rngs(seed + 3), **kw)
    vae = FluxVAE(flux_vae_variant("tiny"), rngs=nnx.Rngs(seed + 1), **kw)
    dit = FluxDiT(variant("tiny", in_channels=4 * vae.config.z_dim, out_channels=4 * vae.config.z_dim,
                          vec_in_dim=clip.config.width, context_in_dim=t5.config.d_model), rngs=nnx.Rngs(seed), **kw)
    return dit, vae, t5, clip
