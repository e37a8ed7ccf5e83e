"""Image-quality metrics of layer decomposition: RMSE (×256) and masked RMSE, PSNR, SSIM (spec/flux.md §5).

The conventions are the LOGO protocol's (SLBR `evaluation.py`, `pytorch_ssim`), which DiffDecompose's tables
follow (its LOGO RMSEs of 2-3 are on this ×256 scale):
- images are float in [0, 1] (uint8 inputs are divided by 255);
- RMSE = √(mean squared error over pixels and channels) × 256 (the protocol's 256, not 255);
- masked RMSE (RMSEw) = √(Σ squared error inside the mask ÷ (mask pixels × channels)) × 256; NaN for an empty
  mask (averages skip it);
- PSNR = 10·log10(1 / MSE), capped at `max_db` (100) for identical images so reports stay finite JSON;
- SSIM: 11×11 Gaussian window, σ = 1.5, C1 = (0.01·L)², C2 = (0.03·L)², per channel, the mean of the SSIM map.
  padding="zero" is `pytorch_ssim` (zero padding, map over every pixel, the LOGO numbers); padding="valid"
  keeps only pixels whose window lies inside the image, which equals skimage's structural_similarity with
  gaussian_weights=True, sigma=1.5, use_sample_covariance=False.
All arithmetic is float64 numpy: evaluation runs on host over image folders, where exactness matters more than
speed, and the library (omnijax/) may not depend on scipy. Axis letters: H height, W width, C channels.
"""

from __future__ import annotations

import math

import numpy as np

RMSE_SCALE = 256.0


def as_float(img) -> np.ndarray:
    """float64 [H, W, C] in [0, 1] from uint8 or float; a [H, W] image gets C = 1."""
    a = np.asarray(img)
    a = a.astype(np.float64) / 255.0 if a.dtype == np.uint8 else a.astype(np.float64)
    return a[..., None] if a.ndim == 2 else a


def _pair(pred, gt) -> tuple[np.ndarray, np.ndarray]:
    p, g = as_float(pred), as_float(gt)
    if p.shape != g.shape or p.ndim != 3:
        raise ValueError(f"prediction {p.shape} and ground truth {g.shape} must be equal [H, W, C] shapes")
    return p, g


def mse(pred, gt) -> float:
    p, g = _pair(pred, gt)
    return float(np.mean((p - g) ** 2))


def rmse(pred, gt, scale: float = RMSE_SCALE) -> float:
    """√MSE × scale (256 in the LOGO protocol)."""
    return math.sqrt(mse(pred, gt)) * scale


def masked_rmse(pred, gt, mask, scale: float = RMSE_SCALE) -> float:
    """RMSE over the pixels where mask > 0.5 (all channels); NaN when the mask is empty. mask [H, W]."""
    p, g = _pair(pred, gt)
    m = np.asarray(mask, np.float64)
    if m.shape != p.shape[:2]:
        raise ValueError(f"mask {m.shape} does not match the image {p.shape[:2]}")
    m = m > 0.5
    n = int(m.sum())
    if n == 0:
        return float("nan")
    return math.sqrt(float(((p - g) ** 2)[m].sum()) / (n * p.shape[2])) * scale


def psnr(pred, gt, data_range: float = 1.0, max_db: float = 100.0) -> float:
    """10·log10(L² / MSE) in dB, capped at max_db."""
    e = mse(pred, gt)
    return max_db if e == 0 else min(max_db, 10.0 * math.log10(data_range ** 2 / e))


def gaussian_window(size: int = 11, sigma: float = 1.5) -> np.ndarray:
    """The normalised 1-D Gaussian [size]; the 2-D window is its outer product."""
    x = np.arange(size, dtype=np.float64) - (size - 1) / 2
    w = np.exp(-(x ** 2) / (2 * sigma ** 2))
    return w / w.sum()


def _filter(x: np.ndarray, w: np.ndarray, padding: str) -> np.ndarray:
    """Separable correlation of [H, W, C] with w ⊗ w: zero padding ("zero", same size) or "valid"."""
    k = len(w)
    if padding == "zero":
        r = k // 2
        x = np.pad(x, ((r, k - 1 - r), (r, k - 1 - r), (0, 0)))
    h, wd = x.shape[0] - k + 1, x.shape[1] - k + 1
    y = sum(w[i] * x[i:i + h] for i in range(k))
    return sum(w[i] * y[:, i:i + wd] for i in range(k))


def ssim(pred, gt, *, window: int = 11, sigma: float = 1.5, padding: str = "zero", data_range: float = 1.0,
         k1: float = 0.01, k2: float = 0.03) -> float:
    """Mean SSIM over the map and the channels (module docstring for `padding`)."""
    if padding not in ("zero", "valid"):
        raise ValueError(f"padding must be 'zero' or 'valid', got {padding!r}")
    p, g = _pair(pred, gt)
    if padding == "valid" and min(p.shape[:2]) < window:
        raise ValueError(f"image {p.shape[:2]} is smaller than the {window}x{window} SSIM window")
    w = gaussian_window(window, sigma)
    mu_p, mu_g = _filter(p, w, padding), _filter(g, w, padding)
    s_pp = _filter(p * p, w, padding) - mu_p ** 2
    s_gg = _filter(g * g, w, padding) - mu_g ** 2
    s_pg = _filter(p * g, w, padding) - mu_p * mu_g
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    m = ((2 * mu_p * mu_g + c1) * (2 * s_pg + c2)) / ((mu_p ** 2 + mu_g ** 2 + c1) * (s_pp + s_gg + c2))
    return float(m.mean())


def image_metrics(pred, gt, mask=None, *, ssim_padding: str = "zero") -> dict[str, float]:
    """rmse, psnr, ssim (and rmse_w with a mask) of one prediction against its ground truth."""
    out = dict(rmse=rmse(pred, gt), psnr=psnr(pred, gt), ssim=ssim(pred, gt, padding=ssim_padding))
    if mask is not None:
        out["rmse_w"] = masked_rmse(pred, gt, mask)
    return out


def mean_metrics(rows: list[dict[str, float]]) -> dict[str, float]:
    """Per-key mean over images, skipping NaN (empty masks); the protocol averages per-image values."""
    keys = sorted({k for r in rows for k in r})
    out = {}
    for k in keys:
        v = np.array([r[k] for r in rows if k in r], np.float64)
        v = v[~np.isnan(v)]
        out[k] = float(v.mean()) if v.size else float("nan")
    return out
