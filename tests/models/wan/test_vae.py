"""WanVAE against diffusers' AutoencoderKLWan (tiny, random, f32): encoder mean, posterior sample and decoder
output at F = 1, 5, 9, 17 on a non-square frame; streamed == whole-sequence; tiled ~ untiled; bad inputs.

diffusers returns UN-normalised latents; the tests normalise them here with the spec's constants (wan.md §5.1),
written out independently of omnijax's copy.
"""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from converters import load_wan_vae
from omnijax.models.wan.vae import VAEConfig, WanVAE, pad_video, vae_variant
from omnijax.models.wan.vae_tiling import TILE_TOLERANCE, TileSpec, tile_starts, tiled_apply
from omnijax.params import count_params
from tests.torch_refs import rel_err, to_numpy_state

SPEC_MEAN = np.array([-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508, 0.4134, -0.0715, 0.5517,
                      -0.3632, -0.1922, -0.9497, 0.2503, -0.2921], np.float32)
SPEC_STD = np.array([2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743, 3.2687, 2.1526, 2.8652, 1.5579,
                     1.6382, 1.1253, 2.8251, 1.9160], np.float32)
# XLA's CPU backend spends most of a test's time compiling this conv-heavy graph; its cheapest optimisation level
# compiles about 3x faster and computes the same f32 values.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
H, W = 16, 24  # non-square, multiples of 8


def diffusers_vae(base_dim=8, seed=0):
    """A tiny AutoencoderKLWan with every parameter random (gammas around 1); the decoder's output conv is scaled
    down so that few output values reach the [-1, 1] clamp (a saturated output would hide differences)."""
    from diffusers import AutoencoderKLWan

    ref = AutoencoderKLWan(base_dim=base_dim, z_dim=16).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            noise = torch.randn(p.shape, generator=g) * 0.2
            p.copy_(1.0 + noise if name.endswith("gamma") else noise * (0.1 if "decoder.conv_out" in name else 1.0))
    return ref


def _to_torch(x):
    return torch.from_numpy(np.ascontiguousarray(x)).permute(0, 4, 1, 2, 3)


def _to_jax_layout(t):
    return t.permute(0, 2, 3, 4, 1).numpy()


@pytest.fixture(scope="module")
def pair():
    ref = diffusers_vae()
    cfg, model = load_wan_vae(to_numpy_state(ref), dtype=jnp.float32, param_dtype=jnp.float32)
    assert cfg == vae_variant("tiny")
    graphdef, state = nnx.split(model)

    @partial(jax.jit, static_argnames=("mode", "frames_per_step"), compiler_options=FAST_COMPILE)
    def roundtrip(state, video, latents, key, mode, frames_per_step=1):
        m = nnx.merge(graphdef, state)
        kw = dict(mode=mode, tile=None, frames_per_step=frames_per_step)
        mean = m.encode(video, **kw)
        sample = m.encode(video, sample_key=key, **kw)
        return mean, sample, m.decode(latents, **kw)

    return ref, model, partial(roundtrip, state)


def _reference(ref, video):
    with torch.no_grad():
        post = ref.encode(_to_torch(video)).latent_dist
        mu, logvar = _to_jax_layout(post.mean), _to_jax_layout(post.logvar)
        out = _to_jax_layout(ref.decode(post.mean).sample)
    return mu, logvar, out


def _video(f, seed=0):
    return np.random.default_rng(seed).uniform(-1, 1, (1, f, H, W, 3)).astype(np.float32)


@pytest.mark.parametrize("frames", [1, 5, 9, 17])
def test_parity_with_diffusers(pair, frames):
    ref, _, roundtrip = pair
    video = _video(frames)
    mu, logvar, want_video = _reference(ref, video)
    want = (mu - SPEC_MEAN) / SPEC_STD
    # Decode the reference's normalised mean, so the decoder is checked on exactly the reference's input.
    key = jax.random.key(3)
    mean, sample, got_video = roundtrip(video, want, key, mode="whole")
    assert mean.shape == (1, (frames - 1) // 4 + 1, H // 8, W // 8, 16)
    assert rel_err(mean, want) <= 1e-5, rel_err(mean, want)
    assert got_video.shape == want_video.shape == video.shape
    assert np.mean(np.abs(want_video) >= 1.0) < 0.05  # the comparison is not hidden by the clamp
    assert rel_err(got_video, want_video) <= 1e-5, rel_err(got_video, want_video)
    # The posterior sample carries the reference quirk: un-normalised std added to the normalised mean.
    eps = np.asarray(jax.random.normal(key, want.shape, jnp.float32))
    want_sample = want + np.exp(0.5 * np.clip(logvar, -30, 20)) * eps
    assert rel_err(sample, want_sample) <= 1e-5, rel_err(sample, want_sample)


@pytest.mark.parametrize("frames_per_step", [1, 3])
def test_streamed_equals_whole_sequence(pair, frames_per_step):
    """17 frames: encode chunks 1,4,4,4,4 (or 1, 12 + a 4-frame tail) and decode 1,1,1,1,1 (or 1, 3 + 1 tail)."""
    ref, _, roundtrip = pair
    video = _video(17, seed=1)
    latents = np.random.default_rng(2).standard_normal((1, 5, H // 8, W // 8, 16)).astype(np.float32)
    key = jax.random.key(0)
    whole = roundtrip(video, latents, key, mode="whole")
    stream = roundtrip(video, latents, key, mode="stream", frames_per_step=frames_per_step)
    for a, b in zip(stream, whole):
        assert rel_err(a, b) <= 1e-5, rel_err(a, b)


def test_streamed_decode_memory_does_not_grow_with_length():
    """XLA's own buffer plan: streamed temp memory grows only by the output frames, whole-sequence by far more."""
    # Abstract weights: only the compiled buffer plan is inspected (an eager random init costs a compile per shape).
    abstract = nnx.eval_shape(lambda: WanVAE(vae_variant("tiny"), dtype=jnp.float32, param_dtype=jnp.float32,
                                             rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)

    def plan(mode, t):
        z = jax.ShapeDtypeStruct((1, t, 4, 6, 16), jnp.float32)
        fn = jax.jit(lambda s, z: nnx.merge(graphdef, s).decode(z, mode=mode, tile=None))
        m = fn.lower(state, z).compile(compiler_options=FAST_COMPILE).memory_analysis()
        return m.temp_size_in_bytes, m.output_size_in_bytes

    (s3, o3), (s9, o9) = plan("stream", 3), plan("stream", 9)
    (w3, _), (w9, _) = plan("whole", 3), plan("whole", 9)
    assert s9 - s3 <= 2 * (o9 - o3), (s3, s9, o3, o9)
    assert w9 - w3 > 4 * (s9 - s3), (w3, w9, s3, s9)


def test_tile_layout():
    assert tile_starts(20, 32, 8) == (20, [0])
    size, starts = tile_starts(90, 64, 12)  # 720p latent height
    assert size <= 64 and starts[0] == 0 and starts[-1] + size == 90
    assert all(b - a <= size - 12 for a, b in zip(starts, starts[1:]))  # overlap >= 12
    size, starts = tile_starts(160, 64, 12)
    assert size <= 64 and starts[-1] + size == 160 and all(b - a <= size - 12 for a, b in zip(starts, starts[1:]))


def test_tiled_blend_is_exact_for_a_local_map():
    """A map with no spatial context (per-pixel linear + nearest 8x upsample): tiling must change nothing."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((1, 2, 20, 28, 4)), jnp.float32)
    mix = jnp.asarray(rng.standard_normal((4, 3)), jnp.float32)

    def fn(t):
        y = jnp.einsum("bthwc,cd->bthwd", t, mix)
        return jnp.repeat(jnp.repeat(y, 8, axis=2), 8, axis=3)

    got = tiled_apply(fn, x, TileSpec(tile=9, overlap=3), scale_in=1, scale_out=8)
    np.testing.assert_allclose(got, fn(x), rtol=1e-6, atol=1e-6)


def test_tiled_decode_and_encode_close_to_untiled(pair):
    _, model, _ = pair
    z = jnp.asarray(np.random.default_rng(0).standard_normal((1, 1, 24, 32, 16)), jnp.float32)
    graphdef, state = nnx.split(model)
    decode = jax.jit(lambda s, z, tile: nnx.merge(graphdef, s).decode(z, mode="whole", tile=tile),
                     static_argnames="tile", compiler_options=FAST_COMPILE)
    full = decode(state, z, None)
    tiled = decode(state, z, TileSpec(tile=16, overlap=8))
    assert tiled.shape == full.shape == (1, 1, 192, 256, 3)
    err = rel_err(tiled, full)
    assert 0 < err <= TILE_TOLERANCE, err
    # one tile covering the whole frame is the untiled decode
    np.testing.assert_allclose(decode(state, z, TileSpec(tile=32, overlap=8)), full, rtol=1e-5, atol=1e-5)

    video = jnp.asarray(np.random.default_rng(1).uniform(-1, 1, (1, 1, 192, 256, 3)), jnp.float32)
    encode = jax.jit(lambda s, v, tile: nnx.merge(graphdef, s).encode(v, mode="whole", tile=tile),
                     static_argnames="tile", compiler_options=FAST_COMPILE)
    full = encode(state, video, None)
    err = rel_err(encode(state, video, TileSpec(tile=16, overlap=8)), full)
    assert 0 < err <= TILE_TOLERANCE, err


def test_bad_inputs_raise_named_errors(pair):
    _, model, _ = pair
    with pytest.raises(ValueError, match="4k\\+1 frames"):
        model.encode(jnp.zeros((1, 6, H, W, 3)))
    with pytest.raises(ValueError, match="not a multiple of 8"):
        model.encode(jnp.zeros((1, 5, 12, W, 3)))
    with pytest.raises(ValueError, match="video must be"):
        model.encode(jnp.zeros((5, H, W, 3)))
    with pytest.raises(ValueError, match="latents must be"):
        model.decode(jnp.zeros((1, 2, 2, 3, 4)))
    with pytest.raises(ValueError, match="mode must be"):
        model.decode(jnp.zeros((1, 2, 2, 3, 16)), mode="chunked")
    with pytest.raises(ValueError, match="frames_per_step"):
        model.decode(jnp.zeros((1, 2, 2, 3, 16)), frames_per_step=0)
    with pytest.raises(ValueError, match="unknown VAE variant"):
        vae_variant("wan2.2")


def test_pad_video_repeats_edges_and_never_drops():
    video = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (1, 6, 12, 17, 3)), jnp.float32)
    padded, (f, h, w) = pad_video(video)
    assert padded.shape == (1, 9, 16, 24, 3) and (f, h, w) == (6, 12, 17)
    np.testing.assert_array_equal(padded[:, :6, :12, :17], video)
    np.testing.assert_array_equal(padded[:, 8, :12, :17], video[:, 5])  # the last frame repeated
    np.testing.assert_array_equal(padded[:, :6, 15, :17], video[:, :, 11])  # the bottom row repeated


def test_config_round_trip():
    cfg = vae_variant("wan2.1")
    assert VAEConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.base_dim == 96 and cfg.dim_mult == (1, 2, 4, 4) and cfg.temporal_downsample == (False, True, True)
    np.testing.assert_allclose(cfg.latents_mean, SPEC_MEAN)
    np.testing.assert_allclose(cfg.latents_std, SPEC_STD)


def test_full_size_params_and_shapes_match_diffusers():
    from diffusers import AutoencoderKLWan

    cfg = vae_variant("wan2.1")
    abstract = nnx.eval_shape(lambda: WanVAE(cfg, rngs=nnx.Rngs(0)))
    with torch.device("meta"):
        ref = AutoencoderKLWan()
    assert count_params(abstract) == sum(p.numel() for p in ref.parameters())
    video = jax.ShapeDtypeStruct((1, 81, 480, 832, 3), jnp.bfloat16)
    z = nnx.eval_shape(lambda m, v: m.encode(v), abstract, video)
    assert z.shape == (1, 21, 60, 104, 16)
    out = nnx.eval_shape(lambda m, z: m.decode(z), abstract, z)
    assert out.shape == (1, 81, 480, 832, 3)
