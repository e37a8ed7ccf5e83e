"""Loading Wan2.1 VAE checkpoints (original `Wan2.1_VAE.pth` or diffusers AutoencoderKLWan) into WanVAE."""

from __future__ import annotations

import re
from collections.abc import Mapping

import jax.numpy as jnp

from converters.build import convert_and_build, mapped_shapes
from converters.engine import best_table
from converters.sources import open_checkpoint, read_config_json
from converters.tables.wan_vae import DIFFUSERS, original_table
from omnijax.layers.init import InitRngs
from omnijax.models.wan.vae import VAEConfig, WanVAE

_RESAMPLE = re.compile(r"(?:.*\.)?encoder\.down(?:samples|_blocks)\.(\d+)\.resample\.1\.weight\Z")


def _layout(keys) -> tuple[int, int]:
    """(levels, residual blocks per level) from the encoder's resample positions (the same in both formats)."""
    idx = sorted(int(m.group(1)) for k in keys if (m := _RESAMPLE.match(k)))
    if not idx:
        return 4, 2
    return len(idx) + 1, idx[0]


def infer_config(shapes: Mapping[str, tuple], levels: int, num_res_blocks: int,
                 json_config: dict | None = None) -> VAEConfig:
    """A VAEConfig from converted parameter shapes ({our path: shape}) and an optional diffusers config.json."""
    def shape(k):
        if k not in shapes:
            raise KeyError(f"cannot infer the VAE config: the checkpoint has no weight for {k}")
        return shapes[k]

    base = shape("encoder.conv_in.kernel")[-1]
    mults, temporal, i = [], [], 0
    for level in range(levels):
        i += num_res_blocks - 1
        mults.append(shape(f"encoder.down_blocks.{i}.conv1.kernel")[-1] // base)
        i += 1
        if level < levels - 1:
            temporal.append(f"encoder.down_blocks.{i}.time_conv.kernel" in shapes)
            i += 1
    kw = dict(base_dim=base, z_dim=shape("post_quant_conv.kernel")[-1], dim_mult=tuple(mults),
              num_res_blocks=num_res_blocks, temporal_downsample=tuple(temporal),
              in_channels=shape("encoder.conv_in.kernel")[3], out_channels=shape("decoder.conv_out.kernel")[-1])
    if json_config and json_config.get("latents_mean") and json_config.get("latents_std"):
        kw.update(latents_mean=tuple(json_config["latents_mean"]), latents_std=tuple(json_config["latents_std"]))
    return VAEConfig(**kw)


def load_wan_vae(source, config: VAEConfig | None = None, *, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16,
                 shardings=None, progress: bool = False) -> tuple[VAEConfig, WanVAE]:
    """Loads the Wan2.1 VAE from PyTorch-side weights.

    Args:
      source: `Wan2.1_VAE.pth` (opened with torch's weights-only loader; unsafe pickles are refused), a
        .safetensors file or directory (diffusers `vae/`), or a mapping name -> array. Original key names (with
        or without VideoX-Fun's `model.` prefix) and diffusers AutoencoderKLWan names are both accepted.
      config: the model config; inferred from the weight shapes (and a diffusers config.json) when None.
      dtype, param_dtype: compute and storage types.
      shardings: optional {param path: jax.sharding.Sharding}.
      progress: show a progress bar over the keys.
    Returns:
      (config, WanVAE with the weights).
    Raises:
      converters.ConversionError naming every missing, unexpected and mis-shaped key.
    """
    src = open_checkpoint(source)
    keys = list(src.keys())
    levels, num_res = _layout(keys) if config is None else (len(config.dim_mult), config.num_res_blocks)
    table = best_table(keys, (original_table(levels, num_res), DIFFUSERS))
    if config is None:
        shapes = mapped_shapes(src, table)
        config = infer_config(shapes, levels, num_res, read_config_json(source))
    make = lambda: WanVAE(config, dtype=dtype, param_dtype=param_dtype, rngs=InitRngs(0))
    return config, convert_and_build(src, table, make, shardings=shardings, progress=progress)
