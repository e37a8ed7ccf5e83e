"""Loading the CLIP vision tower (Wan's open-clip ViT-H/14 .pth, open_clip, or transformers) into CLIPVisionTower."""

from __future__ import annotations

import re
from collections.abc import Mapping

import jax.numpy as jnp

from converters.build import convert_and_build
from converters.engine import TRANSFORMS, best_table, plan
from converters.sources import open_checkpoint, read_config_json
from converters.tables.clip import TABLES
from converters.views import Concatenated, Without
from omnijax.layers.init import InitRngs
from omnijax.models.wan.clip import CLIPVisionConfig, CLIPVisionTower

_HF_LAYER = re.compile(r"((?:vision_model\.|text_model\.)?encoder\.layers\.\d+\.self_attn)\.q_proj\.(weight|bias)\Z")
_BLOCK = re.compile(r"blocks\.(\d+)\.")


def _fuse_hf_qkv(src: Mapping) -> Mapping:
    """transformers' separate q/k/v projections viewed as one `qkv_proj` tensor (rows q, then k, then v)."""
    groups = {}
    for key in src:
        if m := _HF_LAYER.match(key):
            base, kind = m.groups()
            groups[f"{base}.qkv_proj.{kind}"] = [f"{base}.{p}_proj.{kind}" for p in "qkv"]
    return Concatenated(src, groups) if groups else src


def infer_config(shapes: Mapping[str, tuple], json_config: dict | None = None) -> CLIPVisionConfig:
    """A CLIPVisionConfig from converted shapes; the head count comes from a config.json or width / 80 (ViT-H)."""
    def shape(k):
        if k not in shapes:
            raise KeyError(f"cannot infer the CLIP config: the checkpoint has no weight for {k}")
        return shapes[k]

    p, _, _, width = shape("patch_embedding")
    tokens = shape("pos_embedding")[0]
    grid = round((tokens - 1) ** 0.5)
    if grid * grid + 1 != tokens:
        raise ValueError(f"pos_embedding has {tokens} rows, not 1 + a square number of patches")
    layers = 1 + max(int(m.group(1)) for k in shapes if (m := _BLOCK.match(k)))
    j = (json_config or {}).get("vision_config", json_config or {})
    heads = j.get("num_attention_heads")
    if heads is None:  # not in the weights; ViT-H/14 uses 80-wide heads
        if width % 80:
            raise ValueError(f"cannot infer the CLIP head count for width {width}: pass a CLIPVisionConfig")
        heads = width // 80
    act = j.get("hidden_act", "gelu")
    return CLIPVisionConfig(
        image_size=p * grid, patch_size=p, width=width, num_layers=layers, num_heads=int(heads),
        mlp_dim=shape("blocks.0.mlp.fc1.kernel")[1], activation="gelu_tanh" if act == "gelu_pytorch_tanh" else act,
        eps=float(j.get("layer_norm_eps", 1e-5)), output_layer=layers - 1)  # Wan's use_31_block


def load_wan_clip(source, config: CLIPVisionConfig | None = None, *, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16,
                  shardings=None, progress: bool = False) -> tuple[CLIPVisionConfig, CLIPVisionTower]:
    """Loads the CLIP vision tower Wan conditions on.

    Args:
      source: Wan's `models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth` (weights-only), an open_clip
        state dict, a transformers CLIPVisionModel / CLIPModel checkpoint, or a mapping name -> array. Text
        towers, the post-norm and projections are ignored; so are blocks at or after config.output_layer.
      config: the model config; inferred when None (with output_layer = depth - 1, Wan's use_31_block).
      dtype, param_dtype: compute and storage types.
      shardings: optional {param path: jax.sharding.Sharding}.
      progress: show a progress bar over the keys.
    Returns:
      (config, CLIPVisionTower with the weights).
    Raises:
      converters.ConversionError naming every missing, unexpected and mis-shaped key;
      converters.UnsafeCheckpointError for a pickle that needs more than torch's weights-only loader.
    """
    src = _fuse_hf_qkv(open_checkpoint(source))
    keys = list(src.keys())
    table = best_table(keys, TABLES)
    mapping, _, _ = plan(keys, table)
    if config is None:
        shapes = {target: TRANSFORMS[tf](src[key]).shape for key, (target, tf) in mapping.items()}
        config = infer_config(shapes, read_config_json(source))
    # The blocks after output_layer never run (Wan stops after block 31 of 32): not loaded.
    unused = [k for k, (t, _) in mapping.items() if (m := _BLOCK.match(t)) and int(m.group(1)) >= config.output_layer]
    src = Without(src, unused)
    make = lambda: CLIPVisionTower(config, dtype=dtype, param_dtype=param_dtype, rngs=InitRngs(0))
    return config, convert_and_build(src, table, make, shardings=shardings, progress=progress)
