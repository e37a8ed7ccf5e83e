"""Loading the CLIP text tower (transformers CLIPTextModel, FLUX.1 `text_encoder/`) into CLIPTextModel."""

from __future__ import annotations

import re
from collections.abc import Mapping

import jax.numpy as jnp

from converters.build import convert_and_build, mapped_shapes
from converters.clip import _fuse_hf_qkv
from converters.sources import open_checkpoint, read_config_json
from converters.tables.clip_text import TRANSFORMERS
from omnijax.layers.init import InitRngs
from omnijax.models.flux.clip_text import CLIPTextConfig, CLIPTextModel

_BLOCK = re.compile(r"blocks\.(\d+)\.")


def infer_config(shapes: Mapping[str, tuple], json_config: dict | None = None) -> CLIPTextConfig:
    """A CLIPTextConfig from converted shapes; heads, activation and EOS id from a config.json (else CLIP-L's)."""
    def shape(k):
        if k not in shapes:
            raise KeyError(f"cannot infer the CLIP text config: the checkpoint has no weight for {k}")
        return shapes[k]

    vocab, width = shape("token_embedding.embedding")
    j = (json_config or {}).get("text_config", json_config or {})
    heads = j.get("num_attention_heads")
    if heads is None:  # not in the weights; CLIP-L uses 64-wide heads
        if width % 64:
            raise ValueError(f"cannot infer the CLIP text head count for width {width}: pass a CLIPTextConfig")
        heads = width // 64
    act = j.get("hidden_act", "quick_gelu")
    return CLIPTextConfig(
        vocab_size=vocab, width=width, num_layers=1 + max(int(m.group(1)) for k in shapes if (m := _BLOCK.match(k))),
        num_heads=int(heads), mlp_dim=shape("blocks.0.mlp.fc1.kernel")[1], max_positions=shape("pos_embedding")[0],
        activation="gelu_tanh" if act == "gelu_pytorch_tanh" else act, eps=float(j.get("layer_norm_eps", 1e-5)),
        eos_token_id=int(j.get("eos_token_id", 2)))


def load_clip_text(source, config: CLIPTextConfig | None = None, *, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16,
                   shardings=None, progress: bool = False) -> tuple[CLIPTextConfig, CLIPTextModel]:
    """Loads the CLIP text tower Flux conditions on.

    Args:
      source: a transformers CLIPTextModel checkpoint (safetensors file or directory, e.g. FLUX.1-dev/text_encoder)
        or a mapping name -> array.
      config: the model config; inferred from the shapes and a config.json beside them when None (without one:
        64-wide heads, quick_gelu and CLIP-L's legacy eos_token_id 2, i.e. pooling at the largest token id).
      dtype, param_dtype: compute and storage types.
      shardings: optional {param path: jax.sharding.Sharding}.
      progress: show a progress bar over the keys.
    Returns:
      (config, CLIPTextModel with the weights).
    Raises:
      converters.ConversionError naming every missing, unexpected and mis-shaped key.
    """
    src = _fuse_hf_qkv(open_checkpoint(source))
    if config is None:
        config = infer_config(mapped_shapes(src, TRANSFORMERS), read_config_json(source))
    make = lambda: CLIPTextModel(config, dtype=dtype, param_dtype=param_dtype, rngs=InitRngs(0))
    return config, convert_and_build(src, TRANSFORMERS, make, shardings=shardings, progress=progress)
