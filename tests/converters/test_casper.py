"""Casper on a Fun-InP base: the fine-tuned transformer file (1.3B) and the kohya LoRA merge (14B), with files
written here in the formats gen-omnimatte-public / VideoX-Fun produce (shared/spec/wan.md §2.3, §4.4)."""

import json

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from converters import load_casper_wan_dit, load_wan_dit
from converters.casper import CasperError
from converters.registry import convert_to_folder
from omnijax.checkpoint import load_pretrained
from omnijax.models.wan import variant
from omnijax.params import flat_params
from tests.converters.test_wan_dit import to_wan_names
from tests.torch_refs import diffusers_wan, randomize_

F32 = dict(dtype=jnp.float32, param_dtype=jnp.float32)
CFG = variant("tiny-inp")


def _vxf_state(seed):
    """A tiny random Fun-InP transformer in VideoX-Fun (original Wan) keys, torch f32 tensors."""
    torch.manual_seed(seed)
    ref = randomize_(diffusers_wan(i2v=True), seed=seed)
    return {k: v.detach().clone().contiguous() for k, v in to_wan_names(ref.state_dict()).items()}


@pytest.fixture(scope="module")
def states():
    return _vxf_state(0), _vxf_state(1)


@pytest.fixture
def base_dir(tmp_path, states):
    d = tmp_path / "Wan2.1-Fun-tiny-InP"
    d.mkdir()
    save_file(states[0], str(d / "diffusion_pytorch_model.safetensors"))
    with open(d / "config.json", "w") as f:
        json.dump({"_class_name": "WanModel", "num_heads": 2, "dim": 64}, f)
    return d


def _params(model):
    return {k: np.asarray(v.get_value()) for k, v in flat_params(model).items()}


def _assert_same_params(a, b):
    pa, pb = _params(a), _params(b)
    assert pa.keys() == pb.keys()
    for k in pa:
        np.testing.assert_array_equal(pa[k], pb[k], err_msg=k)


@pytest.mark.parametrize("fmt", ["safetensors", "pth_wrapped", "pth"])
def test_transformer_file_replaces_the_base(tmp_path, base_dir, states, fmt):
    base, casper = states
    if fmt == "safetensors":
        path = tmp_path / "casper.safetensors"
        save_file(casper, str(path))
    else:  # gen-omnimatte-public unwraps {"state_dict": ...} before load_state_dict
        path = tmp_path / "casper.pth"
        torch.save({"state_dict": casper, "epoch": 3} if fmt == "pth_wrapped" else casper, path)
    cfg, model = load_casper_wan_dit(str(base_dir), str(path), **F32)
    assert cfg == CFG  # heads from the base's config.json
    p = _params(model)
    # Every weight is Casper's, in our layouts (Linear transposed, Conv3d to [t, h, w, I, O]).
    np.testing.assert_array_equal(p["blocks.1.self_attn.q.kernel"], casper["blocks.1.self_attn.q.weight"].numpy().T)
    np.testing.assert_array_equal(p["blocks.0.cross_attn.k_img.kernel"],
                                  casper["blocks.0.cross_attn.k_img.weight"].numpy().T)
    np.testing.assert_array_equal(p["patch_embedding.kernel"],
                                  casper["patch_embedding.weight"].numpy().transpose(2, 3, 4, 1, 0))
    np.testing.assert_array_equal(p["head.modulation"], casper["head.modulation"].numpy())
    _assert_same_params(model, load_wan_dit(casper, CFG, **F32)[1])
    assert not np.array_equal(p["blocks.1.self_attn.q.kernel"], base["blocks.1.self_attn.q.weight"].numpy().T)


def test_partial_transformer_file_keeps_the_rest_of_the_base(tmp_path, base_dir, states):
    """VideoX-Fun loads the file with strict=False: base tensors the file lacks keep their values."""
    base, casper = states
    kept = ("blocks.1.ffn.2.weight", "img_emb.proj.1.bias", "head.modulation")
    path = tmp_path / "partial.safetensors"
    save_file({k: v for k, v in casper.items() if k not in kept}, str(path))
    _, model = load_casper_wan_dit(str(base_dir), str(path), **F32)
    p = _params(model)
    np.testing.assert_array_equal(p["blocks.1.ffn.linear_2.kernel"], base["blocks.1.ffn.2.weight"].numpy().T)
    np.testing.assert_array_equal(p["condition.img_emb.mlp.linear_1.bias"], base["img_emb.proj.1.bias"].numpy())
    np.testing.assert_array_equal(p["head.modulation"], base["head.modulation"].numpy())
    np.testing.assert_array_equal(p["blocks.1.ffn.linear_1.kernel"], casper["blocks.1.ffn.0.weight"].numpy().T)


def test_diffusers_base_with_videox_fun_casper(tmp_path, states):
    """The two files are matched by the weight they fill, not by key spelling."""
    _, casper = states
    torch.manual_seed(0)
    df_base = {k: v.detach().clone() for k, v in randomize_(diffusers_wan(i2v=True), seed=5).state_dict().items()}
    _, model = load_casper_wan_dit(df_base, casper, config=CFG, **F32)
    _assert_same_params(model, load_wan_dit(casper, CFG, **F32)[1])


# VideoX-Fun's LoRA targets are every nn.Linear of the transformer (spec §2.3); a few of each kind, by their
# original Wan module paths. Names are "lora_unet_" + "_" + path with '.' -> '_' (the root module's name is empty).
_LORA_MODULES = {
    "blocks.0.self_attn.q": 8.0, "blocks.1.self_attn.o": 8.0, "blocks.1.cross_attn.k_img": 2.0,
    "blocks.0.cross_attn.v": None, "blocks.1.ffn.0": 4.0, "blocks.0.ffn.2": 4.0, "text_embedding.2": 4.0,
    "time_projection.1": 4.0, "head.head": 4.0, "img_emb.proj.3": 4.0,
}
RANK = 4


def _kohya_lora(base, seed=0, dtype=torch.bfloat16):
    """{key: tensor} as VideoX-Fun's LoRANetwork.save_weights writes it (bf16, alpha as a 0-d tensor)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for module, alpha in _LORA_MODULES.items():
        o, i = base[module + ".weight"].shape
        name = "lora_unet__" + module.replace(".", "_")
        out[name + ".lora_down.weight"] = (torch.randn(RANK, i, generator=g) / i ** 0.5).to(dtype)
        out[name + ".lora_up.weight"] = (torch.randn(o, RANK, generator=g) * 0.3).to(dtype)
        if alpha is not None:
            out[name + ".alpha"] = torch.tensor(alpha).to(dtype)
    return out


def _merged_by_hand(base, lora, weight):
    """W + weight * (alpha / rank) * up @ down in float32 (weight alone without alpha), in torch layout."""
    out = {k: v.float().numpy() for k, v in base.items()}
    for module, alpha in _LORA_MODULES.items():
        name = "lora_unet__" + module.replace(".", "_")
        up = lora[name + ".lora_up.weight"].float().numpy()
        down = lora[name + ".lora_down.weight"].float().numpy()
        scale = weight * (1.0 if alpha is None else alpha / RANK)
        out[module + ".weight"] = out[module + ".weight"] + np.float32(scale) * (up @ down)
    return out


@pytest.mark.parametrize("weight", [1.0, 0.6])
def test_kohya_lora_merges_as_videox_fun(tmp_path, base_dir, states, weight):
    base = states[0]
    lora = _kohya_lora(base)
    path = tmp_path / "casper_lora.safetensors"
    save_file(lora, str(path), metadata={"sshs_model_hash": "0"})
    _, model = load_casper_wan_dit(str(base_dir), lora=str(path), lora_weight=weight, **F32)
    want = _merged_by_hand(base, lora, weight)
    _assert_same_params(model, load_wan_dit(want, CFG, **F32)[1])
    p = _params(model)
    np.testing.assert_allclose(p["blocks.1.cross_attn.k_img.kernel"], want["blocks.1.cross_attn.k_img.weight"].T,
                               rtol=0, atol=0)
    # Unadapted weights and every bias are the base's.
    np.testing.assert_array_equal(p["blocks.0.self_attn.k.kernel"], base["blocks.0.self_attn.k.weight"].numpy().T)
    np.testing.assert_array_equal(p["blocks.0.self_attn.q.bias"], base["blocks.0.self_attn.q.bias"].numpy())
    assert not np.array_equal(p["blocks.0.self_attn.q.kernel"], base["blocks.0.self_attn.q.weight"].numpy().T)


def test_bf16_merge_rounds_once(base_dir, states):
    """As VideoX-Fun: upcast the bf16 weight, add the f32 delta, round to bf16 once."""
    base = states[0]
    lora = _kohya_lora(base)
    bf_base = {k: v.to(torch.bfloat16) for k, v in base.items()}
    _, model = load_casper_wan_dit(bf_base, lora=lora, config=CFG)
    want = _merged_by_hand(bf_base, lora, 1.0)
    got = _params(model)["blocks.1.ffn.linear_1.kernel"]
    assert got.dtype == jnp.bfloat16
    np.testing.assert_array_equal(got, want["blocks.1.ffn.0.weight"].T.astype(ml_dtypes.bfloat16))


def _one_line_error(match, *args, **kw):
    with pytest.raises(CasperError, match=match) as e:
        load_casper_wan_dit(*args, config=CFG, **F32, **kw)
    assert "\n" not in str(e.value)
    return str(e.value)


def test_named_one_line_errors(tmp_path, base_dir, states):
    base, casper = states
    lora = _kohya_lora(base)
    bad = dict(lora)
    for elem in ("lora_down.weight", "lora_up.weight"):  # a block the 2-block base does not have
        bad[f"lora_unet__blocks_7_self_attn_q.{elem}"] = lora[f"lora_unet__blocks_0_self_attn_q.{elem}"].clone()
    del bad["lora_unet__head_head.lora_up.weight"]
    bad["lora_te_encoder_block_0_layer_0_SelfAttention_q.lora_down.weight"] = torch.zeros(4, 8)
    path = tmp_path / "bad_lora.safetensors"
    save_file(bad, str(path))
    msg = _one_line_error("bad_lora.safetensors", str(base_dir), lora=str(path))
    assert "lora_unet__blocks_7_self_attn_q (the base has no such Linear)" in msg
    assert "lora_unet__head_head (needs both" in msg and "text-encoder" in msg
    wrong = dict(lora, **{"lora_unet__blocks_0_ffn_2.lora_down.weight": torch.zeros(RANK, 5)})
    assert "does not fit the weight" in _one_line_error("lora_unet__blocks_0_ffn_2", str(base_dir), lora=wrong)
    # A transformer file with a mis-shaped tensor, one the base lacks, or a LoRA given as the transformer.
    t = dict(casper, **{"blocks.0.ffn.0.weight": torch.zeros(3, 3), "blocks.0.extra.weight": torch.zeros(2)})
    msg = _one_line_error("do not fit", str(base_dir), t)
    assert "blocks.0.ffn.0.weight (3, 3)" in msg and "blocks.0.extra.weight (not a Wan DiT weight)" in msg
    assert "--casper-lora" in _one_line_error("none of its", str(base_dir), lora)
    with pytest.raises(CasperError, match="transformer file .* or a LoRA"):
        load_casper_wan_dit(str(base_dir))


def write_casper_files(tmp_path, states):
    """Casper's 1.3B transformer (.pth) and a 14B-style kohya LoRA for the base (also used by tests/launch)."""
    base, casper = states
    t_path, l_path = tmp_path / "casper.pth", tmp_path / "casper_lora.safetensors"
    torch.save({"state_dict": casper}, t_path)
    lora = _kohya_lora(base)
    save_file(lora, str(l_path))
    return t_path, l_path, lora


def test_convert_to_folder_one_call_each(tmp_path, base_dir, states):
    base, casper = states
    t_path, l_path, lora = write_casper_files(tmp_path, states)
    run = lambda out, **kw: convert_to_folder("wan_dit", str(base_dir), str(tmp_path / out), param_dtype="f32", **kw)
    run("c13", casper=str(t_path))
    run("c14", casper_lora=str(l_path))
    _, m13 = load_pretrained(str(tmp_path / "c13"), kind="wan_dit", **F32)
    _assert_same_params(m13, load_wan_dit(casper, CFG, **F32)[1])
    _, m14 = load_pretrained(str(tmp_path / "c14"), kind="wan_dit", **F32)
    _assert_same_params(m14, load_wan_dit(_merged_by_hand(base, lora, 1.0), CFG, **F32)[1])
    with open(tmp_path / "c14" / "omnijax.json") as f:
        header = json.load(f)
    assert header["casper_lora"] == str(l_path) and header["lora_weight"] == 1.0
    with pytest.raises(ValueError, match="wan_dit"):
        convert_to_folder("wan_vae", str(base_dir), str(tmp_path / "x"), casper=str(t_path))
    with pytest.raises(CasperError):  # a transformer is not a LoRA
        run("y", casper_lora=str(t_path))
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
