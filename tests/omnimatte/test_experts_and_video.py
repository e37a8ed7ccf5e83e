"""The table of expert kinds (impossible combinations refused) and decompose_video around a Decomposer."""

import jax
import numpy as np
import pytest

from omnijax.io.video import to_uint8
from omnijax.omnimatte.decompose import decompose_video, pingpong_indices
from omnijax.omnimatte.experts import EXPERT_KINDS, ExpertConfig, effect_expert, quality_expert


def test_kinds_fix_mask_and_blocks():
    assert effect_expert(30).mask == "B" and quality_expert(30).mask == "C"
    assert effect_expert(30, 4).blocks == (26, 27, 28, 29) and quality_expert(7).blocks == tuple(range(7))
    assert effect_expert(30).background_in_training and not quality_expert(30).background_in_training
    with pytest.raises(ValueError, match="'effect' uses attention mask 'B'"):
        ExpertConfig("effect", 4, 4.0, (1,), "C")
    with pytest.raises(ValueError, match="K .* applies to the Effect Expert"):
        EXPERT_KINDS["quality"].config(30, 5)
    with pytest.raises(ValueError, match="K must be in 1..30"):
        EXPERT_KINDS["effect"].config(30, 31)


class FakeDecomposer:
    """Stands in for the models: background = the clip's per-pixel temporal mean, alpha = the mask."""

    def __init__(self):
        self.calls = []

    def __call__(self, video, masks, settings, *, prompt="", timings=None, clock=None):
        self.calls.append((video.shape, masks.shape))
        return np.repeat(video.mean(0, keepdims=True), len(video), 0), masks.astype(np.float32)


def test_decompose_video_any_size_and_frame_count():
    rng = np.random.default_rng(0)
    n, h, w = 6, 40, 72  # 6 frames -> 9 (4k+1); 40x72 -> processed at 32x64 (height 32)
    video = rng.integers(0, 256, (n, h, w, 3), dtype=np.uint8)
    masks = np.zeros((2, n, h, w), np.uint8)
    masks[0, :, 5:20, 10:30] = 255
    masks[1, :, 25:35, 40:70] = 255
    dec = FakeDecomposer()
    layers = decompose_video(dec, video, masks, height=32)
    assert dec.calls == [((9, 32, 64, 3), (2, 9, 32, 64))]
    assert layers.processing_size == (32, 64) and layers.processing_frames == 9
    assert layers.background.shape == (n, h, w, 3) and layers.alphas.shape == (2, n, h, w)
    assert layers.foregrounds.shape == (2, n, h, w, 3) and len(layers.psnr) == 2
    # Recomposition PSNR by its definition on the returned layers.
    v = video.astype(np.float32) / 255
    for k in range(2):
        a = layers.alphas[k][..., None]
        comp = a * layers.foregrounds[k] + (1 - a) * layers.background
        want = 10 * np.log10(1.0 / np.mean((comp - v) ** 2))
        assert abs(layers.psnr[k] - want) < 0.05, (layers.psnr[k], want)
    assert pingpong_indices(6, 9).tolist() == [0, 1, 2, 3, 4, 5, 4, 3, 2]
    # uint8=True (what the CLI writes files from): the same layers converted on the device, as the writers would
    # convert the floats on the host; the PSNR is the float layers' own. (Another compiled program: a float may
    # differ in its last bit and land on the other side of a rounding edge, so one level is allowed, rarely.)
    as8 = decompose_video(dec, video, masks, height=32, uint8=True)
    for name in ("background", "alphas", "foregrounds"):
        got, want = getattr(as8, name), to_uint8(getattr(layers, name))
        diff = np.abs(got.astype(int) - want)
        assert got.dtype == np.uint8 and diff.max() <= 1 and (diff == 0).mean() > 0.999, name
    assert as8.psnr == pytest.approx(layers.psnr, rel=1e-5)
    with pytest.raises(ValueError, match="do not match the video"):
        decompose_video(dec, video, masks[:, :5], height=32)


@pytest.mark.slow
def test_set_experts_reuses_the_compiled_sampler(tmp_path):
    """A trainer preview: new adapter values go through the same executable (no retrace), and they are used."""
    from converters import registry
    from omnijax.omnimatte.decompose import Decomposer, SamplerSettings
    from tests.omnimatte.helpers import experts, randomize_lora_b, tiny_base

    base = tiny_base()
    effect, quality = experts(base)
    vae = registry.load("wan_vae", "tiny", dtype="f32")[1]
    cond = registry.conditioner(str(tmp_path), text_encoder=registry.load("umt5", "tiny", dtype="f32")[1],
                                image_encoder=registry.load("wan_clip", "tiny", dtype="f32")[1], tokenizer="tiny")
    dec = Decomposer(effect, quality, vae, cond, attention_backend="xla")
    rng = np.random.default_rng(1)
    video = rng.random((5, 32, 32, 3)).astype(np.float32)
    masks = np.zeros((1, 5, 32, 32), np.float32)
    masks[:, :, 8:20, 8:20] = 1
    settings = SamplerSettings(steps=2)
    first = decompose_video(dec, video, masks, settings, height=32)
    traces = dec.sampler_traces
    assert traces >= 1
    randomize_lora_b(effect)
    dec.set_experts(effect, quality)
    second = decompose_video(dec, video, masks, settings, height=32)
    assert dec.sampler_traces == traces
    assert np.abs(second.alphas - first.alphas).max() > 1e-6  # the new adapter values are used
    with pytest.raises(ValueError, match="differ in structure"):
        dec.set_experts(quality, effect)


def test_device_uint8_matches_the_writers_conversion():
    """omnijax.omnimatte.decompose.to_uint8 (on the device) gives the values omnijax.io.video.to_uint8 (the
    writers', on the host) gives, at every rounding boundary: (k + 1/2) / 255 rounds half to even in both."""
    from omnijax.omnimatte.decompose import to_uint8 as device_uint8

    edges = (np.arange(256, dtype=np.float32) + 0.5) / 255
    x = np.concatenate([edges, np.nextafter(edges, 0), np.nextafter(edges, 1), np.linspace(-0.5, 1.5, 4001),
                        np.random.default_rng(0).random(10_000)]).astype(np.float32)
    got = np.asarray(jax.jit(device_uint8)(x))
    assert got.dtype == np.uint8 and np.array_equal(got, to_uint8(x))
