"""Flux DiT converters: BFL and diffusers formats, prefixes, sharded bf16 safetensors, config inference, errors."""

import json
import os

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from converters import ConversionError, load_flux_dit
from omnijax.models.flux import variant
from omnijax.params import flat_params
from tests.models.flux.refs import diffusers_flux

# diffusers -> BFL names (spec §2.2), written independently of the converter's tables.
_TOP = {"x_embedder": "img_in", "context_embedder": "txt_in",
        "time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
        "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
        "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
        "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
        "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
        "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
        "proj_out": "final_layer.linear"}
_DOUBLE = {"norm1.linear": "img_mod.lin", "norm1_context.linear": "txt_mod.lin", "attn.to_out.0": "img_attn.proj",
           "attn.to_add_out": "txt_attn.proj", "ff.net.0.proj": "img_mlp.0", "ff.net.2": "img_mlp.2",
           "ff_context.net.0.proj": "txt_mlp.0", "ff_context.net.2": "txt_mlp.2"}
_DOUBLE_NORMS = {"attn.norm_q": "img_attn.norm.query_norm", "attn.norm_k": "img_attn.norm.key_norm",
                 "attn.norm_added_q": "txt_attn.norm.query_norm", "attn.norm_added_k": "txt_attn.norm.key_norm"}


def to_bfl(sd):
    """A BFL-format state dict (fused qkv / linear1, swapped final adaLN halves) from a diffusers one."""
    out = {}
    n_double = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("transformer_blocks."))
    n_single = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("single_transformer_blocks."))
    for p in ("weight", "bias"):
        for a, b in _TOP.items():
            if f"{a}.{p}" in sd:
                out[f"{b}.{p}"] = sd[f"{a}.{p}"]
        scale, shift = sd[f"norm_out.linear.{p}"].chunk(2, dim=0)
        out[f"final_layer.adaLN_modulation.1.{p}"] = torch.cat([shift, scale])
        for i in range(n_double):
            d, f = f"transformer_blocks.{i}.", f"double_blocks.{i}."
            for a, b in _DOUBLE.items():
                out[f"{f}{b}.{p}"] = sd[f"{d}{a}.{p}"]
            out[f"{f}img_attn.qkv.{p}"] = torch.cat([sd[f"{d}attn.to_{n}.{p}"] for n in "qkv"])
            out[f"{f}txt_attn.qkv.{p}"] = torch.cat([sd[f"{d}attn.add_{n}_proj.{p}"] for n in "qkv"])
        for i in range(n_single):
            d, f = f"single_transformer_blocks.{i}.", f"single_blocks.{i}."
            parts = [f"attn.to_{n}" for n in "qkv"] + ["proj_mlp"]
            out[f"{f}linear1.{p}"] = torch.cat([sd[f"{d}{n}.{p}"] for n in parts])
            out[f"{f}linear2.{p}"] = sd[f"{d}proj_out.{p}"]
            out[f"{f}modulation.lin.{p}"] = sd[f"{d}norm.linear.{p}"]
    for i in range(n_double):
        for a, b in _DOUBLE_NORMS.items():
            out[f"double_blocks.{i}.{b}.scale"] = sd[f"transformer_blocks.{i}.{a}.weight"]
    for i in range(n_single):
        out[f"single_blocks.{i}.norm.query_norm.scale"] = sd[f"single_transformer_blocks.{i}.attn.norm_q.weight"]
        out[f"single_blocks.{i}.norm.key_norm.scale"] = sd[f"single_transformer_blocks.{i}.attn.norm_k.weight"]
    return out


@pytest.fixture(scope="module")
def ref_state():
    return {k: v.detach().clone() for k, v in diffusers_flux(True).state_dict().items()}


def _params(model):
    return {k: np.asarray(v.get_value()) for k, v in flat_params(model).items()}


def test_both_formats_load_to_identical_params(ref_state):
    cfg = variant("tiny")
    bfl = to_bfl(ref_state)
    # Spec §2.1 key counts, scaled to 2 + 2 blocks: 20 top-level, 24 per double block, 8 per single block.
    assert len(bfl) == 20 + 2 * 24 + 2 * 8
    _, a = load_flux_dit(ref_state, cfg, dtype=jnp.float32, param_dtype=jnp.float32)
    _, b = load_flux_dit(bfl, cfg, dtype=jnp.float32, param_dtype=jnp.float32)
    pa, pb = _params(a), _params(b)
    assert pa.keys() == pb.keys()
    for k in pa:
        np.testing.assert_array_equal(pa[k], pb[k], err_msg=k)
    # Layouts against torch directly: fused rows q|k|v(|mlp) transposed, final (shift, scale) order.
    q, k, v = (ref_state[f"transformer_blocks.1.attn.to_{n}.weight"].numpy() for n in "qkv")
    np.testing.assert_array_equal(pa["double_blocks.1.img_attn.qkv.kernel"], np.concatenate([q, k, v]).T)
    mlp = ref_state["single_transformer_blocks.0.proj_mlp.bias"].numpy()
    np.testing.assert_array_equal(pa["single_blocks.0.linear1.bias"][-mlp.size:], mlp)
    scale_shift = ref_state["norm_out.linear.bias"].numpy()
    np.testing.assert_array_equal(pa["final_layer.adaLN_modulation.lin.bias"][:64], scale_shift[64:])


def test_comfyui_prefix_sharded_bf16_and_config_inference(ref_state, tmp_path):
    bfl = {f"model.diffusion_model.{k}": v.to(torch.bfloat16).contiguous() for k, v in to_bfl(ref_state).items()}
    keys = sorted(bfl)
    shards = {"a.safetensors": keys[: len(keys) // 2], "b.safetensors": keys[len(keys) // 2:]}
    for name, ks in shards.items():
        save_file({k: bfl[k] for k in ks}, str(tmp_path / name))
    with open(tmp_path / "model.safetensors.index.json", "w") as f:
        json.dump({"weight_map": {k: n for n, ks in shards.items() for k in ks}}, f)
    with open(tmp_path / "config.json", "w") as f:  # heads / RoPE axes are not in the weights' shapes
        json.dump({"num_attention_heads": 2, "axes_dims_rope": [8, 12, 12]}, f)
    cfg, model = load_flux_dit(str(tmp_path), dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    assert cfg == variant("tiny")
    p = _params(model)
    want = ref_state["transformer_blocks.0.attn.to_out.0.weight"].to(torch.bfloat16).float().numpy().T
    np.testing.assert_array_equal(p["double_blocks.0.img_attn.proj.kernel"].astype(np.float32), want)
    assert p["double_blocks.0.img_attn.proj.kernel"].dtype == ml_dtypes.bfloat16
    assert p["time_in.in_layer.kernel"].dtype == np.float32  # f32 island
    os.remove(tmp_path / "config.json")
    with pytest.raises(ValueError, match="num_heads"):
        load_flux_dit(str(tmp_path))


def test_schnell_has_no_guidance_keys():
    sd = {k: v.detach() for k, v in diffusers_flux(False).state_dict().items()}
    assert len(to_bfl(sd)) == 16 + 2 * 24 + 2 * 8
    cfg, _ = load_flux_dit(sd, variant("tiny-schnell"), dtype=jnp.float32, param_dtype=jnp.float32)
    with pytest.raises(ConversionError, match="guidance_in"):
        load_flux_dit(sd, variant("tiny"), dtype=jnp.float32, param_dtype=jnp.float32)


def test_missing_unexpected_and_misshaped_keys_are_named_together(ref_state):
    bfl = to_bfl(ref_state)
    del bfl["double_blocks.1.txt_mlp.2.weight"]
    bfl["double_blocks.0.img_attn.extra.weight"] = torch.zeros(3)
    bfl["single_blocks.1.linear2.weight"] = torch.zeros(64, 100)
    with pytest.raises(ConversionError) as e:
        load_flux_dit(bfl, variant("tiny"), dtype=jnp.float32, param_dtype=jnp.float32)
    msg = str(e.value)
    assert "double_blocks.1.txt_mlp.linear_2.kernel" in msg  # missing
    assert "double_blocks.0.img_attn.extra.weight" in msg  # unexpected
    assert "single_blocks.1.linear2.weight" in msg and "(100, 64)" in msg  # wrong shape


def test_convert_to_folder_writes_a_checkpoint_that_loads_back(ref_state, tmp_path):
    from converters.registry import convert_to_folder
    from omnijax.checkpoint import load_pretrained

    src = tmp_path / "flux1-tiny.safetensors"
    save_file({f"model.diffusion_model.{k}": v.contiguous() for k, v in to_bfl(ref_state).items()}, str(src))
    with open(tmp_path / "config.json", "w") as f:
        json.dump({"num_attention_heads": 2, "axes_dims_rope": [8, 12, 12]}, f)
    out = tmp_path / "out"
    convert_to_folder("flux_dit", str(src), str(out), param_dtype="f32")
    cfg, restored = load_pretrained(str(out), kind="flux_dit", dtype=jnp.float32, param_dtype=jnp.float32)
    assert cfg == variant("tiny")
    _, direct = load_flux_dit(ref_state, cfg, dtype=jnp.float32, param_dtype=jnp.float32)
    pa, pb = _params(direct), _params(restored)
    for k in pa:
        np.testing.assert_array_equal(pa[k], pb[k], err_msg=k)
