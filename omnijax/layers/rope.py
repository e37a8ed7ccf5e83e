"""Rotary position embeddings.

Wan's 3D RoPE (shared/spec/wan.md §1.4): the head dim K holds K/2 complex pairs made of *adjacent* real
entries (x[2j], x[2j+1]) (GPT-J "interleaved" style, not rotate-half). The pairs are split between the
frame, height and width axes as [c - 2*(c//3), c//3, c//3] (22/21/21 for K = 128), frame first. Each
axis a with D_a = 2 * pairs_a real dims has its own ladder f_j = theta**(-2j / D_a).

Axis letters: L tokens, P = K/2 pairs.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np


def wan_axis_pairs(head_dim: int) -> tuple[int, int, int]:
    """Complex pairs given to the (frame, height, width) axes."""
    c = head_dim // 2
    return (c - 2 * (c // 3), c // 3, c // 3)


def wan_rope_angles(grid: tuple[int, int, int], head_dim: int, theta: float = 10000.0,
                    offset: tuple[int, int, int] = (0, 0, 0)) -> np.ndarray:
    """Rotation angles [L, P] for tokens in row-major (f, h, w) order over `grid` = (F, H, W).

    Computed in float64 on the host (as the reference does) and returned as float64; callers cast.
    """
    angles = []
    for axis, (size, pairs) in enumerate(zip(grid, wan_axis_pairs(head_dim))):
        dim = 2 * pairs
        freqs = 1.0 / theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim)  # [pairs]
        pos = np.arange(size, dtype=np.float64) + offset[axis]
        angle = pos[:, None] * freqs[None, :]  # [size, pairs]
        shape = [1, 1, 1, pairs]
        shape[axis] = size
        angles.append(np.broadcast_to(angle.reshape(shape), (*grid, pairs)))
    return np.concatenate(angles, axis=-1).reshape(-1, head_dim // 2)


def rope_cos_sin(angles) -> tuple[jnp.ndarray, jnp.ndarray]:
    """(cos, sin), each [L, P] float32."""
    angles = np.asarray(angles)
    return jnp.asarray(np.cos(angles), jnp.float32), jnp.asarray(np.sin(angles), jnp.float32)


def apply_rope(x, cos, sin):
    """Rotates adjacent pairs of x [B, L, N, K] by angles (cos, sin) [L, K/2]; f32 math, x's dtype out."""
    dtype = x.dtype
    x = x.astype(jnp.float32).reshape(*x.shape[:-1], -1, 2)
    x0, x1 = x[..., 0], x[..., 1]
    c = cos[None, :, None, :]
    s = sin[None, :, None, :]
    out = jnp.stack([x0 * c - x1 * s, x0 * s + x1 * c], axis=-1)
    return out.reshape(*out.shape[:-2], -1).astype(dtype)
