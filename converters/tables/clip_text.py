"""CLIP text-tower key table: transformers' CLIPTextModel (FLUX.1 `text_encoder/`; keys bare in transformers 5,
under `text_model.` in older saves and in the published checkpoints, which the table strips).

Targets are omnijax.models.flux.clip_text.CLIPTextModel parameter paths. The q/k/v projections are presented
fused as `...self_attn.qkv_proj` by the loader (converters.views.Concatenated), as for the vision tower.
"""

from converters.engine import Rule, Table, linear, norm

_L = "encoder.layers.{i}"

TRANSFORMERS = Table(
    name="clip_text/transformers",
    prefixes=("text_model.",),
    ignore=(r"embeddings\.position_ids\Z", r"text_projection\."),
    rules=[
        Rule("embeddings.token_embedding.weight", "token_embedding.embedding"),
        Rule("embeddings.position_embedding.weight", "pos_embedding"),
        *norm(f"{_L}.layer_norm1", "blocks.{i}.norm1"),
        *linear(f"{_L}.self_attn.qkv_proj", "blocks.{i}.attn.qkv"),
        *linear(f"{_L}.self_attn.out_proj", "blocks.{i}.attn.proj"),
        *norm(f"{_L}.layer_norm2", "blocks.{i}.norm2"),
        *linear(f"{_L}.mlp.fc1", "blocks.{i}.mlp.fc1"),
        *linear(f"{_L}.mlp.fc2", "blocks.{i}.mlp.fc2"),
        *norm("final_layer_norm", "final_norm"),
    ],
)

TABLES = (TRANSFORMERS,)
