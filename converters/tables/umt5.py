"""umT5 encoder key tables: Wan's original `models_t5_umt5-xxl-enc-bf16.pth` and transformers' UMT5.

Targets are omnijax.models.wan.umt5.UMT5Encoder parameter paths. The transformers table also accepts a
full UMT5Model / UMT5ForConditionalGeneration checkpoint: its decoder and LM head are ignored explicitly.
"""

from converters.engine import Rule, Table, linear

ORIGINAL = Table(
    name="umt5/original",
    rules=[
        Rule("token_embedding.weight", "token_embedding.embedding"),
        *[r for n in ("q", "k", "v", "o") for r in linear(f"blocks.{{i}}.attn.{n}", f"blocks.{{i}}.attn.{n}", False)],
        Rule("blocks.{i}.pos_embedding.embedding.weight", "blocks.{i}.attn.pos_embedding.embedding"),
        Rule("blocks.{i}.norm1.weight", "blocks.{i}.norm1.scale"),
        Rule("blocks.{i}.norm2.weight", "blocks.{i}.norm2.scale"),
        *linear("blocks.{i}.ffn.gate.0", "blocks.{i}.ffn.gate", bias=False),
        *linear("blocks.{i}.ffn.fc1", "blocks.{i}.ffn.fc1", bias=False),
        *linear("blocks.{i}.ffn.fc2", "blocks.{i}.ffn.fc2", bias=False),
        Rule("norm.weight", "norm.scale"),
    ],
)

_ATT = "encoder.block.{i}.layer.0.SelfAttention"
_FF = "encoder.block.{i}.layer.1.DenseReluDense"

TRANSFORMERS = Table(
    name="umt5/transformers",
    ignore=(r"decoder\.", r"lm_head\."),
    rules=[
        # Tied copies of one matrix; the loader keeps only one of them when both are present.
        Rule("shared.weight", "token_embedding.embedding"),
        Rule("encoder.embed_tokens.weight", "token_embedding.embedding"),
        *[r for n in ("q", "k", "v", "o") for r in linear(f"{_ATT}.{n}", f"blocks.{{i}}.attn.{n}", bias=False)],
        Rule(f"{_ATT}.relative_attention_bias.weight", "blocks.{i}.attn.pos_embedding.embedding"),
        Rule("encoder.block.{i}.layer.0.layer_norm.weight", "blocks.{i}.norm1.scale"),
        Rule("encoder.block.{i}.layer.1.layer_norm.weight", "blocks.{i}.norm2.scale"),
        *linear(f"{_FF}.wi_0", "blocks.{i}.ffn.gate", bias=False),  # the GELU branch
        *linear(f"{_FF}.wi_1", "blocks.{i}.ffn.fc1", bias=False),
        *linear(f"{_FF}.wo", "blocks.{i}.ffn.fc2", bias=False),
        Rule("encoder.final_layer_norm.weight", "norm.scale"),
    ],
)

TABLES = (ORIGINAL, TRANSFORMERS)
