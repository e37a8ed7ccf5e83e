"""Wan DiT converters: both key formats, prefixes, sharded bf16 safetensors, named errors, the convert CLI."""

import json
import os
import pickle

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from converters import ConversionError, UnsafeCheckpointError, load_wan_dit
from converters.registry import convert_to_folder
from omnijax.checkpoint import load_pretrained
from omnijax.models.wan import variant
from omnijax.params import flat_params
from tests.torch_refs import diffusers_wan, randomize_

# diffusers -> original Wan names, written independently from spec §2.1 (the converter uses its own table).
_DF_TO_WAN = [
    ("condition_embedder.text_embedder.linear_1", "text_embedding.0"),
    ("condition_embedder.text_embedder.linear_2", "text_embedding.2"),
    ("condition_embedder.time_embedder.linear_1", "time_embedding.0"),
    ("condition_embedder.time_embedder.linear_2", "time_embedding.2"),
    ("condition_embedder.time_proj", "time_projection.1"),
    ("condition_embedder.image_embedder.norm1", "img_emb.proj.0"),
    ("condition_embedder.image_embedder.ff.net.0.proj", "img_emb.proj.1"),
    ("condition_embedder.image_embedder.ff.net.2", "img_emb.proj.3"),
    ("condition_embedder.image_embedder.norm2", "img_emb.proj.4"),
    ("attn1.to_out.0", "self_attn.o"), ("attn2.to_out.0", "cross_attn.o"),
    ("attn1.to_", "self_attn."), ("attn2.to_", "cross_attn."), ("attn1.norm_", "self_attn.norm_"),
    ("attn2.add_k_proj", "cross_attn.k_img"), ("attn2.add_v_proj", "cross_attn.v_img"),
    ("attn2.norm_added_k", "cross_attn.norm_k_img"), ("attn2.norm_", "cross_attn.norm_"),
    ("ffn.net.0.proj", "ffn.0"), ("ffn.net.2", "ffn.2"), ("proj_out", "head.head"),
]


def to_wan_names(sd):
    out = {}
    for k, v in sd.items():
        if k == "scale_shift_table":
            k = "head.modulation"
        elif k.endswith(".scale_shift_table"):
            k = k.replace("scale_shift_table", "modulation")
        elif k.startswith("blocks.") and ".norm2." in k:  # diffusers' block norm2 is Wan's cross-attention norm3
            k = k.replace(".norm2.", ".norm3.")
        for a, b in _DF_TO_WAN:
            if a in k:
                k = k.replace(a, b)
                break
        out[k] = v
    return out


@pytest.fixture(scope="module")
def ref_state():
    torch.manual_seed(0)
    ref = randomize_(diffusers_wan(i2v=True))
    return {k: v.detach().clone() for k, v in ref.state_dict().items()}


def _params(model):
    return {k: np.asarray(v.get_value()) for k, v in flat_params(model).items()}


def test_both_formats_load_to_identical_params(ref_state):
    cfg = variant("tiny-inp")
    _, a = load_wan_dit(ref_state, cfg, dtype=jnp.float32, param_dtype=jnp.float32)
    wan = to_wan_names(ref_state)
    assert set(wan) != set(ref_state)
    _, b = load_wan_dit(wan, cfg, dtype=jnp.float32, param_dtype=jnp.float32)
    pa, pb = _params(a), _params(b)
    assert pa.keys() == pb.keys()
    for k in pa:
        np.testing.assert_array_equal(pa[k], pb[k], err_msg=k)
    # Spot-check layouts against torch directly: Linear transposed, Conv3d to [t,h,w,I,O], norm3 <- diffusers norm2.
    np.testing.assert_array_equal(pa["blocks.1.self_attn.q.kernel"], ref_state["blocks.1.attn1.to_q.weight"].numpy().T)
    np.testing.assert_array_equal(pa["patch_embedding.kernel"][0, 1, 0, 5],
                                  ref_state["patch_embedding.weight"][:, 5, 0, 1, 0].numpy())
    np.testing.assert_array_equal(pa["blocks.0.norm3.scale"], ref_state["blocks.0.norm2.weight"].numpy())


def test_config_needs_heads_when_not_inferable(ref_state):
    # Heads are not in the weights; Wan's head_dim is 128, which a 64-wide test model cannot have.
    with pytest.raises(ValueError, match="num_heads"):
        load_wan_dit(to_wan_names(ref_state), dtype=jnp.float32, param_dtype=jnp.float32)


def test_sharded_bf16_comfyui_safetensors(tmp_path, ref_state):
    wan = {"model.diffusion_model." + k: v.to(torch.bfloat16).contiguous() for k, v in to_wan_names(ref_state).items()}
    keys = sorted(wan)
    half = len(keys) // 2
    files = {"diffusion_pytorch_model-00001-of-00002.safetensors": keys[:half],
             "diffusion_pytorch_model-00002-of-00002.safetensors": keys[half:]}
    for name, ks in files.items():
        save_file({k: wan[k] for k in ks}, str(tmp_path / name))
    with open(tmp_path / "diffusion_pytorch_model.safetensors.index.json", "w") as f:
        json.dump({"weight_map": {k: n for n, ks in files.items() for k in ks}}, f)
    with open(tmp_path / "config.json", "w") as f:
        json.dump({"_class_name": "WanModel", "num_heads": 2, "dim": 64}, f)
    cfg, model = load_wan_dit(str(tmp_path))
    assert cfg == variant("tiny-inp")
    p = _params(model)
    q = p["blocks.0.self_attn.q.kernel"]
    assert q.dtype == jnp.bfloat16
    want = ref_state["blocks.0.attn1.to_q.weight"].to(torch.bfloat16).float().numpy().T
    np.testing.assert_array_equal(q.astype(np.float32), want)
    assert p["blocks.0.modulation"].dtype == np.float32  # f32 island


def test_named_errors(ref_state):
    cfg = variant("tiny-inp")
    bad = dict(ref_state)
    del bad["blocks.1.attn1.to_k.bias"]
    bad["blocks.0.ffn.net.2.weight"] = torch.zeros(3, 3)
    bad["blocks.0.attn1.extra.weight"] = torch.zeros(1)
    with pytest.raises(ConversionError) as e:
        load_wan_dit(bad, cfg, dtype=jnp.float32, param_dtype=jnp.float32)
    msg = str(e.value)
    assert "missing" in msg and "blocks.1.self_attn.k.bias" in msg
    assert "wrong shape" in msg and "blocks.0.ffn.net.2.weight" in msg
    assert "unexpected" in msg and "blocks.0.attn1.extra.weight" in msg
    with pytest.raises(ConversionError, match="does not have"):  # a third block the config lacks
        extra = dict(ref_state, **{"blocks.2.attn1.to_q.bias": torch.zeros(64)})
        load_wan_dit(extra, cfg, dtype=jnp.float32, param_dtype=jnp.float32)


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_pickles_are_weights_only(tmp_path, ref_state):
    good = tmp_path / "good.pth"
    torch.save({"state_dict": to_wan_names(ref_state)}, good)
    _, model = load_wan_dit(str(good), variant("tiny-inp"), dtype=jnp.float32, param_dtype=jnp.float32)
    assert "blocks.1.ffn.linear_2.kernel" in _params(model)
    evil = tmp_path / "evil.pth"
    torch.save({"x": _Evil()}, evil)
    legacy = tmp_path / "legacy_evil.pth"
    with open(legacy, "wb") as f:
        pickle.dump({"x": _Evil()}, f)
    for path in (evil, legacy):
        with pytest.raises(UnsafeCheckpointError, match="weights-only"):
            load_wan_dit(str(path))


def write_wan_source(tmp_path, ref_state) -> str:
    """A tiny original-Wan-keyed .safetensors with its config.json beside it (also used by tests/launch)."""
    src = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in to_wan_names(ref_state).items()}, str(src))
    with open(tmp_path / "config.json", "w") as f:
        json.dump({"num_heads": 2}, f)
    return str(src)


def test_convert_to_folder_writes_restorable_checkpoint(tmp_path, ref_state):
    src = write_wan_source(tmp_path, ref_state)
    out = tmp_path / "converted"
    assert convert_to_folder("wan_dit", src, str(out), param_dtype="f32")[0] == str(out)
    with pytest.raises(FileExistsError):  # no silent overwrite
        convert_to_folder("wan_dit", src, str(out))
    cfg, restored = load_pretrained(str(out), kind="wan_dit", dtype=jnp.float32, param_dtype=jnp.float32)
    _, direct = load_wan_dit(str(src), dtype=jnp.float32, param_dtype=jnp.float32)
    assert cfg == direct.config
    rng = np.random.default_rng(0)
    args = (rng.standard_normal((1, 2, 4, 4, 16)), np.array([300.0]), rng.standard_normal((1, 5, 32)),
            rng.standard_normal((1, 257, 32)), rng.standard_normal((1, 2, 4, 4, 20)))
    np.testing.assert_array_equal(restored(*args), direct(*args))
    assert not [p for p in os.listdir(tmp_path) if ".tmp-" in p]


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        convert_to_folder("wan_dit", str(tmp_path / "nope.safetensors"), str(tmp_path / "o"))
    assert not (tmp_path / "o").exists()
    with pytest.raises(FileNotFoundError, match="launch/convert.py"):
        load_pretrained(str(tmp_path))


def test_sharded_restore(tmp_path, ref_state):
    """Restoring with shardings places params across the 8 fake devices directly."""
    _, model = load_wan_dit(ref_state, variant("tiny-inp"), dtype=jnp.float32, param_dtype=jnp.float32)
    from omnijax.checkpoint import save_pretrained

    save_pretrained(str(tmp_path / "c"), model, "wan_dit")
    mesh = jax.make_mesh((8,), ("fsdp",), axis_types=(jax.sharding.AxisType.Auto,))
    spec = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, "fsdp"))
    _, m2 = load_pretrained(str(tmp_path / "c"), dtype=jnp.float32, param_dtype=jnp.float32,
                            shardings={"blocks.0.ffn.linear_1.kernel": spec})
    k = flat_params(m2)["blocks.0.ffn.linear_1.kernel"].get_value()
    assert k.sharding == spec
    np.testing.assert_array_equal(np.asarray(k), _params(model)["blocks.0.ffn.linear_1.kernel"])
