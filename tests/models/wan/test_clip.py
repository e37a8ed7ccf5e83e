"""CLIPVisionTower against transformers' CLIPVisionModel (tiny, random, f32), Wan's preprocessing vs torch
bicubic, and the full ViT-H/14 shapes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flax import nnx

from converters import load_wan_clip
from omnijax.models.wan.clip import (
    CLIP_MEAN,
    CLIP_STD,
    CLIPVisionConfig,
    CLIPVisionTower,
    clip_variant,
    encode_frames,
    preprocess_frames,
    resize_bicubic,
)
from omnijax.params import count_params
from tests.encoder_refs import clip_reference, hf_clip_vision
from tests.torch_refs import rel_err, to_numpy_state


@pytest.mark.parametrize("act", ["gelu", "quick_gelu"])
def test_parity_with_transformers(act):
    ref = hf_clip_vision(act=act)
    cfg = clip_variant("tiny", activation=act)
    _, model = load_wan_clip(to_numpy_state(ref), cfg, dtype=jnp.float32, param_dtype=jnp.float32)
    x = np.random.default_rng(0).standard_normal((2, 224, 224, 3)).astype(np.float32)
    got = np.asarray(jax.jit(lambda m, a: m(a))(model, x))
    want = clip_reference(ref, x, cfg.output_layer)  # hidden_states[k]: after k blocks, before any post-norm
    assert got.shape == (2, 257, 32)
    assert rel_err(got, want) <= 1e-5, rel_err(got, want)


def _torch_bicubic(x, size, dtype):
    t = torch.from_numpy(x).to(dtype).permute(0, 3, 1, 2)
    return F.interpolate(t, size=size, mode="bicubic", align_corners=False).permute(0, 2, 3, 1).double().numpy()


@pytest.mark.parametrize("shape", [(480, 832), (100, 150), (224, 224), (37, 301)])
def test_bicubic_matches_torch(shape):
    x = np.random.default_rng(1).uniform(-1, 1, (2, *shape, 3)).astype(np.float32)
    got = np.asarray(resize_bicubic(jnp.asarray(x), (224, 224)))
    # torch in float64 is the exact reference; torch's float32 kernel rounds its source coordinates to f32
    # (about 3e-5 relative error on its own), so against it only a looser bound holds.
    assert rel_err(got, _torch_bicubic(x, (224, 224), torch.float64)) <= 1e-6
    assert rel_err(got, _torch_bicubic(x, (224, 224), torch.float32)) <= 1e-4


def test_preprocess_matches_wan_pipeline():
    """[-1, 1] -> bicubic 224 -> x*0.5+0.5 -> Normalize(mean, std), as Wan's CLIPModel.visual does in torch."""
    x = np.random.default_rng(2).uniform(-1, 1, (1, 270, 480, 3)).astype(np.float32)
    t = F.interpolate(torch.from_numpy(x).double().permute(0, 3, 1, 2), size=(224, 224), mode="bicubic",
                      align_corners=False)
    mean, std = (torch.tensor(v, dtype=torch.float64)[:, None, None] for v in (CLIP_MEAN, CLIP_STD))
    t = (t * 0.5 + 0.5 - mean) / std
    got = np.asarray(preprocess_frames(jnp.asarray(x)))
    assert rel_err(got, t.permute(0, 2, 3, 1).numpy()) <= 1e-6


def test_encode_frames_and_bad_inputs():
    model = CLIPVisionTower(clip_variant("tiny"), dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
    frames = np.random.default_rng(3).uniform(-1, 1, (2, 64, 96, 3)).astype(np.float32)
    feats = encode_frames(model, frames)
    assert feats.shape == (2, 257, 32) and np.isfinite(feats).all()
    direct = jax.jit(lambda m, f: m(preprocess_frames(f)))(model, jnp.asarray(frames))
    np.testing.assert_allclose(feats, np.asarray(direct), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="normalised images"):
        model(jnp.zeros((1, 200, 200, 3)))
    with pytest.raises(ValueError, match=r"\[B, H, W, 3\]"):
        preprocess_frames(jnp.zeros((1, 3, 64, 64)))
    with pytest.raises(ValueError, match="output_layer"):
        CLIPVisionConfig(output_layer=33)


def test_config_round_trip():
    cfg = clip_variant("vit-h-14")
    assert CLIPVisionConfig.from_dict(cfg.to_dict()) == cfg
    assert (cfg.num_tokens, cfg.width, cfg.output_layer) == (257, 1280, 31)


def test_vit_h_param_count_matches_transformers():
    """Our tower = transformers' ViT-H/14 vision model minus its last block and post-norm (Wan's use_31_block)."""
    from transformers import CLIPVisionConfig as HFConfig
    from transformers import CLIPVisionModel

    cfg = clip_variant("vit-h-14")
    abstract = nnx.eval_shape(lambda: CLIPVisionTower(cfg, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16,
                                                      rngs=nnx.Rngs(0)))
    with torch.device("meta"):
        ref = CLIPVisionModel(HFConfig(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                                       num_attention_heads=16, image_size=224, patch_size=14, hidden_act="gelu"))
    vm = ref.vision_model if hasattr(ref, "vision_model") else ref
    total = sum(p.numel() for p in ref.parameters())
    unused = sum(p.numel() for p in vm.encoder.layers[-1].parameters()) + sum(
        p.numel() for p in vm.post_layernorm.parameters())
    assert count_params(abstract) == total - unused
