"""The DiffDecompose task: a LoRA on Flux.1 for In-Context Decomposition of alpha composites (tasks/__init__.py).

Config keys read here (configs/diffdecompose.py): input.*, prompt.*, text.max_length, model.{dtype, remat,
attention, dit_variant, param_dtype, vae_dtype}, train_base, model_init.{dit, vae, t5, clip, t5_tokenizer,
clip_tokenizer, lora}, lora.*, icd.*, loss.{t_sampling, guidance, weights}, sampler.{steps, guidance, mu_tokens}
(the preview's sampler, as in the omnimatte task), evals.export_formats, sharding_rules, seed.

One step: AlphaBlend host batch {composite, foreground, background [B, H, W, 3] in [0, 1], subtask [B]} ->
`make_batch` (frozen, jitted: the Flux VAE encodes the three images; the subtask's prompt embedding is a row of
the table built once in `build`; with `input.latent_cache` the latents come from data/layer_cache.py and the VAE
does not run) -> {z_composite, z_foreground, z_background [B, h, w, Z], txt [B, S, D], y [B, V]}
-> `loss` (omnijax.diffdecompose.model.decompose_loss). T5 and CLIP run only while `build` embeds the six subtask
prompts, and not at all when `input.conditioning_cache` already holds them (their identities are recorded in
the cache, so the encoders are not even loaded).
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from converters import registry
from data.alphablend import SUBTASKS, prompts_from_config
from tasks import Models, SetupError

IDS_FILE = "flux_encoder_ids.json"  # in the conditioning cache: encoder identities of the cached prompts
BATCH_KEYS = ("composite", "foreground", "background", "subtask")


def icd_settings(config):
    from omnijax.diffdecompose.model import ICDSettings

    i = config.icd
    try:
        return ICDSettings(fg_ids=i.fg_ids, lora_on=tuple(i.lora_on), composite_guidance=float(i.composite_guidance))
    except ValueError as e:
        raise SetupError(f"config.icd: {e}") from None


# ------------------------------------------------------------------------------------------------ models

def _tokenizer(spec: str, cache_dir: str):
    """A tokenizer folder, or "tiny" for the tiny test tokenizer (built on first use beside the cache)."""
    from converters.tokenizer import build_tiny_tokenizer, load_tokenizer

    if spec == "tiny":
        spec = os.path.join(cache_dir or os.path.expanduser("~/.cache/omnijax"), "tiny_tokenizer")
        if not os.path.isdir(spec):
            build_tiny_tokenizer(spec)
    if not spec or not os.path.isdir(spec):
        raise SetupError(f"tokenizer folder {spec!r} not found (config.model_init.t5_tokenizer / clip_tokenizer)")
    return load_tokenizer(spec)


def prompt_table(config, encoders=None) -> tuple[np.ndarray, np.ndarray]:
    """(txt [6, S, D], y [6, V]) of the six subtask prompts in SUBTASKS order (a batch's `subtask` ids index it).

    encoders: fn() -> (t5, t5 tokenizer, clip, clip tokenizer), called only when the cache cannot answer.
    The encoder identities (weights fingerprints) of a cache fill are recorded under the encoder *paths*, dtype and
    text length, so that a later run answers without loading the encoders; if the files at those paths change,
    delete IDS_FILE from the cache.
    """
    from omnijax.conditioning import EmbeddingCache
    from omnijax.models.flux.pipeline import FluxConditioner

    prompts = [prompts_from_config(config.prompt, SUBTASKS)[s] for s in SUBTASKS]
    cache_dir, max_length = config.input.conditioning_cache, int(config.text.max_length)
    cache = EmbeddingCache(cache_dir) if cache_dir else None
    init = config.model_init
    key = json.dumps(dict(t5=init.t5, clip=init.clip, t5_tokenizer=init.t5_tokenizer,
                          clip_tokenizer=init.clip_tokenizer, max_length=max_length, dtype=config.model.dtype,
                          seed=config.seed), sort_keys=True)
    ids_path = os.path.join(cache_dir, IDS_FILE) if cache_dir else ""
    known = {}
    if ids_path and os.path.exists(ids_path):
        with open(ids_path) as f:
            known = json.load(f)
    if key in known:
        try:  # all six cached under the recorded encoder identities: no encoder is loaded
            return FluxConditioner(cache, max_length=max_length, t5_id=known[key][0], clip_id=known[key][1])(prompts)
        except ValueError:
            pass
    if encoders is None:
        raise SetupError("the prompt embeddings are not cached and no text encoders were given")
    t5, t5_tok, clip, clip_tok = encoders()
    cond = FluxConditioner(cache, t5=t5, t5_tokenizer=t5_tok, clip=clip, clip_tokenizer=clip_tok,
                           max_length=max_length)
    txt, y = cond(prompts)
    if ids_path:
        from omnijax.io.atomic import atomic_write

        known[key] = list(cond.identities())
        atomic_write(ids_path, json.dumps(known, indent=1))
    return txt, y


def _load(config, name: str, kind: str, offset: int, *, dtype=None, model_config=None, **kw):
    """registry.load of model_init.<name> in config.model.dtype (or `dtype`); model_config: a "tiny" source's
    config instead of the registry row's."""
    source = config.model_init[name]
    if not source:
        raise SetupError(f"config.model_init.{name} is not set: 'tiny', a converted folder (launch/convert.py "
                         f"--kind {kind}) or the original weights")
    try:
        return registry.load(kind, source, dtype=dtype or config.model.dtype, seed=config.seed + offset, progress=True,
                             config=model_config, **kw)[1]
    except registry.ModelSourceError as e:
        raise SetupError(f"config.model_init.{name}: {e}") from None


def make_lora(config, flux_config):
    """The trainable adapters: config.lora (rank, alpha, targets), or the file config.model_init.lora."""
    from flax import nnx

    from omnijax.models.flux.lora import FluxLoRA, lora_spec

    dtype, pd = registry.dtype_of(config.model.dtype), registry.dtype_of(config.lora.param_dtype)
    if config.model_init.get("lora"):
        from omnijax.models.flux.lora_files import load_flux_lora
        from omnijax.omnimatte.lora_io import LoRAFileError

        try:
            return load_flux_lora(config.model_init.lora, flux_config, dtype=dtype, param_dtype=pd)
        except (LoRAFileError, OSError) as e:
            raise SetupError(f"config.model_init.lora: {e}") from None
    spec = lora_spec(flux_config, int(config.lora.rank), float(config.lora.alpha), targets=tuple(config.lora.targets))
    return FluxLoRA(flux_config, spec, dtype=dtype, param_dtype=pd, rngs=nnx.Rngs(config.seed))


def _dit(config, mesh, vae, txt, y):
    """The DiT: model_init.dit, or with model.dit_variant a random DiT of that Flux size row (model_init.dit
    "tiny") whose latent and text widths fit the VAE and the prompt table."""
    name = config.model.get("dit_variant", "")
    kw = dict(mesh=mesh, rules=config.sharding_rules, param_dtype=config.model.get("param_dtype") or None)
    if not name:
        return _load(config, "dit", "flux_dit", 0, **kw)
    from omnijax.models.flux.variants import variant

    if config.model_init.dit != "tiny":
        raise SetupError(f"config.model.dit_variant={name!r} builds a random DiT: set model_init.dit='tiny' "
                         f"(not {config.model_init.dit!r}) or dit_variant=''")
    try:
        cfg = variant(name, in_channels=4 * vae.config.z_dim, out_channels=4 * vae.config.z_dim,
                      context_in_dim=int(txt.shape[-1]), vec_in_dim=int(y.shape[-1]))
    except ValueError as e:
        raise SetupError(f"config.model.dit_variant: {e}") from None
    return _load(config, "dit", "flux_dit", 0, model_config=cfg, **kw)


def build(config, mesh) -> Models:
    """DiffDecomposer (FluxDiT + FluxLoRA), the VAE and the prompt table. The adapters train (Models.wrt =
    nnx.LoRAParam) and the DiT is frozen, unless config.train_base: then every weight trains (nnx.Param)."""
    from flax import nnx

    from omnijax import sharding
    from omnijax.diffdecompose.model import DiffDecomposer

    vae = _load(config, "vae", "flux_vae", 1, mesh=mesh, rules="replicated", dtype=config.model.get("vae_dtype"))

    def encoders():
        cache = config.input.conditioning_cache
        return (_load(config, "t5", "t5", 2), _tokenizer(config.model_init.t5_tokenizer, cache),
                _load(config, "clip", "clip_l", 3), _tokenizer(config.model_init.clip_tokenizer, cache))

    txt, y = prompt_table(config, encoders)
    dit = _dit(config, mesh, vae, txt, y)
    if vae.config.z_dim * 4 != dit.config.in_channels:
        raise SetupError(f"the VAE's {vae.config.z_dim} latent channels do not pack to the DiT's "
                         f"{dit.config.in_channels} input features")
    if txt.shape[-1] != dit.config.context_in_dim or y.shape[-1] != dit.config.vec_in_dim:
        raise SetupError(f"text embeddings {txt.shape[-1]}/{y.shape[-1]} wide do not fit the DiT "
                         f"({dit.config.context_in_dim}/{dit.config.vec_in_dim})")
    settings = icd_settings(config)
    model = DiffDecomposer(dit, make_lora(config, dit.config), settings)
    sharding.shard_module(model, config.sharding_rules, mesh, print_fn=None)  # places the new adapters
    lora = config.lora
    train_base = bool(config.get("train_base", False))
    signature = dict(icd=settings.to_dict(), lora=dict(rank=int(lora.rank), alpha=float(lora.alpha),
                                                       targets=list(lora.targets),
                                                       init=config.model_init.get("lora", "")))
    if train_base:  # (only then: checkpoints of adapter-only runs keep their signature)
        signature.update(train_base=True, dit=dit.config.to_dict())
    return Models(trainable=model, frozen=dict(vae=vae, txt=txt, y=y), signature=signature,
                  wrt=nnx.Param if train_base else nnx.LoRAParam)


# ------------------------------------------------------------------------------------------------- input

def dataset(config, *, seed: int, length: int = 10_000):
    from data.alphablend import dataset_from_config

    try:
        return dataset_from_config(config.input, seed=seed, length=length)
    except (ValueError, FileNotFoundError) as e:
        raise SetupError(f"config.input: {e}") from None


CACHE_HINT = ("build one with `python launch/cache_layer_latents.py --config configs/diffdecompose.py --out DIR "
              "--num N` (the same config as training)")


def latent_cache_source(config):
    """The LayerLatentSource of input.latent_cache, checked against the config's image size."""
    from data.layer_cache import LayerLatentSource

    inp = config.input
    try:
        source = LayerLatentSource(inp.latent_cache)
    except FileNotFoundError as e:
        raise SetupError(f"input.latent_cache: {e}; {CACHE_HINT}") from None
    if list(source.meta["image_size"]) != [int(inp.height), int(inp.width)]:
        h, w = source.meta["image_size"]
        raise SetupError(f"latent cache {inp.latent_cache} holds {w}x{h} images, config.input asks for "
                         f"{inp.width}x{inp.height}: set --config.input.height/width to the cache's size")
    return source


def input_pipeline(config, *, seed: int):
    """Pixel samples (BATCH_KEYS) from the generator, or with input.latent_cache the cached latents (+ subtask)."""
    from data.layer_cache import LATENTS
    from data.pipeline import make_pipeline

    inp = config.input
    if inp.batch_size % jax.process_count():
        raise SetupError(f"input.batch_size {inp.batch_size} is not divisible by {jax.process_count()} processes")
    if inp.latent_cache:
        source, keys = latent_cache_source(config), LATENTS + ("subtask",)
    else:
        source, keys = dataset(config, seed=seed), BATCH_KEYS
    return make_pipeline(source, batch_size=inp.batch_size // jax.process_count(), seed=seed, keys=keys,
                         num_threads=inp.num_threads)


def make_prepare(vae, txt_table, y_table, *, sample: bool = False):
    """Jitted, frozen: (global batch of BATCH_KEYS, key) -> the loss's inputs. Latents are the VAE posterior mean,
    or a posterior draw per image when `sample`."""
    from flax import nnx

    txt_table, y_table = jnp.asarray(txt_table), jnp.asarray(y_table)

    @nnx.jit
    def prepare(vae, batch, key):
        keys = jax.random.split(key, 3)
        enc = lambda img, k: vae.encode(img * 2.0 - 1.0, sample_key=k if sample else None)
        sub = batch["subtask"]
        return dict(z_composite=enc(batch["composite"], keys[0]), z_foreground=enc(batch["foreground"], keys[1]),
                    z_background=enc(batch["background"], keys[2]), txt=txt_table[sub], y=y_table[sub])

    return lambda batch, key: prepare(vae, batch, key)


def make_batch(models: Models, config, mesh):
    """fn(host batch, key) -> the loss's inputs as global arrays (the VAE runs only on pixel batches)."""
    from data.layer_cache import LATENTS

    split = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp")))
    f = models.frozen
    if config.input.latent_cache:
        if config.input.vae_sample:
            raise SetupError("the latent cache holds posterior means: set input.vae_sample=False to train on it")
        keys = LATENTS + ("subtask",)
        txt_table, y_table = jnp.asarray(f["txt"]), jnp.asarray(f["y"])
        lookup = jax.jit(lambda b: dict(b, txt=txt_table[b["subtask"]], y=y_table[b["subtask"]]))
        prepare = lambda batch, key: lookup(batch)
    else:
        keys = BATCH_KEYS
        prepare = make_prepare(f["vae"], f["txt"], f["y"], sample=bool(config.input.vae_sample))

    def batch_fn(host_batch, key):
        arrays = {k: np.asarray(host_batch[k], np.int32 if k == "subtask" else np.float32) for k in keys}
        glob = jax.tree.map(lambda x: jax.make_array_from_process_local_data(split, x), arrays)
        return prepare(glob, key)

    return batch_fn


# ------------------------------------------------------------------------------------ loss, preview, export

def loss(model, batch, rng, *, config):
    from omnijax.diffdecompose.model import decompose_loss

    lc = config.loss
    value, _ = decompose_loss(model, batch, rng, t_sampling=lc.t_sampling, guidance=float(lc.guidance),
                              weights=tuple(lc.weights), attention_backend=config.model.attention,
                              remat=config.model.remat)
    return value


def make_preview(models: Models, config):
    """fn(model, path): decomposes a fixed held-out composite with the model being trained; writes a labelled
    sheet (composite, both truths, both predictions) and path.json with RMSE x256 / PSNR of each layer and the
    trivial baseline (the composite taken as the background). One Decomposer: compiled pieces are reused."""
    from omnijax.diffdecompose.preview import labelled_sheet
    from omnijax.diffdecompose.sampling import Decomposer
    from omnijax.io.atomic import atomic_write
    from omnijax.io.video import write_image
    from omnijax.metrics.image import psnr, rmse

    sample = dataset(config, seed=config.seed + 7919, length=1)[0]
    sub = int(sample["subtask"])
    txt, y = models.frozen["txt"][sub:sub + 1], models.frozen["y"][sub:sub + 1]
    dec = Decomposer(models.trainable, models.frozen["vae"], num_steps=int(config.sampler.steps),
                     guidance=float(config.sampler.guidance), mu_tokens=config.sampler.mu_tokens,
                     attention_backend=config.model.attention)

    def preview(model, path):
        dec.model = model
        out = dec(sample["composite"][None], txt, y, seed=config.seed)
        fg, bg = out["foreground"][0], out["background"][0]
        write_image(path, labelled_sheet([[(f"in: {SUBTASKS[sub]}", sample["composite"]),
                                           ("fg truth", sample["foreground"]), ("bg truth", sample["background"]),
                                           ("fg pred", fg), ("bg pred", bg)]]))
        metrics = dict(bg_rmse=rmse(bg, sample["background"]), bg_psnr=psnr(bg, sample["background"]),
                       fg_rmse=rmse(fg, sample["foreground"]), fg_psnr=psnr(fg, sample["foreground"]),
                       baseline_bg_rmse=rmse(sample["composite"], sample["background"]),
                       baseline_bg_psnr=psnr(sample["composite"], sample["background"]))
        atomic_write(os.path.splitext(path)[0] + ".json", json.dumps(metrics, indent=1))

    return preview


def export(model, config, workdir: str) -> list[str]:
    """The LoRA in every format of config.evals.export_formats (lora_diffdecompose_<format>.safetensors; formats of
    omnijax.models.flux.lora_files), with the ICD settings and the prompt block in its metadata so that sampling
    uses what training used."""
    from omnijax.diffdecompose.lora_io import save_decomposer_lora

    extra = dict(icd=model.settings.to_dict(), prompt=json.loads(config.prompt.to_json()))
    paths = [save_decomposer_lora(os.path.join(workdir, f"lora_diffdecompose_{fmt}.safetensors"), model.lora,
                                  fmt=fmt, extra=extra) for fmt in config.evals.export_formats]
    if config.get("train_base", False):  # the trained base as a converted folder (model_init.dit / --dit)
        from omnijax.checkpoint import save_pretrained

        paths.append(save_pretrained(os.path.join(workdir, "dit"), model.dit, "flux_dit", overwrite=True))
    return paths
