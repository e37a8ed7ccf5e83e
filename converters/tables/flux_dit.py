"""Flux.1 DiT key tables: BFL (flux1-dev.safetensors, fused qkv / linear1) and diffusers (split q/k/v)
(shared/spec/flux.md §2.2). Targets are omnijax.models.flux.FluxDiT parameter paths (BFL's tree).

The diffusers format does not map one key to one parameter: its q/k/v (and the single blocks' proj_mlp) are
fused first by the lazy view `diffusers_fused_view` below, under the BFL-side names "…attn.to_qkv" /
"…to_qkv_mlp"; the final adaLN halves are swapped by the named transform "swap_halves_linear_t".
"""

import re

from converters.engine import Rule, Table, linear
from converters.views import Concatenated

PREFIXES = ("model.diffusion_model.", "diffusion_model.", "transformer.")

_BLOCK_LINEARS = ("img_mod.lin", "txt_mod.lin", "img_attn.qkv", "txt_attn.qkv", "img_attn.proj", "txt_attn.proj")
_MLPS = (("img_mlp.0", "img_mlp.linear_1"), ("img_mlp.2", "img_mlp.linear_2"), ("txt_mlp.0", "txt_mlp.linear_1"),
         ("txt_mlp.2", "txt_mlp.linear_2"))
_QK = ("img_attn.norm.query_norm", "img_attn.norm.key_norm", "txt_attn.norm.query_norm", "txt_attn.norm.key_norm")


def _embedder(src_in, src_out, dst):
    return [*linear(src_in, f"{dst}.in_layer"), *linear(src_out, f"{dst}.out_layer")]


BFL = Table(
    name="flux_dit/bfl",
    prefixes=PREFIXES,
    rules=[
        *linear("img_in", "img_in"),
        *linear("txt_in", "txt_in"),
        *_embedder("time_in.in_layer", "time_in.out_layer", "time_in"),
        *_embedder("vector_in.in_layer", "vector_in.out_layer", "vector_in"),
        *_embedder("guidance_in.in_layer", "guidance_in.out_layer", "guidance_in"),
        *[r for n in _BLOCK_LINEARS for r in linear(f"double_blocks.{{i}}.{n}", f"double_blocks.{{i}}.{n}")],
        *[r for s, d in _MLPS for r in linear(f"double_blocks.{{i}}.{s}", f"double_blocks.{{i}}.{d}")],
        *[Rule(f"double_blocks.{{i}}.{n}.scale", f"double_blocks.{{i}}.{n}.scale") for n in _QK],
        *[r for n in ("linear1", "linear2", "modulation.lin")
          for r in linear(f"single_blocks.{{i}}.{n}", f"single_blocks.{{i}}.{n}")],
        *[Rule(f"single_blocks.{{i}}.norm.{n}.scale", f"single_blocks.{{i}}.norm.{n}.scale")
          for n in ("query_norm", "key_norm")],
        *linear("final_layer.linear", "final_layer.linear"),
        *linear("final_layer.adaLN_modulation.1", "final_layer.adaLN_modulation.lin"),
    ],
)

# diffusers module -> BFL-tree target, per double block (N) / single block (M).
_DF_DOUBLE = {
    "norm1.linear": "img_mod.lin", "norm1_context.linear": "txt_mod.lin",
    "attn.to_qkv": "img_attn.qkv", "attn.add_qkv": "txt_attn.qkv",  # fused by the view
    "attn.to_out.0": "img_attn.proj", "attn.to_add_out": "txt_attn.proj",
    "ff.net.0.proj": "img_mlp.linear_1", "ff.net.2": "img_mlp.linear_2",
    "ff_context.net.0.proj": "txt_mlp.linear_1", "ff_context.net.2": "txt_mlp.linear_2",
}
_DF_QK = {"attn.norm_q": "img_attn.norm.query_norm", "attn.norm_k": "img_attn.norm.key_norm",
          "attn.norm_added_q": "txt_attn.norm.query_norm", "attn.norm_added_k": "txt_attn.norm.key_norm"}
_DF_SINGLE = {"norm.linear": "modulation.lin", "to_qkv_mlp": "linear1", "proj_out": "linear2"}

DIFFUSERS = Table(
    name="flux_dit/diffusers",
    prefixes=PREFIXES,
    rules=[
        *linear("x_embedder", "img_in"),
        *linear("context_embedder", "txt_in"),
        *_embedder("time_text_embed.timestep_embedder.linear_1", "time_text_embed.timestep_embedder.linear_2",
                   "time_in"),
        *_embedder("time_text_embed.text_embedder.linear_1", "time_text_embed.text_embedder.linear_2", "vector_in"),
        *_embedder("time_text_embed.guidance_embedder.linear_1", "time_text_embed.guidance_embedder.linear_2",
                   "guidance_in"),
        *[r for s, d in _DF_DOUBLE.items()
          for r in linear(f"transformer_blocks.{{i}}.{s}", f"double_blocks.{{i}}.{d}")],
        *[Rule(f"transformer_blocks.{{i}}.{s}.weight", f"double_blocks.{{i}}.{d}.scale") for s, d in _DF_QK.items()],
        *[r for s, d in _DF_SINGLE.items()
          for r in linear(f"single_transformer_blocks.{{i}}.{s}", f"single_blocks.{{i}}.{d}")],
        Rule("single_transformer_blocks.{i}.attn.norm_q.weight", "single_blocks.{i}.norm.query_norm.scale"),
        Rule("single_transformer_blocks.{i}.attn.norm_k.weight", "single_blocks.{i}.norm.key_norm.scale"),
        *linear("proj_out", "final_layer.linear"),
        # diffusers' AdaLayerNormContinuous splits (scale, shift); BFL's final layer (shift, scale).
        Rule("norm_out.linear.weight", "final_layer.adaLN_modulation.lin.kernel", "swap_halves_linear_t"),
        Rule("norm_out.linear.bias", "final_layer.adaLN_modulation.lin.bias", "swap_halves"),
    ],
)

TABLES = (BFL, DIFFUSERS)

# Fusions of the diffusers layout (row blocks in this order, spec §2.3.2-3): {fused suffix: parts}.
_FUSE_DOUBLE = {"attn.to_qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
                "attn.add_qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")}
_FUSE_SINGLE = {"to_qkv_mlp": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")}
_BLOCK = re.compile(r"(?:.*\.)?(transformer_blocks|single_transformer_blocks)\.(\d+)\.")


def diffusers_fused_view(source):
    """A lazy view of a diffusers-format mapping with q/k/v (and proj_mlp) fused into BFL's row order."""
    keys = list(source.keys())
    blocks = {}
    for k in keys:
        m = _BLOCK.match(k)
        if m:
            blocks.setdefault(k[:m.end()], m.group(1))
    groups = {}
    for prefix, kind in blocks.items():
        for fused, parts in (_FUSE_DOUBLE if kind == "transformer_blocks" else _FUSE_SINGLE).items():
            for p in ("weight", "bias"):
                groups[f"{prefix}{fused}.{p}"] = [f"{prefix}{part}.{p}" for part in parts]
    return Concatenated(source, groups)
