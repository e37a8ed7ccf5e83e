"""load_wan_vae: key coverage of the original (`Wan2.1_VAE.pth`) and diffusers formats, files on disk, and the
errors for missing, unexpected and mis-shaped keys and for unsafe pickles.

The original-format state dict is made from the diffusers one by an inverse rename written here from
shared/spec/wan.md §2.2 (independent of converters/tables/wan_vae.py).
"""

import json
import re

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from converters import ConversionError, UnsafeCheckpointError, load_wan_vae
from omnijax.models.wan.vae import vae_variant
from omnijax.params import flat_params
from tests.torch_refs import to_numpy_state


def _diffusers_state(seed=0):
    from diffusers import AutoencoderKLWan

    torch.manual_seed(seed)
    ref = AutoencoderKLWan(base_dim=8, z_dim=16)
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_()  # every tensor distinct, so a wrong pairing of keys cannot go unseen
    return to_numpy_state(ref)


_RES = {"norm1.gamma": "residual.0.gamma", "conv1": "residual.2", "norm2.gamma": "residual.3.gamma",
        "conv2": "residual.6", "conv_shortcut": "shortcut"}


def _res(rest: str) -> str:
    for d, o in _RES.items():
        if rest == d or rest.startswith(d + "."):
            return o + rest[len(d):]
    return rest  # resample.1.* and time_conv.* keep their names


def to_original(key: str) -> str:
    """diffusers AutoencoderKLWan key -> original Wan2.1_VAE.pth key (spec §2.2), num_res_blocks = 2."""
    if m := re.fullmatch(r"(quant_conv|post_quant_conv)\.(\w+)", key):
        return {"quant_conv": "conv1", "post_quant_conv": "conv2"}[m[1]] + "." + m[2]
    part, rest = key.split(".", 1)
    if m := re.fullmatch(r"conv_in\.(\w+)", rest):
        return f"{part}.conv1.{m[1]}"
    if rest == "norm_out.gamma":
        return f"{part}.head.0.gamma"
    if m := re.fullmatch(r"conv_out\.(\w+)", rest):
        return f"{part}.head.2.{m[1]}"
    if m := re.fullmatch(r"mid_block\.resnets\.(\d)\.(.+)", rest):
        return f"{part}.middle.{2 * int(m[1])}.{_res(m[2])}"
    if m := re.fullmatch(r"mid_block\.attentions\.0\.(.+)", rest):
        return f"{part}.middle.1.{m[1]}"
    if m := re.fullmatch(r"down_blocks\.(\d+)\.(.+)", rest):
        return f"encoder.downsamples.{m[1]}.{_res(m[2])}"
    if m := re.fullmatch(r"up_blocks\.(\d)\.resnets\.(\d)\.(.+)", rest):
        return f"decoder.upsamples.{4 * int(m[1]) + int(m[2])}.{_res(m[3])}"
    if m := re.fullmatch(r"up_blocks\.(\d)\.upsamplers\.0\.(.+)", rest):
        return f"decoder.upsamples.{4 * int(m[1]) + 3}.{m[2]}"
    raise AssertionError(f"no original name for {key}")


@pytest.fixture(scope="module")
def states():
    df = _diffusers_state()
    original = {to_original(k): v for k, v in df.items()}
    assert len(original) == len(df)
    return df, original


def _params(model):
    return {k: np.asarray(v.get_value()) for k, v in flat_params(model).items()}


def test_spec_examples_of_the_inverse_rename():
    assert to_original("decoder.up_blocks.1.resnets.0.conv_shortcut.weight") == "decoder.upsamples.4.shortcut.weight"
    assert to_original("decoder.up_blocks.2.upsamplers.0.resample.1.bias") == "decoder.upsamples.11.resample.1.bias"
    assert to_original("encoder.down_blocks.5.time_conv.weight") == "encoder.downsamples.5.time_conv.weight"
    assert to_original("encoder.mid_block.attentions.0.norm.gamma") == "encoder.middle.1.norm.gamma"


@pytest.mark.parametrize("prefix", ["", "model."])
def test_original_and_diffusers_formats_give_identical_params(states, prefix):
    df, original = states
    cfg_df, m_df = load_wan_vae(df, dtype=jnp.float32, param_dtype=jnp.float32)
    cfg_or, m_or = load_wan_vae({prefix + k: v for k, v in original.items()}, dtype=jnp.float32,
                                param_dtype=jnp.float32)
    assert cfg_df == cfg_or == vae_variant("tiny")
    a, b = _params(m_df), _params(m_or)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    # every checkpoint tensor lands somewhere: the sum of element counts matches, and values are the layouts of §2.4
    assert sum(v.size for v in a.values()) == sum(v.size for v in df.values())
    np.testing.assert_array_equal(a["encoder.conv_in.kernel"], df["encoder.conv_in.weight"].transpose(2, 3, 4, 1, 0))
    np.testing.assert_array_equal(a["decoder.up_blocks.0.upsampler.conv.kernel"],
                                  df["decoder.up_blocks.0.upsamplers.0.resample.1.weight"].transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(a["encoder.mid_block.attentions.0.to_qkv.kernel"],
                                  df["encoder.mid_block.attentions.0.to_qkv.weight"][:, :, 0, 0].T)
    np.testing.assert_array_equal(a["decoder.norm_out.scale"], df["decoder.norm_out.gamma"].reshape(-1))


def test_missing_unexpected_and_misshaped_keys_are_named(states):
    df, original = states
    cfg = vae_variant("tiny")
    broken = dict(original)
    del broken["decoder.upsamples.7.time_conv.weight"]
    broken["encoder.downsamples.3.residual.2.bias"] = np.zeros(5, np.float32)
    broken["decoder.extra_head.weight"] = np.zeros(3, np.float32)
    with pytest.raises(ConversionError) as e:
        load_wan_vae(broken, cfg, dtype=jnp.float32, param_dtype=jnp.float32)
    msg = str(e.value)
    assert "decoder.up_blocks.1.upsampler.time_conv.kernel" in msg  # missing
    assert "encoder.downsamples.3.residual.2.bias" in msg and "wrong shape" in msg
    assert "decoder.extra_head.weight" in msg and "unexpected" in msg


def test_pth_file_and_diffusers_directory(states, tmp_path):
    df, original = states
    path = tmp_path / "Wan2.1_VAE.pth"
    torch.save({k: torch.from_numpy(v) for k, v in original.items()}, path)
    cfg, model = load_wan_vae(path, dtype=jnp.float32, param_dtype=jnp.float32)
    assert cfg == vae_variant("tiny")

    from safetensors.numpy import save_file

    d = tmp_path / "vae"
    d.mkdir()
    save_file(df, str(d / "diffusion_pytorch_model.safetensors"))
    mean = [0.5] * 16
    (d / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKLWan", "latents_mean": mean,
                                               "latents_std": [2.0] * 16}))
    cfg2, model2 = load_wan_vae(d, dtype=jnp.float32, param_dtype=jnp.bfloat16)
    assert cfg2.latents_mean == tuple(mean) and cfg2.latents_std == (2.0,) * 16
    p = flat_params(model2)["decoder.conv_out.kernel"].get_value()
    assert p.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(p, np.float32),
                                  np.asarray(jnp.asarray(_params(model)["decoder.conv_out.kernel"], jnp.bfloat16),
                                             np.float32))


class _Payload:
    """Anything a weights-only unpickler must refuse to construct."""

    def __reduce__(self):
        return (print, ("this code must not run",))


def test_unsafe_pickle_is_refused(tmp_path):
    path = tmp_path / "Wan2.1_VAE.pth"
    torch.save({"encoder.conv1.weight": torch.zeros(8, 3, 3, 3, 3), "payload": _Payload()}, path)
    with pytest.raises(UnsafeCheckpointError, match="weights-only"):
        load_wan_vae(path)
