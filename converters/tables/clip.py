"""CLIP ViT vision-tower key tables: Wan's `models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth`,
open_clip's own naming, and transformers' CLIPVisionModel / CLIPModel.

Targets are omnijax.models.wan.clip.CLIPVisionTower parameter paths. Only the vision tower is loaded:
text towers, post-norms, projections and logit scales are ignored explicitly. The transformers q/k/v
projections are presented fused as `...self_attn.qkv_proj` by the loader (converters.views.Concatenated).
"""

from converters.engine import Rule, Table, linear, norm

_NOT_VISUAL = r"(?!visual\.)"  # XLM-RoBERTa text tower, log_scale, ...

WAN = Table(
    name="clip/wan",
    ignore=(_NOT_VISUAL, r"visual\.post_norm\.", r"visual\.head\Z"),
    rules=[
        Rule("visual.patch_embedding.weight", "patch_embedding", "conv2d_to_hwio"),
        Rule("visual.cls_embedding", "cls_embedding", "squeeze"),  # [1, 1, D]
        Rule("visual.pos_embedding", "pos_embedding", "drop_leading_axis"),  # [1, 1 + P, D]
        *norm("visual.pre_norm", "pre_norm"),
        *norm("visual.transformer.{i}.norm1", "blocks.{i}.norm1"),
        *linear("visual.transformer.{i}.attn.to_qkv", "blocks.{i}.attn.qkv"),
        *linear("visual.transformer.{i}.attn.proj", "blocks.{i}.attn.proj"),
        *norm("visual.transformer.{i}.norm2", "blocks.{i}.norm2"),
        *linear("visual.transformer.{i}.mlp.0", "blocks.{i}.mlp.fc1"),
        *linear("visual.transformer.{i}.mlp.2", "blocks.{i}.mlp.fc2"),
    ],
)

_RB = "visual.transformer.resblocks.{i}"

OPEN_CLIP = Table(
    name="clip/open_clip",
    ignore=(_NOT_VISUAL, r"visual\.ln_post\.", r"visual\.proj\Z"),
    rules=[
        Rule("visual.conv1.weight", "patch_embedding", "conv2d_to_hwio"),
        Rule("visual.class_embedding", "cls_embedding"),
        Rule("visual.positional_embedding", "pos_embedding"),
        *norm("visual.ln_pre", "pre_norm"),
        *norm(f"{_RB}.ln_1", "blocks.{i}.norm1"),
        Rule(f"{_RB}.attn.in_proj_weight", "blocks.{i}.attn.qkv.kernel", "linear_t"),
        Rule(f"{_RB}.attn.in_proj_bias", "blocks.{i}.attn.qkv.bias"),
        *linear(f"{_RB}.attn.out_proj", "blocks.{i}.attn.proj"),
        *norm(f"{_RB}.ln_2", "blocks.{i}.norm2"),
        *linear(f"{_RB}.mlp.c_fc", "blocks.{i}.mlp.fc1"),
        *linear(f"{_RB}.mlp.c_proj", "blocks.{i}.mlp.fc2"),
    ],
)


def _transformers(prefix: str, ignore: tuple[str, ...]) -> Table:
    """transformers 5's CLIPVisionModel saves its keys bare; CLIPModel (and older versions) under `vision_model.`."""
    e, l = f"{prefix}embeddings", f"{prefix}encoder.layers.{{i}}"
    return Table(
        name=f"clip/transformers{'/' + prefix.rstrip('.') if prefix else ''}",
        ignore=(*ignore, rf"{prefix}post_layernorm\.", rf"{e}\.position_ids\Z"),
        rules=[
            Rule(f"{e}.patch_embedding.weight", "patch_embedding", "conv2d_to_hwio"),
            Rule(f"{e}.class_embedding", "cls_embedding"),
            Rule(f"{e}.position_embedding.weight", "pos_embedding"),
            *norm(f"{prefix}pre_layrnorm", "pre_norm"),
            *norm(f"{l}.layer_norm1", "blocks.{i}.norm1"),
            *linear(f"{l}.self_attn.qkv_proj", "blocks.{i}.attn.qkv"),
            *linear(f"{l}.self_attn.out_proj", "blocks.{i}.attn.proj"),
            *norm(f"{l}.layer_norm2", "blocks.{i}.norm2"),
            *linear(f"{l}.mlp.fc1", "blocks.{i}.mlp.fc1"),
            *linear(f"{l}.mlp.fc2", "blocks.{i}.mlp.fc2"),
        ],
    )


TRANSFORMERS = _transformers("", ())
TRANSFORMERS_CLIP_MODEL = _transformers("vision_model.", (r"(?!vision_model\.)",))  # text tower etc. ignored

TABLES = (WAN, OPEN_CLIP, TRANSFORMERS, TRANSFORMERS_CLIP_MODEL)
