"""Flux LoRA files: exact round trips in both formats, the ComfyUI layout written out by hand, named errors."""

import jax
import numpy as np
import pytest
from flax import nnx

from omnijax.conditioning import read_safetensors, write_safetensors
from omnijax.models.flux.lora import FluxLoRA, lora_spec
from omnijax.models.flux.lora_files import LoRAFileError, load_lora, save_lora
from omnijax.models.flux.variants import variant

CFG = variant("tiny", depth=1, depth_single_blocks=1)


def _lora():
    lora = FluxLoRA(CFG, lora_spec(CFG, 3, 6.0, targets=("img_attn.qkv", "linear1")), rngs=nnx.Rngs(0))
    for i, ad in enumerate(lora.adapters().values()):
        ad.lora_b[...] = jax.random.normal(jax.random.key(i), ad.lora_b.shape)
    return lora


@pytest.mark.parametrize("fmt", ["omnijax", "comfy"])
def test_round_trip_is_exact(tmp_path, fmt):
    lora = _lora()
    path = save_lora(str(tmp_path / f"l_{fmt}.safetensors"), lora, fmt, extra=dict(icd=dict(fg_ids="axis0")))
    back, extra = load_lora(path, CFG)
    assert back.spec == lora.spec
    for (k, a), (k2, b) in zip(lora.adapters().items(), back.adapters().items()):
        assert k == k2
        np.testing.assert_array_equal(a.lora_a[...], b.lora_a[...])
        np.testing.assert_array_equal(a.lora_b[...], b.lora_b[...])
    assert extra["icd"] == dict(fg_ids="axis0")


def test_comfy_layout(tmp_path):
    lora = _lora()
    tensors, _ = read_safetensors(save_lora(str(tmp_path / "c.safetensors"), lora, "comfy"))
    ad = lora.adapters()["double_blocks.0.img_attn.qkv"]
    p = "diffusion_model.double_blocks.0.img_attn.qkv"
    np.testing.assert_array_equal(tensors[p + ".lora_A.weight"], np.asarray(ad.lora_a[...]).T)  # [R, I]
    np.testing.assert_array_equal(tensors[p + ".lora_B.weight"], np.asarray(ad.lora_b[...]).T)  # [O, R]
    assert tensors[p + ".alpha"].item() == 6.0
    assert len(tensors) == 3 * len(lora.adapters())


def test_named_errors(tmp_path):
    bad = str(tmp_path / "bad.safetensors")
    write_safetensors(bad, {"double_blocks.0.img_attn.qkv.lora_a": np.zeros((5, 2), np.float32),
                            "double_blocks.0.img_attn.qkv.lora_b": np.zeros((2, 192), np.float32)})
    with pytest.raises(LoRAFileError, match="img_attn.qkv"):
        load_lora(bad, CFG)
    write_safetensors(bad, {"double_blocks.0.nothing.lora_a": np.zeros((64, 2), np.float32),
                            "double_blocks.0.nothing.lora_b": np.zeros((2, 64), np.float32)})
    with pytest.raises(LoRAFileError, match="nothing"):
        load_lora(bad, CFG)
    (tmp_path / "junk.safetensors").write_bytes(b"not a file")
    with pytest.raises(LoRAFileError, match="readable"):
        load_lora(str(tmp_path / "junk.safetensors"), CFG)
