"""Layer metrics against independent references: skimage, and float64 formulas written here."""

import math

import numpy as np
import pytest
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from omnijax.metrics import image as M


def _pair(seed=0, shape=(23, 31, 3), noise=0.1):
    r = np.random.default_rng(seed)
    gt = r.uniform(0, 1, shape)
    pred = np.clip(gt + r.normal(0, noise, shape), 0, 1)
    return pred, gt


def _ssim_zero_pad_reference(x, y):
    """pytorch_ssim's definition, directly: an 11×11 Gaussian (σ 1.5) window, zero padding, mean of the map."""
    g = np.exp(-((np.arange(11) - 5.0) ** 2) / (2 * 1.5 ** 2))
    win = np.outer(g, g) / np.outer(g, g).sum()
    h, w, c = x.shape

    def conv(a):
        p = np.pad(a, ((5, 5), (5, 5), (0, 0)))
        out = np.zeros_like(a)
        for dy in range(11):
            for dx in range(11):
                out += win[dy, dx] * p[dy:dy + h, dx:dx + w]
        return out

    mx, my = conv(x), conv(y)
    vx, vy, cxy = conv(x * x) - mx ** 2, conv(y * y) - my ** 2, conv(x * y) - mx * my
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    return float((((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2))).mean())


@pytest.mark.parametrize("shape", [(23, 31, 3), (16, 16, 1)])
def test_ssim_valid_matches_skimage(shape):
    pred, gt = _pair(1, shape)
    want = structural_similarity(pred, gt, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                                 data_range=1.0, channel_axis=-1)
    assert M.ssim(pred, gt, padding="valid") == pytest.approx(want, abs=1e-10)


def test_ssim_zero_padding_matches_pytorch_ssim_definition():
    pred, gt = _pair(2)
    assert M.ssim(pred, gt) == pytest.approx(_ssim_zero_pad_reference(pred, gt), abs=1e-12)
    assert M.ssim(gt, gt) == pytest.approx(1.0, abs=1e-12)
    # uint8 inputs are read as /255
    u = np.rint(gt * 255).astype(np.uint8)
    assert M.ssim(u, u // 2) == pytest.approx(_ssim_zero_pad_reference(u / 255.0, (u // 2) / 255.0), abs=1e-12)


def test_rmse_masked_rmse_psnr_closed_forms():
    gt = np.full((8, 10, 3), 0.5)
    pred = gt + 0.1
    assert M.rmse(pred, gt) == pytest.approx(25.6)                       # 0.1 × 256, not × 255
    assert M.psnr(pred, gt) == pytest.approx(20.0)
    assert M.psnr(gt, gt) == 100.0
    mask = np.zeros((8, 10))
    mask[:4, :5] = 1                                                    # a quarter of the image
    pred2 = gt.copy()
    pred2[:4, :5] += 0.2
    assert M.masked_rmse(pred2, gt, mask) == pytest.approx(0.2 * 256)
    assert M.rmse(pred2, gt) == pytest.approx(math.sqrt(0.25 * 0.04) * 256)
    assert math.isnan(M.masked_rmse(pred2, gt, np.zeros((8, 10))))
    with pytest.raises(ValueError, match="must be equal"):
        M.rmse(pred, gt[:4])


def test_psnr_matches_skimage_and_mean_skips_nan():
    pred, gt = _pair(3)
    assert M.psnr(pred, gt) == pytest.approx(peak_signal_noise_ratio(gt, pred, data_range=1.0), abs=1e-10)
    rows = [dict(rmse=1.0, rmse_w=float("nan")), dict(rmse=3.0, rmse_w=4.0)]
    assert M.mean_metrics(rows) == dict(rmse=2.0, rmse_w=4.0)
