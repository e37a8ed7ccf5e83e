"""Tiny random base model, experts and inputs shared by the omnimatte tests."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from omnijax.models.wan.dit import WanDiT
from omnijax.models.wan.variants import variant
from omnijax.omnimatte.branch import EasyOmnimatte
from omnijax.omnimatte.experts import effect_expert, quality_expert


def tiny_base(num_layers=3, seed=0):
    cfg = variant("tiny-inp", num_layers=num_layers)
    return WanDiT(cfg, dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(seed))


def experts(base, *, k=1, targets=None):
    n = base.config.num_layers
    kw = {} if targets is None else dict(targets=targets)
    eff = EasyOmnimatte(base, effect_expert(n, k, rank=4, alpha=8.0, **kw), rngs=nnx.Rngs(1))
    qual = EasyOmnimatte(base, quality_expert(n, rank=4, alpha=4.0, **kw), rngs=nnx.Rngs(2))
    return eff, qual


def randomize_lora_b(model, seed=3, scale=0.3):
    """Non-zero B matrices so the adapters change the output (fresh ones are the identity)."""
    flat = nnx.to_flat_state(nnx.state(model, nnx.LoRAParam))
    keys = jax.random.split(jax.random.key(seed), len(flat))
    new = []
    for (path, var), key in zip(flat, keys):
        val = var.get_value()
        if path[-1] == "lora_b":
            val = scale * jax.random.normal(key, val.shape, val.dtype)
        new.append((path, var.replace(val)))
    nnx.update(model, nnx.from_flat_state(new))


def inputs(seed=0, b=1, t=2, h=4, w=6, cfg=None):
    k = jax.random.split(jax.random.key(seed), 6)
    text_dim = 32 if cfg is None else cfg.text_dim
    return dict(z_bg=jax.random.normal(k[0], (b, t, h, w, 16)), z_alpha=jax.random.normal(k[1], (b, t, h, w, 16)),
                timesteps=jnp.full((b,), 700.0), context=jax.random.normal(k[3], (b, 5, text_dim)),
                clip_features=jax.random.normal(k[4], (b, 257, 32)), y=jax.random.normal(k[2], (b, t, h, w, 20)))


def run(model, d, **kw):
    return model(d["z_bg"], d["z_alpha"], d["timesteps"], d["context"], d["clip_features"], d["y"], **kw)


def base_run(base, d, latent):
    return base(latent, d["timesteps"], d["context"], d["clip_features"], d["y"])
