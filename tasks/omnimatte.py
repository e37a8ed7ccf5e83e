"""The EasyOmnimatte task: train one expert (Effect or Quality) on synthetic composites (tasks/__init__.py).

Config keys read here: input.*, model.{variant, dtype, remat, attention, context_method},
model_init.{dit, vae, umt5, clip, tokenizer}, lora.*, expert.{name, k, analysis}, loss.{shift, max_abs_error},
sampler.{steps, tau}, evals.export_formats, sharding_rules, seed.

Input: pixel composites VAE-encoded inside the step (default), or with `input.latent_cache` the VAE posteriors
written by launch/cache_latents.py (the encoder is then never run). Both paths end in
omnijax.omnimatte.training.model_inputs; `input.vae_sample` picks a posterior sample per step (the reference's
`.sample()`) or the posterior mean.
"""

from __future__ import annotations

import json
import os

import jax
import numpy as np

from converters import registry
from tasks import Models, SetupError

CONVERT_HINT = ("convert the base first: Casper (the paper's base) on Wan2.1-Fun-1.3B-InP, `python launch/convert.py "
                "--kind wan_dit --source /ckpt/Wan2.1-Fun-1.3B-InP --casper /ckpt/casper/wan2.1_1.3b_transformer"
                ".safetensors --out /ckpt/omnijax/casper_1.3b` (14B: --casper-lora on Wan2.1-Fun-14B-InP; plain "
                "Fun-InP without --casper is the appendix-E ablation), then pass "
                "--config.model_init.dit=/ckpt/omnijax/casper_1.3b (and .vae/.umt5/.clip/.tokenizer)")
CACHE_HINT = ("build one with `python launch/cache_latents.py --out DIR --vae /ckpt/omnijax/wan_vae --frames F "
              "--height H --width W --num N` (docs/training.md)")
MODEL_FILES = (("dit", "wan_dit"), ("vae", "wan_vae"), ("umt5", "umt5"), ("clip", "wan_clip"))


# ------------------------------------------------------------------------------------------------ models

def build_models(config, mesh=None):
    """(base WanDiT, WanVAE, Conditioner) from config.model_init: each "tiny" (random) or a path.

    The base is placed by config.sharding_rules on `mesh`, the VAE and CLIP replicated on it, all created already
    placed; umT5 runs on one device (its outputs are cached per prompt). Without a mesh nothing is placed.
    """
    from omnijax.models.wan import variant

    init, seed = config.model_init, config.seed
    missing = [k for k, _ in MODEL_FILES if not init.get(k)]
    if missing:
        raise SetupError(f"config.model_init.{missing[0]} is not set: {CONVERT_HINT}")
    for k, _ in MODEL_FILES:
        if init[k] != "tiny" and not os.path.exists(init[k]):
            raise SetupError(f"config.model_init.{k}={init[k]} does not exist: {CONVERT_HINT}")
    if init.tokenizer and init.tokenizer != "tiny" and not os.path.exists(init.tokenizer):
        raise SetupError(f"config.model_init.tokenizer={init.tokenizer} does not exist: {CONVERT_HINT}")
    want = variant(config.model.variant)

    def load(name, kind, offset, **kw):
        return registry.load(kind, init[name], dtype=config.model.dtype, seed=seed + offset, progress=True, **kw)[1]

    base = load("dit", "wan_dit", 0, mesh=mesh, rules=config.sharding_rules,
                config=want if init.dit == "tiny" else None)
    got = base.config
    if (got.dim, got.num_layers, got.in_dim, got.model_type) != (want.dim, want.num_layers, want.in_dim,
                                                                   want.model_type):
        raise SetupError(f"config.model_init.dit={init.dit} holds a {got.num_layers}-block dim-{got.dim} "
                         f"{got.model_type} model, config.model.variant={config.model.variant!r} is not that model")
    # The VAE and CLIP encode the sharded batch every step: replicated on the mesh. umT5 encodes the empty prompt
    # once (and is usually served by the embedding cache): it stays on one device.
    vae = load("vae", "wan_vae", 1, mesh=mesh, rules="replicated")
    umt5, clip = load("umt5", "umt5", 2), load("clip", "wan_clip", 3, mesh=mesh, rules="replicated")
    tokenizer = init.tokenizer or ("tiny" if init.umt5 == "tiny" else None)
    if tokenizer is None:
        raise SetupError(f"config.model_init.tokenizer is not set: {CONVERT_HINT}")
    cond = registry.conditioner(config.input.conditioning_cache or None, text_encoder=umt5, image_encoder=clip,
                                tokenizer=tokenizer)
    return base, vae, cond


def expert_config(config, num_layers: int):
    """The ExpertConfig of config.expert and config.lora (omnijax.omnimatte.experts.EXPERT_KINDS)."""
    from omnijax.omnimatte.experts import expert_kind

    e, lora = config.expert, config.lora
    try:
        kind = expert_kind(e.name)
    except ValueError as err:
        raise SetupError(f"config.expert.name: {err}") from None
    if e.k and e.analysis:
        raise SetupError(f"config.expert.k={e.k} and config.expert.analysis={e.analysis} both set K: keep one")
    k = int(e.k) or None
    if e.analysis:
        with open(e.analysis) as f:
            k = int(json.load(f)["effect_expert_k"])
    try:
        return kind.config(num_layers, k, rank=lora.rank, alpha=lora.alpha, targets=tuple(lora.targets))
    except ValueError as err:
        raise SetupError(f"config.expert: {err}") from None


def build(config, mesh) -> Models:
    from flax import nnx

    from omnijax import sharding
    from omnijax.omnimatte.branch import EasyOmnimatte

    base, vae, cond = build_models(config, mesh)
    expert = expert_config(config, base.config.num_layers)
    try:
        expert.validate_for(base.config.num_layers, base.config.is_i2v)
    except ValueError as err:
        raise SetupError(str(err)) from None
    model = EasyOmnimatte(base, expert, lora_param_dtype=registry.dtype_of(config.lora.param_dtype),
                          rngs=nnx.Rngs(config.seed), mesh=mesh, context_method=config.model.context_method)
    # The base is in place already; this places the new adapters and records every spec for the optimizer.
    sharding.shard_module(model, config.sharding_rules, mesh, print_fn=None)
    return Models(trainable=model, frozen=dict(vae=vae, conditioner=cond), signature=dict(expert=expert.to_dict()))


# ------------------------------------------------------------------------------------------------- input

SOURCES = ("videomatte", "procedural")


def check_source(inp) -> None:
    """Training data only from real clips unless the toy source is named: one line naming the keys otherwise."""
    if inp.source not in SOURCES:
        raise SetupError(f"config.input.source={inp.source!r}: must be one of {', '.join(SOURCES)}")
    missing = [k for k in ("fg_dir", "bg_dir") if not inp.get(k)]
    if inp.source == "videomatte" and missing:
        raise SetupError(f"config.input.{' and config.input.'.join(missing)} not set: training composites need "
                         "--config.input.fg_dir (VideoMatte240K fgr/ + pha/) and --config.input.bg_dir (background "
                         "videos); for the built-in toy clips say --config.input.source=procedural")
    if inp.source == "procedural" and len(missing) < 2:
        raise SetupError("config.input.source=procedural ignores config.input.fg_dir/bg_dir: set "
                         "--config.input.source=videomatte to train on those folders, or clear them")


def pixel_source(config, *, seed: int, preview: bool = False):
    """The synthetic composites of config.input: the pixel path's training data and the preview clip.

    With `preview`, missing folders fall back to procedural clips (the preview only shows the expert at work; a
    latent-cache run needs no pixel folders)."""
    from data.composite import CompositeConfig
    from data.synthetic import SyntheticOmnimatte

    inp = config.input
    if not preview:
        check_source(inp)
    cfg = CompositeConfig(num_frames=inp.frames, height=inp.height, width=inp.width)
    fg = bg = None
    if inp.source == "videomatte" and inp.fg_dir and inp.bg_dir:
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
    from omnijax.omnimatte.training import PIXEL_KEYS

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
                         num_threads=inp.num_threads, num_workers=inp.get("num_workers", 0)), cached


def input_pipeline(config, *, seed: int):
    return make_input(config, seed=seed)[0]


def host_inputs(pixels_or_cached) -> tuple[dict, np.ndarray]:
    """Host batch -> (the arrays `make_prepare` reads, first frames uint8 [B, H, W, 3] for CLIP)."""
    from data.latent_cache import to_uint8
    from omnijax.omnimatte.training import PIXEL_KEYS

    b = pixels_or_cached
    if "first_frame" in b:
        return {k: v for k, v in b.items() if k != "first_frame"}, b["first_frame"]
    # The cache keeps the CLIP frame as uint8; quantise here too, so both paths see the same image.
    return {k: b[k] for k in PIXEL_KEYS}, to_uint8(b["video"][:, 0])


def make_prepare(vae, *, cached: bool, sample: bool):
    """Jitted, frozen: a (global) batch and a key -> `model_inputs` (the VAE runs only on pixel batches)."""
    from omnijax.omnimatte.decompose import jit_module_fn
    from omnijax.omnimatte.training import cached_posteriors, model_inputs, pixel_posteriors

    if cached:
        from data.latent_cache import LATENT_KEYS, LOGVAR_KEYS

        logvar_of = dict(zip(LATENT_KEYS, LOGVAR_KEYS))  # logvars are in the batch only when sampling
        return jax.jit(lambda batch, key: model_inputs(cached_posteriors(batch, logvar_of), batch["mask"], key,
                                                       sample=sample))
    return jit_module_fn(vae, lambda vae, batch, key: model_inputs(pixel_posteriors(vae, batch), batch["mask"], key,
                                                                   sample=sample))


def to_global(tree, sharding):
    """Process-local host arrays [B_local, ...] -> global jax.Arrays [B, ...] placed by `sharding`."""
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), tree)


def make_batch(models: Models, config, mesh):
    """fn(host batch, key) -> the step's batch: x0 latents, condition y, text context and CLIP features."""
    prepare = make_prepare(models.frozen["vae"], cached=bool(config.input.latent_cache),
                           sample=config.input.vae_sample)
    return conditioned_batch_fn(prepare, models, config, mesh)


def conditioned_batch_fn(prepare, models: Models, config, mesh):
    """fn(host batch, key) -> prepare(global arrays, key) plus the empty prompt's text context and the CLIP
    features of each clip's first frame: the conditioning every Wan Fun-InP task (experts, base) trains with."""
    split = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp")))
    cond = models.frozen["conditioner"]
    local = config.input.batch_size // jax.process_count()
    # The paper trains without text: every example gets the empty prompt's embedding.
    context = to_global(np.stack(cond.text([""]) * local), split)

    if cond.cache is None:
        # No embedding cache: CLIP runs on the device on the global first frames (no host round trip per step).
        from omnijax.models.wan.clip import preprocess_frames
        from omnijax.omnimatte.decompose import jit_module_fn

        clip_of = jit_module_fn(cond.image_encoder, lambda m, frames: m(preprocess_frames(
            frames.astype(np.float32) / 127.5 - 1.0, m.config.image_size)))
    else:  # cached features are read on the host; CLIP runs only for frames the cache has not seen
        clip_of = lambda frames: to_global(cond.image(np.asarray(frames).astype(np.float32) / 127.5 - 1.0), split)

    def batch_fn(host_batch, key):
        arrays, first_frames = host_inputs(host_batch)
        batch = prepare(to_global(arrays, split), key)
        batch["context"] = context
        batch["clip"] = clip_of(to_global(first_frames, split) if cond.cache is None else first_frames)
        return batch

    return batch_fn


# ------------------------------------------------------------------------------------ loss, preview, export

def loss(model, batch, rng, *, config):
    from omnijax.omnimatte.training import expert_loss

    return expert_loss(model, batch, rng, shift=config.loss.shift, max_abs_error=config.loss.max_abs_error,
                       remat=config.model.remat, attention_backend=config.model.attention)


def make_preview(models: Models, config):
    """fn(model, path): decomposes a fixed validation clip with the expert being trained (as both experts) and
    writes a contact sheet; one Decomposer is built here, so previews reuse its compiled pieces."""
    from data.pipeline import fit_to_latent
    from omnijax.io.video import write_image
    from omnijax.omnimatte.decompose import Decomposer, SamplerSettings, decompose_video
    from omnijax.omnimatte.preview import layer_sheet

    clip = fit_to_latent(pixel_source(config, seed=config.seed + 7919, preview=True)[0])
    video, masks = clip["video"], clip["mask"][None]
    settings = SamplerSettings(steps=config.sampler.steps, tau=config.sampler.tau)
    model = models.trainable
    decomposer = Decomposer(model, model, models.frozen["vae"], models.frozen["conditioner"],
                            attention_backend=config.model.attention)

    def preview(model, path):
        decomposer.set_experts(model, model)
        layers = decompose_video(decomposer, video, masks, settings, height=video.shape[1])
        write_image(path, layer_sheet(video, layers.alphas, layers.foregrounds, layers.background))

    return preview


def export(model, config, workdir: str) -> list[str]:
    """The expert's LoRA in every format of config.evals.export_formats (lora_<name>_<format>.safetensors)."""
    from omnijax.omnimatte.lora_io import save_lora

    paths = []
    for fmt in config.evals.export_formats:
        paths.append(os.path.join(workdir, f"lora_{model.expert.name}_{fmt}.safetensors"))
        save_lora(paths[-1], model, fmt=fmt)
    return paths
