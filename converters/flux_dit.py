"""Loading Flux.1 DiT checkpoints (BFL or diffusers format, any prefix, sharded or not) into FluxDiT."""

from __future__ import annotations

import re
from collections.abc import Mapping

import jax.numpy as jnp

from converters.build import convert_and_build, mapped_shapes
from converters.engine import best_table
from converters.sources import open_checkpoint, read_config_json
from converters.tables.flux_dit import TABLES, diffusers_fused_view
from omnijax.layers.init import InitRngs
from omnijax.models.flux import FluxConfig, FluxDiT


def infer_config(shapes: Mapping[str, tuple], json_config: dict | None = None) -> FluxConfig:
    """A FluxConfig from converted parameter shapes ({our path: shape}) and an optional diffusers config.json."""
    def shape(k):
        if k not in shapes:
            raise KeyError(f"cannot infer the Flux config: the checkpoint has no weight for {k}")
        return shapes[k]

    def count(kind):
        idx = [int(m.group(1)) for k in shapes if (m := re.match(rf"{kind}\.(\d+)\.", k))]
        return 1 + max(idx) if idx else 0

    js = json_config or {}
    in_channels, hidden = shape("img_in.kernel")
    heads = js.get("num_attention_heads")
    if heads is None:
        if hidden % 128:
            raise ValueError(f"cannot infer num_heads for hidden size {hidden} (Flux uses head_dim 128): pass "
                             "config= or put a config.json with num_attention_heads beside the weights")
        heads = hidden // 128
    axes = tuple(js.get("axes_dims_rope", (16, 56, 56)))
    return FluxConfig(
        in_channels=in_channels, out_channels=shape("final_layer.linear.kernel")[1],
        vec_in_dim=shape("vector_in.in_layer.kernel")[0], context_in_dim=shape("txt_in.kernel")[0],
        hidden_size=hidden, num_heads=int(heads),
        mlp_ratio=shape("double_blocks.0.img_mlp.linear_1.kernel")[1] / hidden,
        depth=count("double_blocks"), depth_single_blocks=count("single_blocks"), axes_dim=axes,
        qkv_bias="double_blocks.0.img_attn.qkv.bias" in shapes,
        guidance_embed="guidance_in.in_layer.kernel" in shapes,
        time_dim=shape("time_in.in_layer.kernel")[0])


def load_flux_dit(source, config: FluxConfig | None = None, *, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16,
                  shardings=None, progress: bool = False) -> tuple[FluxConfig, FluxDiT]:
    """Loads a Flux.1 DiT from PyTorch-side weights.

    Args:
      source: a .safetensors file, a directory of (sharded) safetensors, a .pth (weights-only), or a mapping
        name -> array. BFL (flux1-dev.safetensors) and diffusers (transformer/) key formats; ComfyUI
        (`model.diffusion_model.`) prefixes are stripped.
      config: the model config; inferred from the weight shapes (and a config.json beside them) when None.
      dtype, param_dtype: compute and storage types (the f32 islands stay f32).
      shardings: optional {param path: jax.sharding.Sharding}.
      progress: show a progress bar over the keys.
    Returns:
      (config, FluxDiT with the weights).
    Raises:
      converters.ConversionError naming every missing, unexpected and mis-shaped key.
    """
    src = diffusers_fused_view(open_checkpoint(source))
    table = best_table(list(src.keys()), TABLES)
    if config is None:
        config = infer_config(mapped_shapes(src, table), read_config_json(source))
    make = lambda: FluxDiT(config, dtype=dtype, param_dtype=param_dtype, rngs=InitRngs(0))
    return config, convert_and_build(src, table, make, shardings=shardings, progress=progress)
