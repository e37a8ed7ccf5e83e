"""The one model registry and the one loader every entry point, task and the trainer use.

`MODEL_KINDS` has one row per model kind: the omnijax model class, its config class, the converter that reads
the original PyTorch-side files, and the tiny random config (tests, smoke runs). A new kind (flux_dit, flux_vae,
t5, clip_l) is a new row; `load` does not change.

`load(kind, source, ...)` takes any of three sources, with the same meaning everywhere (config keys
`model_init.<name>`, CLI flags `--<name>`):
  "tiny"                 random weights of the row's tiny config (seeded);
  a converted folder     written by `launch/convert.py` (omnijax.json + orbax params), restored in place;
  anything else          the original files (safetensors / .pth / diffusers folder), converted on load.
With a mesh, parameters are created already sharded: the placement comes from the abstract model (no
allocation) and every array is read or initialised straight into its shards, so no device ever holds a whole
parameter that its rule splits (a 14B base never passes through one device).
"""

from __future__ import annotations

import dataclasses
import importlib
import os
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from omnijax import sharding as shd
from omnijax.checkpoint import is_pretrained, load_pretrained
from omnijax.layers.init import InitRngs

# The one dtype table of config values and CLI flags.
DTYPES = {"bf16": jnp.bfloat16, "bfloat16": jnp.bfloat16, "f32": jnp.float32, "float32": jnp.float32}


def dtype_of(name) -> jnp.dtype:
    """A dtype from its config/flag spelling ("bf16", "float32", ...) or a dtype itself."""
    if isinstance(name, str):
        if name not in DTYPES:
            raise ValueError(f"unknown dtype {name!r}; known: {', '.join(DTYPES)}")
        return DTYPES[name]
    return jnp.dtype(name)


def _ref(ref: str):
    mod, _, name = ref.partition(":")
    return getattr(importlib.import_module(mod), name)


@dataclasses.dataclass(frozen=True)
class ModelKind:
    """One registry row. References are "module:attribute" strings, imported on use."""

    model: str    # nnx.Module class, called as cls(config, dtype=, param_dtype=, rngs=)
    config: str   # its config class (has from_dict / to_dict)
    convert: str  # converter: fn(source, config=None, *, dtype, param_dtype, shardings, progress) -> (config, model)
    tiny: str     # fn() -> the tiny config


MODEL_KINDS: dict[str, ModelKind] = {
    "wan_dit": ModelKind("omnijax.models.wan.dit:WanDiT", "omnijax.models.wan.variants:WanConfig",
                         "converters.wan_dit:load_wan_dit", "converters.registry:_tiny_wan_dit"),
    "wan_vae": ModelKind("omnijax.models.wan.vae:WanVAE", "omnijax.models.wan.vae:VAEConfig",
                         "converters.wan_vae:load_wan_vae", "converters.registry:_tiny_wan_vae"),
    "umt5": ModelKind("omnijax.models.wan.umt5:UMT5Encoder", "omnijax.models.wan.umt5:UMT5Config",
                      "converters.umt5:load_umt5", "converters.registry:_tiny_umt5"),
    "wan_clip": ModelKind("omnijax.models.wan.clip:CLIPVisionTower", "omnijax.models.wan.clip:CLIPVisionConfig",
                          "converters.clip:load_wan_clip", "converters.registry:_tiny_wan_clip"),
    # Flux.1 (DiffDecompose): the tiny rows fit each other (packed latent = 4 x VAE channels, text widths).
    "flux_dit": ModelKind("omnijax.models.flux.dit:FluxDiT", "omnijax.models.flux.variants:FluxConfig",
                          "converters.flux_dit:load_flux_dit", "converters.registry:_tiny_flux_dit"),
    "flux_vae": ModelKind("omnijax.models.flux.vae:FluxVAE", "omnijax.models.flux.vae:FluxVAEConfig",
                          "converters.flux_vae:load_flux_vae", "converters.registry:_tiny_flux_vae"),
    "t5": ModelKind("omnijax.models.wan.umt5:UMT5Encoder", "omnijax.models.wan.umt5:UMT5Config",
                    "converters.umt5:load_t5", "converters.registry:_tiny_t5"),
    "clip_l": ModelKind("omnijax.models.flux.clip_text:CLIPTextModel", "omnijax.models.flux.clip_text:CLIPTextConfig",
                        "converters.clip_text:load_clip_text", "converters.registry:_tiny_clip_l"),
}


def _tiny_wan_dit():
    from omnijax.models.wan.variants import variant

    return variant("tiny-inp")


def _tiny_wan_vae():
    from omnijax.models.wan.vae import vae_variant

    return vae_variant("tiny")


def _tiny_umt5():
    from omnijax.models.wan.umt5 import umt5_variant

    return umt5_variant("tiny")


def _tiny_wan_clip():
    from omnijax.models.wan.clip import clip_variant

    return clip_variant("tiny")


def _tiny_flux_vae():
    from omnijax.models.flux.vae import flux_vae_variant

    return flux_vae_variant("tiny")


def _tiny_t5():
    from omnijax.models.wan.umt5 import umt5_variant

    return umt5_variant("tiny-t5")


def _tiny_clip_l():
    from omnijax.models.flux.clip_text import clip_text_variant

    return clip_text_variant("tiny")


def _tiny_flux_dit():
    from omnijax.models.flux.variants import variant

    z = _tiny_flux_vae().z_dim
    return variant("tiny", in_channels=4 * z, out_channels=4 * z, vec_in_dim=_tiny_clip_l().width,
                   context_in_dim=_tiny_t5().d_model)


def model_kind(kind: str) -> ModelKind:
    if kind not in MODEL_KINDS:
        raise ValueError(f"unknown model kind {kind!r}; known: {', '.join(MODEL_KINDS)}")
    return MODEL_KINDS[kind]


def model_classes(kind: str) -> tuple[type, type]:
    """(model class, config class) of a kind."""
    row = model_kind(kind)
    return _ref(row.model), _ref(row.config)


class ModelSourceError(FileNotFoundError):
    """A model source that is neither "tiny", a converted folder nor an existing file or folder."""


def load(kind: str, source: str, *, dtype="bf16", param_dtype=None, mesh: jax.sharding.Mesh | None = None,
         rules: str | Sequence = "replicated", seed: int = 0, config=None, progress: bool = False,
         print_fn: Callable[[str], None] | None = None):
    """(config, model) of `kind` from `source` ("tiny", a converted folder, or the original files).

    Args:
      dtype, param_dtype: compute and storage dtype (names of DTYPES or dtypes); param_dtype defaults to dtype.
      mesh, rules: where the parameters live (omnijax.sharding rule set or list). Without a mesh the arrays are on
        the default device: a "tiny" init leaves them uncommitted (jax may move them to where they are used), a
        converted folder's restore commits them to that device.
      seed: the random init of "tiny" sources.
      config: the tiny model's config instead of the row's (e.g. fewer layers); converted sources bring theirs.
      print_fn: prints the placement table (None: silent).
    """
    row = model_kind(kind)
    dtype = dtype_of(dtype)
    param_dtype = dtype if param_dtype is None else dtype_of(param_dtype)
    model_cls, config_cls = _ref(row.model), _ref(row.config)

    def maker(cfg):
        return lambda: model_cls(cfg, dtype=dtype, param_dtype=param_dtype, rngs=InitRngs(seed))

    if source == "tiny":
        cfg = _ref(row.tiny)() if config is None else config
        return cfg, _init_tiny(maker(cfg), rules, mesh, print_fn)
    if not source or not os.path.exists(source):
        raise ModelSourceError(f"{kind} weights {source!r}: no such file or folder")
    # The placement follows from the abstract model (the converter infers the config from the weight shapes).
    placement = None if mesh is None else (
        lambda abstract: shd.param_shardings(abstract, rules, mesh, var_type=nnx.Param, print_fn=print_fn))
    if is_pretrained(source):
        return load_pretrained(source, kind=kind, model_cls=model_cls, config_cls=config_cls, dtype=dtype,
                               param_dtype=param_dtype, shardings=placement)
    return _ref(row.convert)(source, dtype=dtype, param_dtype=param_dtype, progress=progress, shardings=placement)


def _init_tiny(make, rules, mesh, print_fn):
    """Random init placed by `rules`. Rules that may split a parameter run the init under jit with every output
    born on its shards (omnijax.sharding.init_sharded), on any mesh, so a 1-device and an 8-device run start
    from the same bits. Fully replicated rules use the eager init: compiling a whole model's init (the VAE's
    takes a minute on a CPU) buys nothing when every device holds whole parameters anyway."""
    if any(len(spec) for _, spec in shd.get_rules(rules)):
        mesh = shd.make_mesh({}, devices=jax.devices()[:1]) if mesh is None else mesh
        return shd.init_sharded(make, rules, mesh, print_fn=print_fn)[0]
    model = make()
    if mesh is not None:
        shd.shard_module(model, rules, mesh, print_fn=print_fn)
    return model


def conditioner(cache_dir: str | None, *, text_encoder=None, image_encoder=None, tokenizer: str | None = None):
    """An omnijax.conditioning.Conditioner over the embedding cache at `cache_dir` (None: no cache).

    tokenizer: the umT5 tokenizer folder, or "tiny" for the tiny test tokenizer (built on first use).
    """
    from converters.tokenizer import build_tiny_tokenizer, load_tokenizer
    from omnijax.conditioning import Conditioner, EmbeddingCache

    if tokenizer == "tiny":
        tokenizer = os.path.join(cache_dir or os.path.expanduser("~/.cache/omnijax"), "tiny_tokenizer")
        if not os.path.isdir(tokenizer):
            build_tiny_tokenizer(tokenizer)
    return Conditioner(EmbeddingCache(cache_dir) if cache_dir else None, text_encoder=text_encoder,
                       image_encoder=image_encoder, tokenizer=load_tokenizer(tokenizer) if tokenizer else None)


def convert_to_folder(kind: str, source: str, out: str, *, param_dtype="bf16", overwrite: bool = False,
                      casper: str | None = None, casper_lora: str | None = None, lora_weight: float = 1.0,
                      progress: bool = False):
    """Converts a public checkpoint of `kind` into an omnijax checkpoint folder `out` (written atomically; an
    existing `out` is a FileExistsError unless `overwrite`). Returns (out as written, config).

    casper / casper_lora (wan_dit only): Casper's fine-tuned transformer replacing `source`'s weights, or its LoRA
    merged into them with `lora_weight` (converters.casper). The folder's header records the sources.
    """
    from omnijax.checkpoint import save_pretrained

    if (casper or casper_lora) and kind != "wan_dit":
        raise ValueError(f"casper / casper_lora apply to kind wan_dit, not {kind}")
    if casper or casper_lora:
        from converters.casper import load_casper_wan_dit

        dt = dtype_of(param_dtype)
        config, model = load_casper_wan_dit(source, casper, casper_lora, lora_weight=lora_weight, dtype=dt,
                                            param_dtype=dt, progress=progress)
    else:
        config, model = load(kind, source, dtype=param_dtype, progress=progress)
    extra = {k: os.path.abspath(v) for k, v in (("casper", casper), ("casper_lora", casper_lora)) if v}
    if casper_lora:
        extra["lora_weight"] = lora_weight
    return save_pretrained(out, model, kind, overwrite=overwrite, source=os.path.abspath(source), **extra), config
