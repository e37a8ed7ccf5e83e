"""Train/sample consistency by memorisation: the sampler must invert what the trainer learned.

A tiny Flux DiT from random init is trained with the task's own path (tasks/diffdecompose.py: `build`, `make_batch`,
`loss` = decompose_loss; configs/diffdecompose.py:learn,runlocal, every weight trained) on ONE watermark sample
until it has memorised it; the task's sampler (Decomposer, 28 Euler steps of the config) then decomposes that
sample's composite, and the sampled latents are compared IN LATENT SPACE with the latents the trainer used as x0
targets (a random VAE's decode means nothing). Each layer must land much closer to its own target than to the
plausible wrong answers: the other layer (layers returned in the other order), the composite (a copy of the input),
and a different sample's layer (conditioning ignored). Breaking the sampler on purpose (velocity sign, the two
noisy segments fed in the other order) must make the check fail.

The random tiny VAE's latents have std ~0.11, against unit noise: memorising them to a useful precision would take
thousands of steps. A trained VAE (omnijax.training.autoencoder, KL towards N(0, 1)) hands the DiT latents of about
unit scale, so the VAE's own normalisation constants (shift_factor, scaling_factor) are set to give the memorised
sample's latents zero mean and unit std. Trainer and sampler both encode through the same `vae.encode`, so this
cannot hide a normalisation mismatch between them.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import diffdecompose
from data.alphablend import AlphaBlendConfig, AlphaBlendDataset
from omnijax import sharding
from omnijax.diffdecompose import sampling
from omnijax.diffdecompose.model import DiffDecomposer
from omnijax.models.flux.vae import pack_latents
from omnijax.training.optim import make_optimizer
from omnijax.training.step import make_train_step
from tasks import diffdecompose as task

pytestmark = pytest.mark.slow

SIZE = 16          # 16x16 images -> 8x8x16 latents (tiny VAE, x2) -> 16 tokens per layer
STEPS = 600        # Adam steps on the one sample
MAX_REL = 0.5      # relative L2 of a sampled layer to its own target must stay below this ...
MARGIN = 0.6       # ... and below MARGIN x its relative L2 to every wrong answer


def _rel(x, ref):
    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    return float(np.linalg.norm(x - ref) / np.linalg.norm(ref))


@pytest.fixture(scope="module")
def memorised():
    config = diffdecompose.get_config("learn,runlocal")
    config.input.update(height=SIZE, width=SIZE, batch_size=1)
    config.schedule = dict(warmup_steps=0, decay_type="constant")
    config.lr = 3e-3  # high: one sample to memorise
    # Large strong marks (16-20 px boxes at 32 px scale, opacity 0.7-0.9): background and composite latents differ.
    data = AlphaBlendDataset(AlphaBlendConfig(height=SIZE, width=SIZE, subtasks=("watermark",),
                                              watermark_size=(256.0, 320.0), opacity=(("watermark", (0.7, 0.9)),)),
                             seed=0, length=2)
    samples = [data[0], data[1]]
    host = lambda s: {k: np.asarray(s[k])[None] for k in task.BATCH_KEYS}
    mesh = sharding.make_mesh(dict(config.mesh), devices=jax.devices()[:1])
    with jax.set_mesh(mesh):
        models = task.build(config, mesh)
        vae = models.frozen["vae"]
        raw = np.asarray(vae.encode(jnp.asarray(samples[0]["composite"][None]) * 2.0 - 1.0))  # scaled latents
        c = vae.config
        vae.config = dataclasses.replace(c, shift_factor=c.shift_factor + float(raw.mean()) / c.scaling_factor,
                                         scaling_factor=c.scaling_factor / float(raw.std()))
        model = models.trainable
        optimizer = nnx.Optimizer(model, make_optimizer(config)[0], wrt=models.wrt)
        step_fn, state = make_train_step(model, optimizer, lambda m, b, r: task.loss(m, b, r, config=config))
        make = task.make_batch(models, config, mesh)
        batch, other = (make(host(s), jax.random.key(0)) for s in samples)
        key, losses = jax.random.key(1), []
        for _ in range(STEPS):  # t and noise drawn per step as in training; the sample is fixed
            key, k = jax.random.split(key)
            state, metrics = step_fn(state, batch, k)
            losses.append(float(metrics["loss"]))
        model = step_fn.merge(state)[0]
        sub = int(samples[0]["subtask"])
        decomposer = sampling.Decomposer(model, vae, num_steps=int(config.sampler.steps),
                                         guidance=float(config.sampler.guidance), mu_tokens=config.sampler.mu_tokens,
                                         attention_backend=config.model.attention)
        txt, y = models.frozen["txt"][sub:sub + 1], models.frozen["y"][sub:sub + 1]
        run = lambda: decomposer.latents(samples[0]["composite"][None], txt, y, seed=3)
        packed = lambda b, k: np.asarray(pack_latents(b[k]))
        targets = dict(foreground=packed(batch, "z_foreground"), background=packed(batch, "z_background"),
                       composite=packed(batch, "z_composite"), other_foreground=packed(other, "z_foreground"),
                       other_background=packed(other, "z_background"))
        yield dict(run=run, targets=targets, losses=losses, mesh=mesh)


def _distances(out, targets):
    """{layer: {answer: relative L2 of the sampled layer to that answer}} (each relative to the answer's norm)."""
    return {layer: {name: _rel(out[layer], ref) for name, ref in targets.items()} for layer in ("foreground",
                                                                                                  "background")}


def _consistent(d) -> bool:
    """Each sampled layer is close to its own target and much closer to it than to every wrong answer."""
    ok = True
    for layer, other in (("foreground", "background"), ("background", "foreground")):
        own = d[layer][layer]
        wrong = [v for k, v in d[layer].items() if k not in (layer, "other_" + other)]
        ok &= own < MAX_REL and own < MARGIN * min(wrong)
    return ok


def test_sampler_returns_the_memorised_layers(memorised):
    losses = memorised["losses"]
    assert np.mean(losses[-50:]) < 0.25 * np.mean(losses[:10])  # it did memorise (loss ~1.2 -> ~0.2)
    with jax.set_mesh(memorised["mesh"]):
        out = memorised["run"]()
    t = memorised["targets"]
    assert np.array_equal(np.asarray(out["composite"]), t["composite"])  # the sampler's condition = the trainer's
    d = _distances(out, t)
    print(d)
    assert _consistent(d), d
    # The layers in the other order (a sampler returning (background, foreground)) fail the same check.
    assert not _consistent(_distances(dict(foreground=out["background"], background=out["foreground"]), t))


def _flipped_euler(state, velocity, sigma, sigma_next, _step=sampling.euler_step):
    return _step(state, jax.tree.map(lambda v: -v, velocity), sigma, sigma_next)


def _swapped_call(self, z_c, x_fg, x_bg, *args, _call=DiffDecomposer.__call__, **kw):
    v_bg, v_fg = _call(self, z_c, x_bg, x_fg, *args, **kw)  # the noisy segments fed in the other order
    return v_fg, v_bg


@pytest.mark.parametrize("broken", ["velocity_sign", "segment_order"])
def test_a_broken_sampler_fails_the_check(memorised, monkeypatch, broken):
    if broken == "velocity_sign":
        monkeypatch.setattr(sampling, "euler_step", _flipped_euler)
    else:
        monkeypatch.setattr(DiffDecomposer, "__call__", _swapped_call)
    jax.clear_caches()  # the sampler's compiled loop was traced with the unbroken pieces
    try:
        with jax.set_mesh(memorised["mesh"]):
            out = memorised["run"]()
    finally:
        monkeypatch.undo()
        jax.clear_caches()
    d = _distances(out, memorised["targets"])
    print(broken, d)
    assert not _consistent(d), d
