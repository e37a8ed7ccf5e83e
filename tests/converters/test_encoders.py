"""umT5 and CLIP converters: Wan's original .pth names, open_clip names and transformers formats.

The original-format dicts are produced from tiny random transformers models by explicit inverse renames
written here (independent of the tables), then loaded and compared with the transformers outputs.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from converters import ConversionError, UnsafeCheckpointError, load_umt5, load_wan_clip
from omnijax.models.wan.clip import clip_variant
from omnijax.models.wan.umt5 import umt5_variant
from tests.encoder_refs import clip_reference, hf_clip_vision, hf_umt5, umt5_reference
from tests.torch_refs import rel_err

F32 = dict(dtype=jnp.float32, param_dtype=jnp.float32)


def _umt5_inputs():
    ids = np.random.default_rng(0).integers(2, 1024, (2, 150))
    mask = np.ones_like(ids)
    mask[1, 90:] = 0
    return ids, mask


def _umt5_check(model, ref):
    ids, mask = _umt5_inputs()
    got = np.asarray(jax.jit(lambda m, a, b: m(a, b))(model, jnp.asarray(ids), jnp.asarray(mask)))
    assert rel_err(got, umt5_reference(ref, ids, mask)) <= 1e-5


def wan_umt5_state(ref) -> dict:
    """transformers UMT5 encoder state -> the key names of Wan's models_t5_umt5-xxl-enc-bf16.pth."""
    sd = {k: v.clone() for k, v in ref.state_dict().items()}
    out = {"token_embedding.weight": sd.pop("shared.weight"), "norm.weight": sd.pop("encoder.final_layer_norm.weight")}
    sd.pop("encoder.embed_tokens.weight", None)  # tied copy of shared.weight
    for i in range(len(ref.encoder.block)):
        att, ff = f"encoder.block.{i}.layer.0.SelfAttention", f"encoder.block.{i}.layer.1.DenseReluDense"
        for n in "qkvo":
            out[f"blocks.{i}.attn.{n}.weight"] = sd.pop(f"{att}.{n}.weight")
        out[f"blocks.{i}.pos_embedding.embedding.weight"] = sd.pop(f"{att}.relative_attention_bias.weight")
        out[f"blocks.{i}.norm1.weight"] = sd.pop(f"encoder.block.{i}.layer.0.layer_norm.weight")
        out[f"blocks.{i}.norm2.weight"] = sd.pop(f"encoder.block.{i}.layer.1.layer_norm.weight")
        out[f"blocks.{i}.ffn.gate.0.weight"] = sd.pop(f"{ff}.wi_0.weight")
        out[f"blocks.{i}.ffn.fc1.weight"] = sd.pop(f"{ff}.wi_1.weight")
        out[f"blocks.{i}.ffn.fc2.weight"] = sd.pop(f"{ff}.wo.weight")
    assert not sd, f"inverse rename missed {sorted(sd)}"
    return out


def _vm(ref):
    return ref.vision_model if hasattr(ref, "vision_model") else ref


def wan_clip_state(ref) -> dict:
    """transformers CLIPVisionModel -> Wan's XLMRobertaCLIP names (fused to_qkv), plus a text tower to ignore."""
    vm = _vm(ref)
    out = {
        "visual.patch_embedding.weight": vm.embeddings.patch_embedding.weight,
        "visual.cls_embedding": vm.embeddings.class_embedding[None, None],
        "visual.pos_embedding": vm.embeddings.position_embedding.weight[None],
        "visual.pre_norm.weight": vm.pre_layrnorm.weight, "visual.pre_norm.bias": vm.pre_layrnorm.bias,
        "visual.post_norm.weight": vm.post_layernorm.weight, "visual.post_norm.bias": vm.post_layernorm.bias,
        "visual.head": torch.randn(vm.config.hidden_size, 16),
        "textual.token_embedding.weight": torch.randn(50, 8), "log_scale": torch.tensor(4.6),
    }
    for i, layer in enumerate(vm.encoder.layers):
        p, a = f"visual.transformer.{i}", layer.self_attn
        for kind in ("weight", "bias"):
            out[f"{p}.attn.to_qkv.{kind}"] = torch.cat([getattr(getattr(a, n), kind) for n in ("q_proj", "k_proj",
                                                                                               "v_proj")])
            out[f"{p}.attn.proj.{kind}"] = getattr(a.out_proj, kind)
            out[f"{p}.norm1.{kind}"] = getattr(layer.layer_norm1, kind)
            out[f"{p}.norm2.{kind}"] = getattr(layer.layer_norm2, kind)
            out[f"{p}.mlp.0.{kind}"] = getattr(layer.mlp.fc1, kind)
            out[f"{p}.mlp.2.{kind}"] = getattr(layer.mlp.fc2, kind)
    return {k: v.detach().clone() for k, v in out.items()}


def open_clip_state(ref) -> dict:
    """transformers CLIPVisionModel -> open_clip's names (visual.conv1, resblocks, in_proj_weight, ...)."""
    vm = _vm(ref)
    out = {
        "visual.conv1.weight": vm.embeddings.patch_embedding.weight,
        "visual.class_embedding": vm.embeddings.class_embedding,
        "visual.positional_embedding": vm.embeddings.position_embedding.weight,
        "visual.ln_pre.weight": vm.pre_layrnorm.weight, "visual.ln_pre.bias": vm.pre_layrnorm.bias,
        "visual.ln_post.weight": vm.post_layernorm.weight, "visual.ln_post.bias": vm.post_layernorm.bias,
        "visual.proj": torch.randn(vm.config.hidden_size, 16),
        "token_embedding.weight": torch.randn(50, 8), "transformer.resblocks.0.ln_1.weight": torch.ones(8),
        "logit_scale": torch.tensor(4.6),
    }
    for i, layer in enumerate(vm.encoder.layers):
        p, a = f"visual.transformer.resblocks.{i}", layer.self_attn
        out[f"{p}.attn.in_proj_weight"] = torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight])
        out[f"{p}.attn.in_proj_bias"] = torch.cat([a.q_proj.bias, a.k_proj.bias, a.v_proj.bias])
        for kind in ("weight", "bias"):
            out[f"{p}.attn.out_proj.{kind}"] = getattr(a.out_proj, kind)
            out[f"{p}.ln_1.{kind}"] = getattr(layer.layer_norm1, kind)
            out[f"{p}.ln_2.{kind}"] = getattr(layer.layer_norm2, kind)
            out[f"{p}.mlp.c_fc.{kind}"] = getattr(layer.mlp.fc1, kind)
            out[f"{p}.mlp.c_proj.{kind}"] = getattr(layer.mlp.fc2, kind)
    return {k: v.detach().clone() for k, v in out.items()}


def clip_model_state(ref) -> dict:
    """transformers CLIPModel layout: the vision tower under `vision_model.`, plus text tower and projections."""
    out = {f"vision_model.{k}": v.clone() for k, v in _vm(ref).state_dict().items()}
    out.update({"text_model.embeddings.token_embedding.weight": torch.randn(50, 8),
                "visual_projection.weight": torch.randn(16, 32), "logit_scale": torch.tensor(2.6)})
    return out


def _clip_check(model, ref, layer):
    x = np.random.default_rng(1).standard_normal((1, 224, 224, 3)).astype(np.float32)
    got = np.asarray(jax.jit(lambda m, a: m(a))(model, x))
    assert rel_err(got, clip_reference(ref, x, layer)) <= 1e-5


# ---------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def umt5_ref():
    return hf_umt5()


@pytest.fixture(scope="module")
def clip_ref():
    return hf_clip_vision()


def test_umt5_wan_pth(umt5_ref, tmp_path):
    path = tmp_path / "models_t5_umt5-xxl-enc-bf16.pth"
    torch.save(wan_umt5_state(umt5_ref), path)
    cfg, model = load_umt5(str(path), **F32)  # config inferred from the shapes
    assert cfg == umt5_variant("tiny")
    _umt5_check(model, umt5_ref)


def test_umt5_transformers_dir_and_full_model(umt5_ref, tmp_path):
    umt5_ref.save_pretrained(tmp_path / "enc")  # safetensors + config.json (read for max distance, eps, act)
    cfg, model = load_umt5(str(tmp_path / "enc"), **F32)
    assert cfg == umt5_variant("tiny")
    _umt5_check(model, umt5_ref)
    full = hf_umt5(full=True, seed=3)  # encoder-decoder checkpoint: the decoder is ignored explicitly
    _, model = load_umt5({k: v for k, v in full.state_dict().items()}, umt5_variant("tiny"), **F32)
    _umt5_check(model, full)


def test_clip_wan_pth(tmp_path):
    ref = hf_clip_vision(width=160, heads=2, layers=3)  # 80-wide heads: the head count can be inferred
    path = tmp_path / "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth"
    torch.save(wan_clip_state(ref), path)
    cfg, model = load_wan_clip(str(path), **F32)
    assert (cfg.width, cfg.num_heads, cfg.num_layers, cfg.output_layer, cfg.activation) == (160, 2, 3, 2, "gelu")
    _clip_check(model, ref, 2)


@pytest.mark.parametrize("fmt", [open_clip_state, clip_model_state])
def test_clip_other_formats(clip_ref, fmt):
    cfg = clip_variant("tiny")
    _, model = load_wan_clip(fmt(clip_ref), cfg, **F32)
    _clip_check(model, clip_ref, cfg.output_layer)


def test_clip_output_layer_choice(clip_ref):
    """All three blocks (no use_31_block truncation) when asked: matches the reference's last hidden state."""
    _, model = load_wan_clip(wan_clip_state(clip_ref), clip_variant("tiny", output_layer=3), **F32)
    _clip_check(model, clip_ref, 3)


class _Payload:  # any non-tensor object makes the pickle need code execution
    def __reduce__(self):
        return (print, ("this must never run",))


@pytest.mark.parametrize("loader", [load_umt5, load_wan_clip])
def test_unsafe_pickle_refused(tmp_path, loader):
    path = tmp_path / "evil.pth"
    torch.save({"token_embedding.weight": torch.zeros(4, 4), "extra": _Payload()}, path)
    with pytest.raises(UnsafeCheckpointError, match="refused"):
        loader(str(path))


def test_missing_and_misshaped_keys_are_named(umt5_ref, clip_ref):
    sd = wan_umt5_state(umt5_ref)
    del sd["blocks.1.ffn.fc1.weight"]
    with pytest.raises(ConversionError, match=r"missing[\s\S]*blocks\.1\.ffn\.fc1\.kernel"):
        load_umt5(sd, umt5_variant("tiny"), **F32)
    sd = wan_umt5_state(umt5_ref)
    sd["blocks.0.attn.q.weight"] = torch.zeros(32, 31)
    with pytest.raises(ConversionError, match=r"wrong shape[\s\S]*blocks\.0\.attn\.q\.weight"):
        load_umt5(sd, umt5_variant("tiny"), **F32)
    sd = wan_clip_state(clip_ref)
    sd["visual.transformer.0.attn.to_qkv.bias"] = torch.zeros(95)
    sd["visual.stray.weight"] = torch.zeros(3)
    with pytest.raises(ConversionError, match=r"unexpected[\s\S]*visual\.stray\.weight[\s\S]*wrong shape[\s\S]*"
                                              r"to_qkv\.bias"):
        load_wan_clip(sd, clip_variant("tiny"), **F32)


def test_pretrained_round_trip(umt5_ref, clip_ref, tmp_path):
    """Converted encoders survive omnijax.checkpoint (the registry kinds 'umt5' and 'wan_clip')."""
    from omnijax.checkpoint import load_pretrained, save_pretrained

    _, text = load_umt5(wan_umt5_state(umt5_ref), umt5_variant("tiny"), **F32)
    save_pretrained(str(tmp_path / "umt5"), text, "umt5")
    cfg, restored = load_pretrained(str(tmp_path / "umt5"), kind="umt5", **F32)
    assert cfg == umt5_variant("tiny")
    _umt5_check(restored, umt5_ref)
    _, image = load_wan_clip(wan_clip_state(clip_ref), clip_variant("tiny"), **F32)
    save_pretrained(str(tmp_path / "clip"), image, "wan_clip")
    cfg, restored = load_pretrained(str(tmp_path / "clip"), kind="wan_clip", **F32)
    assert cfg == clip_variant("tiny")
    _clip_check(restored, clip_ref, cfg.output_layer)
