"""Wan2.1 DiT key tables: original Wan / VideoX-Fun ("civitai") and diffusers (shared/spec/wan.md §1.5, §2.1).

Targets are omnijax.models.wan.WanDiT parameter paths.
"""

from converters.engine import Rule, Table, linear, norm

PREFIXES = ("model.diffusion_model.", "diffusion_model.")

_CROSS = ("q", "k", "v", "o", "k_img", "v_img")

CIVITAI = Table(
    name="wan_dit/civitai",
    prefixes=PREFIXES,
    rules=[
        Rule("patch_embedding.weight", "patch_embedding.kernel", "conv3d_to_thwio"),
        Rule("patch_embedding.bias", "patch_embedding.bias"),
        *linear("text_embedding.0", "condition.text_embedding.linear_1"),
        *linear("text_embedding.2", "condition.text_embedding.linear_2"),
        *linear("time_embedding.0", "condition.time_embedding.linear_1"),
        *linear("time_embedding.2", "condition.time_embedding.linear_2"),
        *linear("time_projection.1", "condition.time_projection"),
        *norm("img_emb.proj.0", "condition.img_emb.norm1"),
        *linear("img_emb.proj.1", "condition.img_emb.mlp.linear_1"),
        *linear("img_emb.proj.3", "condition.img_emb.mlp.linear_2"),
        *norm("img_emb.proj.4", "condition.img_emb.norm2"),
        Rule("head.modulation", "head.modulation"),
        *linear("head.head", "head.head"),
        Rule("blocks.{i}.modulation", "blocks.{i}.modulation"),
        *[r for n in ("q", "k", "v", "o")
          for r in linear(f"blocks.{{i}}.self_attn.{n}", f"blocks.{{i}}.self_attn.{n}")],
        *norm("blocks.{i}.self_attn.norm_q", "blocks.{i}.self_attn.norm_q", bias=False),
        *norm("blocks.{i}.self_attn.norm_k", "blocks.{i}.self_attn.norm_k", bias=False),
        *[r for n in _CROSS for r in linear(f"blocks.{{i}}.cross_attn.{n}", f"blocks.{{i}}.cross_attn.{n}")],
        *[r for n in ("norm_q", "norm_k", "norm_k_img")
          for r in norm(f"blocks.{{i}}.cross_attn.{n}", f"blocks.{{i}}.cross_attn.{n}", bias=False)],
        *norm("blocks.{i}.norm3", "blocks.{i}.norm3"),
        *linear("blocks.{i}.ffn.0", "blocks.{i}.ffn.linear_1"),
        *linear("blocks.{i}.ffn.2", "blocks.{i}.ffn.linear_2"),
    ],
)

_DF_CROSS = dict(q="to_q", k="to_k", v="to_v", o="to_out.0", k_img="add_k_proj", v_img="add_v_proj")

DIFFUSERS = Table(
    name="wan_dit/diffusers",
    prefixes=PREFIXES,
    # An old diffusers revision stores the head table as AdaLayerNorm's linear: identity weight, table as bias.
    ignore=(r"norm_out\.linear\.weight",),
    rules=[
        Rule("patch_embedding.weight", "patch_embedding.kernel", "conv3d_to_thwio"),
        Rule("patch_embedding.bias", "patch_embedding.bias"),
        *linear("condition_embedder.text_embedder.linear_1", "condition.text_embedding.linear_1"),
        *linear("condition_embedder.text_embedder.linear_2", "condition.text_embedding.linear_2"),
        *linear("condition_embedder.time_embedder.linear_1", "condition.time_embedding.linear_1"),
        *linear("condition_embedder.time_embedder.linear_2", "condition.time_embedding.linear_2"),
        *linear("condition_embedder.time_proj", "condition.time_projection"),
        *norm("condition_embedder.image_embedder.norm1", "condition.img_emb.norm1"),
        *linear("condition_embedder.image_embedder.ff.net.0.proj", "condition.img_emb.mlp.linear_1"),
        *linear("condition_embedder.image_embedder.ff.net.2", "condition.img_emb.mlp.linear_2"),
        *norm("condition_embedder.image_embedder.norm2", "condition.img_emb.norm2"),
        Rule("scale_shift_table", "head.modulation"),
        Rule("norm_out.linear.bias", "head.modulation", "flatten_to_1x2"),
        *linear("proj_out", "head.head"),
        Rule("blocks.{i}.scale_shift_table", "blocks.{i}.modulation"),
        *[r for n, d in _DF_CROSS.items() if n in ("q", "k", "v", "o")
          for r in linear(f"blocks.{{i}}.attn1.{d}", f"blocks.{{i}}.self_attn.{n}")],
        *norm("blocks.{i}.attn1.norm_q", "blocks.{i}.self_attn.norm_q", bias=False),
        *norm("blocks.{i}.attn1.norm_k", "blocks.{i}.self_attn.norm_k", bias=False),
        *[r for n, d in _DF_CROSS.items() for r in linear(f"blocks.{{i}}.attn2.{d}", f"blocks.{{i}}.cross_attn.{n}")],
        *norm("blocks.{i}.attn2.norm_q", "blocks.{i}.cross_attn.norm_q", bias=False),
        *norm("blocks.{i}.attn2.norm_k", "blocks.{i}.cross_attn.norm_k", bias=False),
        *norm("blocks.{i}.attn2.norm_added_k", "blocks.{i}.cross_attn.norm_k_img", bias=False),
        *norm("blocks.{i}.norm2", "blocks.{i}.norm3"),  # diffusers' norm2 is the cross-attention LN
        *linear("blocks.{i}.ffn.net.0.proj", "blocks.{i}.ffn.linear_1"),
        *linear("blocks.{i}.ffn.net.2", "blocks.{i}.ffn.linear_2"),
    ],
)

TABLES = (CIVITAI, DIFFUSERS)
