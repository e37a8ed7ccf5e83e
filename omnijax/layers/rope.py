"""Rotary position embeddings.

Wan's 3D RoPE (shared/spec/wan.md §1.4): the head dim K holds K/2 complex pairs made of *adjacent* real
entries (x[2j], x[2j+1]) (GPT-J "interleaved" style, not rotate-half). The pairs are split between the
frame, height and width axes as [c - 2*(c//3), c//3, c//3] (22/21/21 for K = 128), frame first. Each
axis a with D_a = 2 * pairs_a real dims has its own ladder f_j = theta**(-2j / D_a).

Flux's n-axis RoPE (shared/spec/flux.md §1.9): every token carries n float position ids (Flux: 3, axis 0 for
the image index, then row, column); axis i owns axes_dim[i] / 2 consecutive pairs with the ladder
theta**(-2k / axes_dim[i]); the same adjacent-pair rotation (`apply_rope`) as Wan. Ids are traced inputs there,
so the angles are built in f32 inside the program.

Axis letters: B batch, L tokens, P = K/2 pairs, A id axes.
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
        freqs = axis_frequencies((dim,), theta)  # [pairs]
        pos = np.arange(size, dtype=np.float64) + offset[axis]
        angle = pos[:, None] * freqs[None, :]  # [size, pairs]
        shape = [1, 1, 1, pairs]
        shape[axis] = size
        angles.append(np.broadcast_to(angle.reshape(shape), (*grid, pairs)))
    return np.concatenate(angles, axis=-1).reshape(-1, head_dim // 2)


def wan_rope_cos_sin(grid: tuple[int, int, int], head_dim: int, theta: float = 10000.0):
    """(cos, sin) [L, P] f32 of `wan_rope_angles`, built on the device from per-axis tables.

    Each pair's angle depends on one grid axis only, so the [L, P] tables are per-axis [size, pairs] tables
    (float64 on the host, as the reference computes them, then f32) broadcast over the grid and concatenated:
    the same values as `rope_cos_sin(wan_rope_angles(...))`, without baking two [L, P] constants into every
    compiled program (at 81x480x832, 2 x 8.4 MB per DiT call site: a sampler's StableHLO was 68 MB of them).
    """
    tables = []
    for size, pairs in zip(grid, wan_axis_pairs(head_dim)):
        freqs = axis_frequencies((2 * pairs,), theta)
        tables.append(np.arange(size, dtype=np.float64)[:, None] * freqs[None, :])  # [size, pairs]

    def full(fn):
        parts = []
        for axis, table in enumerate(tables):
            shape = [1, 1, 1, table.shape[1]]
            shape[axis] = table.shape[0]
            part = jnp.asarray(fn(table), jnp.float32).reshape(shape)
            parts.append(jnp.broadcast_to(part, (*grid, table.shape[1])))
        return jnp.concatenate(parts, axis=-1).reshape(-1, head_dim // 2)

    return full(np.cos), full(np.sin)


def axis_frequencies(axes_dim, theta: float = 10000.0) -> np.ndarray:
    """[P] float64 ladder of every id axis, concatenated in axis order (Wan and Flux share the form)."""
    for d in axes_dim:
        if d % 2:
            raise ValueError(f"RoPE axis dims must be even, got {tuple(axes_dim)}")
    return np.concatenate([1.0 / theta ** (np.arange(0, d, 2, dtype=np.float64) / d) for d in axes_dim])


def nd_rope_angles(ids, axes_dim, theta: float = 10000.0):
    """Angles [..., L, P] f32 for float position ids [..., L, A] (Flux's EmbedND): id_a * ladder_a per axis."""
    if ids.shape[-1] != len(axes_dim):
        raise ValueError(f"position ids have {ids.shape[-1]} axes, the RoPE has {len(axes_dim)} ({tuple(axes_dim)})")
    reps = np.repeat(np.arange(len(axes_dim)), [d // 2 for d in axes_dim])  # the id axis of each pair
    freqs = jnp.asarray(axis_frequencies(axes_dim, theta), jnp.float32)
    return jnp.asarray(ids, jnp.float32)[..., reps] * freqs


def rope_cos_sin(angles) -> tuple[jnp.ndarray, jnp.ndarray]:
    """(cos, sin), each [L, P] float32."""
    angles = np.asarray(angles)
    return jnp.asarray(np.cos(angles), jnp.float32), jnp.asarray(np.sin(angles), jnp.float32)


def apply_rope(x, cos, sin):
    """Rotates adjacent pairs of x [B, L, N, K] by angles (cos, sin) [L, K/2] (shared by the batch) or
    [B, L, K/2] (per example, Flux's ids); f32 math, x's dtype out."""
    dtype = x.dtype
    x = x.astype(jnp.float32).reshape(*x.shape[:-1], -1, 2)
    x0, x1 = x[..., 0], x[..., 1]
    c = cos[None, :, None, :] if cos.ndim == 2 else cos[:, :, None, :]
    s = sin[None, :, None, :] if sin.ndim == 2 else sin[:, :, None, :]
    out = jnp.stack([x0 * c - x1 * s, x0 * s + x1 * c], axis=-1)
    return out.reshape(*out.shape[:-2], -1).astype(dtype)
