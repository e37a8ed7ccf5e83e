"""Block-wise effect association analysis (paper §3.2, eq. 3-4, appendix C; spec easyomnimatte.md §6).

Axis letters: B batch, F pixel frames, T latent frames, H/W pixels, L tokens, N heads, K head dim.

For block b, S_b(p) (eq. 3) is the fraction of query token p's self-attention mass on keys inside the effect
mask M^e. That is an attention whose values are M^e (per key token: the fraction of its pixels inside M^e), so it
runs through the fused kernel at full resolution without an L x L map. C_b (eq. 4) is the sum of S_b over M^e's
pixels, normalised over blocks per video, then averaged over the dataset. Reading a token's attention as spread
evenly over its pixels, both are the pixel-level equations exactly (token_mask). The curve's two deepest troughs
split the blocks into three stages; the last stage is the Effect Expert's default set of adapted blocks.

What the base model is probed on: one denoising step of the inpainting task the experts are trained and sampled
on. z_t = (1 - sigma) z_0 + sigma eps is the noisy latent of the composite video itself (z_0 = VAE(video), eps
Gaussian, t = 1000 sigma): the Casper base was trained to regenerate the masked region of exactly such a latent,
so its attention at this step shows where it looks for the object's effects. The condition y is the removal mask
(dilated object) and the video latent, as in training; the conditioning is what training and sampling feed the
DiT, the umT5 embedding of the empty prompt and the CLIP features of frame 0 (`conditioning`), not zeros, which
the model never saw and which would change every block's attention.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from omnijax.layers.attention import attention
from omnijax.omnimatte.masks import condition_y, latent_mask, removal_mask


def _token_cells(x, patch, vae_stride):
    """Sums a pixel-frame array [F, H, W] over each token's pixels -> [T', h', w'] (T' = latent frames / pt).

    Latent frame 0 holds pixel frame 0 alone and latent frame t the frames 4t-3..4t (the VAE's causal grouping),
    so frame 0's group is padded with empty frames: the sums count real pixels only.
    """
    f, hh, ww = x.shape
    st, sh, sw = vae_stride
    if f % st != 1 or hh % (sh * patch[1]) or ww % (sw * patch[2]):
        raise ValueError(f"mask {x.shape}: frames must be {st}k+1 and H, W multiples of {sh * patch[1]}")
    if ((f - 1) // st + 1) % patch[0]:
        raise ValueError(f"mask {x.shape}: {(f - 1) // st + 1} latent frames do not split into patches of {patch[0]}")
    x = jnp.concatenate([jnp.zeros((st - 1, hh, ww), x.dtype), x], axis=0)
    t = x.shape[0] // (st * patch[0])
    return x.reshape(t, st * patch[0], hh // (sh * patch[1]), sh * patch[1], ww // (sw * patch[2]),
                     sw * patch[2]).sum(axis=(1, 3, 5))


def token_pixels(num_frames: int, height: int, width: int, patch=(1, 2, 2), vae_stride=(4, 8, 8)):
    """Number of pixels (over all pixel frames) each token stands for: [L] float32.

    Tokens of latent frame 0 cover one pixel frame, the others `vae_stride[0]`, so eq. 4's sum over pixel frames
    weighs them 1 : 4.
    """
    return _token_cells(jnp.ones((num_frames, height, width), jnp.float32), patch, vae_stride).reshape(-1)


def token_mask(mask, patch=(1, 2, 2), vae_stride=(4, 8, 8), threshold: float | None = None):
    """Pixel mask [F, H, W] in {0, 1} -> the fraction of each token's pixels inside it, [L] float32.

    Attention runs on tokens, so spreading a token's attention evenly over its pixels makes eq. 3 and 4 at pixel
    level exact with these fractions: the mass a query puts on M^e is sum_y W(p, y) * fraction(y), and the sum of
    S over M^e's pixels is sum_p S(p) * fraction(p) * token_pixels(p). With `threshold` the fraction is binarised
    (1 where it reaches `threshold`), the coarser token-level reading of M^e.
    """
    m = jnp.asarray(mask, jnp.float32)
    frac = _token_cells(m, patch, vae_stride).reshape(-1) / token_pixels(*m.shape, patch, vae_stride)
    return frac if threshold is None else (frac >= threshold).astype(jnp.float32)


def association_attention(q, k, indicator, *, backend: str = "auto"):
    """Eq. 3 for every query: attention mass on indicated keys, averaged over heads.

    Args:
      q: [B, L, N, K] (RoPE applied); k: [B, S, N, K]; indicator: [B, S] in [0, 1] (M^e fraction per key).
    Returns:
      S [B, L] float32.
    """
    b, s, n, d = k.shape
    # Values = the indicator in channel 0 (fused kernels want v's head dim equal to k's).
    v = jnp.zeros((b, s, n, d), q.dtype).at[..., 0].set(indicator.astype(q.dtype)[:, :, None])
    out = attention(q, k, v, backend=backend)
    return jnp.mean(out[..., 0].astype(jnp.float32), axis=-1)


def conditioning(conditioner) -> Callable:
    """video [F, H, W, 3] in [0, 1] -> (context [1, L, D], clip [1, 257, D]) as the trainer makes them: the empty
    prompt's umT5 embedding and the CLIP features of frame 0 quantised to uint8 (as the trainer's batches hold it).

    conditioner: an omnijax.conditioning.Conditioner (umT5 + tokenizer + CLIP, optionally over the cache).
    """
    from omnijax.models.wan.umt5 import pad_text_context

    text = jnp.asarray(pad_text_context(conditioner.text([""])))

    def condition(video):
        frame = np.clip(np.rint(np.asarray(video[:1], np.float32) * 255), 0, 255)
        return text, jnp.asarray(conditioner.image(frame / 127.5 - 1.0))

    return condition


def model_inputs(base, sample: Mapping, encode: Callable, *, sigma: float, key, context, clip, dilation: int = 11):
    """Builds the inpainting inputs for one sample: (z_t [1,T,h,w,16], t [1], y [1,T,h,w,20], context, clip).

    z_t is the sample's own video latent noised to `sigma` (see the module docstring); context [1, L, D] and clip
    [1, 257, D] come from `conditioning`.
    """
    video = jnp.asarray(sample["video"], jnp.float32)
    latent = encode(video * 2.0 - 1.0)[None]  # [1, T, h, w, 16]
    m = removal_mask(jnp.asarray(sample["mask"])[None], dilation=dilation)
    y = condition_y(latent_mask(m[None]), latent)
    noise = jax.random.normal(key, latent.shape, jnp.float32)
    z_t = (1.0 - sigma) * latent + sigma * noise
    return z_t, jnp.full((1,), 1000.0 * sigma), y, jnp.asarray(context), None if clip is None else jnp.asarray(clip)


@partial(nnx.jit, static_argnames=("backend",))
def block_scores(base, z_t, timesteps, context, clip, y, indicator, *, backend: str = "auto"):
    """S_b for every block: [num_blocks, B, L], from one plain forward of the base model.

    The base's self-attention hook sees each block's rotated q and k in order; next to the normal attention it
    computes eq. 3 with the effect fraction [B, L] of the tokens (token_mask) as values.
    """
    x, rope, _ = base.embed(z_t, y)
    _, e0, text, image = base.condition(timesteps, context, clip)
    scores = []

    def hook(q, k, v):
        scores.append(association_attention(q, k, indicator, backend=backend))
        return attention(q, k, v, backend=backend)

    base.run_blocks(x, e0, text, image, rope, attn_fn=hook, backend=backend)
    return jnp.stack(scores)


def contribution(scores, weights):
    """Eq. 4 for one video: C_b = sum_p S_b(p) M^e(p) / sum_b (same).

    Args:
      scores: S [blocks, L].
      weights: [L], the number of M^e pixels each token stands for (token_mask * token_pixels), or any multiple.
    Returns:
      C [blocks], summing to 1.
    """
    per_block = jnp.sum(scores * weights[None], axis=-1)
    return per_block / jnp.sum(per_block)


def split_stages(curve) -> dict:
    """Three stages split at the curve's two deepest interior troughs (local minima).

    A trough block starts the next stage. With fewer than two troughs the blocks are split in thirds.
    Returns {"troughs": [t1, t2], "stages": [[0, t1], [t1, t2], [t2, B]] (half-open), "effect_expert_k": B - t2}.
    """
    c = np.asarray(curve, np.float64)
    n = len(c)
    if n < 3:
        raise ValueError(f"need at least 3 blocks to find stages, got {n}")
    minima = [i for i in range(1, n - 1) if c[i] <= c[i - 1] and c[i] <= c[i + 1] and (c[i] < c[i - 1] or
                                                                                      c[i] < c[i + 1])]
    if len(minima) >= 2:
        t1, t2 = sorted(sorted(minima, key=lambda i: (c[i], i))[:2])
        method = "troughs"
    else:
        t1, t2 = round(n / 3), round(2 * n / 3)
        method = "thirds (fewer than two troughs)"
    return {"troughs": [int(t1), int(t2)], "stages": [[0, int(t1)], [int(t1), int(t2)], [int(t2), n]],
            "effect_expert_k": int(n - t2), "method": method}


def analyze(base, samples: Iterable[Mapping], encode: Callable, *, condition: Callable, sigma: float = 0.5,
            seed: int = 0,
            backend: str = "auto", token_threshold: float | None = None, dilation: int = 11, keep_maps: int = 1,
            progress: Callable | None = None) -> dict:
    """Runs the analysis over a dataset.

    Args:
      base: a WanDiT (i2v / Fun-InP: the inpainting model).
      samples: dicts with "video" [F, H, W, 3] in [0, 1], "mask" [F, H, W] (object) and "effect_mask" [F, H, W]
        (effect region minus the dilated object), F = 4k+1 and H, W multiples of 16: the samples of
        data.synthetic.SyntheticOmnimatte (spec §5) after data.pipeline.fit_to_latent.
      encode: video [F, H, W, 3] in [-1, 1] -> latent [T, H/8, W/8, 16] (the VAE's encoder).
      condition: video [F, H, W, 3] in [0, 1] -> (context, clip), normally `conditioning(conditioner)`.
      sigma: noise level of the probed denoising step (t = 1000 sigma).
      token_threshold: None weighs tokens by their M^e fraction (exact, see token_mask); a number binarises it.
      keep_maps: keep the S maps of the first `keep_maps` samples ([blocks, T, h, w]) for plotting.
      progress: called with the index of every sample read.
    Returns:
      {"contribution": [B] dataset mean, "per_sample": [[B], ...], "skipped": count without effect tokens,
       "maps": [...], "grid": (T, h, w), plus split_stages(...)}.
    """
    key = jax.random.key(seed)
    patch = base.config.patch_size
    per_sample, maps, skipped, grid = [], [], 0, None
    for i, sample in enumerate(samples):
        key, sub = jax.random.split(key)  # split for every sample, so sample i's noise does not depend on skips
        if progress:
            progress(i)
        effect = token_mask(sample["effect_mask"], patch, threshold=token_threshold)
        if float(effect.sum()) == 0:
            skipped += 1
            continue
        context, clip = condition(sample["video"])
        z_t, t, y, context, clip = model_inputs(base, sample, encode, sigma=sigma, key=sub, context=context,
                                                clip=clip, dilation=dilation)
        grid = (z_t.shape[1] // patch[0], z_t.shape[2] // patch[1], z_t.shape[3] // patch[2])
        scores = block_scores(base, z_t, t, context, clip, y, effect[None], backend=backend)[:, 0]
        weights = effect * token_pixels(*np.shape(sample["effect_mask"]), patch)
        per_sample.append(np.asarray(contribution(scores, weights)))
        if len(maps) < keep_maps:
            maps.append(np.asarray(scores).reshape(-1, *grid))
    if not per_sample:
        raise ValueError("no sample had effect pixels: the analysis needs effect masks (shadows, reflections)")
    curve = np.mean(per_sample, axis=0)
    return {"contribution": curve.tolist(), "per_sample": [p.tolist() for p in per_sample], "skipped": skipped,
            "num_samples": len(per_sample), "sigma": sigma, "grid": list(grid), "maps": maps,
            **split_stages(curve)}


def pool_encoder(channels: int = 16, seed: int = 0):
    """A stand-in for the VAE encoder (random-model smoke runs only): the VAE's 4x8x8 grouping as means and a
    fixed random 3 -> `channels` projection. Real analyses pass the Wan VAE's encoder."""
    proj = np.random.default_rng(seed).normal(size=(3, channels)).astype(np.float32)

    def encode(video):
        v = jnp.asarray(video, jnp.float32)
        f, hh, ww, c = v.shape
        v = jnp.concatenate([jnp.repeat(v[:1], 4, axis=0), v[1:]], axis=0)
        v = v.reshape(-1, 4, hh // 8, 8, ww // 8, 8, c).mean(axis=(1, 3, 5))
        return v @ proj

    return encode
