"""LayerNorm and RMSNorm that compute their statistics in float32 and return the input dtype.

Axis letters: D feature dim (last axis).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


class LayerNorm(nnx.Module):
    """LayerNorm over the last axis; `affine=False` has no parameters (Wan's norm1/norm2/head norm)."""

    def __init__(self, dim: int, *, eps: float = 1e-6, affine: bool = True, param_dtype=jnp.float32):
        self.eps = eps
        self.affine = affine
        if affine:
            self.scale = nnx.Param(jnp.ones((dim,), param_dtype))
            self.bias = nnx.Param(jnp.zeros((dim,), param_dtype))

    def __call__(self, x):
        dtype = x.dtype
        x = x.astype(jnp.float32)
        mean = x.mean(-1, keepdims=True)
        var = jnp.square(x - mean).mean(-1, keepdims=True)
        y = (x - mean) * jax.lax.rsqrt(var + self.eps)
        if self.affine:
            y = y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
        return y.astype(dtype)


class RMSNorm(nnx.Module):
    """x * rsqrt(mean(x^2) + eps) in f32, cast to x's dtype, then times the weight (as Wan/diffusers)."""

    def __init__(self, dim: int, *, eps: float = 1e-6, param_dtype=jnp.float32):
        self.eps = eps
        self.scale = nnx.Param(jnp.ones((dim,), param_dtype))

    def __call__(self, x):
        dtype = x.dtype
        xf = x.astype(jnp.float32)
        y = (xf * jax.lax.rsqrt(jnp.square(xf).mean(-1, keepdims=True) + self.eps)).astype(dtype)
        return y * self.scale[...].astype(dtype)


class GroupNorm(nnx.Module):
    """GroupNorm over channels-last x [B, ..., C]: statistics per sample over every non-batch axis of each group
    of C/G channels, in f32; affine scale and bias per channel (the SD/Flux VAE norm, torch.nn.GroupNorm)."""

    def __init__(self, dim: int, groups: int, *, eps: float = 1e-6, param_dtype=jnp.float32):
        if dim % groups:
            raise ValueError(f"GroupNorm: {dim} channels are not divisible into {groups} groups")
        self.groups, self.eps = groups, eps
        self.scale = nnx.Param(jnp.ones((dim,), param_dtype))
        self.bias = nnx.Param(jnp.zeros((dim,), param_dtype))

    def __call__(self, x):
        dtype, shape = x.dtype, x.shape
        xf = x.astype(jnp.float32).reshape(*shape[:-1], self.groups, shape[-1] // self.groups)
        axes = (*range(1, xf.ndim - 2), xf.ndim - 1)
        mean = xf.mean(axes, keepdims=True)
        var = jnp.square(xf - mean).mean(axes, keepdims=True)
        y = ((xf - mean) * jax.lax.rsqrt(var + self.eps)).reshape(shape)
        y = y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
        return y.astype(dtype)
