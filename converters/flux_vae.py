"""Loading the Flux.1 VAE (BFL `ae.safetensors` or diffusers AutoencoderKL `vae/`) into FluxVAE."""

from __future__ import annotations

import re
from collections.abc import Mapping

import jax.numpy as jnp

from converters.build import convert_and_build, mapped_shapes
from converters.engine import best_table, strip_prefix
from converters.sources import open_checkpoint, read_config_json
from converters.tables.flux_vae import DIFFUSERS, PREFIXES, bfl_table
from omnijax.layers.init import InitRngs
from omnijax.models.flux.vae import FluxVAE, FluxVAEConfig

_LEVEL = re.compile(r"encoder\.down(?:_blocks)?\.(\d+)\.")
_RES = re.compile(r"encoder\.down(?:_blocks)?\.0\.(?:block|resnets)\.(\d+)\.conv1\.weight\Z")


def _layout(keys) -> tuple[int, int]:
    """(levels, residual blocks per encoder level) from the encoder key names (the same in both formats)."""
    prefix = strip_prefix(list(keys), PREFIXES)
    bare = [k[len(prefix):] for k in keys]
    levels = {int(m.group(1)) for k in bare if (m := _LEVEL.match(k))}
    res = {int(m.group(1)) for k in bare if (m := _RES.match(k))}
    return (max(levels) + 1 if levels else 4), (max(res) + 1 if res else 2)


def infer_config(shapes: Mapping[str, tuple], levels: int, num_res_blocks: int,
                 json_config: dict | None = None) -> FluxVAEConfig:
    """A FluxVAEConfig from converted shapes ({our path: shape}) and an optional diffusers config.json."""
    def shape(k):
        if k not in shapes:
            raise KeyError(f"cannot infer the Flux VAE config: the checkpoint has no weight for {k}")
        return shapes[k]

    base = shape("encoder.conv_in.kernel")[-1]
    mults = tuple(shape(f"encoder.down_blocks.{i}.resnets.0.conv1.kernel")[-1] // base for i in range(levels))
    j = json_config or {}
    groups = int(j.get("norm_num_groups", 32))  # not in the weights; 32 in every published Flux VAE
    if any(base * m % groups for m in mults):
        raise ValueError(f"cannot infer the Flux VAE's GroupNorm groups for widths {[base * m for m in mults]}: "
                         f"pass a FluxVAEConfig or a config.json with norm_num_groups")
    kw = dict(base_dim=base, dim_mult=mults, num_res_blocks=num_res_blocks,
              z_dim=shape("decoder.conv_in.kernel")[2], in_channels=shape("encoder.conv_in.kernel")[2],
              out_channels=shape("decoder.conv_out.kernel")[-1], groups=groups)
    for ours, theirs in (("scaling_factor", "scaling_factor"), ("shift_factor", "shift_factor")):
        if j.get(theirs) is not None:
            kw[ours] = float(j[theirs])
    return FluxVAEConfig(**kw)


def load_flux_vae(source, config: FluxVAEConfig | None = None, *, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16,
                  shardings=None, progress: bool = False) -> tuple[FluxVAEConfig, FluxVAE]:
    """Loads the Flux VAE from PyTorch-side weights.

    Args:
      source: BFL's `ae.safetensors`, a diffusers `vae/` directory (or its safetensors file), or a mapping
        name -> array. ComfyUI-style prefixes (`first_stage_model.`, `vae.`) are stripped.
      config: the model config; inferred from the weight shapes (and a diffusers config.json) when None.
      dtype, param_dtype: compute and storage types.
      shardings: optional {param path: jax.sharding.Sharding}.
      progress: show a progress bar over the keys.
    Returns:
      (config, FluxVAE with the weights).
    Raises:
      converters.ConversionError naming every missing, unexpected and mis-shaped key.
    """
    src = open_checkpoint(source)
    keys = list(src.keys())
    levels, num_res = _layout(keys) if config is None else (len(config.dim_mult), config.num_res_blocks)
    table = best_table(keys, (bfl_table(levels), DIFFUSERS))
    if config is None:
        config = infer_config(mapped_shapes(src, table), levels, num_res, read_config_json(source))
    make = lambda: FluxVAE(config, dtype=dtype, param_dtype=param_dtype, rngs=InitRngs(0))
    return config, convert_and_build(src, table, make, shardings=shardings, progress=progress)
