"""Masks for the inpainting condition y: the "remove" region and the 4-channel latent mask.

Axis letters: B batch, F pixel frames (4k + 1), T latent frames (k + 1), H/W pixels, h/w latent grid (H/8, W/8).

shared/spec/wan.md §3.2-3.4. Pixel mask convention here: m = 1 where the model regenerates (remove),
127/255 on the neutral background, 0 where content is kept. The model's mask channels carry 1 - m
(1 = known / keep), so remove -> 0 and neutral -> 128/255.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

NEUTRAL = 127.0 / 255.0
BINARY_THRESHOLD = 240.0 / 255.0  # Casper binarises object masks at < 240 -> 0, else 255


def binarize(mask, threshold: float = BINARY_THRESHOLD):
    """mask [...] in [0, 1] -> {0, 1} float32 (>= threshold is 1)."""
    return (jnp.asarray(mask, jnp.float32) >= threshold).astype(jnp.float32)


def dilate(mask, width: int = 11):
    """Per-frame binary dilation with a width x width square (max filter; outside the frame counts as 0).

    mask [..., H, W] -> [..., H, W].
    """
    if width < 1:
        raise ValueError(f"dilation width must be >= 1, got {width}")
    mask = jnp.asarray(mask, jnp.float32)
    if width == 1:
        return mask
    lead = mask.ndim - 2
    pad = [(0, 0)] * lead + [((width - 1) // 2, width // 2)] * 2
    return jax.lax.reduce_window(mask, 0.0, jax.lax.max, (1,) * lead + (width, width), (1,) * mask.ndim, pad)


def removal_mask(object_masks, *, dilation: int = 11, threshold: float = BINARY_THRESHOLD):
    """The EasyOmnimatte trimask: remove (1) on the dilated union of the objects, neutral (127/255) elsewhere.

    Args:
      object_masks: [K, F, H, W] (K objects) or [F, H, W], values in [0, 1].
    Returns:
      m [F, H, W] float32 in {127/255, 1}.
    """
    m = jnp.asarray(object_masks, jnp.float32)
    if m.ndim == 3:
        m = m[None]
    if m.ndim != 4:
        raise ValueError(f"object masks must be [K, F, H, W] or [F, H, W], got shape {m.shape}")
    union = jnp.max(dilate(binarize(m, threshold), dilation), axis=0)
    return jnp.where(union > 0, 1.0, NEUTRAL)


def latent_mask(m):
    """Pixel mask m [B, F, H, W] (1 = remove) -> the 4 mask channels of y, [B, T, h, w, 4] holding 1 - m.

    Temporal packing: frame 0 repeated four times, then frames 1..F-1, grouped in fours (latent frame 0 = pixel
    frame 0 in all 4 channels; latent t >= 1, channel j = pixel frame 4t - 3 + j). Spatial: the reference's
    bilinear resize by 1/8 without antialiasing (align_corners=False), i.e. each cell is the mean of pixel rows
    {8y+3, 8y+4} x cols {8x+3, 8x+4}; jax.image.resize would antialias, which the base model never saw.
    """
    m = jnp.asarray(m, jnp.float32)
    if m.ndim != 4:
        raise ValueError(f"pixel mask must be [B, F, H, W], got shape {m.shape}")
    b, f, hh, ww = m.shape
    if f % 4 != 1:
        raise ValueError(f"the frame count must be 4k + 1, got {f}")
    if hh % 8 or ww % 8:
        raise ValueError(f"height and width must be multiples of 8, got {(hh, ww)}")
    keep = 1.0 - m
    packed = jnp.concatenate([jnp.repeat(keep[:, :1], 4, axis=1), keep[:, 1:]], axis=1)
    packed = packed.reshape(b, (f + 3) // 4, 4, hh, ww)
    rows = 0.5 * (packed[..., 3::8, :] + packed[..., 4::8, :])
    cells = 0.5 * (rows[..., 3::8] + rows[..., 4::8])  # [B, T, 4, h, w]
    return jnp.moveaxis(cells, 2, -1)


def condition_y(mask_latent, video_latent):
    """[mask (4) ; VAE latent of the full input video (16)] -> y [B, T, h, w, 20] (wan.md §3.1)."""
    if mask_latent.shape[:4] != video_latent.shape[:4] or mask_latent.shape[-1] != 4:
        raise ValueError(f"mask latent {mask_latent.shape} and video latent {video_latent.shape} do not pair up")
    return jnp.concatenate([mask_latent, video_latent.astype(mask_latent.dtype)], axis=-1)
