"""Decomposing a composite: encode -> joint Euler flow sampling of both layers -> decode (spec §3, §4.3).

Axis letters: B batch, H/W image size, h/w latent size, Z latent channels, L packed tokens of one layer, P packed
features, S text tokens, D text width, V pooled width.

Both noisy layers start from independent noise at sigma 1 and take the same Flux Euler steps
x <- x + (sigma_{i+1} - sigma_i) v(x, sigma_i) with their own velocity slices of one joint forward, the clean
composite riding along at timestep 0. The schedule is Flux's shifted grid with mu from the token count of ONE
layer by default (spec §3.2; `mu_tokens="both"` counts the two generated layers together). One jitted
`lax.fori_loop` whose noise key, guidance, text and sigmas are traced: a new seed or prompt reuses the program.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from omnijax.diffdecompose.model import DiffDecomposer
from omnijax.models.flux.vae import FluxVAE, pack_latents, unpack_latents
from omnijax.sampling.euler import euler_step
from omnijax.sampling.flow import flux_sigmas

F32 = jnp.float32


def decompose_sigmas(model: DiffDecomposer, num_steps: int, h: int, w: int, *, mu_tokens: str = "layer",
                     shift: bool | None = None) -> np.ndarray:
    """The [N + 1] sigma table for an h x w latent; shift defaults to on for dev (guidance-distilled) models."""
    if mu_tokens not in ("layer", "both"):
        raise ValueError(f"mu_tokens must be 'layer' or 'both', got {mu_tokens!r}")
    tokens = (h // 2) * (w // 2) * (2 if mu_tokens == "both" else 1)
    return flux_sigmas(num_steps, tokens, shift=model.config.guidance_embed if shift is None else shift)


def sample_layers(model: DiffDecomposer, z_c, txt, y, noise_fg, noise_bg, sigmas, guidance=None, *,
                  grid: tuple[int, int], attention_backend: str = "auto"):
    """The Euler loop over both layers (traceable). z_c, noise_*: [B, L, P]; sigmas [N + 1] ending in 0.

    Returns (x_fg, x_bg) clean packed latents [B, L, P] f32.
    """
    b = z_c.shape[0]
    sigmas = jnp.asarray(sigmas, F32)
    dtype = model.dit.dtype

    def step(i, state):
        x_fg, x_bg = state
        t = jnp.broadcast_to(sigmas[i], (b,))
        v_fg, v_bg = model(z_c.astype(dtype), x_fg.astype(dtype), x_bg.astype(dtype), t, txt.astype(dtype), y,
                           guidance, grid=grid, attention_backend=attention_backend)
        return (euler_step(x_fg, v_fg.astype(F32), sigmas[i], sigmas[i + 1]),
                euler_step(x_bg, v_bg.astype(F32), sigmas[i], sigmas[i + 1]))

    return jax.lax.fori_loop(0, sigmas.shape[0] - 1, step, (noise_fg.astype(F32), noise_bg.astype(F32)))


@nnx.jit(static_argnames=("grid", "attention_backend"))
def _sample(model, z_c, txt, y, key, sigmas, guidance, grid, attention_backend):
    k_fg, k_bg = jax.random.split(key)
    noise = lambda k: jax.random.normal(k, z_c.shape, F32)
    g = guidance if model.config.guidance_embed else None
    return sample_layers(model, z_c, txt, y, noise(k_fg), noise(k_bg), sigmas, g, grid=grid,
                         attention_backend=attention_backend)


@nnx.jit
def _encode(vae, images):
    return pack_latents(vae.encode(images * 2.0 - 1.0))


@nnx.jit(static_argnames=("h", "w"))
def _decode(vae, packed, h, w):
    return (vae.decode(unpack_latents(packed, h, w), tile=None) + 1.0) * 0.5


class Decomposer:
    """Compiled pieces (encode, sample, decode) reused across calls; one per (model, VAE).

    `__call__(composite [B, H, W, 3] in [0, 1], txt [B, S, D], y [B, V])` -> dict(foreground, background
    [B, H, W, 3] in [0, 1] f32 numpy, timings {encode_s, sample_s, decode_s}); `latents(...)` stops before the
    decoder (the layers in the DiT's latent space, as the trainer's x0 targets are).
    """

    def __init__(self, model: DiffDecomposer, vae: FluxVAE, *, num_steps: int = 28, guidance: float = 3.5,
                 mu_tokens: str = "layer", attention_backend: str = "auto"):
        self.model, self.vae = model, vae
        self.num_steps, self.guidance, self.mu_tokens = int(num_steps), float(guidance), mu_tokens
        self.attention_backend = attention_backend

    def latents(self, composite, txt, y, *, seed: int = 0) -> dict:
        """The sampled layers before decoding: dict(foreground, background, composite: packed latents [B, L, P]
        f32 (the composite's as the model saw it), grid (h, w), timings {encode_s, sample_s})."""
        composite = np.asarray(composite, np.float32)
        if composite.ndim != 4 or composite.shape[-1] != 3:
            raise ValueError(f"composite must be [B, H, W, 3], got shape {composite.shape}")
        sf = self.vae.config.spatial_factor
        _, H, W, _ = composite.shape
        if H % (2 * sf) or W % (2 * sf):
            raise ValueError(f"image size {H}x{W} must be a multiple of {2 * sf}")
        h, w = H // sf, W // sf
        timings = {}
        t0 = time.perf_counter()
        z_c = jax.block_until_ready(_encode(self.vae, jnp.asarray(composite)))
        timings["encode_s"] = time.perf_counter() - t0
        sigmas = decompose_sigmas(self.model, self.num_steps, h, w, mu_tokens=self.mu_tokens)
        b = composite.shape[0]
        t0 = time.perf_counter()
        x_fg, x_bg = jax.block_until_ready(_sample(self.model, z_c, jnp.asarray(txt), jnp.asarray(y),
                                                   jax.random.key(seed), jnp.asarray(sigmas),
                                                   jnp.full((b,), self.guidance, F32), (h, w),
                                                   self.attention_backend))
        timings["sample_s"] = time.perf_counter() - t0
        return dict(foreground=x_fg, background=x_bg, composite=z_c, grid=(h, w), timings=timings)

    def __call__(self, composite, txt, y, *, seed: int = 0) -> dict:
        out = self.latents(composite, txt, y, seed=seed)
        (h, w), timings = out["grid"], out["timings"]
        t0 = time.perf_counter()
        fg = np.asarray(_decode(self.vae, out["foreground"], h, w))
        bg = np.asarray(_decode(self.vae, out["background"], h, w))
        timings["decode_s"] = time.perf_counter() - t0
        return dict(foreground=np.clip(fg, 0, 1), background=np.clip(bg, 0, 1), timings=timings)
