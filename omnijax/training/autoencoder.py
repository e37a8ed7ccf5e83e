"""Training a VAE from scratch (the Wan video VAE or the Flux image VAE): the first stage of the small-scale
learning checks (benchmarks/learn_*.py), where no published VAE weights can be downloaded.

The objective is the usual one: L1 reconstruction of a posterior draw plus `kl_weight` times the KL divergence
of the posterior from N(0, 1). Both are taken in the space the diffusion model sees, i.e. AFTER each VAE's
latent normalisation (Wan: the per-channel mean/std of `WanVAE.posterior`; Flux: shift and scale), so a VAE
trained here hands the DiT latents of about unit scale whatever its normalisation constants are.

  vae = WanVAE(vae_variant("tiny"), dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
  history = fit_autoencoder(vae, batches, steps=2000, lr=1e-3)    # batches: iterator of [B, F, H, W, 3] in [-1, 1]
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

F32 = jnp.float32


def latent_posterior(vae, x):
    """(mean, logvar) of the DiT-space latent of `x`: a draw is mean + exp(logvar / 2) * eps.

    Wan: [B, F, H, W, 3] -> [B, T, h, w, Z]; the noise std is the un-normalised one (the reference's `.sample()`
    quirk, models/wan/vae.sample_posterior), so it is taken as is. Flux: [B, H, W, 3] -> [B, h, w, Z]; the draw
    is scaled with the mean, so the log-variance gains 2 log(scaling_factor).
    """
    from omnijax.models.flux.vae import FluxVAE
    from omnijax.models.wan.vae import WanVAE

    if isinstance(vae, WanVAE):
        return vae.posterior(x, mode="whole", tile=None)
    if isinstance(vae, FluxVAE):
        mean, logvar = vae.moments(x, tile=None)
        return vae._scale(mean), logvar + 2.0 * math.log(vae.config.scaling_factor)
    raise TypeError(f"latent_posterior: not a WanVAE or FluxVAE: {type(vae).__name__}")


def decode(vae, z):
    from omnijax.models.wan.vae import WanVAE

    return vae.decode(z, mode="whole", tile=None) if isinstance(vae, WanVAE) else vae.decode(z, tile=None)


def gaussian_kl(mean, logvar):
    """KL(N(mean, exp(logvar)) || N(0, 1)) per element, f32."""
    mean, logvar = mean.astype(F32), logvar.astype(F32)
    return 0.5 * (mean**2 + jnp.exp(logvar) - 1.0 - logvar)


def autoencoder_loss(vae, x, key, *, kl_weight: float):
    """(loss, metrics): mean |decode(draw) - x| + kl_weight * mean KL; x in [-1, 1]."""
    mean, logvar = latent_posterior(vae, x)
    z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape, F32)
    l1 = jnp.mean(jnp.abs(decode(vae, z) - x.astype(F32)))
    kl = jnp.mean(gaussian_kl(mean, logvar))
    return l1 + kl_weight * kl, dict(l1=l1, kl=kl, latent_std=jnp.std(mean))


def fit_autoencoder(vae, batches: Iterator, *, steps: int, lr: float = 1e-3, kl_weight: float = 1e-3,
                    seed: int = 0, log_every: int = 100, log: Callable[[str], None] = print,
                    max_seconds: float | None = None) -> list[dict]:
    """Trains every nnx.Param of `vae` in place with AdamW (cosine decay after 5 % warmup, clip 1.0).

    Args:
      batches: iterator of arrays in [-1, 1] of the VAE's input layout (see latent_posterior).
      steps: optimizer steps; one batch each.
      max_seconds: stop after the first step that ends past this many seconds (checked at log steps, so a run
        inside a fixed time slot ends cleanly); the schedule stays the one of `steps`, and the last row's
        "step" says where it stopped.
    Returns:
      the metrics every `log_every` steps and at the last: [{"step", "loss", "l1", "kl", "latent_std", "s"}].
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    schedule = optax.warmup_cosine_decay_schedule(0.0, lr, max(1, steps // 20), steps, lr * 0.05)
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=1e-4))
    optimizer = nnx.Optimizer(vae, tx, wrt=nnx.Param)

    @nnx.jit
    def step(vae, optimizer, x, key):
        (loss, metrics), grads = nnx.value_and_grad(
            lambda m: autoencoder_loss(m, x, key, kl_weight=kl_weight), has_aux=True)(vae)
        optimizer.update(vae, grads)
        return dict(metrics, loss=loss)

    key, history, t0 = jax.random.key(seed), [], time.perf_counter()
    for i in range(1, steps + 1):
        metrics = step(vae, optimizer, jnp.asarray(next(batches)), jax.random.fold_in(key, i))
        late = max_seconds is not None and i % log_every == 0 and time.perf_counter() - t0 > max_seconds
        if i % log_every == 0 or i == steps or i == 1:
            row = {k: float(v) for k, v in metrics.items()}
            row.update(step=i, s=round(time.perf_counter() - t0, 1))
            if not all(np.isfinite(v) for v in row.values()):
                raise FloatingPointError(f"autoencoder step {i}: non-finite metrics {row}")
            history.append(row)
            log(f"vae step {i}/{steps} loss {row['loss']:.4f} l1 {row['l1']:.4f} kl {row['kl']:.3f} "
                f"latent std {row['latent_std']:.3f} ({row['s']:.0f}s)")
        if late and i < steps:
            log(f"vae: stopped at step {i} of {steps}: past the {max_seconds:.0f} s limit")
            break
    return history
