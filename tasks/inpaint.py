"""The base-pretraining task: a Wan Fun-InP DiT trained from scratch, every weight, to inpaint the clean background
of a synthetic composite (tasks/__init__.py protocol; configs/inpaint_base.py).

Config keys read here: input.* (pixel composites only), model.{variant, dtype, remat, attention},
model_init.{dit, vae, umt5, clip, tokenizer}, input.masked_prob, loss.{shift, max_abs_error}, sampler.steps,
sharding_rules, seed.

The inputs are those the Wan Fun-InP model takes everywhere in this repo: y = [4 latent mask channels ; the VAE
latent of the input video] (omnijax.omnimatte.masks), the CLIP features of the first frame and the empty prompt's
text context (tasks.omnimatte.conditioned_batch_fn, shared with the experts). x0 = the clean background's latent;
omnijax.omnimatte.training.inpaint_pixels says which region is removed and which video is shown. The export is a
converted folder (`base/`) that registry.load("wan_dit", folder), i.e. config.model_init.dit, reads.
"""

from __future__ import annotations

import os

import jax
import numpy as np

from tasks import Models, SetupError
from tasks.omnimatte import build_models, conditioned_batch_fn, pixel_source

PIXEL_KEYS = ("video", "mask", "alpha", "background")


def build(config, mesh) -> Models:
    from flax import nnx

    base, vae, cond = build_models(config, mesh)
    if not base.config.is_i2v:
        raise SetupError(f"config.model.variant={config.model.variant!r}: the inpainting base must be a Fun-InP "
                         "(-inp) variant (mask and video-latent channels, CLIP)")
    return Models(trainable=base, frozen=dict(vae=vae, conditioner=cond), wrt=nnx.Param,
                  signature=dict(task="inpaint", variant=config.model.variant,
                                 masked_prob=float(config.input.masked_prob)))


def input_pipeline(config, *, seed: int):
    from data.pipeline import make_pipeline

    inp = config.input
    if inp.get("latent_cache"):
        raise SetupError("config.input.latent_cache: the inpainting task encodes the masked video itself; unset it")
    if inp.batch_size % jax.process_count():
        raise SetupError(f"input.batch_size {inp.batch_size} is not divisible by {jax.process_count()} processes")
    return make_pipeline(pixel_source(config, seed=seed), batch_size=inp.batch_size // jax.process_count(),
                         seed=seed, keys=PIXEL_KEYS, num_threads=inp.num_threads,
                         num_workers=inp.get("num_workers", 0))


def make_batch(models: Models, config, mesh):
    from omnijax.omnimatte.decompose import jit_module_fn
    from omnijax.omnimatte.training import inpaint_inputs

    p = float(config.input.masked_prob)
    if not 0.0 <= p <= 1.0:
        raise SetupError(f"config.input.masked_prob = {p}: must be in [0, 1]")
    prepare = jit_module_fn(models.frozen["vae"], lambda vae, batch, key: inpaint_inputs(
        vae, batch, key, masked_prob=p, sample=config.input.vae_sample))
    return conditioned_batch_fn(prepare, models, config, mesh)


def loss(model, batch, rng, *, config):
    from omnijax.omnimatte.training import inpaint_loss

    return inpaint_loss(model, batch, rng, shift=config.loss.shift, max_abs_error=config.loss.max_abs_error,
                        remat=bool(config.model.remat), attention_backend=config.model.attention)


def sample_background(model, vae, clip, y, context, *, steps: int, shift: float, key):
    """Euler sampling of the background latent (dx/dsigma = the predicted velocity), decoded to [0, 1] pixels.

    y [B, T, h, w, 20], context [B, L, D], clip [B, 257, D] -> [B, F, H, W, 3]."""
    import jax.numpy as jnp

    from omnijax.sampling.schedules import inference_sigmas

    sigmas = inference_sigmas(steps, shift)
    z = jax.random.normal(key, (*y.shape[:-1], 16), jnp.float32)
    for s, s_next in zip(sigmas[:-1], sigmas[1:]):
        t = jnp.full((z.shape[0],), 1000.0 * float(s), jnp.float32)
        v = model(z.astype(model.dtype), t, context, clip, y, attention_backend="xla").astype(jnp.float32)
        z = z + float(s_next - s) * v
    return (vae.decode(z) + 1.0) * 0.5


def make_preview(models: Models, config):
    """fn(model, path): input, mask and sampled background of one fixed clip, in both forms (masked / not)."""
    import jax.numpy as jnp

    from data.pipeline import fit_to_latent
    from omnijax.io.sheet import label_rows
    from omnijax.io.video import write_image
    from omnijax.omnimatte.masks import condition_y, latent_mask
    from omnijax.omnimatte.training import inpaint_pixels

    clip_px = fit_to_latent(pixel_source(config, seed=config.seed + 7919, preview=True)[0])
    batch = {k: jnp.asarray(clip_px[k])[None].repeat(2, 0) for k in PIXEL_KEYS}
    vae, cond = models.frozen["vae"], models.frozen["conditioner"]
    m, video = inpaint_pixels(batch, jnp.array([True, False]))
    context = jnp.asarray(np.stack(cond.text([""]) * 2))
    clip = jnp.asarray(cond.image(np.asarray(batch["video"][:, 0]) * 2.0 - 1.0))  # the full first frame, as trained
    y = condition_y(latent_mask(m), vae.posterior(video)[0])

    def preview(model, path):
        bg = sample_background(model, vae, clip, y, context, steps=config.sampler.steps, shift=config.loss.shift,
                               key=jax.random.key(0))
        idx = np.linspace(0, bg.shape[1] - 1, 4).round().astype(int)
        rows = [np.asarray(batch["video"][0])[idx], np.repeat(np.asarray(m[0])[idx][..., None], 3, -1),
                np.asarray(bg[0])[idx], np.asarray(bg[1])[idx], np.asarray(batch["background"][0])[idx]]
        sheet = np.concatenate([np.concatenate(list(r), axis=1) for r in rows], axis=0)
        write_image(path, label_rows((np.clip(sheet, 0, 1) * 255).round().astype(np.uint8),
                                     ["input", "hole (masked)", "bg, masked", "bg, unmasked", "true bg"]))

    return preview


def export(model, config, workdir: str) -> list[str]:
    """The trained base as a converted folder, workdir/base (registry.load("wan_dit", ...) reads it)."""
    from omnijax.checkpoint import save_pretrained

    return [save_pretrained(os.path.join(workdir, "base"), model, "wan_dit", overwrite=True,
                            source="tasks/inpaint.py (trained from scratch)")]
