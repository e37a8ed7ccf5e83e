"""Synthetic omnimatte composites with camera motion and pseudo-shadows (paper appendix B, spec §5).

Axis letters: F frames, H height, W width. Images are float32 in [0, 1], channels-last. Pixel coordinates are
(row y, column x) with pixel centres at integers, as in `scipy.ndimage`; all geometry is 3×3 homogeneous
matrices in that (y, x) order, composed into ONE warp per frame so every layer is resampled once.

Pipeline for one sample (all random numbers are in `params`, see `sample_params`):
1. source foreground clip (colour, straight alpha) of any size -> cover-resize and centre it in the H×W frame;
   then a static random resize / rotation / translation of the foreground (`fg_*`).
2. camera motion: the frame is embedded in a larger canvas, padded by `pad`·W horizontally (and `pad`·H
   vertically, so the aspect is kept), split asymmetrically (`pad_left`, `pad_top` are the fractions before the
   content); the canvas is resized back to H×W, and an affine transform about the frame centre is applied whose
   parameters move from state A to state B along a cosine ease: horizontal shifts of opposite sign with
   magnitudes 15–30 % of W, rotation ±5°, scale 0.95–1.05, shear ±3°. Only the foreground layer (object and
   shadow) moves this way; the background keeps its own motion (procedural pans, or the filmed clip).
3. pseudo-shadow: the object alpha, flattened below a ground line (the lowest object row over the clip) to
   `shadow_compress` (10–30 %) of its height, sheared horizontally by `shadow_shear` (30–60°, side
   `shadow_side`), warped with the same per-frame motion, blurred (`shadow_blur`·max(H, W) px) and scaled by
   `shadow_opacity` (30–70 %). Casting the shadow below the ground line (a light behind the object) keeps it
   mostly outside the object, so it is an effect the coarse mask does not cover.
4. composite: the shadow darkens the background, then the object goes over it:
       V = α_o·F_o + (1 − α_o)·(1 − α_s)·B.
   The ground-truth layer is the union α = α_o + α_s − α_o·α_s = 1 − (1 − α_o)(1 − α_s) and its colour is
       F = α_o·F_o / α   (F = 0 where α = 0),
   i.e. the shadow is a black, semi-transparent part of the layer. Then α·F + (1 − α)·B = V exactly (up to float
   rounding), and F stays in [0, 1] because α ≥ α_o.
Resampling uses premultiplied colour (warp α_o·F_o and α_o, never straight colour), so no colour from outside
the object bleeds into its edge.

Per-sample outputs: `video`, `background`, `foreground` [F, H, W, 3]; `alpha` (object ∪ shadow), `mask` (coarse:
α_o > `mask_threshold`), `effect_mask` ((α > `effect_threshold`) minus the mask dilated by a disk of radius
`mask_dilation`·max(H, W) px) [F, H, W]; `params` (flat dict of floats).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
from scipy import ndimage

F32 = np.float32


@dataclasses.dataclass(frozen=True)
class CompositeConfig:
    """Output size and sampling ranges. Ranges are (low, high); angles in degrees; `±x` fields are symmetric.

    Defaults follow the paper (appendix B) where it gives numbers; the foreground resize / rotation / shift
    ranges, shadow blur, thresholds and dilation are this project's choices.
    """

    num_frames: int = 9
    height: int = 64
    width: int = 64
    pad: tuple[float, float] = (0.3, 0.5)
    shift: tuple[float, float] = (0.15, 0.30)
    rotation: float = 5.0
    scale: tuple[float, float] = (0.95, 1.05)
    shear: float = 3.0
    fg_scale: tuple[float, float] = (0.7, 1.0)
    fg_rotation: float = 10.0
    fg_shift: float = 0.1
    shadow_prob: float = 1.0
    shadow_compress: tuple[float, float] = (0.1, 0.3)
    shadow_shear: tuple[float, float] = (30.0, 60.0)
    shadow_opacity: tuple[float, float] = (0.3, 0.7)
    shadow_blur: tuple[float, float] = (0.003, 0.012)
    mask_threshold: float = 0.5
    effect_threshold: float = 0.1
    mask_dilation: float = 0.015

    def __post_init__(self):
        if self.num_frames < 1 or self.height < 2 or self.width < 2:
            raise ValueError(f"bad clip size {self.num_frames}x{self.height}x{self.width}")
        for name in ("pad", "shift", "scale", "fg_scale", "shadow_compress", "shadow_shear", "shadow_opacity",
                     "shadow_blur"):
            lo, hi = getattr(self, name)
            if lo > hi:
                raise ValueError(f"CompositeConfig.{name}: low {lo} > high {hi}")


PARAM_NAMES = (
    "pad", "pad_left", "pad_top",
    "a_shift", "a_rotation", "a_scale", "a_shear", "b_shift", "b_rotation", "b_scale", "b_shear",
    "fg_scale", "fg_rotation", "fg_shift_x", "fg_shift_y",
    "shadow", "shadow_compress", "shadow_shear", "shadow_side", "shadow_opacity", "shadow_blur",
)


def sample_params(rng: np.random.Generator, cfg: CompositeConfig) -> dict[str, float]:
    """Draw the random parameters of one composite (keys: PARAM_NAMES)."""
    u = lambda r: float(rng.uniform(*r))
    sym = lambda m: float(rng.uniform(-m, m))
    side = 1.0 if rng.uniform() < 0.5 else -1.0  # A moves one way, B the other: pronounced lateral motion
    p = dict(pad=u(cfg.pad), pad_left=float(rng.uniform()), pad_top=float(rng.uniform()))
    p.update(a_shift=side * u(cfg.shift), a_rotation=sym(cfg.rotation), a_scale=u(cfg.scale), a_shear=sym(cfg.shear))
    p.update(b_shift=-side * u(cfg.shift), b_rotation=sym(cfg.rotation), b_scale=u(cfg.scale),
             b_shear=sym(cfg.shear))
    p.update(fg_scale=u(cfg.fg_scale), fg_rotation=sym(cfg.fg_rotation), fg_shift_x=sym(cfg.fg_shift),
             fg_shift_y=sym(cfg.fg_shift))
    p.update(shadow=float(rng.uniform() < cfg.shadow_prob), shadow_compress=u(cfg.shadow_compress),
             shadow_shear=u(cfg.shadow_shear), shadow_side=1.0 if rng.uniform() < 0.5 else -1.0,
             shadow_opacity=u(cfg.shadow_opacity), shadow_blur=u(cfg.shadow_blur))
    return p


def ease(t: float) -> float:
    """Cosine ease-in-out on [0, 1]: zero velocity at both ends, so the camera starts and stops smoothly."""
    return 0.5 - 0.5 * math.cos(math.pi * t)


# ------------------------------------------------------------------------------------------------ geometry


def _translate(dy: float, dx: float) -> np.ndarray:
    return np.array([[1.0, 0.0, dy], [0.0, 1.0, dx], [0.0, 0.0, 1.0]])


def _linear(a: np.ndarray, center: tuple[float, float]) -> np.ndarray:
    """Homogeneous matrix applying the 2×2 (y, x) map `a` about `center`."""
    m = np.eye(3)
    m[:2, :2] = a
    return _translate(*center) @ m @ _translate(-center[0], -center[1])


def _rot(deg: float) -> np.ndarray:
    c, s = math.cos(math.radians(deg)), math.sin(math.radians(deg))
    return np.array([[c, s], [-s, c]])  # (y, x) order; positive = counter-clockwise on screen (y points down)


def _shear_x(deg: float) -> np.ndarray:
    return np.array([[1.0, 0.0], [math.tan(math.radians(deg)), 1.0]])  # x' = x + tan·y


def _resize(scale_y: float, scale_x: float) -> np.ndarray:
    """Centre-aligned resize of pixel coordinates: (p + 0.5)·s − 0.5."""
    return _translate(-0.5, -0.5) @ np.diag([scale_y, scale_x, 1.0]) @ _translate(0.5, 0.5)


def camera_matrix(p: dict[str, float], t: float, height: int, width: int) -> np.ndarray:
    """Frame-space camera transform at time t ∈ [0, 1]: A and B's parameters mixed by the eased weight."""
    e = ease(t)
    mix = lambda k: (1 - e) * p["a_" + k] + e * p["b_" + k]
    c = ((height - 1) / 2, (width - 1) / 2)
    a = mix("scale") * _rot(mix("rotation")) @ _shear_x(mix("shear"))
    return _translate(0.0, mix("shift") * width) @ _linear(a, c)


def placement_matrix(p: dict[str, float], src_hw: tuple[int, int], height: int, width: int) -> np.ndarray:
    """Source clip pixels -> frame pixels before the camera: cover-resize, static fg transform, padded canvas."""
    hs, ws = src_hw
    k = max(height / hs, width / ws)
    cover = _translate((height - hs * k) / 2, (width - ws * k) / 2) @ _resize(k, k)
    c = ((height - 1) / 2, (width - 1) / 2)
    fg = _translate(p["fg_shift_y"] * height, p["fg_shift_x"] * width) @ _linear(
        p["fg_scale"] * _rot(p["fg_rotation"]), c)
    ph, pw = p["pad"] * height, p["pad"] * width
    embed = _translate(p["pad_top"] * ph, p["pad_left"] * pw)
    shrink = _resize(height / (height + ph), width / (width + pw))
    return shrink @ embed @ fg @ cover


def shadow_matrix(p: dict[str, float], ground: float) -> np.ndarray:
    """Source pixels -> shadow pixels: flatten below the ground row y_g (y' = y_g + c·(y_g − y)), then shear.

    A point at height h = y_g − y above the ground lands c·h below it and shifts sideways by side·tan(θ)·c·h.
    """
    c = p["shadow_compress"]
    k = p["shadow_side"] * math.tan(math.radians(p["shadow_shear"]))
    return np.array([[-c, 0.0, ground * (1 + c)], [-k * c, 1.0, k * c * ground], [0.0, 0.0, 1.0]])


def _warp(img: np.ndarray, fwd: np.ndarray, out_hw: tuple[int, int]) -> np.ndarray:
    """Resample [h, w] or [h, w, C] by the forward map `fwd` (source -> output), zero outside, bilinear."""
    inv = np.linalg.inv(fwd)
    if img.ndim == 2:
        return ndimage.affine_transform(img, inv, output_shape=out_hw, order=1, mode="constant", cval=0.0,
                                        prefilter=False)
    return np.stack([_warp(img[..., i], fwd, out_hw) for i in range(img.shape[-1])], -1)


def _downsample_for(frames: np.ndarray, k: float) -> tuple[np.ndarray, float]:
    """Box-average by an integer factor when shrinking by 2× or more, so bilinear warps do not alias."""
    n = int(1.0 / k) if k < 0.5 else 1
    if n <= 1:
        return frames, 1.0
    f, h, w = frames.shape[:3]
    h2, w2 = h // n, w // n
    x = frames[:, :h2 * n, :w2 * n].reshape(f, h2, n, w2, n, *frames.shape[3:]).mean(axis=(2, 4))
    return x.astype(F32), float(n)


def _support(a: np.ndarray) -> tuple[int, int, int, int] | None:
    """Bounding box (y0, y1, x0, x1), end-exclusive, of the nonzero pixels of [..., h, w] (union over leading axes)."""
    nz = a.reshape(-1, *a.shape[-2:]).any(axis=0)
    rows, cols = np.nonzero(nz.any(axis=1))[0], np.nonzero(nz.any(axis=0))[0]
    if rows.size == 0:
        return None
    return int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1


def _warp_region(img: np.ndarray, fwd: np.ndarray, support, out_hw: tuple[int, int], margin: int = 0):
    """Warp only where the source support lands: returns (values, (y0, y1, x0, x1)) or None when off-frame.

    The layers are zero outside their support, so warping the bounding box of its image (plus `margin` pixels
    for a later blur) gives the same frame as a full warp, at a fraction of the cost for small objects.
    """
    if support is None:
        return None
    y0, y1, x0, x1 = support
    corners = np.array([[y, x, 1.0] for y in (y0 - 1, y1) for x in (x0 - 1, x1)]).T
    yy, xx = (fwd @ corners)[:2]
    m = margin + 2
    oy0, oy1 = max(int(np.floor(yy.min())) - m, 0), min(int(np.ceil(yy.max())) + m + 1, out_hw[0])
    ox0, ox1 = max(int(np.floor(xx.min())) - m, 0), min(int(np.ceil(xx.max())) + m + 1, out_hw[1])
    if oy0 >= oy1 or ox0 >= ox1:
        return None
    return _warp(img, _translate(-oy0, -ox0) @ fwd, (oy1 - oy0, ox1 - ox0)), (oy0, oy1, ox0, ox1)


# ----------------------------------------------------------------------------------------------- composite


def composite(fg_rgb: np.ndarray, fg_alpha: np.ndarray, bg: np.ndarray, params: dict[str, float],
              cfg: CompositeConfig) -> dict[str, np.ndarray]:
    """Build one ground-truth sample from a foreground clip, a background clip and sampled parameters.

    Args:
      fg_rgb: float32 [F, h, w, 3] straight (not premultiplied) foreground colour, any size h×w.
      fg_alpha: float32 [F, h, w] in [0, 1].
      bg: float32 [F, H', W', 3] background of any size; it is cover-resized and centre-cropped to H×W.
      params: from `sample_params`.
      cfg: output size and thresholds (num_frames must equal F).

    Returns:
      dict with video, background, foreground [F, H, W, 3]; alpha, mask, effect_mask [F, H, W] (float32) and
      params (the input dict, copied).
    """
    nf, hh, ww = cfg.num_frames, cfg.height, cfg.width
    if fg_rgb.shape[:3] != fg_alpha.shape or fg_rgb.shape[-1] != 3:
        raise ValueError(f"foreground shapes disagree: rgb {fg_rgb.shape}, alpha {fg_alpha.shape}")
    if fg_rgb.shape[0] != nf or bg.shape[0] != nf or bg.shape[-1] != 3:
        raise ValueError(f"need {nf} frames: foreground {fg_rgb.shape}, background {bg.shape}")
    hs, ws = fg_alpha.shape[1:]
    k = max(hh / hs, ww / ws)
    premul = np.concatenate([fg_rgb * fg_alpha[..., None], fg_alpha[..., None]], -1).astype(F32)
    premul, n = _downsample_for(premul, k)
    pre = _resize(n, n)  # downsampled pixels -> original source pixels
    place = placement_matrix(params, (hs, ws), hh, ww)

    # Ground line: lowest object row over the clip (in source pixels), so the shadow stays put under the object.
    rows = np.nonzero((fg_alpha > 0.5).any(axis=(0, 2)))[0]
    ground = float(rows[-1]) if rows.size else float(hs - 1)
    shadow_on = params["shadow"] > 0.5
    flatten = shadow_matrix(params, ground)
    shadow_src = premul[..., 3]
    if shadow_on:
        # Flattening to 10-30 % height minifies the matte vertically by up to 10x or more; prefilter it so the
        # bilinear warp does not alias (a jagged, flickering shadow). Output pixel footprint in source rows:
        fy = float(np.abs(np.linalg.inv(placement_matrix(params, (hs, ws), hh, ww) @ flatten @ pre)[0, :2]).sum())
        if fy > 1.5:
            shadow_src = ndimage.gaussian_filter1d(shadow_src, 0.5 * math.sqrt(fy * fy - 1.0), axis=1,
                                                   mode="constant")
    sigma = params["shadow_blur"] * max(hh, ww)

    obj_support = _support(premul[..., 3])
    shadow_support = _support(shadow_src) if shadow_on else None

    bgk = max(hh / bg.shape[1], ww / bg.shape[2])
    bg_small, bn = _downsample_for(bg.astype(F32), bgk)
    bg_fwd = (_translate((hh - bg.shape[1] * bgk) / 2, (ww - bg.shape[2] * bgk) / 2) @ _resize(bgk, bgk)
              @ _resize(bn, bn))
    bg_same = bg.shape[1:3] == (hh, ww)

    out = {key: np.empty((nf, hh, ww, 3), F32) for key in ("video", "background")}
    out["foreground"] = np.zeros((nf, hh, ww, 3), F32)
    out.update({key: np.zeros((nf, hh, ww), F32) for key in ("alpha", "mask", "effect_mask")})
    obj = np.zeros((nf, hh, ww), F32)
    blur = shadow_on and sigma > 0.3
    for f in range(nf):
        cam = camera_matrix(params, f / max(nf - 1, 1), hh, ww)
        b = bg[f].astype(F32) if bg_same else np.clip(_warp(bg_small[f], bg_fwd, (hh, ww)), 0.0, 1.0)
        out["background"][f] = b
        out["video"][f] = b
        o_reg = _warp_region(premul[f], cam @ place @ pre, obj_support, (hh, ww))
        s_reg = None
        if shadow_on:
            s_reg = _warp_region(shadow_src[f], cam @ place @ flatten @ pre, shadow_support, (hh, ww),
                                 margin=int(math.ceil(4 * sigma)) + 1 if blur else 0)
        boxes = [r[1] for r in (o_reg, s_reg) if r is not None]
        if not boxes:
            continue
        # Everything below happens inside the union box U of the layer's regions; outside it alpha = 0, V = B.
        y0, y1 = min(bx[0] for bx in boxes), max(bx[1] for bx in boxes)
        x0, x1 = min(bx[2] for bx in boxes), max(bx[3] for bx in boxes)
        shape = (y1 - y0, x1 - x0)
        a_o, p_o, a_s = np.zeros(shape, F32), np.zeros(shape + (3,), F32), np.zeros(shape, F32)
        if o_reg is not None:
            (ry0, ry1, rx0, rx1), v = o_reg[1], np.clip(o_reg[0], 0.0, 1.0)
            a_o[ry0 - y0:ry1 - y0, rx0 - x0:rx1 - x0] = v[..., 3]
            # premultiplied colour never exceeds its alpha
            p_o[ry0 - y0:ry1 - y0, rx0 - x0:rx1 - x0] = np.minimum(v[..., :3], v[..., 3:])
        if s_reg is not None:
            (ry0, ry1, rx0, rx1), v = s_reg[1], s_reg[0]
            # zero outside the region, so a blur of the margin-padded region equals a blur of the whole frame
            v = ndimage.gaussian_filter(v, sigma, mode="constant", truncate=4.0) if blur else v
            a_s[ry0 - y0:ry1 - y0, rx0 - x0:rx1 - x0] = np.clip(v, 0.0, 1.0) * F32(params["shadow_opacity"])
        alpha = a_o + a_s - a_o * a_s
        bu = b[y0:y1, x0:x1]
        out["video"][f, y0:y1, x0:x1] = p_o + ((1.0 - a_o) * (1.0 - a_s))[..., None] * bu
        out["foreground"][f, y0:y1, x0:x1] = np.where(alpha[..., None] > 0,
                                                      p_o / np.maximum(alpha, 1e-12)[..., None], 0.0)
        out["alpha"][f, y0:y1, x0:x1] = alpha
        obj[f, y0:y1, x0:x1] = a_o
    mask = obj > cfg.mask_threshold
    r = max(1, int(round(cfg.mask_dilation * max(hh, ww))))
    # Dilation by a disk of radius r == distance to the mask <= r; the distance transform costs O(HW) per frame
    # where a structuring element costs O(HW r^2).
    dil = np.stack([ndimage.distance_transform_edt(~m) <= r if m.any() else m for m in mask])
    out["mask"][:] = mask
    out["effect_mask"][:] = (out["alpha"] > cfg.effect_threshold) & ~dil
    np.clip(out["foreground"], 0.0, 1.0, out=out["foreground"])
    out["params"] = dict(params)
    return out
