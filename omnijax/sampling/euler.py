"""The flow-match Euler step on pytrees of latents (shared/spec/wan.md §4.1).

A sampler state is any pytree of arrays (e.g. {"background": [B,T,H,W,C], "alpha": [B,T,H,W,C]} or a tuple);
an expert returns a velocity pytree of the same structure. v = eps - x0 points from data to noise, so the step
towards data is x <- x + (sigma_next - sigma) * v with sigma_next < sigma.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def euler_step(state, velocity, sigma, sigma_next):
    """One Euler step, computed in float32 and cast back to each state leaf's dtype.

    In float32 so that the only rounding is the final cast, once per step. (diffusers upcasts the sample but
    multiplies the bf16 velocity by a 0-dim float32 dt, which torch computes in bf16: its increment is rounded
    to bf16 before the add, a difference of at most one bf16 rounding of the increment per step.)

    Args:
        state: pytree of arrays (any dtype).
        velocity: pytree of the same structure and shapes (any float dtype).
        sigma: scalar, the current sigma.
        sigma_next: scalar, the next sigma.

    Returns:
        The stepped pytree, leaves in the dtypes of `state`.
    """
    dt = jnp.asarray(sigma_next, jnp.float32) - jnp.asarray(sigma, jnp.float32)

    def step(x, v):
        if x.shape != v.shape:
            raise ValueError(f"velocity shape {v.shape} does not match state shape {x.shape}")
        return (x.astype(jnp.float32) + dt * v.astype(jnp.float32)).astype(x.dtype)

    return jax.tree.map(step, state, velocity)


def noise_like(key: jax.Array, state, dtype=None):
    """Independent standard Gaussian noise for every leaf of `state` (drawn in float32, then cast).

    Args:
        key: PRNG key; a new key gives new noise without changing shapes, so a jitted sampler is not retraced.
        state: pytree of arrays or jax.ShapeDtypeStruct giving shapes (and dtypes unless `dtype` is given).
        dtype: optional dtype for all leaves.

    Returns:
        A pytree like `state` of N(0, 1) samples.
    """
    leaves, treedef = jax.tree.flatten(state)
    keys = jax.random.split(key, len(leaves))
    out = [jax.random.normal(k, x.shape, jnp.float32).astype(dtype or x.dtype) for k, x in zip(keys, leaves)]
    return jax.tree.unflatten(treedef, out)
