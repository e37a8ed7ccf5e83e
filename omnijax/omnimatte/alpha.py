"""Alpha mattes through the video VAE, foreground recovery and the recomposition check.

Axis letters: B batch, F frames, H/W pixels, C colour channels (3).

The alpha matte is encoded by the same VAE as the video, as a grey video (spec easyomnimatte.md §2): alpha in
[0, 1] repeated to 3 channels and mapped to [-1, 1]; decoding averages the 3 channels and maps back.
The foreground follows from the compositing equation V = alpha*F + (1 - alpha)*B (paper eq. 2).
"""

from __future__ import annotations

import jax.numpy as jnp

EPS = 1e-6


def alpha_to_video(alpha):
    """alpha [..., F, H, W] in [0, 1] -> grey video [..., F, H, W, 3] in [-1, 1]."""
    alpha = jnp.asarray(alpha)
    return jnp.repeat((2.0 * alpha - 1.0)[..., None], 3, axis=-1)


def video_to_alpha(video):
    """Decoded grey video [..., F, H, W, 3] in [-1, 1] -> alpha [..., F, H, W], mean of channels, clipped to [0, 1]."""
    video = jnp.asarray(video)
    if video.shape[-1] != 3:
        raise ValueError(f"expected a video with 3 channels last, got shape {video.shape}")
    return jnp.clip((jnp.mean(video.astype(jnp.float32), axis=-1) + 1.0) * 0.5, 0.0, 1.0)


def _check_layers(video, alpha, background):
    if video.shape[-1] != 3 or background.shape != video.shape or alpha.shape != video.shape[:-1]:
        raise ValueError(f"video {video.shape} and background {background.shape} must be [..., F, H, W, 3] "
                         f"and alpha {alpha.shape} [..., F, H, W]")


def recover_foreground(video, alpha, background, *, eps: float = EPS, clip_result: bool = True):
    """Paper eq. 2: F = clip(V - (1 - alpha) * B, 0, 1) / (alpha + eps).

    Args:
      video, background: [..., F, H, W, 3] in [0, 1]; alpha: [..., F, H, W] in [0, 1].
      clip_result: also clip F to [0, 1] (where alpha is small the division can overshoot).
    Returns:
      F [..., F, H, W, 3] in float32.
    """
    video, background = jnp.asarray(video, jnp.float32), jnp.asarray(background, jnp.float32)
    alpha = jnp.asarray(alpha, jnp.float32)
    _check_layers(video, alpha, background)
    a = alpha[..., None]
    fg = jnp.clip(video - (1.0 - a) * background, 0.0, 1.0) / (a + eps)
    return jnp.clip(fg, 0.0, 1.0) if clip_result else fg


def composite(foreground, alpha, background):
    """alpha * F + (1 - alpha) * B with alpha [..., F, H, W] and the layers [..., F, H, W, 3]."""
    a = jnp.asarray(alpha, jnp.float32)[..., None]
    return a * jnp.asarray(foreground, jnp.float32) + (1.0 - a) * jnp.asarray(background, jnp.float32)


def psnr(x, ref, *, data_range: float = 1.0):
    """Peak signal-to-noise ratio in dB over all elements (inf where identical)."""
    mse = jnp.mean((jnp.asarray(x, jnp.float32) - jnp.asarray(ref, jnp.float32)) ** 2)
    return 10.0 * jnp.log10(data_range ** 2 / mse)


def recomposition_psnr(video, foreground, alpha, background):
    """The built-in layer check: PSNR of alpha*F + (1 - alpha)*B against the input video (dB)."""
    _check_layers(jnp.asarray(video), jnp.asarray(alpha), jnp.asarray(background))
    return psnr(composite(foreground, alpha, background), video)
