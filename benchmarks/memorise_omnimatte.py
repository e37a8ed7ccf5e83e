"""Train/sample consistency by memorisation: does the omnimatte sampler invert what the trainer learned?

A small random model is trained through the real task code (tasks/inpaint.py and tasks/omnimatte.py: the task's
build, batch maker and loss; launch's optimizer and train step) on ONE fixed procedural composite until its
flow-matching loss is small; then the real sampler (omnijax.omnimatte.decompose.Decomposer, the dual-expert
Euler loop) runs on that clip's video and coarse mask, and the latents it hands to the VAE decoder are compared
with the latents the trainer used as x0 (no trained VAE exists here, so the comparison is in latent space).

A swapped condition channel, a velocity sign, different timesteps or RoPE positions, a wrong latent
normalisation, or an inverted mask between training and sampling would leave the loss low and the sample far
from the memorised target. The expected result: relative L2 to the target well below the relative L2 to the
alternatives (the conditioning input's latent; a different clip's target; for the alpha also the coarse mask's).

Two checks on the same samples:
  consistency  the Decomposer's latents equal an independent Euler loop over the same trained models fed the
               TRAINERS' batches (y, text context, CLIP features of tasks/inpaint.py and tasks/omnimatte.py), from
               the same initial noise: rel. L2 <= 1e-3. Holds at any training length; catches every sampler-side
               mismatch (velocity sign, timesteps, condition channels, mask polarity, latent frame order).
  memorised    (not with --tiny) the sample is within 0.1 rel. L2 of the x0 target and below half its distance to
               the nearest alternative. Catches trainer-side mismatches too (a wrong target).
--break runs the sampler broken on purpose; the script fails if a break passes.

Stages (each the real code path):
  base     configs/inpaint_base.py:runlocal at model.variant=small-inp, every weight trained (tasks/inpaint.py),
           x0 = the clean background latent, y in the form the sampler feeds (the composite with the coarse object
           removed: masked_prob=0); sampled through the experts' background branch (no adapter touches it)
  effect   configs/effect_expert.py:runlocal LoRA (rank 16) on the memorised base, x0 = the alpha latent (mask B:
           the background set sees the noisy true background)
  quality  configs/quality_expert.py:runlocal, the same
  sample   the Decomposer at tau = 0.5 (dual), tau = 0 (Effect alone), tau = 1 (Quality alone)

The latents of the random tiny VAE are dominated by per-channel constants: the target, the input's latent and
another clip's target lie only 0.12-0.18 rel. L2 apart, so memorisation must be precise to tell them apart. On this
CPU (2026-11-29), 600 base + 300 + 300 expert steps at a constant lr (base loss 0.065, experts 0.03-0.08): the
background sample 0.330 rel. L2 from its target, 0.342 from the input's latent, 0.363 from another clip's; the alpha
0.377 from its target, 0.377 from the mask's, 0.373 from another clip's: underfit, not yet discriminating. The
sampler equalled the reference loop (0.000) at every tau; broken, it did not (velocity sign 5.6, condition channels
1.2, mask inverted 0.17, latent frames reversed 0.12). The base's x0 estimate was 0.49 off at sigma = 1: the high
noise end is what is not learned yet. A cosine lr (now the default) reached loss 0.033 and 0.28-0.32 in 600 steps.
Hence GPU defaults of thousands of steps:

  python3 benchmarks/memorise_omnimatte.py --json $OUT/memorise.json --break \
      none,velocity_sign,mask_inverted,condition_swapped,frames_reversed          # one H200, a few minutes
  PYTHONPATH=$PWD python benchmarks/memorise_omnimatte.py --tiny                  # CPU mechanics, ~1.5 min
tests/benchmarks/test_memorise_omnimatte.py runs the consistency check and three breaks without training steps.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from benchmarks.common import rel_l2  # noqa: E402

# Deliberate breaks of the SAMPLER side (the check must fail under each): see `broken_sampler`.
BREAKS = ("none", "velocity_sign", "mask_inverted", "condition_swapped", "frames_reversed")


def settings(tiny: bool = False, **kw) -> dict:
    """GPU defaults (memorisation needs a few thousand steps: ~0.4 rel. L2 after 600 CPU steps) or --tiny."""
    s = dict(variant="small-inp", frames=9, height=32, width=32, seed=0, other_seed=1, base_steps=4000, base_lr=1e-3,
             expert_steps=3000, expert_lr=2e-3, lora_rank=16, sampler_steps=12)
    if tiny:
        s.update(variant="tiny-inp", frames=5, base_steps=20, expert_steps=10)
    s.update({k: v for k, v in kw.items() if v is not None})
    return s


def clip_batch(s, seed: int) -> dict:
    """One procedural composite as a host batch of one ({video, mask, alpha, background} float32 [1, ...])."""
    from data.composite import CompositeConfig
    from data.pipeline import fit_to_latent
    from data.synthetic import SyntheticOmnimatte

    data = SyntheticOmnimatte(CompositeConfig(num_frames=s["frames"], height=s["height"], width=s["width"]),
                              seed=seed)
    clip = fit_to_latent(data[0])
    return {k: np.asarray(clip[k], np.float32)[None] for k in ("video", "mask", "alpha", "background")}


def _config(module, s, steps: int, **over):
    from configs.common import override

    config = module.get_config("runlocal")
    with config.unlocked():
        config.input.update(frames=s["frames"], height=s["height"], width=s["width"], vae_sample=False,
                            num_threads=0)
        # Cosine to 1 % of the lr over the run: a constant lr plateaued (the Adam noise of one example's steps).
        config.schedule = dict(warmup_steps=0, decay_type="cosine", end_factor=0.01)
        config.seed = s["seed"]
        config.model.variant = s["variant"]
        config.total_steps = max(1, steps)
        override(config, over)
    return config


def memorise(task, config, host: dict, steps: int, *, log=print):
    """Builds the task's models, makes its batch of `host` once (fixed x0 and y), and trains `steps` steps of the
    task's loss with the trainer's optimizer and step. Returns (models, trained model, batch, loss history)."""
    import jax
    from flax import nnx

    from omnijax import sharding
    from omnijax.training.optim import make_optimizer
    from omnijax.training.step import make_train_step

    mesh = sharding.make_mesh(dict(config.mesh), devices=jax.devices()[:1])
    with jax.set_mesh(mesh):
        models = task.build(config, mesh)
        batch = task.make_batch(models, config, mesh)(host, jax.random.key(0))
        optimizer = nnx.Optimizer(models.trainable, make_optimizer(config)[0], wrt=models.wrt)
        step_fn, state = make_train_step(models.trainable, optimizer,
                                         lambda m, b, r: task.loss(m, b, r, config=config))
        losses, key = [], jax.random.key(config.seed + 1)
        for i in range(steps):
            state, metrics = step_fn(state, batch, jax.random.fold_in(key, i))
            losses.append(float(metrics["loss"]))
            if i % max(1, steps // 5) == 0 or i == steps - 1:
                log(f"  step {i:4d} loss {np.mean(losses[-20:]):.4f}")
        model = step_fn.merge(state)[0]
    return models, model, batch, losses


@contextlib.contextmanager
def broken_sampler(kind: str):
    """Breaks the sampler side of omnijax.omnimatte.decompose on purpose (`kind` in BREAKS)."""
    from omnijax.omnimatte import decompose

    saved = {n: getattr(decompose, n) for n in ("make_sampler", "latent_mask", "condition_y")}
    if kind == "velocity_sign":
        import jax

        neg = lambda f: (lambda z, s, c: jax.tree.map(lambda v: -v, f(z, s, c)))
        decompose.make_sampler = lambda e, q: saved["make_sampler"](neg(e), neg(q))
    elif kind == "mask_inverted":
        decompose.latent_mask = lambda m: 1.0 - saved["latent_mask"](m)
    elif kind == "condition_swapped":  # the video latent's channel halves swapped
        import jax.numpy as jnp

        decompose.condition_y = lambda m, v: saved["condition_y"](m, jnp.roll(v, v.shape[-1] // 2, axis=-1))
    elif kind == "frames_reversed":  # the condition's latent frames in reverse order (a segment order bug)
        decompose.condition_y = lambda m, v: saved["condition_y"](m, v[:, ::-1])
    elif kind != "none":
        raise ValueError(f"unknown break {kind!r}; known: {', '.join(BREAKS)}")
    try:
        yield
    finally:
        for n, f in saved.items():
            setattr(decompose, n, f)


def sampled_latents(decomposer, host: dict, *, steps: int, tau: float, seed: int = 0):
    """Runs the Decomposer on the clip's video and coarse mask; returns the (background, alpha) latents it decodes
    ([T, h, w, 16] each), captured at the decoder's input."""
    from omnijax.omnimatte.decompose import SamplerSettings

    seen, decode = [], decomposer._decode

    def capture(z, i):
        seen.append(np.asarray(z)[int(i)])
        return decode(z, i)

    capture.lower = decode.lower  # the Decomposer compiles ahead through it
    decomposer._decode = capture
    try:
        decomposer(host["video"][0], host["mask"][0][None], SamplerSettings(steps=steps, tau=tau, seed=seed))
    finally:
        decomposer._decode = decode
    assert len(seen) == 2, f"expected one background and one alpha decode, got {len(seen)}"
    return seen[0], seen[1]


def reference_sample(experts, batch, *, steps: int, tau: float, seed: int = 0, shift: float = 5.0):
    """An independent Euler loop over the trained experts with the TRAINER's conditioning (batch y, context, clip):
    what the sampler must reproduce. experts = (effect, quality) EasyOmnimatte; the first steps with sigma > tau
    run the Effect Expert (paper eq. 7). The initial noise is drawn as the Decomposer draws it (split(key(seed)):
    background, alpha), so both integrate the same ODE from the same point. Returns (background, alpha) [T, h, w, 16].
    """
    import jax
    import jax.numpy as jnp

    from omnijax.sampling.schedules import inference_sigmas

    shape = batch["y"].shape[:-1] + (16,)
    k_bg, k_alpha = jax.random.split(jax.random.key(seed))
    z_bg, z_a = jax.random.normal(k_bg, shape, jnp.float32), jax.random.normal(k_alpha, shape, jnp.float32)
    sigmas = inference_sigmas(steps, shift)
    fns = [jax.jit(lambda zb, za, t, m=m: m(zb, za, t, batch["context"], batch["clip"], batch["y"],
                                             attention_backend="xla")) for m in experts]
    for s, s_next in zip(sigmas[:-1], sigmas[1:]):
        v_bg, v_a = fns[0 if s > tau else 1](z_bg, z_a, jnp.full((shape[0],), 1000.0 * float(s), jnp.float32))
        z_bg, z_a = z_bg + float(s_next - s) * v_bg, z_a + float(s_next - s) * v_a
    return np.asarray(z_bg[0]), np.asarray(z_a[0])


TAUS = ((0.5, "dual"), (0.0, "effect"), (1.0, "quality"))  # tau = 0: the Effect Expert alone, 1: the Quality


def reference_background(base, batch, *, steps: int, seed: int = 0, shift: float = 5.0):
    """The same independent Euler loop over the inpainting base alone, with the inpainting trainer's batch: the
    sampler's background branch (no adapter ever touches it) must reproduce it. Returns [T, h, w, 16]."""
    import jax
    import jax.numpy as jnp

    from omnijax.sampling.schedules import inference_sigmas

    shape = batch["x0"].shape
    z = jax.random.normal(jax.random.split(jax.random.key(seed))[0], shape, jnp.float32)
    fn = jax.jit(lambda z, t: base(z, t, batch["context"], batch["clip"], batch["y"], attention_backend="xla"))
    sigmas = inference_sigmas(steps, shift)
    for s, s_next in zip(sigmas[:-1], sigmas[1:]):
        z = z + float(s_next - s) * fn(z, jnp.full((shape[0],), 1000.0 * float(s), jnp.float32))
    return np.asarray(z[0])


def run(s: dict, *, breaks=("none",), taus=TAUS, log=print) -> dict:
    """The whole check; returns {stage: numbers} (see the module docstring)."""
    from configs import effect_expert, inpaint_base, quality_expert
    from omnijax.checkpoint import save_pretrained
    from omnijax.omnimatte.decompose import Decomposer
    from tasks import inpaint, omnimatte

    host, other = clip_batch(s, s["seed"]), clip_batch(s, s["other_seed"])
    out = dict(settings=s)
    t0 = time.perf_counter()
    log("base: inpainting, every weight, one clip")
    bcfg = _config(inpaint_base, s, s["base_steps"], **{"input.masked_prob": 0.0, "lr": s["base_lr"]})
    bmodels, base, bbatch, blosses = memorise(inpaint, bcfg, host, s["base_steps"], log=log)
    # The alternatives: the conditioning input (the composite's latent, y's video channels), another clip's target.
    vae = bmodels.frozen["vae"]
    x0_bg, y_video = np.asarray(bbatch["x0"][0]), np.asarray(bbatch["y"][0, ..., 4:])
    other_bg = np.asarray(vae.posterior(other["background"] * 2.0 - 1.0)[0][0])
    out["base"] = dict(steps=s["base_steps"], **_losses(blosses), seconds=round(time.perf_counter() - t0, 1))

    with tempfile.TemporaryDirectory() as tmp:
        folder = save_pretrained(os.path.join(tmp, "base"), base, "wan_dit", source="memorise_omnimatte")
        experts, eb = {}, {}
        for name, module in (("effect", effect_expert), ("quality", quality_expert)):
            t0 = time.perf_counter()
            log(f"{name}: LoRA rank {s['lora_rank']} on the memorised base, one clip")
            cfg = _config(module, s, s["expert_steps"], **{
                "model_init.dit": folder, "lr": s["expert_lr"], "lora.rank": s["lora_rank"],
                "lora.alpha": float(s["lora_rank"])})
            emodels, expert, batch, losses = memorise(omnimatte, cfg, host, s["expert_steps"], log=log)
            experts[name], eb[name] = (expert, emodels), batch
            out[name] = dict(steps=s["expert_steps"], **_losses(losses), seconds=round(time.perf_counter() - t0, 1))
    # The two experts' batches are the same clip through the same code: one target.
    x0_alpha = np.asarray(eb["effect"]["x0_alpha"][0])
    np.testing.assert_allclose(x0_alpha, np.asarray(eb["quality"]["x0_alpha"][0]), atol=1e-5)
    np.testing.assert_allclose(np.asarray(eb["effect"]["x0_bg"][0]), x0_bg, atol=1e-4)
    vae, cond = experts["effect"][1].frozen["vae"], experts["effect"][1].frozen["conditioner"]
    mask_alpha = np.asarray(vae.posterior(_alpha_video(host["mask"]))[0][0])
    other_alpha = np.asarray(vae.posterior(_alpha_video(other["alpha"]))[0][0])
    pair = (experts["effect"][0], experts["quality"][0])
    base_ref = reference_background(base, bbatch, steps=s["sampler_steps"])
    refs = {tau: reference_sample(pair, eb["effect"], steps=s["sampler_steps"], tau=tau) for tau, _ in taus}
    out["samples"] = {}
    for brk in breaks:
        rows = {}
        with broken_sampler(brk):  # the Decomposer binds the sampler pieces when built: one per break
            dec = Decomposer(*pair, vae, cond, attention_backend="xla")
            for tau, label in taus:
                bg, alpha = sampled_latents(dec, host, steps=s["sampler_steps"], tau=tau)
                ref_bg, ref_alpha = refs[tau]
                rows[label] = dict(bg_to_target=rel_l2(bg, x0_bg), bg_to_input=rel_l2(bg, y_video),
                                   bg_to_other=rel_l2(bg, other_bg), alpha_to_target=rel_l2(alpha, x0_alpha),
                                   alpha_to_mask=rel_l2(alpha, mask_alpha), alpha_to_other=rel_l2(alpha, other_alpha),
                                   bg_to_reference=max(rel_l2(bg, ref_bg), rel_l2(bg, base_ref)),
                                   alpha_to_reference=rel_l2(alpha, ref_alpha))
        out["samples"][brk] = rows
        for label, r in rows.items():
            log(f"sample [{brk}] tau {label:7s} " + " ".join(f"{k} {v:.3f}" for k, v in r.items()))
    return out


def _losses(losses) -> dict:
    """Mean loss of the first 10 and the last 20 steps (None without steps)."""
    mean = lambda x: float(np.mean(x)) if x else None
    return dict(loss_first=mean(losses[:10]), loss_last=mean(losses[-20:]))


def _alpha_video(alpha):
    from omnijax.omnimatte.alpha import alpha_to_video

    return alpha_to_video(alpha)


def failures(rows: dict, *, memorised: bool, consistency_tol: float = 1e-3, ratio: float = 0.5,
             tol: float = 0.1) -> list[str]:
    """Why a set of samples fails the check; empty when it passes.

    Always: the sampler reproduces the reference Euler loop on the trainer's conditioning (rel. L2 <=
    `consistency_tol`). With `memorised` (the model was trained long enough to memorise the clip): the sample is
    within `tol` of the memorised target and below `ratio` times its distance to the nearest alternative."""
    bad = []
    for label, r in rows.items():
        for what, alts in (("bg", ("bg_to_input", "bg_to_other")),
                           ("alpha", ("alpha_to_mask", "alpha_to_other"))):
            if r[f"{what}_to_reference"] > consistency_tol:
                bad.append(f"{label} {what}: rel. L2 {r[f'{what}_to_reference']:.3f} to the reference Euler loop")
            d, nearest = r[f"{what}_to_target"], min(r[a] for a in alts)
            if memorised and (d > tol or d > ratio * nearest):
                bad.append(f"{label} {what}: rel. L2 {d:.3f} to the target, {nearest:.3f} to the nearest alternative")
    return bad


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--break", dest="breaks", default="none", help=f"comma list of {', '.join(BREAKS)}")
    for k in ("base_steps", "expert_steps", "sampler_steps", "lora_rank"):
        p.add_argument("--" + k.replace("_", "-"), dest=k, type=int, default=None)
    for k in ("base_lr", "expert_lr"):
        p.add_argument("--" + k.replace("_", "-"), dest=k, type=float, default=None)
    p.add_argument("--tiny", action="store_true", help="CPU mechanics: tiny-inp, a few steps, the memorisation "
                   "numbers are reported but not required (the sampler/reference agreement still is)")
    p.add_argument("--json", help="write the numbers here")
    a = p.parse_args(argv)
    s = settings(tiny=a.tiny, **{k: getattr(a, k) for k in ("base_steps", "expert_steps", "sampler_steps", "lora_rank",
                                                "base_lr", "expert_lr")})
    import jax

    # f32 matmuls and convolutions at full precision: on a GPU the default (TF32) makes the same clip's latents
    # differ by ~4e-4 between two compiled programs, above the checks' tolerances (seen on an H200, 2026-11-29).
    jax.config.update("jax_default_matmul_precision", "highest")
    res = run(s, breaks=tuple(a.breaks.split(",")))
    print(json.dumps({k: v for k, v in res.items() if k != "samples"}, indent=1))
    rc = 0
    for brk, rows in res["samples"].items():
        bad = failures(rows, memorised=not a.tiny)
        print(f"[{brk}] " + ("PASS" if not bad else "FAIL: " + "; ".join(bad)))
        rc |= int(bool(bad)) if brk == "none" else int(not bad)  # a break the check misses is a failure too
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)
    return rc


if __name__ == "__main__":
    sys.exit(main())
