"""The omnimatte training objective as library functions: batch -> model inputs -> alpha-latent flow matching.

Axis letters: B batch, F pixel frames, H/W pixels, T latent frames, h/w latent grid.

shared/spec/easyomnimatte.md §3. An expert is trained on the alpha latent only: x0 = VAE(alpha as a grey video),
the condition y = [latent removal mask ; VAE(input video)], and under mask B (Effect Expert) the background set
sees the noisy ground-truth background at the same sigma. The pixel path (VAE inside the step) and the latent
cache path (posteriors read from disk) meet in `model_inputs`, so both train on the same inputs.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from omnijax.models.wan.vae import sample_posterior
from omnijax.omnimatte.alpha import alpha_to_video
from omnijax.omnimatte.masks import condition_y, latent_mask, removal_mask
from omnijax.training.loss import flow_matching_inputs, flow_matching_loss, noisy_latents

# x0 latent -> the pixel clip it encodes; also fixes the order of the per-step sampling keys.
LATENTS = (("z_background", "background"), ("z_alpha", "alpha"), ("z_video", "video"))
PIXEL_KEYS = ("video", "mask", "alpha", "background")


def model_inputs(posteriors, mask, key, *, sample: bool):
    """The one path from a batch's VAE posteriors to the model inputs (pixel and cache paths alike).

    Args:
      posteriors: {"z_background" | "z_alpha" | "z_video": (normalised mean, logvar or None)}, each [B, T, h, w, 16].
      mask: [B, F, H, W] object masks in [0, 1].
      key: this step's data key; the latents draw from split(key, 3) in LATENTS order.
      sample: x0 = a posterior sample mean + exp(logvar/2)*eps (the reference trains on `.sample()`), else the mean.
    Returns:
      dict(x0_alpha, x0_bg [B, T, h, w, 16], y [B, T, h, w, 20]) in f32.
    """
    keys = dict(zip((name for name, _ in LATENTS), jax.random.split(key, len(LATENTS))))
    z = {name: sample_posterior(mean, logvar, keys[name]) if sample else mean.astype(jnp.float32)
         for name, (mean, logvar) in posteriors.items()}
    removal = jax.vmap(removal_mask)(mask)  # dilated object mask: remove; rest neutral
    return dict(x0_alpha=z["z_alpha"], x0_bg=z["z_background"], y=condition_y(latent_mask(removal), z["z_video"]))


def pixel_posteriors(vae, batch):
    """{latent name: (mean, logvar)} of a pixel batch {video, background [B, F, H, W, 3], alpha [B, F, H, W]}."""
    clips = {k: alpha_to_video(batch[k]) if k == "alpha" else batch[k] * 2.0 - 1.0 for _, k in LATENTS}
    return {name: vae.posterior(clips[k]) for name, k in LATENTS}


def cached_posteriors(batch, logvar_of: dict):
    """{latent name: (mean, logvar or None)} of a latent-cache batch; `logvar_of` maps mean key -> logvar key."""
    return {name: (batch[name], batch.get(logvar_of[name])) for name, _ in LATENTS}


def expert_loss(model, batch, rng, *, shift: float = 5.0, max_abs_error: float | None = 50.0,
                remat: bool | int = False, attention_backend: str = "auto"):
    """Flow-matching loss of an expert (omnijax.omnimatte.branch.EasyOmnimatte) on the alpha latent.

    Args:
      batch: dict(x0_alpha, x0_bg [B, T, h, w, 16], y [B, T, h, w, 20], context [B, L, D], clip [B, 257, D]).
      rng: this step's key: split into the alpha draw (sigma, noise) and the background noise.
    Returns:
      scalar f32.
    """
    k_alpha, k_bg = jax.random.split(rng)
    x0_a = batch["x0_alpha"]
    fm = flow_matching_inputs(k_alpha, x0_a, shift=shift)
    # Under mask B the background half sees the noisy ground-truth background at the same sigma; under mask C it
    # cannot reach the alpha velocity and is not run at all.
    z_b = None
    if model.expert.background_in_training:
        z_b = noisy_latents(batch["x0_bg"], jax.random.normal(k_bg, x0_a.shape, jnp.float32), fm["sigma"])
    _, v_alpha = model(z_b, fm["x_t"], fm["timesteps"], batch["context"], batch["clip"], batch["y"], train=True,
                       remat=remat, attention_backend=attention_backend)
    return flow_matching_loss(v_alpha, fm["target"], max_abs_error=max_abs_error)


# ------------------------------------------------------------------ the base: Fun-InP-style background inpainting

EFFECT_THRESHOLD = 0.1  # alpha above this is part of the layer to remove (data.composite's effect_threshold)


def inpaint_pixels(batch, masked):
    """The inpainting condition in pixels: (removal mask m [B, F, H, W], input video [B, F, H, W, 3] in [-1, 1]).

    Two forms, chosen per sample by `masked` [B] bool:
      masked (Fun-InP): m removes the dilated object AND its effect (alpha > EFFECT_THRESHOLD), and the video is
        black (-1, as Fun-InP's masked video) wherever m removes: the model inpaints a hole;
      unmasked (the form the omnimatte sampler feeds the base, omnijax.omnimatte.decompose): m removes the dilated
        coarse object mask only and the video is the whole composite: the model must also find and remove the
        shadow outside the mask (Casper's effect removal, which the Effect Expert builds on).
    Both use removal_mask's trimask (1 remove, 127/255 elsewhere), as the sampler does.
    """
    obj = jax.vmap(removal_mask)(batch["mask"])
    region = jnp.maximum(batch["mask"], (batch["alpha"] > EFFECT_THRESHOLD).astype(jnp.float32))
    m = jnp.where(masked[:, None, None, None], jax.vmap(removal_mask)(region), obj)
    video = batch["video"] * 2.0 - 1.0
    hole = (masked[:, None, None, None] & (m >= 1.0))[..., None]
    return m, jnp.where(hole, -1.0, video)


def inpaint_inputs(vae, batch, key, *, masked_prob: float, sample: bool):
    """Pixel batch {video, background [B, F, H, W, 3], mask, alpha [B, F, H, W]} -> dict(x0 = the clean
    background's latent [B, T, h, w, 16], y = [latent mask ; latent of the input video] [B, T, h, w, 20]).

    key: split into the form choice (masked with probability `masked_prob`) and the two posterior draws.
    """
    k_form, k_bg, k_video = jax.random.split(key, 3)
    masked = jax.random.uniform(k_form, (batch["video"].shape[0],)) < masked_prob
    m, video = inpaint_pixels(batch, masked)

    def latent(x, k):
        mean, logvar = vae.posterior(x)
        return sample_posterior(mean, logvar, k) if sample else mean.astype(jnp.float32)

    return dict(x0=latent(batch["background"] * 2.0 - 1.0, k_bg),
                y=condition_y(latent_mask(m), latent(video, k_video)))


def inpaint_loss(model, batch, rng, *, shift: float = 5.0, max_abs_error: float | None = 50.0,
                 remat: bool = False, attention_backend: str = "auto"):
    """Flow-matching loss of a Wan Fun-InP DiT whose x0 is the clean background latent.

    Args:
      batch: dict(x0 [B, T, h, w, 16], y [B, T, h, w, 20], context [B, L, D], clip [B, 257, D]).
    Returns:
      scalar f32.
    """
    fm = flow_matching_inputs(rng, batch["x0"], shift=shift)
    v = model(fm["x_t"], fm["timesteps"], batch["context"], batch["clip"], batch["y"],
              attention_backend=attention_backend, remat=remat)
    return flow_matching_loss(v, fm["target"], max_abs_error=max_abs_error)
