"""Loading umT5 (Wan's original .pth or transformers' UMT5) and T5 v1.1 encoder checkpoints (transformers'
T5EncoderModel, e.g. FLUX.1 text_encoder_2) into UMT5Encoder; the bias layout is read from the weights."""

from __future__ import annotations

import re
from collections.abc import Mapping

import jax.numpy as jnp

from converters.build import convert_and_build, mapped_shapes
from converters.engine import best_table
from converters.sources import open_checkpoint, read_config_json
from converters.tables.umt5 import TABLES
from converters.views import Without
from omnijax.layers.init import InitRngs
from omnijax.models.wan.umt5 import UMT5Config, UMT5Encoder

_TIED = ("shared.weight", "encoder.embed_tokens.weight")


def infer_config(shapes: Mapping[str, tuple], json_config: dict | None = None) -> UMT5Config:
    """A UMT5Config from converted parameter shapes ({our path: shape}) and an optional transformers config.json."""
    def shape(k):
        if k not in shapes:
            raise KeyError(f"cannot infer the umT5 config: the checkpoint has no weight for {k}")
        return shapes[k]

    vocab, d_model = shape("token_embedding.embedding")
    num_buckets, heads = shape("blocks.0.attn.pos_embedding.embedding")
    j = json_config or {}
    act = j.get("dense_act_fn", "gelu_new")
    layers = 1 + max(int(m.group(1)) for k in shapes if (m := re.match(r"blocks\.(\d+)\.", k)))
    # T5 v1.1 has a bias table in layer 0 only; with one layer both layouts compute the same thing.
    shared = layers > 1 and "blocks.1.attn.pos_embedding.embedding" not in shapes
    return UMT5Config(
        vocab_size=vocab, d_model=d_model,
        num_layers=layers, shared_position_bias=shared,
        num_heads=heads, d_kv=shape("blocks.0.attn.q.kernel")[1] // heads, d_ff=shape("blocks.0.ffn.gate.kernel")[1],
        num_buckets=num_buckets, max_distance=int(j.get("relative_attention_max_distance", 128)),
        eps=float(j.get("layer_norm_epsilon", 1e-6)),
        activation={"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh"}.get(act, act))


def load_umt5(source, config: UMT5Config | None = None, *, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16,
              shardings=None, progress: bool = False) -> tuple[UMT5Config, UMT5Encoder]:
    """Loads a umT5 encoder from PyTorch-side weights.

    Args:
      source: Wan's `models_t5_umt5-xxl-enc-bf16.pth` (weights-only), a transformers UMT5 checkpoint
        (safetensors file or directory; encoder-only or full model, whose decoder is ignored), or a mapping
        name -> array.
      config: the model config; inferred from the weight shapes (and a config.json beside them) when None.
      dtype, param_dtype: compute and storage types.
      shardings: optional {param path: jax.sharding.Sharding}.
      progress: show a progress bar over the keys.
    Returns:
      (config, UMT5Encoder with the weights).
    Raises:
      converters.ConversionError naming every missing, unexpected and mis-shaped key;
      converters.UnsafeCheckpointError for a pickle that needs more than torch's weights-only loader.
    """
    src = open_checkpoint(source)
    if all(k in src for k in _TIED):  # transformers' tied embedding: two names, one matrix
        src = Without(src, _TIED[1:])
    keys = list(src.keys())
    table = best_table(keys, TABLES)
    if config is None:
        shapes = mapped_shapes(src, table)
        config = infer_config(shapes, read_config_json(source))
    make = lambda: UMT5Encoder(config, dtype=dtype, param_dtype=param_dtype, rngs=InitRngs(0))
    return config, convert_and_build(src, table, make, shardings=shardings, progress=progress)


# T5 v1.1 (transformers T5EncoderModel) uses the same key names as UMT5; only the layer-0-only bias table differs,
# which infer_config reads from the weights. One loader serves both.
load_t5 = load_umt5
