"""FluxVAE against diffusers' AutoencoderKL (Flux config: 16 latents, no quant convs; tiny, random, f32) in
both checkpoint formats, the tiled decode, and the latent packing against diffusers' FluxPipeline packing."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from converters import load_flux_vae
from omnijax.models.flux.vae import (
    TILE_TOLERANCE,
    FluxVAE,
    flux_vae_variant,
    image_ids,
    pack_latents,
    unpack_latents,
)
from omnijax.models.wan.vae_tiling import TileSpec
from tests.torch_refs import randomize_, rel_err, to_numpy_state

SCALE, SHIFT = 0.3611, 0.1159


def hf_vae(seed=0):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    ref = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(16, 32), layers_per_block=1,
                        latent_channels=16, norm_num_groups=8, use_quant_conv=False, use_post_quant_conv=False,
                        scaling_factor=SCALE, shift_factor=SHIFT)
    return randomize_(ref, seed=seed, scale=0.1).eval()


def bfl_state(ref) -> dict:
    """diffusers AutoencoderKL state -> BFL `ae.safetensors` names (explicit inverse rename, not the tables)."""
    sd = {k: v.clone() for k, v in ref.state_dict().items()}
    levels = len(ref.config.block_out_channels)
    out = {}

    def res(src, dst):
        for n, m in (("norm1", "norm1"), ("conv1", "conv1"), ("norm2", "norm2"), ("conv2", "conv2"),
                     ("conv_shortcut", "nin_shortcut")):
            for kind in ("weight", "bias"):
                if f"{src}.{n}.{kind}" in sd:
                    out[f"{dst}.{m}.{kind}"] = sd.pop(f"{src}.{n}.{kind}")

    for part in ("encoder", "decoder"):
        for kind in ("weight", "bias"):
            out[f"{part}.conv_in.{kind}"] = sd.pop(f"{part}.conv_in.{kind}")
            out[f"{part}.conv_out.{kind}"] = sd.pop(f"{part}.conv_out.{kind}")
            out[f"{part}.norm_out.{kind}"] = sd.pop(f"{part}.conv_norm_out.{kind}")
            a = f"{part}.mid_block.attentions.0"
            out[f"{part}.mid.attn_1.norm.{kind}"] = sd.pop(f"{a}.group_norm.{kind}")
            for n, m in (("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out")):
                w = sd.pop(f"{a}.{n}.{kind}")
                out[f"{part}.mid.attn_1.{m}.{kind}"] = w[:, :, None, None] if kind == "weight" else w
        res(f"{part}.mid_block.resnets.0", f"{part}.mid.block_1")
        res(f"{part}.mid_block.resnets.1", f"{part}.mid.block_2")
    for i in range(levels):
        for j in range(ref.config.layers_per_block + 1):
            res(f"encoder.down_blocks.{i}.resnets.{j}", f"encoder.down.{i}.block.{j}")
            res(f"decoder.up_blocks.{i}.resnets.{j}", f"decoder.up.{levels - 1 - i}.block.{j}")
        for kind in ("weight", "bias"):
            if f"encoder.down_blocks.{i}.downsamplers.0.conv.{kind}" in sd:
                out[f"encoder.down.{i}.downsample.conv.{kind}"] = sd.pop(
                    f"encoder.down_blocks.{i}.downsamplers.0.conv.{kind}")
            if f"decoder.up_blocks.{i}.upsamplers.0.conv.{kind}" in sd:
                out[f"decoder.up.{levels - 1 - i}.upsample.conv.{kind}"] = sd.pop(
                    f"decoder.up_blocks.{i}.upsamplers.0.conv.{kind}")
    assert not sd, f"inverse rename missed {sorted(sd)}"
    return {k: v.numpy() for k, v in out.items()}


@pytest.fixture(scope="module")
def ref():
    return hf_vae()


def _load(state):
    return load_flux_vae(state, flux_vae_variant("tiny"), dtype=jnp.float32, param_dtype=jnp.float32)[1]


@pytest.fixture(scope="module")
def model(ref):
    return _load(to_numpy_state(ref))


def test_bfl_format_gives_the_same_parameters(model, ref):
    """The forward parity below runs on the diffusers-format load; the BFL load must fill every param identically."""
    from omnijax.params import flat_params

    want = {k: np.asarray(v.get_value()) for k, v in flat_params(model).items()}
    got = {k: np.asarray(v.get_value()) for k, v in flat_params(_load(bfl_state(ref))).items()}
    assert got.keys() == want.keys()
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)


def test_encode_decode_parity(model, ref):
    x = np.random.default_rng(0).uniform(-1, 1, (2, 32, 48, 3)).astype(np.float32)
    with torch.no_grad():
        mean = ref.encode(torch.as_tensor(x).permute(0, 3, 1, 2)).latent_dist.mean
        want_z = ((mean - SHIFT) * SCALE).permute(0, 2, 3, 1).numpy()
    got_z = np.asarray(jax.jit(lambda m, a: m.encode(a))(model, jnp.asarray(x)))
    assert got_z.shape == (2, 16, 24, 16)
    assert rel_err(got_z, want_z) <= 1e-5, rel_err(got_z, want_z)

    z = np.random.default_rng(1).standard_normal((2, 8, 12, 16)).astype(np.float32)
    with torch.no_grad():
        raw = ref.decode(torch.as_tensor(z).permute(0, 3, 1, 2) / SCALE + SHIFT).sample.permute(0, 2, 3, 1).numpy()
    got = np.asarray(jax.jit(lambda m, a: m.decode(a, tile=None))(model, jnp.asarray(z)))
    assert rel_err(got, raw.clip(-1, 1)) <= 1e-5, rel_err(got, raw.clip(-1, 1))
    # Unclamped too, so values beyond [-1, 1] are compared as well (decoder only; the unscale is SCALE/SHIFT).
    got_raw = np.asarray(jax.jit(lambda m, a: m.decoder(a[:, None] / SCALE + SHIFT)[:, 0])(model, jnp.asarray(z)))
    assert rel_err(got_raw, raw) <= 1e-5, rel_err(got_raw, raw)


def test_tiled_decode_close_to_whole(model):
    z = jnp.asarray(np.random.default_rng(2).standard_normal((1, 24, 32, 16)).astype(np.float32))
    whole = np.asarray(jax.jit(lambda m, a: m.decode(a, tile=None))(model, z))
    tiled = np.asarray(jax.jit(lambda m, a: m.decode(a, tile=TileSpec(16, 8)))(model, z))
    err = rel_err(tiled, whole)
    assert 0 < err <= TILE_TOLERANCE, err


def test_pack_matches_diffusers_and_round_trips():
    from diffusers import FluxPipeline

    z = np.random.default_rng(3).standard_normal((2, 6, 10, 16)).astype(np.float32)
    want = FluxPipeline._pack_latents(torch.as_tensor(z).permute(0, 3, 1, 2), 2, 16, 6, 10).numpy()
    packed = pack_latents(jnp.asarray(z))
    np.testing.assert_array_equal(np.asarray(packed), want)
    np.testing.assert_array_equal(np.asarray(unpack_latents(packed, 6, 10)), z)
    ids = FluxPipeline._prepare_latent_image_ids(2, 3, 5, "cpu", torch.float32).numpy()
    np.testing.assert_array_equal(np.asarray(image_ids(6, 10, batch=2)), np.broadcast_to(ids, (2, 15, 3)))


def test_config_inferred_from_weights(ref, tmp_path):
    from safetensors.numpy import save_file

    save_file(bfl_state(ref), str(tmp_path / "ae.safetensors"))
    (tmp_path / "config.json").write_text('{"norm_num_groups": 8, "scaling_factor": 0.5}')
    config, _ = load_flux_vae(str(tmp_path / "ae.safetensors"), dtype=jnp.float32, param_dtype=jnp.float32)
    assert config == flux_vae_variant("tiny", scaling_factor=0.5)


def test_bad_inputs(model):
    with pytest.raises(ValueError, match="multiple of 2"):
        model.encode(jnp.zeros((1, 33, 32, 3)))
    with pytest.raises(ValueError, match=r"latents must be \[B, H, W, 16\]"):
        model.decode(jnp.zeros((1, 8, 8, 4)))
    with pytest.raises(ValueError, match="even"):
        pack_latents(jnp.zeros((1, 3, 4, 16)))
    with pytest.raises(ValueError, match="unknown Flux VAE variant"):
        flux_vae_variant("sdxl")


def test_full_size_shapes():
    from flax import nnx

    graphdef, state = nnx.split(nnx.eval_shape(lambda: FluxVAE(flux_vae_variant("flux"), rngs=nnx.Rngs(0))))
    img = jax.ShapeDtypeStruct((1, 256, 256, 3), jnp.float32)
    z = jax.eval_shape(lambda s, x: nnx.merge(graphdef, s).encode(x), state, img)
    assert z.shape == (1, 32, 32, 16)
    assert jax.eval_shape(lambda s, x: nnx.merge(graphdef, s).decode(x), state, z).shape == img.shape
