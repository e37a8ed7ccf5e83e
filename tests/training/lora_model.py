"""A small NNX model with frozen nnx.Param weights and nnx.LoRAParam adapters, for the training tests.

Axis letters: B batch, L tokens, I/O features, r LoRA rank.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


class LoRADense(nnx.Module):
    """y = x W + b + (x A) B; W, b frozen (nnx.Param), A [I, r] and B [r, O] trained (nnx.LoRAParam)."""

    def __init__(self, din: int, dout: int, rank: int, *, rngs: nnx.Rngs):
        k = rngs.params
        self.kernel = nnx.Param(jax.random.normal(k(), (din, dout)) / din ** 0.5)
        self.bias = nnx.Param(jax.random.normal(k(), (dout,)) * 0.1)
        self.lora = nnx.LoRA(din, rank, dout, rngs=rngs)
        # Non-zero B so the very first gradient reaches A as well.
        self.lora.lora_b.set_value(jax.random.normal(k(), (rank, dout)) * 0.1)

    def __call__(self, x):
        return x @ self.kernel[...] + self.bias[...] + self.lora(x)


class TinyLoRANet(nnx.Module):
    """[B, L, I] -> [B, L, I]: two LoRA dense layers with a GELU between them and a frozen RMS scale."""

    def __init__(self, dim: int = 16, hidden: int = 32, rank: int = 4, *, rngs: nnx.Rngs):
        self.fc1 = LoRADense(dim, hidden, rank, rngs=rngs)
        self.fc2 = LoRADense(hidden, dim, rank, rngs=rngs)
        self.scale = nnx.Param(jnp.ones((dim,)))

    def __call__(self, x):
        return self.fc2(jax.nn.gelu(self.fc1(x))) * self.scale[...]


def regression_loss(model, batch, rng):
    """MSE to the target plus a little input noise drawn from `rng` (so the rng stream matters)."""
    x = batch["x"] + 0.01 * jax.random.normal(rng, batch["x"].shape)
    return jnp.mean(jnp.square(model(x) - batch["y"]))


def make_batch(step: int, batch: int = 8, tokens: int = 4, dim: int = 16):
    """Deterministic batch number `step` (numpy-free so it is cheap): x random, y a fixed function of x."""
    key = jax.random.fold_in(jax.random.key(1234), step)
    x = jax.random.normal(key, (batch, tokens, dim))
    return {"x": x, "y": jnp.sin(x) * 0.5}


RULES = [(r"kernel$", ("fsdp", None)), (".*", None)]
OPT_CONFIG = dict(lr=1e-2, wd=1e-2, grad_clip_norm=1.0, total_steps=6,
                  schedule=dict(warmup_steps=2, decay_type="cosine", warmup_init=0.5))


def build(mesh=None, seed: int = 0):
    """(model, optimizer) of TinyLoRANet; sharded by RULES when a mesh is given (call under jax.set_mesh)."""
    from omnijax import sharding
    from omnijax.training.optim import make_optimizer

    model = TinyLoRANet(rngs=nnx.Rngs(seed))
    if mesh is not None:
        sharding.shard_module(model, RULES, mesh, print_fn=None)
    tx, _ = make_optimizer(OPT_CONFIG)
    return model, nnx.Optimizer(model, tx, wrt=nnx.LoRAParam)
