"""Alpha <-> grey video, foreground recovery, trimask and the 4-channel latent mask (vs torch interpolate)."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as tnf

from omnijax.omnimatte import alpha as A
from omnijax.omnimatte import masks as M


def test_alpha_video_round_trip_and_range():
    rng = np.random.default_rng(0)
    alpha = rng.uniform(0, 1, (2, 3, 4, 5)).astype(np.float32)
    video = np.asarray(A.alpha_to_video(alpha))
    assert video.shape == (2, 3, 4, 5, 3) and video.min() >= -1 and video.max() <= 1
    np.testing.assert_allclose(video[..., 1], 2 * alpha - 1, atol=1e-7)
    # Decoding averages the channels: a per-channel perturbation with zero mean leaves alpha unchanged.
    noisy = video + np.array([0.1, -0.05, -0.05], np.float32)
    np.testing.assert_allclose(np.asarray(A.video_to_alpha(noisy)), alpha, atol=1e-6)
    assert float(A.video_to_alpha(np.full((1, 1, 1, 3), 3.0)).max()) == 1.0
    with pytest.raises(ValueError, match="3 channels"):
        A.video_to_alpha(np.zeros((1, 2, 2, 4)))


def test_foreground_recovery_inverts_compositing():
    rng = np.random.default_rng(1)
    fg, bg = rng.uniform(0, 1, (2, 3, 4, 4, 3)), rng.uniform(0, 1, (2, 3, 4, 4, 3))
    alpha = rng.uniform(0.2, 1, (2, 3, 4, 4))
    video = alpha[..., None] * fg + (1 - alpha[..., None]) * bg
    rec = np.asarray(A.recover_foreground(video, alpha, bg))
    np.testing.assert_allclose(rec, fg, atol=2e-5)
    assert float(A.recomposition_psnr(video, rec, alpha, bg)) > 80
    # Where alpha is 0 the foreground is undefined: eq. 2 gives clip(V - B) / eps, clipped to [0, 1].
    rec0 = np.asarray(A.recover_foreground(video, np.zeros_like(alpha), bg))
    expected = np.clip(np.clip(video - bg, 0, 1) / 1e-6, 0, 1)
    np.testing.assert_allclose(rec0, expected, atol=1e-6)
    p = float(A.psnr(np.zeros(4), np.full(4, 0.1)))
    assert abs(p - 20.0) < 1e-4  # 10 log10(1 / 0.01)
    with pytest.raises(ValueError, match="alpha"):
        A.recover_foreground(video, alpha[..., :2], bg)


def _brute_dilate(m, width):
    out = np.zeros_like(m)
    lo, hi = (width - 1) // 2, width // 2
    hh, ww = m.shape[-2:]
    for y in range(hh):
        for x in range(ww):
            out[..., y, x] = m[..., max(0, y - lo):y + hi + 1, max(0, x - lo):x + hi + 1].max(axis=(-2, -1))
    return out


def test_removal_mask_binarises_dilates_and_unions():
    rng = np.random.default_rng(2)
    objs = (rng.uniform(0, 1, (2, 3, 12, 14)) > 0.97).astype(np.float32) * rng.uniform(0.9, 1.0, (2, 3, 12, 14))
    m = np.asarray(M.removal_mask(objs, dilation=5))
    binary = (objs >= 240 / 255).astype(np.float32)
    expected_union = _brute_dilate(binary, 5).max(axis=0)
    np.testing.assert_array_equal(m == 1.0, expected_union > 0)
    np.testing.assert_allclose(m[expected_union == 0], 127 / 255)
    np.testing.assert_array_equal(np.asarray(M.dilate(binary, 4)), _brute_dilate(binary, 4))
    with pytest.raises(ValueError, match="K, F, H, W"):
        M.removal_mask(np.zeros((2, 2)))


@pytest.mark.parametrize("frames", [1, 9])
def test_latent_mask_matches_torch_trilinear(frames):
    rng = np.random.default_rng(3)
    b, hh, ww = 2, 32, 48
    m = rng.uniform(0, 1, (b, frames, hh, ww)).astype(np.float32)
    ours = np.asarray(M.latent_mask(m))
    # The reference pipeline: [B, 1, F, H, W], frame-0 x4 packing, [B, 4, k+1, H, W], 1 - m, trilinear resize.
    t = torch.from_numpy(m)[:, None]
    t = torch.cat([t[:, :, :1].repeat(1, 1, 4, 1, 1), t[:, :, 1:]], dim=2)
    k1 = t.shape[2] // 4
    t = t.view(b, k1, 4, hh, ww).transpose(1, 2)
    ref = tnf.interpolate(1 - t, size=(k1, hh // 8, ww // 8), mode="trilinear", align_corners=False)
    ref = ref.permute(0, 2, 3, 4, 1).numpy()
    assert ours.shape == (b, k1, hh // 8, ww // 8, 4)
    np.testing.assert_allclose(ours, ref, atol=1e-6)
    # And per frame as a plain bilinear (no antialias) resize.
    bil = tnf.interpolate(1 - torch.from_numpy(m[:, :1]), size=(hh // 8, ww // 8), mode="bilinear",
                          align_corners=False, antialias=False).numpy()
    np.testing.assert_allclose(ours[:, 0, :, :, 0], bil[:, 0], atol=1e-6)


def test_latent_mask_errors_and_condition_packing():
    with pytest.raises(ValueError, match="4k"):
        M.latent_mask(np.zeros((1, 4, 16, 16)))
    with pytest.raises(ValueError, match="multiples of 8"):
        M.latent_mask(np.zeros((1, 5, 12, 16)))
    y = M.condition_y(jnp.zeros((1, 2, 3, 4, 4)), jnp.ones((1, 2, 3, 4, 16)))
    assert y.shape == (1, 2, 3, 4, 20) and float(y[..., :4].sum()) == 0 and float(y[..., 4:].min()) == 1
