"""The trainer's loss (tasks.omnimatte.loss -> omnimatte.training.expert_loss) against a loss built by hand.

A spy records what the loss feeds the expert; the test then checks each input against the objective of spec
easyomnimatte.md §3 written here, and rebuilds the loss from a reference expert's public call:
- sigma: timesteps / 1000 must be entries of the base model's training table sigma_i = S((1000 - i) / 1000),
  S(s) = 5 s / (1 + 4 s) (shift 5, spec wan.md §4.1), written here in closed form;
- the alpha half: x_t = (1 - sigma) x0_alpha + sigma eps_a with eps_a standard normal, target eps_a - x0_alpha;
- the Effect Expert's background half: the noisy GROUND-TRUTH background at the SAME sigma,
  (1 - sigma) x0_bg + sigma eps_b with eps_b standard normal and independent of eps_a; the Quality Expert
  runs no background half;
- the mask: the reference expert is built from a hand-written ExpertConfig (Effect: mask B on the last block of
  3; Quality: mask C on all blocks) holding the trained expert's LoRA values, and the loss must equal
  mean((v_alpha - (eps_a - x0_alpha))^2) with v_alpha from that reference's public call.
x0_alpha and x0_bg are kept far apart (means -2 and +3), so training on the wrong latent cannot pass as noise.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs.common import expert_config as make_config
from omnijax.omnimatte.branch import EasyOmnimatte
from omnijax.omnimatte.experts import ExpertConfig
from tasks import omnimatte as task
from tests.omnimatte.helpers import randomize_lora_b, tiny_base

B, T, HH, WW = 4, 2, 4, 6
HAND = {"effect": dict(blocks=(2,), mask="B"), "quality": dict(blocks=(0, 1, 2), mask="C")}


def hand_table(shift=5.0):
    s = (1000 - np.arange(1000)) / 1000
    return shift * s / (1 + (shift - 1) * s)


class Spy:
    """Stands in for the expert: records every call's inputs, answers with the expert's own output."""

    def __init__(self, model):
        self.model, self.expert, self.calls = model, model.expert, []

    def __call__(self, z_bg, z_alpha, t, *args, **kwargs):
        def record(z_bg, x_t, t):
            self.calls.append({k: None if v is None else np.asarray(v, np.float64)
                               for k, v in dict(z_bg=z_bg, x_t=x_t, t=t).items()})

        jax.debug.callback(record, z_bg, z_alpha, t)
        return self.model(z_bg, z_alpha, t, *args, **kwargs)


def batch(cfg, seed=0):
    k = jax.random.split(jax.random.key(seed), 5)
    shape = (B, T, HH, WW, 16)
    return dict(x0_alpha=-2.0 + 0.5 * jax.random.normal(k[0], shape), x0_bg=3.0 + 0.5 * jax.random.normal(k[1], shape),
                y=jax.random.normal(k[2], (B, T, HH, WW, 20)), context=jax.random.normal(k[3], (B, 5, cfg.text_dim)),
                clip=jax.random.normal(k[4], (B, 257, cfg.image_dim)))


def standard_normal(eps, what):
    """Per sample: mean ~ 0 and std ~ 1 (768 elements each: the mean's standard error is 0.036)."""
    for i, e in enumerate(eps):
        assert abs(e.mean()) < 0.2 and 0.85 < e.std() < 1.15, f"{what}, sample {i}: mean {e.mean()}, std {e.std()}"


def noise_of(noisy, x0, sigma):
    s = sigma.reshape(-1, 1, 1, 1, 1)
    return (noisy - (1.0 - s) * np.asarray(x0, np.float64)) / s


@pytest.mark.parametrize("name", ["effect", "quality"])
def test_loss_against_the_hand_built_objective(name):
    config = make_config(name, "runlocal")
    base = tiny_base(num_layers=3)
    expert = task.expert_config(config, base.config.num_layers)
    model = EasyOmnimatte(base, expert, rngs=nnx.Rngs(1))
    randomize_lora_b(model)  # adapters that change the output, so the mask and the inputs matter
    hand = ExpertConfig(f"reference_{name}", expert.rank, expert.alpha, HAND[name]["blocks"], HAND[name]["mask"])
    reference = EasyOmnimatte(base, hand, rngs=nnx.Rngs(9))
    nnx.update(reference.lora, nnx.state(model.lora, nnx.LoRAParam))

    data = batch(base.config)
    table = hand_table()
    spy = Spy(model)
    loss = jax.jit(lambda d, key: task.loss(spy, d, key, config=config))  # eager ops would compile one by one
    forward = jax.jit(lambda z_bg, x_t, t: reference(z_bg, x_t, t, data["context"], data["clip"], data["y"],
                                                     train=True, attention_backend="xla")[1])
    for seed in (0, 1):
        spy.calls.clear()
        got = float(loss(data, jax.random.key(seed)))
        jax.effects_barrier()
        (call,) = spy.calls
        sigma = call["t"] / 1000.0
        # sigma: entries of the shift-5 training table.
        gap = np.abs(sigma[:, None] - table[None]).min(axis=1)
        assert np.all(gap < 1e-6), f"sigmas {sigma} are not entries of the shift-5 training table (gaps {gap})"
        eps_a = noise_of(call["x_t"], data["x0_alpha"], sigma)
        standard_normal(eps_a, "alpha half's noise")
        if name == "effect":
            assert call["z_bg"] is not None, "the Effect Expert trains with the background half (mask B)"
            eps_b = noise_of(call["z_bg"], data["x0_bg"], sigma)
            standard_normal(eps_b, "background half's noise (noisy ground truth at the same sigma)")
            corr = np.corrcoef(eps_a.reshape(-1), eps_b.reshape(-1))[0, 1]
            assert abs(corr) < 0.2, f"background noise is not independent of the alpha noise (corr {corr})"
        else:
            assert call["z_bg"] is None, "the Quality Expert (mask C) runs no background half"

        z_bg = None if call["z_bg"] is None else jnp.asarray(call["z_bg"], jnp.float32)
        v = forward(z_bg, jnp.asarray(call["x_t"], jnp.float32), jnp.asarray(call["t"], jnp.float32))
        target = eps_a - np.asarray(data["x0_alpha"], np.float64)
        want = np.mean((np.asarray(v, np.float64) - target) ** 2)
        np.testing.assert_allclose(got, want, rtol=2e-4, err_msg=f"seed {seed}")
