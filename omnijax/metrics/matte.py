"""Metrics of a predicted omnimatte layer against the synthetic ground truth (benchmarks/learn_omnimatte.py).

Axis letters: F frames, H/W pixels, C colour channels. Inputs are one clip's arrays in [0, 1]: alphas [F, H, W],
videos [F, H, W, 3], masks [F, H, W] (nonzero = inside). Arithmetic is float32 numpy (a clip is millions of
values; tests hold these to float64 references); every function returns a Python float.

  alpha_mae        mean |alpha_pred - alpha_gt| over all pixels
  alpha_iou        IoU of (alpha_pred > t) and (alpha_gt > t), t = 0.5: the layer's solid part, i.e. the object
                   (the pseudo-shadow's opacity is 0.3-0.7 and blurred); 1.0 when both are empty
  effect_recall    share of the effect region (shadow outside the dilated object mask: data.composite's
                   effect_mask) where alpha_pred > t, t = 0.1 (composite's effect_threshold); NaN when empty
  masked_psnr      PSNR (data range 1) of two videos over the pixels of a mask (all channels), capped at 100 dB;
                   NaN for an empty mask
  psnr             the same over every pixel
"""

from __future__ import annotations

import math

import numpy as np

F32 = np.float32
MAX_DB = 100.0


def _f32(x) -> np.ndarray:
    return np.asarray(x, F32)


def alpha_mae(pred, gt) -> float:
    pred, gt = _f32(pred), _f32(gt)
    if pred.shape != gt.shape:
        raise ValueError(f"alpha_mae: prediction {pred.shape} and ground truth {gt.shape} differ in shape")
    return float(np.mean(np.abs(pred - gt), dtype=np.float64))


def alpha_iou(pred, gt, threshold: float = 0.5) -> float:
    p, g = _f32(pred) > threshold, _f32(gt) > threshold
    if p.shape != g.shape:
        raise ValueError(f"alpha_iou: prediction {p.shape} and ground truth {g.shape} differ in shape")
    union = int(np.count_nonzero(p | g))
    return 1.0 if union == 0 else int(np.count_nonzero(p & g)) / union


def effect_recall(pred, effect_mask, threshold: float = 0.1) -> float:
    pred, region = _f32(pred), np.asarray(effect_mask) > 0
    if pred.shape != region.shape:
        raise ValueError(f"effect_recall: prediction {pred.shape} and effect mask {region.shape} differ in shape")
    n = int(np.count_nonzero(region))
    return float("nan") if n == 0 else int(np.count_nonzero((pred > threshold) & region)) / n


def masked_psnr(pred, gt, mask=None) -> float:
    pred, gt = _f32(pred), _f32(gt)
    if pred.shape != gt.shape:
        raise ValueError(f"masked_psnr: {pred.shape} and {gt.shape} differ in shape")
    sq = np.square(pred - gt)
    if mask is not None:
        m = np.asarray(mask) > 0
        if m.shape != pred.shape[:-1]:
            raise ValueError(f"masked_psnr: mask {m.shape} does not match the videos {pred.shape}")
        if not m.any():
            return float("nan")
        sq = sq[m]
    mse = float(np.mean(sq, dtype=np.float64))
    return MAX_DB if mse == 0 else min(MAX_DB, -10.0 * math.log10(mse))


def psnr(pred, gt) -> float:
    return masked_psnr(pred, gt)
