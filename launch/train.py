"""Train an EasyOmnimatte expert (Effect or Quality) on synthetic composites.

  python launch/train.py --config configs/effect_expert.py --workdir runs/effect [--config.key=value ...]
  python launch/train.py --config configs/effect_expert.py:runlocal --workdir /tmp/effect     # tiny, CPU
  python launch/train.py --config configs/effect_expert.py --workdir runs/effect --config.input.latent_cache=DIR

Input: pixel composites VAE-encoded inside the loop (default), or with `config.input.latent_cache` the VAE
posteriors written by launch/cache_latents.py (the encoder is then never run in the loop). Both paths end in
`model_inputs` (x0 latents and the condition y); `config.input.vae_sample` picks a posterior sample per step
(the reference's `.sample()`, default) or the posterior mean.

One readable loop (big_vision's train.py as the model): logging -> mesh -> input -> models -> shardings ->
optimizer / restore -> compiled step -> loop (step; log; non-finite guard; checkpoint; preview) -> LoRA export.
The workdir holds checkpoints/ (LoRA params, optimizer state, step, data-iterator state, rng: a rerun resumes
exactly), metrics.jsonl + TensorBoard events, previews/*.png and the exported LoRA files.
"""

from __future__ import annotations

import functools
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags, logging  # noqa: E402
from flax import nnx  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from launch import common  # noqa: E402  (sets XLA flags first)

_CONFIG = config_flags.DEFINE_config_file("config", None, "training config file", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "run directory (checkpoints, metrics, previews, LoRA files)")
_DISTRIBUTED = flags.DEFINE_bool("distributed", False, "call jax.distributed.initialize() (multi-host runs)")

CONVERT_HINT = ("convert the public weights first, e.g. `python launch/convert.py --source "
                "/ckpt/Wan2.1-Fun-1.3B-InP --kind wan_dit --out /ckpt/omnijax/wan_dit_1.3b_inp`, then pass "
                "--config.model_init.dit=/ckpt/omnijax/wan_dit_1.3b_inp (and .vae/.umt5/.clip/.tokenizer)")


class SetupError(ValueError):
    """A configuration problem the user must fix (printed as one message)."""


def build_models(config):
    """(base WanDiT, WanVAE, Conditioner) from config.model_init ("tiny" builds random tiny models)."""
    init = config.model_init
    dtype = common.DTYPES[config.model.dtype]
    if init.dit == "tiny":
        base, vae, umt5, clip = common.tiny_models(config.seed, dtype)
        from omnijax.models.wan import variant

        if base.config != variant(config.model.variant):
            raise SetupError(f"model_init.dit=tiny builds the tiny-inp variant, config.model.variant is "
                             f"{config.model.variant!r}")
        cond = common.conditioner(config.input.conditioning_cache or None, text_encoder=umt5, image_encoder=clip,
                                  tiny=True)
        return base, vae, cond
    missing = [k for k in ("dit", "vae", "umt5", "clip", "tokenizer") if not init.get(k)]
    if missing:
        raise SetupError(f"config.model_init.{missing[0]} is not set: {CONVERT_HINT}")
    for k in ("dit", "vae", "umt5", "clip", "tokenizer"):
        if not os.path.exists(init[k]):
            raise SetupError(f"config.model_init.{k}={init[k]} does not exist: {CONVERT_HINT}")
    _, base = common.load_model("wan_dit", init.dit, dtype)
    _, vae = common.load_model("wan_vae", init.vae, dtype)
    _, umt5 = common.load_model("umt5", init.umt5, dtype)
    _, clip = common.load_model("wan_clip", init.clip, dtype)
    cond = common.conditioner(config.input.conditioning_cache or None, text_encoder=umt5, image_encoder=clip,
                              tokenizer_dir=init.tokenizer)
    return base, vae, cond


def expert_config(config, num_layers: int):
    from omnijax.omnimatte.experts import ExpertConfig, default_k

    e, lora = config.expert, config.lora
    if e.name == "effect":
        k = e.k or default_k(num_layers)
        if e.analysis:
            with open(e.analysis) as f:
                k = int(json.load(f)["effect_expert_k"])
        blocks = tuple(range(num_layers - k, num_layers))
    else:
        blocks = tuple(range(num_layers))
    return ExpertConfig(e.name, int(lora.rank), float(lora.alpha), blocks, e.mask, tuple(lora.targets))


PIXEL_KEYS = ("video", "mask", "alpha", "background")
# x0 latent -> the pixel clip it encodes; also fixes the order of the per-step sampling keys.
LATENTS = (("z_background", "background"), ("z_alpha", "alpha"), ("z_video", "video"))
CACHE_HINT = ("build one with `python launch/cache_latents.py --out DIR --vae /ckpt/omnijax/wan_vae --frames F "
              "--height H --width W --num N` (docs/training.md)")


def pixel_source(config, *, seed: int):
    """The synthetic composites of config.input: the pixel path's training data and the preview clip."""
    from data.composite import CompositeConfig
    from data.synthetic import SyntheticOmnimatte

    inp = config.input
    if inp.source != "procedural" and not inp.fg_dir:
        raise SetupError(f"input.source={inp.source!r} needs input.fg_dir (VideoMatte240K layout) and input.bg_dir")
    cfg = CompositeConfig(num_frames=inp.frames, height=inp.height, width=inp.width)
    fg = bg = None
    if inp.fg_dir:
        from data.sources import VideoFolderSource, VideoMatteSource

        fg, bg = VideoMatteSource(inp.fg_dir, seed=seed), VideoFolderSource(inp.bg_dir)
    return SyntheticOmnimatte(cfg, foregrounds=fg, backgrounds=bg, seed=seed)


def latent_cache_source(config):
    """The LatentSource of config.input.latent_cache, checked against the config (clip size, posterior)."""
    from data.latent_cache import LatentSource
    from data.pipeline import latent_friendly

    inp = config.input
    try:
        source = LatentSource(inp.latent_cache)
    except FileNotFoundError as e:
        raise SetupError(f"input.latent_cache: {e}; {CACHE_HINT}") from e
    if inp.vae_sample and not source.has_logvar:
        raise SetupError(f"latent cache {inp.latent_cache} holds posterior means only (built with --mean-only or a "
                         "mean encoder), so no VAE sample can be drawn: rebuild it without --mean-only, or train on "
                         "the means with --config.input.vae_sample=False")
    size = tuple(source[0]["mask"].shape)
    want = latent_friendly(inp.frames, inp.height, inp.width)
    if size != want:
        raise SetupError(f"latent cache {inp.latent_cache} holds {size[0]}x{size[1]}x{size[2]} clips (FxHxW) but "
                         f"config.input asks for {want[0]}x{want[1]}x{want[2]}: set --config.input.frames/height/width "
                         "to the cache's size (the preview clip is generated at that size)")
    return source


def make_input(config, *, seed: int):
    """(grain pipeline, cached): cached latents when config.input.latent_cache is set, else pixel composites."""
    from data.latent_cache import LATENT_KEYS, LOGVAR_KEYS
    from data.pipeline import make_pipeline

    inp = config.input
    if inp.batch_size % jax.process_count():
        raise SetupError(f"input.batch_size {inp.batch_size} is not divisible by {jax.process_count()} processes")
    cached = bool(inp.latent_cache)
    if cached:
        source = latent_cache_source(config)
        keys = LATENT_KEYS + (LOGVAR_KEYS if inp.vae_sample else ()) + ("mask", "first_frame")
    else:
        source, keys = pixel_source(config, seed=seed), PIXEL_KEYS
    return make_pipeline(source, batch_size=inp.batch_size // jax.process_count(), seed=seed, keys=keys,
                         num_threads=inp.num_threads), cached


def model_inputs(posteriors, mask, key, *, sample: bool):
    """The one path from a batch's VAE posteriors to the model inputs (pixel and cache paths alike).

    Args:
      posteriors: {"z_background" | "z_alpha" | "z_video": (normalised mean, logvar or None)}, each [B, T, h, w, 16].
      mask: [B, F, H, W] object masks in [0, 1].
      key: this step's data key; the latents draw from split(key, 3) in LATENTS order.
      sample: x0 = a posterior sample mean + exp(logvar/2)*eps (the reference trains on `.sample()`), else the mean.
    Returns:
      dict(x0_alpha, x0_bg [B, T, h, w, 16], y [B, T, h, w, 20]) in f32.
    """
    from omnijax.models.wan.vae import sample_posterior
    from omnijax.omnimatte.masks import condition_y, latent_mask, removal_mask

    keys = dict(zip((name for name, _ in LATENTS), jax.random.split(key, len(LATENTS))))
    z = {name: sample_posterior(mean, logvar, keys[name]) if sample else mean.astype(jnp.float32)
         for name, (mean, logvar) in posteriors.items()}
    removal = jax.vmap(removal_mask)(mask)  # dilated object mask: remove; rest neutral
    return dict(x0_alpha=z["z_alpha"], x0_bg=z["z_background"], y=condition_y(latent_mask(removal), z["z_video"]))


def make_prepare(vae, *, cached: bool, sample: bool):
    """Jitted, frozen: a (global) batch and a key -> `model_inputs`.

    Pixel batches {video, mask, alpha, background} are VAE-encoded here (`WanVAE.posterior` of the clip, the
    background and the alpha as a grey video). Cached batches {z_*, logvar_*, mask} already hold the posterior:
    the VAE is not touched at all.
    """
    from omnijax.omnimatte.alpha import alpha_to_video
    from omnijax.omnimatte.decompose import jit_module_fn

    if cached:
        from data.latent_cache import LATENT_KEYS, LOGVAR_KEYS

        logvar_of = dict(zip(LATENT_KEYS, LOGVAR_KEYS))

        def from_cache(batch, key):  # the logvars are in the batch only when sampling (see make_input)
            post = {name: (batch[name], batch.get(logvar_of[name])) for name, _ in LATENTS}
            return model_inputs(post, batch["mask"], key, sample=sample)

        return jax.jit(from_cache)

    def from_pixels(vae, batch, key):
        clips = {k: alpha_to_video(batch[k]) if k == "alpha" else batch[k] * 2.0 - 1.0 for _, k in LATENTS}
        post = {name: vae.posterior(clips[k]) for name, k in LATENTS}
        return model_inputs(post, batch["mask"], key, sample=sample)

    return jit_module_fn(vae, from_pixels)


def host_inputs(pixels_or_cached) -> tuple[dict, np.ndarray]:
    """Host batch -> (the arrays `make_prepare` reads, first frames uint8 [B, H, W, 3] for CLIP)."""
    from data.latent_cache import to_uint8

    b = pixels_or_cached
    if "first_frame" in b:
        return {k: v for k, v in b.items() if k != "first_frame"}, b["first_frame"]
    # The cache keeps the CLIP frame as uint8; quantise here too, so both paths see the same image.
    return {k: b[k] for k in PIXEL_KEYS}, to_uint8(b["video"][:, 0])


def to_global(tree, sharding):
    """Process-local host arrays [B_local, ...] -> global jax.Arrays [B, ...] placed by `sharding`."""
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), tree)


def loss_fn(model, batch, rng, *, config):
    from omnijax.training.loss import flow_matching_loss, noisy_latents, sample_sigmas, velocity_target

    k_sigma, k_alpha, k_bg = jax.random.split(rng, 3)
    x0_a = batch["x0_alpha"]
    sigma = sample_sigmas(k_sigma, x0_a.shape[0], shift=config.loss.shift)
    eps_a = jax.random.normal(k_alpha, x0_a.shape, jnp.float32)
    z_a = noisy_latents(x0_a, eps_a, sigma)
    # The Effect Expert's background half sees the noisy ground-truth background at the same sigma.
    z_b = None if config.expert.mask == "C" else noisy_latents(
        batch["x0_bg"], jax.random.normal(k_bg, x0_a.shape, jnp.float32), sigma)
    _, v_alpha = model(z_b, z_a, 1000.0 * sigma, batch["context"], batch["clip"], batch["y"], train=True,
                       remat=config.model.remat, attention_backend=config.model.attention)
    return flow_matching_loss(v_alpha, velocity_target(x0_a, eps_a), max_abs_error=config.loss.max_abs_error)


def write_preview(path, model, vae, cond, clip_sample, config):
    """Samples the fixed validation clip with the expert being trained and writes a contact sheet."""
    from omnijax.io.video import write_image
    from omnijax.omnimatte.alpha import recover_foreground
    from omnijax.omnimatte.decompose import Decomposer, SamplerSettings
    from omnijax.omnimatte.preview import contact_sheet

    video, mask = clip_sample["video"], clip_sample["mask"][None]
    dec = Decomposer(model, model, vae, cond, attention_backend=config.model.attention)
    bg, alphas = dec(video, mask, SamplerSettings(steps=config.evals.preview_sampler_steps, tau=config.sampler.tau))
    fg = np.asarray(recover_foreground(video, alphas[0], bg))
    write_image(path, contact_sheet(video, alphas, fg[None], bg))


def train(config, workdir: str):
    """Runs (or resumes) the training job of `config` in `workdir`; returns the final train-step state."""
    from data.pipeline import fit_to_latent
    from omnijax import sharding
    from omnijax.omnimatte.branch import EasyOmnimatte
    from omnijax.omnimatte.lora_io import save_lora
    from omnijax.training.checkpoint import Checkpointer
    from omnijax.training.chrono import Chrono
    from omnijax.training.metrics import MetricWriter
    from omnijax.training.optim import make_optimizer
    from omnijax.training.step import NonFiniteGuard, make_train_step

    # ---------------------------------------------------------------- logging
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "config.json"), "w") as f:
        f.write(config.to_json_best_effort(indent=1))
    logging.info("devices: %s", jax.devices())

    # ---------------------------------------------------------------- mesh
    sizes = dict(config.mesh)
    # A fully specified mesh (no -1) takes the first prod(sizes) devices, e.g. runlocal's single device.
    n = int(np.prod(list(sizes.values())))
    devices = jax.devices()[:n] if -1 not in sizes.values() and n <= jax.device_count() else None
    mesh = sharding.make_mesh(sizes, devices=devices)
    logging.info("mesh: %s", dict(mesh.shape))
    batch_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp")))
    # Everything below runs under the mesh: the activation constraints of the model (omnijax.sharding.constrain)
    # read it when the step is traced.
    with jax.set_mesh(mesh):
        # ------------------------------------------------------------ input
        pipeline, cached = make_input(config, seed=config.seed)
        data_iter = iter(pipeline)
        val = fit_to_latent(pixel_source(config, seed=config.seed + 7919)[0])
        logging.info("input: %s, x0 = VAE posterior %s", f"latent cache {config.input.latent_cache}" if cached
                     else "pixel composites (VAE-encoded every step)",
                     "sample" if config.input.vae_sample else "mean")

        # ------------------------------------------------------------ models and shardings
        base, vae, cond = build_models(config)
        expert = expert_config(config, base.config.num_layers)
        expert.validate_for(base.config.num_layers, base.config.is_i2v)
        model = EasyOmnimatte(base, expert, lora_param_dtype=common.DTYPES[config.lora.param_dtype],
                              rngs=nnx.Rngs(config.seed))
        sharding.shard_module(model, config.sharding_rules, mesh, print_fn=logging.info)
        sharding.shard_module(vae, "replicated", mesh, print_fn=None)  # encodes the sharded batch (pixel path)
        tx, schedule = make_optimizer(config)
        optimizer = nnx.Optimizer(model, tx, wrt=nnx.LoRAParam)
        n_lora = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.LoRAParam)))
        logging.info("expert %s: %d adapted blocks, %d LoRA params (mask %s)", expert.name, len(expert.blocks),
                     n_lora, expert.mask)

        # ------------------------------------------------------------ restore
        ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), keep=config.keep_ckpt)
        rng = jax.random.key(config.seed)
        first_step = 0
        restored = ckpt.restore(model, optimizer)
        if restored is not None:
            first_step, rng = restored.step, restored.rng
            data_iter.set_state(restored.data_state)
            logging.info("resumed from step %d", first_step)

        # ------------------------------------------------------------ compiled step
        prepare = make_prepare(vae, cached=cached, sample=config.input.vae_sample)
        local_batch = config.input.batch_size // jax.process_count()
        # The paper trains without text: every example gets the empty prompt's embedding.
        context = to_global(np.stack(cond.text([""]) * local_batch), batch_sharding)

        def next_batch(step):
            arrays, first_frames = host_inputs(next(data_iter))
            key = jax.random.fold_in(jax.random.fold_in(rng, step), 1)
            batch = prepare(to_global(arrays, batch_sharding), key)
            batch["context"] = context
            clip = cond.image(first_frames.astype(np.float32) / 127.5 - 1.0)
            batch["clip"] = to_global(clip, batch_sharding)
            return batch

        step_fn, state = make_train_step(model, optimizer, functools.partial(loss_fn, config=config))
        batch = next_batch(first_step)
        compiled = step_fn.compile(state, batch, jax.random.fold_in(rng, first_step))
        mem = compiled.memory_analysis()
        if mem is not None:
            logging.info("compiled step: temp %.2f GB, arguments %.2f GB",
                         getattr(mem, "temp_size_in_bytes", 0) / 2**30,
                         getattr(mem, "argument_size_in_bytes", 0) / 2**30)

        # ------------------------------------------------------------ loop
        chrono = Chrono(config.total_steps, examples_per_step=config.input.batch_size, first_step=first_step)
        guard = NonFiniteGuard(config.loss.nonfinite_patience)
        os.makedirs(os.path.join(workdir, "previews"), exist_ok=True)
        with MetricWriter(workdir) as writer:
            for step in range(first_step + 1, config.total_steps + 1):
                if step > first_step + 1:
                    batch = next_batch(step - 1)
                state, metrics = step_fn(state, batch, jax.random.fold_in(rng, step))
                chrono.tick(step)
                try:
                    guard(step, metrics)
                except FloatingPointError as e:
                    ckpt.wait()
                    raise SystemExit(f"stopping: {e}. The last good checkpoint is step {ckpt.latest_step()} in "
                                     f"{ckpt.directory}; lower config.lr or check the data.") from e
                if step % config.log_steps == 0 or step == config.total_steps:
                    m = {k: float(v) for k, v in metrics.items()}
                    m.update(lr=float(schedule(step - 1)), **chrono.metrics())
                    writer.write(step, m)
                    logging.info("step %d/%d loss %.5f grad_norm %.4f %s", step, config.total_steps, m["loss"],
                                 m["grad_norm"], chrono.summary())
                if step % config.ckpt_steps == 0 or step == config.total_steps:
                    model, optimizer = step_fn.merge(state)
                    with chrono.paused():
                        ckpt.save(step, model, optimizer, rng=rng, data_state=data_iter.get_state(),
                                  extra=dict(expert=expert.to_dict()))
                if step % config.evals.preview_steps == 0:
                    model, _ = step_fn.merge(state)
                    with chrono.paused():
                        write_preview(os.path.join(workdir, "previews", f"step_{step:07d}.png"), model, vae, cond,
                                      val, config)
        ckpt.close()

        # ------------------------------------------------------------ export
        model, _ = step_fn.merge(state)
        for fmt in config.evals.export_formats:
            save_lora(os.path.join(workdir, f"lora_{expert.name}_{fmt}.safetensors"), model, fmt=fmt)
    logging.info("done: %s", workdir)
    return state


def main(argv):
    del argv
    if _DISTRIBUTED.value:
        jax.distributed.initialize()
    if _CONFIG.value is None or _WORKDIR.value is None:
        raise app.UsageError("--config and --workdir are required")
    try:
        train(_CONFIG.value, _WORKDIR.value)
    except SetupError as e:
        raise SystemExit(f"error: {e}") from e


if __name__ == "__main__":
    app.run(main)
