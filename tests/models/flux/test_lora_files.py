"""Flux LoRA files: a PEFT LoRA saved by diffusers reproduces diffusers' output; every format round-trips."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from converters import load_flux_dit
from omnijax.models.flux import FluxDiT, FluxLoRA, lora_spec, variant
from omnijax.models.flux.lora import DOUBLE_TARGETS, SINGLE_TARGETS, TOP_TARGETS
from omnijax.models.flux.lora_files import FORMATS, LoRAFileError, load_flux_lora, lora_tensors, save_flux_lora
from tests.models.flux.refs import diffusers_flux, inputs, torch_forward
from tests.torch_refs import rel_err, to_numpy_state

# PEFT module-name regex (full match): every adaptable Linear except the top-level proj_out / norm_out.
_TARGETS = (r".*(x_embedder|context_embedder|norm1\.linear|norm1_context\.linear|attn\.to_q|attn\.to_k|"
            r"attn\.to_v|attn\.add_q_proj|attn\.add_k_proj|attn\.add_v_proj|to_out\.0|to_add_out|ff\.net\.0\.proj|"
            r"ff\.net\.2|ff_context\.net\.0\.proj|ff_context\.net\.2|norm\.linear|proj_mlp|"
            r"single_transformer_blocks\.\d+\.proj_out)")


def _plain(model, x, lora):
    return np.asarray(model(x["img"], x["img_ids"], x["txt"], x["txt_ids"], x["timesteps"], x["y"], x["guidance"],
                            lora=lora))


def test_peft_lora_saved_by_diffusers_matches_diffusers(tmp_path):
    from diffusers import FluxPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    ref = diffusers_flux(True)
    base_sd = to_numpy_state(ref)
    config = LoraConfig(r=4, lora_alpha=6, target_modules=_TARGETS, init_lora_weights="gaussian",
                        rank_pattern={"ff.net.2": 2}, alpha_pattern={"ff.net.2": 5})
    ref.add_adapter(config)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if "lora_B" in name:  # B = 0 at init; make every adapter act
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    x = inputs()
    want = torch_forward(ref, x)
    FluxPipeline.save_lora_weights(str(tmp_path), transformer_lora_layers=get_peft_model_state_dict(ref),
                                   transformer_lora_adapter_metadata=config.to_dict())
    cfg = variant("tiny")
    _, model = load_flux_dit(base_sd, cfg, dtype=jnp.float32, param_dtype=jnp.float32)
    lora = load_flux_lora(str(tmp_path / "pytorch_lora_weights.safetensors"), cfg)
    assert lora.adapters()["double_blocks.0.img_attn.qkv"].rank == 12  # to_q/k/v: A stacked, B block-diagonal
    assert lora.adapters()["single_blocks.1.linear1"].rank == 16
    got = _plain(model, x, lora)
    assert rel_err(got, want) <= 1e-5, rel_err(got, want)
    assert rel_err(_plain(model, x, None), want) > 1e-2  # the LoRA matters
    # Written back in diffusers naming, the same adapters (ranks kept per module) and the same numbers.
    save_flux_lora(str(tmp_path / "back.safetensors"), lora, fmt="diffusers")
    back = load_flux_lora(str(tmp_path / "back.safetensors"), cfg)
    _assert_same(lora, back)


def _assert_same(a: FluxLoRA, b: FluxLoRA):
    aa, bb = a.adapters(), b.adapters()
    assert aa.keys() == bb.keys()
    for k in aa:
        assert (aa[k].rank, aa[k].alpha) == (bb[k].rank, bb[k].alpha), k
        np.testing.assert_array_equal(aa[k].lora_a.get_value(), bb[k].lora_a.get_value(), err_msg=k)
        np.testing.assert_array_equal(aa[k].lora_b.get_value(), bb[k].lora_b.get_value(), err_msg=k)


@pytest.fixture(scope="module")
def trained():
    cfg = variant("tiny")
    lora = FluxLoRA(cfg, lora_spec(cfg, 3, 5.0, targets=DOUBLE_TARGETS + SINGLE_TARGETS + TOP_TARGETS),
                    rngs=nnx.Rngs(0))
    r = np.random.default_rng(0)
    for ad in lora.adapters().values():
        ad.lora_b.set_value(jnp.asarray(r.standard_normal(ad.lora_b.get_value().shape), jnp.float32))
    return cfg, lora


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_format_round_trips(trained, fmt, tmp_path):
    cfg, lora = trained
    path = str(tmp_path / f"{fmt}.safetensors")
    save_flux_lora(path, lora, fmt=fmt)
    _assert_same(lora, load_flux_lora(path, cfg))
    # The same file also fills an existing LoRA of that shape.
    target = FluxLoRA(cfg, dict(lora.spec), rngs=nnx.Rngs(5))
    _assert_same(lora, load_flux_lora(path, cfg, lora=target))


def test_key_names_follow_each_format(trained):
    _, lora = trained
    keys = {fmt: set(lora_tensors(lora, fmt)[0]) for fmt in FORMATS}
    assert "double_blocks.1.img_mlp.linear_1.lora_a" in keys["omnijax"]
    assert "double_blocks.1.img_mlp.0.lora_A.weight" in keys["bfl"]
    assert "single_blocks.0.linear1.lora_B.weight" in keys["bfl"]
    assert {"lora_unet_double_blocks_0_txt_attn_qkv.lora_down.weight", "lora_unet_single_blocks_1_linear2.alpha",
            "lora_unet_img_in.lora_up.weight"} <= keys["kohya"]
    assert {"transformer.transformer_blocks.0.attn.add_k_proj.lora_A.weight",
            "transformer.single_transformer_blocks.1.proj_mlp.lora_B.weight",
            "transformer.single_transformer_blocks.1.proj_out.lora_A.weight",
            "transformer.x_embedder.lora_A.weight"} <= keys["diffusers"]


def test_bad_files_are_named(trained):
    cfg, lora = trained
    tensors, _ = lora_tensors(lora, "kohya")
    with pytest.raises(LoRAFileError, match="lora_unet_final_layer_linear"):
        load_flux_lora({**tensors, "lora_unet_final_layer_linear.lora_down.weight": np.zeros((3, 64))}, cfg)
    half = dict(tensors)
    del half["lora_unet_double_blocks_1_img_mod_lin.lora_up.weight"]
    with pytest.raises(LoRAFileError, match="double_blocks_1_img_mod_lin"):
        load_flux_lora(half, cfg)
    with pytest.raises(LoRAFileError, match="does not fit"):
        load_flux_lora(tensors, variant("tiny", hidden_size=128, axes_dim=(16, 24, 24)))


def test_lora_changes_a_model_built_without_conversion(trained):
    cfg, lora = trained
    model = FluxDiT(cfg, dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
    x = inputs()
    assert rel_err(_plain(model, x, lora), _plain(model, x, None)) > 1e-2
