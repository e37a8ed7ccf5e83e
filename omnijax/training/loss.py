"""Flow-matching training objective of Wan2.1 (shared/spec/wan.md §4.1, §4.4; easyomnimatte.md §3).

Axis letters: B batch; latents are [B, T, H, W, C] (any trailing shape works: the loss is element-wise).

x_σ = (1 − σ)·x0 + σ·ε; the model predicts the velocity ε − x0; σ is drawn from the base model's shifted
1000-entry training table; the loss is a mean squared error in f32 over all elements in which elements whose
error exceeds a threshold (50 in the reference) contribute zero but still count in the mean.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from omnijax.sampling.schedules import train_sigmas

F32 = jnp.float32


def training_sigmas(num_train_timesteps: int = 1000, shift: float = 5.0) -> np.ndarray:
    """The training table σ_i = S((N − i)/N), i = 0..N−1 (omnijax.sampling.schedules, the one definition)."""
    return train_sigmas(shift, num_train_timesteps)


def sample_sigmas(rng: jax.Array, batch: int, *, num_train_timesteps: int = 1000, shift: float = 5.0,
                  stratified: bool = False) -> jax.Array:
    """σ [B] f32 drawn uniformly over the training table's entries.

    With `stratified`, sample j draws its index from the j-th of B equal slices of the table, the
    reference's rank stratification applied across the global batch (lower variance, same marginal).
    """
    table = jnp.asarray(training_sigmas(num_train_timesteps, shift), F32)
    if stratified:
        lo = (jnp.arange(batch) * num_train_timesteps) // batch
        hi = ((jnp.arange(batch) + 1) * num_train_timesteps) // batch
        idx = jax.random.randint(rng, (batch,), lo, jnp.maximum(hi, lo + 1))
    else:
        idx = jax.random.randint(rng, (batch,), 0, num_train_timesteps)
    return table[idx]


def noisy_latents(x0: jax.Array, noise: jax.Array, sigma: jax.Array) -> jax.Array:
    """x_σ = (1 − σ)·x0 + σ·ε in f32, cast to x0's dtype. σ is [B] (broadcast over the trailing axes)."""
    s = jnp.asarray(sigma, F32).reshape(-1, *([1] * (x0.ndim - 1)))
    return ((1.0 - s) * x0.astype(F32) + s * noise.astype(F32)).astype(x0.dtype)


def velocity_target(x0: jax.Array, noise: jax.Array) -> jax.Array:
    """The regression target ε − x0 (f32)."""
    return noise.astype(F32) - x0.astype(F32)


def flow_matching_loss(pred: jax.Array, target: jax.Array, *, max_abs_error: float | None = 50.0,
                       weights: jax.Array | None = None) -> jax.Array:
    """Element-wise MSE in f32, elements with |pred − target| > max_abs_error zeroed, mean over all elements.

    Args:
      pred, target: same shape, e.g. [B, T, H, W, C].
      max_abs_error: outlier threshold (the reference's 50); None keeps every element.
      weights: optional, broadcastable to pred (e.g. [B, 1, 1, 1, 1] per-sample weights).
    Returns:
      scalar f32.
    """
    if pred.shape != target.shape:
        raise ValueError(f"prediction {pred.shape} and target {target.shape} differ in shape")
    err = pred.astype(F32) - target.astype(F32)
    sq = jnp.square(err)
    if max_abs_error is not None:
        sq = jnp.where(jnp.abs(err) <= max_abs_error, sq, 0.0)
    if weights is not None:
        sq = sq * jnp.asarray(weights, F32)
    return jnp.mean(sq)


def flow_matching_inputs(rng: jax.Array, x0: jax.Array, *, num_train_timesteps: int = 1000, shift: float = 5.0,
                         stratified: bool = False):
    """Draws σ and ε for clean latents x0 [B, ...].

    Returns:
      dict(x_t [B, ...] in x0's dtype, timesteps [B] = 1000·σ f32, sigma [B] f32, noise [B, ...] f32,
      target [B, ...] f32 = ε − x0).
    """
    k_sigma, k_noise = jax.random.split(rng)
    sigma = sample_sigmas(k_sigma, x0.shape[0], num_train_timesteps=num_train_timesteps, shift=shift,
                          stratified=stratified)
    noise = jax.random.normal(k_noise, x0.shape, F32)
    return dict(x_t=noisy_latents(x0, noise, sigma), timesteps=sigma * num_train_timesteps, sigma=sigma,
                noise=noise, target=velocity_target(x0, noise))
