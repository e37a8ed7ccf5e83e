"""Train/sample consistency of DiffDecompose by memorisation: does the sampler invert what the trainer learned?

  python3 benchmarks/memorise_diffdecompose.py --tiny      # CPU: tiny DiT, 16x16, 1500 steps (about 1 min)
  python3 benchmarks/memorise_diffdecompose.py             # GPU: the learn config's "small" DiT, bf16, 128x128

A DiT from random init is trained with the task's own path (tasks/diffdecompose.py: `build`, `make_batch`, `loss`
= decompose_loss; configs/diffdecompose.py:learn, every weight trained) on ONE watermark sample until it has
memorised it (t and noise are drawn per step as in training; the sample is fixed). The task's sampler (Decomposer,
the config's Euler steps and guidance) then decomposes that sample's composite, and the sampled layers are compared
IN LATENT SPACE with the latents the trainer used as x0 targets (a random VAE's decode means nothing). Each layer
must land much closer to its own target than to every plausible wrong answer: the other layer (the layers in the
other order), the composite (a copy of the input) and another sample's same layer (the conditioning ignored).
The sampler is then broken on purpose (BREAKS: the velocity's sign, the two noisy segments fed in the other order)
and the check must fail.

The random tiny VAE's latents have std ~0.11 against unit noise: memorising them to a useful precision would take
thousands of steps. A trained VAE (omnijax.training.autoencoder: KL towards N(0, 1)) hands the DiT latents of about
unit scale, so the VAE's own normalisation constants (shift_factor, scaling_factor) are set to give the memorised
composite's latents zero mean and unit std. Trainer and sampler encode through the same `vae.encode`, so this
cannot hide a normalisation mismatch between them (the decoder is not part of the check).

Prints (and with $OUT writes) memorise_diffdecompose.json: the losses, the relative L2 of each sampled layer to each
answer, for the intact sampler and each break, and whether each passed; the exit status is 1 when the intact
sampler fails or a broken one passes.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import rel_l2  # noqa: E402

MAX_REL = 0.5      # relative L2 of a sampled layer to its own target must stay below this ...
MARGIN = 0.6       # ... and below MARGIN x its relative L2 to every wrong answer
LAYERS = ("foreground", "background")


def distances(out: dict, targets: dict) -> dict:
    """{layer: {answer: relative L2 of the sampled layer to that answer}} (relative to the answer's norm)."""
    return {layer: {name: rel_l2(out[layer], ref) for name, ref in targets.items()} for layer in LAYERS}


def consistent(d: dict, max_rel: float = MAX_REL, margin: float = MARGIN) -> bool:
    """Each sampled layer is close to its own target and much closer to it than to every wrong answer."""
    ok = True
    for layer, other in (("foreground", "background"), ("background", "foreground")):
        own = d[layer][layer]
        wrong = [v for k, v in d[layer].items() if k not in (layer, "other_" + other)]
        ok &= own < max_rel and own < margin * min(wrong)
    return bool(ok)


def memorise(*, tiny: bool, size: int, steps: int, lr: float, sampler_steps: int = 28, log=print) -> dict:
    """Trains a fresh DiT on one watermark sample; returns dict(sample=fn() -> Decomposer.latents of its composite,
    targets {foreground, background, composite, other_foreground, other_background: packed [1, L, P]}, losses, mesh).
    sampler_steps: Euler steps (28: the learn config's; its tiny variant's 2 would hide schedule errors).
    """
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from configs import diffdecompose
    from data.alphablend import AlphaBlendConfig, AlphaBlendDataset
    from omnijax import sharding
    from omnijax.diffdecompose.sampling import Decomposer
    from omnijax.models.flux.vae import pack_latents
    from omnijax.training.optim import make_optimizer
    from omnijax.training.step import make_train_step
    from tasks import diffdecompose as task

    config = diffdecompose.get_config("learn,runlocal" if tiny else "learn")
    config.input.update(height=size, width=size, batch_size=1)
    config.schedule = dict(warmup_steps=0, decay_type="constant")
    config.lr = lr
    # Large strong marks (half to two thirds of the frame, opacity 0.7-0.9): background and composite differ.
    data = AlphaBlendDataset(AlphaBlendConfig(height=size, width=size, subtasks=("watermark",),
                                              watermark_size=(256.0, 320.0), opacity=(("watermark", (0.7, 0.9)),)),
                             seed=0, length=2)
    samples = [data[0], data[1]]
    host = lambda s: {k: np.asarray(s[k])[None] for k in task.BATCH_KEYS}
    mesh = sharding.make_mesh(dict(config.mesh), devices=jax.devices()[:1])
    t0 = time.perf_counter()
    with jax.set_mesh(mesh):
        models = task.build(config, mesh)
        vae = models.frozen["vae"]
        raw = np.asarray(vae.encode(jnp.asarray(samples[0]["composite"][None]) * 2.0 - 1.0))
        c = vae.config  # unit-scale latents, as a trained VAE gives (module docstring)
        vae.config = dataclasses.replace(c, shift_factor=c.shift_factor + float(raw.mean()) / c.scaling_factor,
                                         scaling_factor=c.scaling_factor / float(raw.std()))
        model = models.trainable
        optimizer = nnx.Optimizer(model, make_optimizer(config)[0], wrt=models.wrt)
        step_fn, state = make_train_step(model, optimizer, lambda m, b, r: task.loss(m, b, r, config=config))
        make = task.make_batch(models, config, mesh)
        batch, other = (make(host(s), jax.random.key(0)) for s in samples)
        key, losses = jax.random.key(1), []
        for i in range(steps):
            key, k = jax.random.split(key)
            state, metrics = step_fn(state, batch, k)
            losses.append(float(metrics["loss"]))
            if (i + 1) % max(1, steps // 5) == 0:
                log(f"step {i + 1}: loss {np.mean(losses[-50:]):.4f} ({time.perf_counter() - t0:.1f}s)")
        model = step_fn.merge(state)[0]
        sub = int(samples[0]["subtask"])
        decomposer = Decomposer(model, vae, num_steps=int(sampler_steps),
                                guidance=float(config.sampler.guidance), mu_tokens=config.sampler.mu_tokens,
                                attention_backend=config.model.attention)
        txt, y = models.frozen["txt"][sub:sub + 1], models.frozen["y"][sub:sub + 1]
        packed = lambda b, k: np.asarray(pack_latents(b[k]))
        targets = dict(foreground=packed(batch, "z_foreground"), background=packed(batch, "z_background"),
                       composite=packed(batch, "z_composite"), other_foreground=packed(other, "z_foreground"),
                       other_background=packed(other, "z_background"))

    def sample():
        with jax.set_mesh(mesh):
            return decomposer.latents(samples[0]["composite"][None], txt, y, seed=3)

    return dict(sample=sample, targets=targets, losses=losses, mesh=mesh, sampler_steps=int(sampler_steps))


# ------------------------------------------------------------------------------------------- broken samplers

def _flipped_euler(state, velocity, sigma, sigma_next):
    import jax

    from omnijax.sampling.euler import euler_step

    return euler_step(state, jax.tree.map(lambda v: -v, velocity), sigma, sigma_next)


def _swapped_segments(call):
    def swapped(self, z_c, x_fg, x_bg, *args, **kw):
        v_bg, v_fg = call(self, z_c, x_bg, x_fg, *args, **kw)  # the noisy segments fed in the other order
        return v_fg, v_bg

    return swapped


@contextlib.contextmanager
def broken(name: str):
    """The sampler with one deliberate error (BREAKS), restored on exit; the compiled loop is retraced both ways."""
    import jax

    from omnijax.diffdecompose import sampling
    from omnijax.diffdecompose.model import DiffDecomposer

    if name == "velocity_sign":
        owner, attr, new = sampling, "euler_step", _flipped_euler
    elif name == "segment_order":
        owner, attr, new = DiffDecomposer, "__call__", _swapped_segments(DiffDecomposer.__call__)
    else:
        raise ValueError(f"unknown break {name!r}; known: {', '.join(BREAKS)}")
    old = getattr(owner, attr)
    setattr(owner, attr, new)
    jax.clear_caches()
    try:
        yield
    finally:
        setattr(owner, attr, old)
        jax.clear_caches()


BREAKS = ("velocity_sign", "segment_order")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="the tiny DiT at 16x16 on CPU (learn,runlocal)")
    p.add_argument("--size", type=int, default=0, help="image size (0: 16 with --tiny, else 128)")
    p.add_argument("--steps", type=int, default=0, help="training steps (0: 1500 with --tiny, else 3000)")
    p.add_argument("--sampler-steps", type=int, default=28, help="Euler steps of the sampler")
    p.add_argument("--lr", type=float, default=0.0, help="constant learning rate (0: 3e-3 with --tiny, else 1e-3)")
    args = p.parse_args(argv)
    size = args.size or (16 if args.tiny else 128)
    steps = args.steps or (1500 if args.tiny else 3000)
    lr = args.lr or (3e-3 if args.tiny else 1e-3)
    if size % 16 or size < 16 or steps < 1 or args.sampler_steps < 1 or lr <= 0:
        p.error("--size must be a positive multiple of 16, --steps, --sampler-steps and --lr positive")

    from benchmarks.common import emit
    from omnijax.xla_flags import setup_xla_flags

    setup_xla_flags()  # before jax initialises a backend

    t0 = time.perf_counter()
    m = memorise(tiny=args.tiny, size=size, steps=steps, lr=lr, sampler_steps=args.sampler_steps)
    train_s = time.perf_counter() - t0
    runs = {}
    for name in ("intact",) + BREAKS:
        with broken(name) if name != "intact" else contextlib.nullcontext():
            d = distances(m["sample"](), m["targets"])
        runs[name] = dict(passed=consistent(d), rel_l2=d)
        print(f"{name}: {'PASS' if runs[name]['passed'] else 'FAIL'} "
              + "; ".join(f"{layer} " + ", ".join(f"{k} {v:.3f}" for k, v in d[layer].items()) for layer in LAYERS))
    losses = m["losses"]
    emit("memorise_diffdecompose", dict(
        size=size, steps=steps, lr=lr, tiny=args.tiny, sampler_steps=m["sampler_steps"], max_rel=MAX_REL,
        margin=MARGIN, loss_first10=float(np.mean(losses[:10])), loss_last50=float(np.mean(losses[-50:])),
        train_s=round(train_s, 1), runs=runs))
    ok = runs["intact"]["passed"] and not any(runs[b]["passed"] for b in BREAKS)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
