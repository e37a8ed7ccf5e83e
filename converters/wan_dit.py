"""Loading Wan2.1 DiT checkpoints (civitai / VideoX-Fun or diffusers, any prefix, sharded or not) into WanDiT."""

from __future__ import annotations

import re
from collections.abc import Mapping

import jax.numpy as jnp

from converters.build import convert_and_build, mapped_shapes
from converters.engine import best_table
from converters.sources import open_checkpoint, read_config_json
from converters.tables.wan_dit import TABLES
from omnijax.layers.init import InitRngs
from omnijax.models.wan import WanConfig, WanDiT


def infer_config(shapes: Mapping[str, tuple], json_config: dict | None = None) -> WanConfig:
    """A WanConfig from converted parameter shapes ({our path: shape}) and an optional config.json."""
    def shape(k):
        if k not in shapes:
            raise KeyError(f"cannot infer the Wan config: the checkpoint has no weight for {k}")
        return shapes[k]

    pt, ph, pw, in_dim, dim = shape("patch_embedding.kernel")
    num_layers = 1 + max(int(m.group(1)) for k in shapes if (m := re.match(r"blocks\.(\d+)\.", k)))
    i2v = "condition.img_emb.mlp.linear_1.kernel" in shapes
    heads = (json_config or {}).get("num_heads") or (json_config or {}).get("num_attention_heads")
    if heads is None:
        if dim % 128:
            raise ValueError(f"cannot infer num_heads for dim {dim} (Wan uses head_dim 128): pass config= "
                             "or put a config.json with num_heads beside the weights")
        heads = dim // 128
    return WanConfig(
        dim=dim, ffn_dim=shape("blocks.0.ffn.linear_1.kernel")[1], num_heads=int(heads),
        num_layers=num_layers, model_type="i2v" if i2v else "t2v", in_dim=in_dim,
        out_dim=shape("head.head.kernel")[1] // (pt * ph * pw),
        freq_dim=shape("condition.time_embedding.linear_1.kernel")[0],
        text_dim=shape("condition.text_embedding.linear_1.kernel")[0],
        image_dim=shape("condition.img_emb.mlp.linear_1.kernel")[0] if i2v else 1280,
        patch_size=(pt, ph, pw), eps=float((json_config or {}).get("eps", 1e-6)))


def load_wan_dit(source, config: WanConfig | None = None, *, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16,
                 shardings=None, progress: bool = False) -> tuple[WanConfig, WanDiT]:
    """Loads a Wan2.1 DiT from PyTorch-side weights.

    Args:
      source: a .safetensors file, a directory of (sharded) safetensors, a .pth (weights-only), or a mapping
        name -> array. Original Wan / VideoX-Fun and diffusers key formats; ComfyUI prefixes are stripped.
      config: the model config; inferred from the weight shapes (and a config.json beside them) when None.
      dtype, param_dtype: compute and storage types (f32 islands stay f32).
      shardings: optional {param path: jax.sharding.Sharding}.
      progress: show a progress bar over the keys.
    Returns:
      (config, WanDiT with the weights).
    Raises:
      converters.ConversionError naming every missing, unexpected and mis-shaped key.
    """
    src = open_checkpoint(source)
    keys = list(src.keys())
    table = best_table(keys, TABLES)
    if config is None:
        shapes = mapped_shapes(src, table)
        config = infer_config(shapes, read_config_json(source))
    make = lambda: WanDiT(config, dtype=dtype, param_dtype=param_dtype, rngs=InitRngs(0))
    return config, convert_and_build(src, table, make, shardings=shardings, progress=progress)
