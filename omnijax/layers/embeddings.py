"""Sinusoidal timestep embedding (Wan: cos first) and small MLP helpers."""

from __future__ import annotations

import jax.numpy as jnp


def sinusoidal_embedding(t, dim: int, *, theta: float = 10000.0):
    """[B] timesteps -> [B, dim] f32 embedding [cos(t*w), sin(t*w)], w_i = theta**(-i / (dim/2))."""
    half = dim // 2
    freqs = jnp.power(theta, -jnp.arange(half, dtype=jnp.float32) / half)
    args = t.astype(jnp.float32)[:, None] * freqs[None, :]
    return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
