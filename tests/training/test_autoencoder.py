"""The VAE pretraining stage of the learning checks (omnijax/training/autoencoder.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx

from omnijax.models.flux.vae import FluxVAE, flux_vae_variant
from omnijax.models.wan.vae import WanVAE, vae_variant
from omnijax.training.autoencoder import fit_autoencoder, gaussian_kl, latent_posterior


def test_gaussian_kl_matches_torch():
    rng = np.random.default_rng(0)
    mean, logvar = rng.normal(size=(3, 5)), rng.normal(size=(3, 5))
    want = torch.distributions.kl_divergence(
        torch.distributions.Normal(torch.tensor(mean), torch.tensor(np.exp(0.5 * logvar))),
        torch.distributions.Normal(0.0, 1.0)).numpy()
    np.testing.assert_allclose(gaussian_kl(jnp.asarray(mean), jnp.asarray(logvar)), want, rtol=1e-5, atol=1e-6)


def test_posterior_draw_is_what_encode_draws():
    """mean + exp(logvar/2) eps from latent_posterior equals each VAE's own encode(sample_key) with the same key: the
    objective's latent is the one the DiT is trained on."""
    f32 = dict(dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
    for vae, shape in ((FluxVAE(flux_vae_variant("tiny"), **f32), (1, 16, 16, 3)),
                       (WanVAE(vae_variant("tiny"), **f32), (1, 5, 16, 16, 3))):
        x = jax.random.uniform(jax.random.key(1), shape, minval=-1, maxval=1)
        mean, logvar = latent_posterior(vae, x)
        key = jax.random.key(2)
        eps = jax.random.normal(key, mean.shape)
        np.testing.assert_allclose(mean + jnp.exp(0.5 * logvar) * eps, vae.encode(x, sample_key=key), rtol=1e-4,
                                   atol=1e-5)


def _blocks(shape, seed):
    """Flat-coloured rectangles on a flat background: what a tiny autoencoder can learn in a few steps."""
    rng = np.random.default_rng(seed)
    while True:
        x = np.full(shape, -0.5, np.float32)
        for b in range(shape[0]):
            y0, x0 = rng.integers(0, shape[-3] // 2, 2)
            x[b, ..., y0:y0 + shape[-3] // 2, x0:x0 + shape[-2] // 2, :] = rng.uniform(-1, 1, 3)
        yield x


def test_fit_lowers_reconstruction_error_and_stops_at_its_time_limit():
    """The Flux VAE here; the Wan VAE's fit runs in the learning script's test (tests/benchmarks). max_seconds ends
    the run at the first log step past the limit: 0 s stops this 400-step run at step 40 (one compile for both)."""
    vae = FluxVAE(flux_vae_variant("tiny"), dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
    lines = []
    history = fit_autoencoder(vae, _blocks((2, 16, 16, 3), 0), steps=400, lr=3e-3, log_every=40, log=lines.append,
                              max_seconds=0.0)
    assert [h["step"] for h in history] == [1, 40]
    assert "stopped at step 40 of 400" in lines[-1]
    assert history[-1]["l1"] < 0.6 * history[0]["l1"], history
