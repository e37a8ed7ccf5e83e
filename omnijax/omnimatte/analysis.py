"""Block-wise effect association analysis (paper §3.2, eq. 3-4, appendix C; spec easyomnimatte.md §6).

Axis letters: B batch, F pixel frames, T latent frames, H/W pixels, L tokens, N heads, K head dim.

For block b, S_b(p) (eq. 3) is the fraction of query token p's self-attention mass on keys inside the effect
mask M^e. That is an attention whose values are the indicator of M^e, so it runs through the fused kernel at
full resolution without an L x L map. C_b (eq. 4) is the sum of S_b over effect-region queries, normalised over
blocks per video, then averaged over the dataset. The curve's two deepest troughs split the blocks into three
stages; the last stage is the Effect Expert's default set of adapted blocks.
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


def token_mask(mask, patch=(1, 2, 2), vae_stride=(4, 8, 8), threshold: float = 0.5):
    """Pixel mask [F, H, W] -> per-token indicator [L] (float32 0/1) on the DiT's token grid.

    A token covers latent frame t (pixel frame 0 for t = 0, frames 4t-3..4t otherwise) and a
    (ph*8) x (pw*8) pixel square; it is inside the mask when the covered fraction reaches `threshold`.
    """
    m = jnp.asarray(mask, jnp.float32)
    f, hh, ww = m.shape
    st, sh, sw = vae_stride
    if f % st != 1 or hh % (sh * patch[1]) or ww % (sw * patch[2]):
        raise ValueError(f"mask {m.shape}: frames must be {st}k+1 and H, W multiples of {sh * patch[1]}")
    frames = jnp.concatenate([jnp.repeat(m[:1], st, axis=0), m[1:]], axis=0)  # the VAE's causal grouping
    t = frames.shape[0] // (st * patch[0])
    cells = frames.reshape(t, st * patch[0], hh // (sh * patch[1]), sh * patch[1], ww // (sw * patch[2]),
                           sw * patch[2]).mean(axis=(1, 3, 5))
    return (cells >= threshold).astype(jnp.float32).reshape(-1)


def association_attention(q, k, indicator, *, backend: str = "auto"):
    """Eq. 3 for every query: attention mass on indicated keys, averaged over heads.

    Args:
      q: [B, L, N, K] (RoPE applied); k: [B, S, N, K]; indicator: [B, S] in {0, 1}.
    Returns:
      S [B, L] float32.
    """
    b, s, n, d = k.shape
    # Values = the indicator in channel 0 (fused kernels want v's head dim equal to k's).
    v = jnp.zeros((b, s, n, d), q.dtype).at[..., 0].set(indicator.astype(q.dtype)[:, :, None])
    out = attention(q, k, v, backend=backend)
    return jnp.mean(out[..., 0].astype(jnp.float32), axis=-1)


def model_inputs(base, sample: Mapping, encode: Callable, *, sigma: float, key, dilation: int = 11):
    """Builds the inpainting inputs for one sample: (z_t [1,T,h,w,16], t [1], y [1,T,h,w,20], context, clip)."""
    cfg = base.config
    video = jnp.asarray(sample["video"], jnp.float32)
    latent = encode(video * 2.0 - 1.0)[None]  # [1, T, h, w, 16]
    m = removal_mask(jnp.asarray(sample["mask"])[None], dilation=dilation)
    y = condition_y(latent_mask(m[None]), latent)
    noise = jax.random.normal(key, latent.shape, jnp.float32)
    z_t = (1.0 - sigma) * latent + sigma * noise
    context = jnp.zeros((1, 1, cfg.text_dim), jnp.float32)  # no prompt (the paper uses none)
    clip = jnp.zeros((1, 257, cfg.image_dim), jnp.float32) if cfg.is_i2v else None  # "no CLIP image" = zeros
    return z_t, jnp.full((1,), 1000.0 * sigma), y, context, clip


@partial(nnx.jit, static_argnames=("backend",))
def block_scores(base, z_t, timesteps, context, clip, y, indicator, *, backend: str = "auto"):
    """S_b for every block: [num_blocks, B, L], from one plain forward of the base model.

    The base's self-attention hook sees each block's rotated q and k in order; next to the normal attention it
    computes eq. 3 with the indicator [B, L] of the effect tokens as values.
    """
    x, rope, _ = base.embed(z_t, y)
    _, e0, text, image = base.condition(timesteps, context, clip)
    scores = []

    def hook(q, k, v):
        scores.append(association_attention(q, k, indicator, backend=backend))
        return attention(q, k, v, backend=backend)

    base.run_blocks(x, e0, text, image, rope, attn_fn=hook, backend=backend)
    return jnp.stack(scores)


def contribution(scores, effect_tokens):
    """Eq. 4 for one video: C_b = sum_p S_b(p) M^e(p) / sum_b (same). scores [blocks, L], effect_tokens [L]."""
    per_block = jnp.sum(scores * effect_tokens[None], axis=-1)
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


def analyze(base, samples: Iterable[Mapping], encode: Callable, *, sigma: float = 0.5, seed: int = 0,
            backend: str = "auto", token_threshold: float = 0.5, dilation: int = 11, keep_maps: int = 1,
            progress: Callable | None = None) -> dict:
    """Runs the analysis over a dataset.

    Args:
      base: a WanDiT (i2v / Fun-InP: the inpainting model).
      samples: dicts with "video" [F, H, W, 3] in [0, 1], "mask" [F, H, W] (object), "effect_mask" [F, H, W].
      encode: video [F, H, W, 3] in [-1, 1] -> latent [T, H/8, W/8, 16] (the VAE's encoder).
      sigma: noise level of the probed denoising step (t = 1000 sigma).
      keep_maps: keep the S maps of the first `keep_maps` samples ([blocks, T, h, w]) for plotting.
    Returns:
      {"contribution": [B] dataset mean, "per_sample": [[B], ...], "skipped": count without effect tokens,
       "maps": [...], "grid": (T, h, w), plus split_stages(...)}.
    """
    key = jax.random.key(seed)
    per_sample, maps, skipped, grid = [], [], 0, None
    for i, sample in enumerate(samples):
        key, sub = jax.random.split(key)
        z_t, t, y, context, clip = model_inputs(base, sample, encode, sigma=sigma, key=sub, dilation=dilation)
        effect = token_mask(sample["effect_mask"], base.config.patch_size, threshold=token_threshold)
        pt, ph, pw = base.config.patch_size
        grid = (z_t.shape[1] // pt, z_t.shape[2] // ph, z_t.shape[3] // pw)
        if float(effect.sum()) == 0:
            skipped += 1
            continue
        scores = block_scores(base, z_t, t, context, clip, y, effect[None], backend=backend)[:, 0]
        per_sample.append(np.asarray(contribution(scores, effect)))
        if len(maps) < keep_maps:
            maps.append(np.asarray(scores).reshape(-1, *grid))
        if progress:
            progress(i)
    if not per_sample:
        raise ValueError("no sample had effect tokens: the analysis needs effect masks (shadows, reflections)")
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


def toy_effect_samples(num: int, *, frames: int = 5, height: int = 64, width: int = 64, seed: int = 0):
    """A tiny procedural dataset (moving disk + cast shadow over a moving texture) for tests and the CLI default
    when the data package is absent. Yields the sample dicts `analyze` takes."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    for _ in range(num):
        r = rng.uniform(0.15, 0.22) * min(height, width)
        x0, y0 = rng.uniform(0.25, 0.5) * width, rng.uniform(0.25, 0.45) * height
        vx, phase = rng.uniform(-1.5, 1.5), rng.uniform(0, 6.28)
        colour = rng.uniform(0.6, 1.0, 3)
        sdx, sdy = rng.uniform(0.6, 1.0) * r, rng.uniform(1.1, 1.4) * r
        video, mask, effect = [], [], []
        for f in range(frames):
            bg = 0.35 + 0.15 * np.sin(0.2 * xx + 0.15 * yy + phase + 0.3 * f)[..., None] * np.array([1, 0.8, 0.6])
            cx, cy = x0 + vx * f, y0
            obj = ((xx - cx) ** 2 + (yy - cy) ** 2 <= r ** 2).astype(np.float32)
            shadow = ((xx - cx - sdx) / (1.8 * r)) ** 2 + ((yy - cy - sdy) / (0.8 * r)) ** 2 <= 1
            shadow = shadow.astype(np.float32) * (1 - obj)
            frame = bg * (1 - 0.5 * shadow[..., None])
            frame = frame * (1 - obj[..., None]) + colour * obj[..., None]
            video.append(np.clip(frame, 0, 1))
            mask.append(obj)
            effect.append(shadow)
        yield {"video": np.stack(video).astype(np.float32), "mask": np.stack(mask), "effect_mask": np.stack(effect)}
