"""Flux.1's flow-matching schedule and jitted Euler sampler (shared/spec/flux.md §3.2-§3.5).

Schedule: N sigmas linspace(1, 1/N, N), shifted by the resolution-dependent exponential time shift
s' = e^mu / (e^mu + (1/s - 1)) with mu interpolated linearly from the packed token count of ONE generated image
(0.5 at 256 tokens, 1.15 at 4096, extrapolated beyond), then a final 0 appended. This reproduces diffusers'
FlowMatchEulerDiscreteScheduler with Flux's config (use_dynamic_shifting) fed by FluxPipeline's `calculate_shift`,
operation by operation in float32; schnell (no shifting) is `shift=False`. BFL's grid (linspace(1, 0, N+1),
shifted) is the same point set.

Sampler: x <- x + (sigma_{i+1} - sigma_i) * v(x, sigma_i) for i = 0..N-1, the model called with timesteps = sigma
(BFL's t in [0, 1]; the DiT multiplies by 1000 inside) and, for dev, the guidance strength as an input (guidance
distillation: one pass per step, no negative prompt). One `lax.fori_loop`; the noise key, guidance, text
embeddings and sigma values are traced arguments, so a new seed, guidance or prompt reuses the compiled program;
only shapes (batch, image size, text length, step count) compile anew.

Axis letters: B batch, L packed image tokens, S text tokens, P packed features (64), D text width, V pooled width.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from omnijax.sampling.euler import euler_step

# FLUX.1 scheduler config (scheduler/scheduler_config.json of dev; spec §3.3).
BASE_SEQ_LEN, MAX_SEQ_LEN, BASE_SHIFT, MAX_SHIFT = 256, 4096, 0.5, 1.15


def flux_mu(seq_len: int, base_seq_len: int = BASE_SEQ_LEN, max_seq_len: int = MAX_SEQ_LEN,
            base_shift: float = BASE_SHIFT, max_shift: float = MAX_SHIFT) -> float:
    """mu of the time shift for `seq_len` packed tokens of one image: the line through (256, 0.5), (4096, 1.15)."""
    slope = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return seq_len * slope + (base_shift - slope * base_seq_len)


def time_shift(sigmas: np.ndarray, mu: float) -> np.ndarray:
    """e^mu / (e^mu + (1/s - 1)), in the dtype of `sigmas` (float32 in the schedule, as diffusers computes it)."""
    e = math.exp(mu)
    return e / (e + (1 / sigmas - 1))


def flux_sigmas(num_steps: int, seq_len: int | None = None, *, shift: bool = True, mu: float | None = None
                ) -> np.ndarray:
    """The sigmas of an N-step Flux run, float32 [N + 1], from 1 down to the appended 0.

    Args:
      num_steps: N >= 1.
      seq_len: packed tokens of one generated image ((H/16)(W/16)); gives mu unless `mu` is passed.
      shift: False for schnell (no time shift: 1, (N-1)/N, ..., 1/N, 0).
      mu: explicit shift parameter (overrides seq_len).
    """
    if isinstance(num_steps, bool) or not isinstance(num_steps, (int, np.integer)) or num_steps < 1:
        raise ValueError(f"num_steps must be a positive int, got {num_steps!r}")
    sigmas = np.linspace(1.0, 1 / num_steps, num_steps).astype(np.float32)
    if shift:
        if mu is None:
            if seq_len is None or seq_len < 1:
                raise ValueError(f"the shifted schedule needs the image token count (seq_len), got {seq_len!r}")
            mu = flux_mu(seq_len)
        sigmas = time_shift(sigmas, mu).astype(np.float32)
    return np.concatenate([sigmas, np.zeros(1, np.float32)])


def sample(model, noise, img_ids, txt, txt_ids, y, sigmas, guidance=None):
    """The Euler loop; traceable (call it inside jit, or use `make_sampler`).

    Args:
      model: callable (img, img_ids, txt, txt_ids, timesteps, y, guidance) -> velocity, e.g. a FluxDiT.
      noise: [B, L, P] packed initial latents (pure noise at sigmas[0] = 1); the state's dtype is kept.
      img_ids: [B, L, 3]; txt: [B, S, D]; txt_ids: [B, S, 3]; y: [B, V].
      sigmas: [N + 1] decreasing table ending in 0 (`flux_sigmas`).
      guidance: [B] (or scalar) guidance strength for dev models; None for schnell.
    Returns:
      [B, L, P] clean packed latents.
    """
    if jnp.ndim(sigmas) != 1 or jnp.shape(sigmas)[0] < 2:
        raise ValueError(f"sigmas must be a 1-D table of N + 1 >= 2 entries ending in 0, got {jnp.shape(sigmas)}")
    b = noise.shape[0]
    sigmas = jnp.asarray(sigmas, jnp.float32)
    if guidance is not None:
        guidance = jnp.broadcast_to(jnp.asarray(guidance, jnp.float32), (b,))

    def step(i, x):
        v = model(x, img_ids, txt, txt_ids, jnp.broadcast_to(sigmas[i], (b,)), y, guidance)
        return euler_step(x, v, sigmas[i], sigmas[i + 1])

    return jax.lax.fori_loop(0, sigmas.shape[0] - 1, step, noise)


@nnx.jit
def _run(model, key, img_ids, txt, txt_ids, y, sigmas, guidance):
    _TRACES[0] += 1  # runs only while tracing: counts compilations for the tests
    b, length = img_ids.shape[:2]
    noise = jax.random.normal(key, (b, length, model.config.in_channels), jnp.float32)
    return sample(model, noise, img_ids, txt, txt_ids, y, sigmas, guidance)


_TRACES = [0]


def trace_count() -> int:
    """How many times the jitted sampler has been traced in this process."""
    return _TRACES[0]


def run_sampler(model: nnx.Module, key: jax.Array, img_ids, txt, txt_ids, y, sigmas, guidance=None):
    """The jitted sampler: noise from `key` (f32, packed [B, L, model.config.in_channels]), then `sample`.

    Every argument but the model's structure is traced; guidance is always passed as an f32 [B] array (zeros for
    schnell, whose model ignores it) so that dev and schnell calls, and Python or array guidance, share one
    signature.
    """
    if getattr(model.config, "guidance_embed", False) and guidance is None:
        raise ValueError("a guidance-distilled (dev) model needs a guidance strength (e.g. 3.5)")
    b = img_ids.shape[0]
    g = jnp.broadcast_to(jnp.asarray(0.0 if guidance is None else guidance, jnp.float32), (b,))
    return _run(model, key, jnp.asarray(img_ids, jnp.float32), jnp.asarray(txt), jnp.asarray(txt_ids, jnp.float32),
                jnp.asarray(y), jnp.asarray(sigmas, jnp.float32), g)
