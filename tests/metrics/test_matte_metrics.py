"""omnijax/metrics/matte.py against float64 references written independently (loops, sets, skimage)."""

import math

import numpy as np
import pytest
from skimage.metrics import peak_signal_noise_ratio

from omnijax.metrics import matte


def _clip(seed, shape=(3, 9, 7)):
    rng = np.random.default_rng(seed)
    return rng.uniform(size=shape), rng.uniform(size=shape)


def test_alpha_mae_and_iou():
    pred, gt = _clip(0)
    ref_mae = sum(abs(float(a) - float(b)) for a, b in zip(pred.ravel(), gt.ravel())) / pred.size
    assert matte.alpha_mae(pred, gt) == pytest.approx(ref_mae, rel=1e-6)
    p = {i for i, v in enumerate(pred.ravel()) if v > 0.5}
    g = {i for i, v in enumerate(gt.ravel()) if v > 0.5}
    assert matte.alpha_iou(pred, gt) == pytest.approx(len(p & g) / len(p | g), rel=1e-12)
    assert matte.alpha_iou(np.zeros((2, 4, 4)), np.zeros((2, 4, 4))) == 1.0
    with pytest.raises(ValueError, match="differ in shape"):
        matte.alpha_mae(pred, gt[:1])


def test_effect_recall():
    pred, _ = _clip(1)
    region = np.random.default_rng(2).uniform(size=pred.shape) > 0.6
    hits = sum(1 for a, r in zip(pred.ravel(), region.ravel()) if r and a > 0.1)
    assert matte.effect_recall(pred, region) == pytest.approx(hits / region.sum(), rel=1e-12)
    assert math.isnan(matte.effect_recall(pred, np.zeros_like(region)))


def test_psnr_matches_skimage_and_masked_reference():
    rng = np.random.default_rng(3)
    a, b = rng.uniform(size=(2, 8, 8, 3)), rng.uniform(size=(2, 8, 8, 3))
    assert matte.psnr(a, b) == pytest.approx(peak_signal_noise_ratio(b, a, data_range=1.0), abs=1e-4)
    mask = rng.uniform(size=(2, 8, 8)) > 0.5
    err = [(a[f, y, x, c] - b[f, y, x, c]) ** 2 for f in range(2) for y in range(8) for x in range(8)
           for c in range(3) if mask[f, y, x]]
    assert matte.masked_psnr(a, b, mask) == pytest.approx(10 * math.log10(1.0 / np.mean(err)), abs=1e-4)
    assert math.isnan(matte.masked_psnr(a, b, np.zeros((2, 8, 8), bool)))
    assert matte.psnr(a, a) == matte.MAX_DB
