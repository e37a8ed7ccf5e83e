"""Compositor: the layer equation, the paper's parameter ranges, closed-form geometry, shadows, determinism."""

import dataclasses
import math

import numpy as np
import pytest
from scipy import ndimage

from data.composite import CompositeConfig, composite, sample_params
from data.procedural import ProceduralSource
from data.synthetic import SyntheticOmnimatte

SMALL = CompositeConfig(num_frames=5, height=48, width=64)


def _check_layers(s, cfg):
    f, h, w = cfg.num_frames, cfg.height, cfg.width
    for k in ("video", "background", "foreground"):
        assert s[k].shape == (f, h, w, 3) and s[k].dtype == np.float32, k
        assert s[k].min() >= 0.0 and s[k].max() <= 1.0, k
    for k in ("alpha", "mask", "effect_mask"):
        assert s[k].shape == (f, h, w) and s[k].dtype == np.float32, k
    a = s["alpha"]
    assert a.min() >= 0.0 and a.max() <= 1.0
    assert set(np.unique(s["mask"])) <= {0.0, 1.0} and set(np.unique(s["effect_mask"])) <= {0.0, 1.0}
    recon = a[..., None] * s["foreground"] + (1 - a[..., None]) * s["background"]
    np.testing.assert_allclose(recon, s["video"], atol=2e-6)
    # the GT alpha covers the coarse mask, and the effect mask never touches it
    assert (a[s["mask"] > 0] > 0.5 - 1e-6).all()
    assert not (s["effect_mask"] * s["mask"]).any()


@pytest.mark.parametrize("cfg", [SMALL, CompositeConfig(num_frames=3, height=33, width=71),
                                 dataclasses.replace(SMALL, shadow_prob=0.0)])
def test_layer_equation_holds_for_every_sample(cfg):
    ds = SyntheticOmnimatte(cfg, seed=7)
    for i in range(6):
        _check_layers(ds[i], cfg)


def test_parameters_stay_in_paper_ranges():
    cfg = CompositeConfig()
    for seed in range(2000):
        p = sample_params(np.random.default_rng(seed), cfg)
        assert 0.3 <= p["pad"] <= 0.5 and 0 <= p["pad_left"] <= 1 and 0 <= p["pad_top"] <= 1
        assert p["a_shift"] * p["b_shift"] < 0  # opposite signs
        for s in ("a", "b"):
            assert 0.15 <= abs(p[s + "_shift"]) <= 0.30
            assert abs(p[s + "_rotation"]) <= 5.0
            assert 0.95 <= p[s + "_scale"] <= 1.05
            assert abs(p[s + "_shear"]) <= 3.0
        assert 0.1 <= p["shadow_compress"] <= 0.3
        assert 30.0 <= p["shadow_shear"] <= 60.0
        assert 0.3 <= p["shadow_opacity"] <= 0.7
        assert p["shadow_side"] in (-1.0, 1.0) and p["shadow"] == 1.0
    # both directions of motion occur
    signs = {np.sign(sample_params(np.random.default_rng(s), cfg)["a_shift"]) for s in range(50)}
    assert signs == {-1.0, 1.0}


def _disk_clip(nf, h, w, cy, cx, r):
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    a = np.clip(r - np.sqrt((y - cy) ** 2 + (x - cx) ** 2) + 0.5, 0, 1)
    alpha = np.repeat(a[None], nf, 0)
    rgb = np.ones((nf, h, w, 3), np.float32) * np.array([0.9, 0.2, 0.1], np.float32)
    return rgb, alpha


def _centroid(a):
    y, x = np.mgrid[0:a.shape[0], 0:a.shape[1]]
    return float((a * y).sum() / a.sum()), float((a * x).sum() / a.sum())


def test_camera_motion_matches_closed_form():
    """Static disk, only padding + A->B shift and scale: centroid positions at the first and last frames."""
    h, w, nf = 96, 128, 5
    cfg = CompositeConfig(num_frames=nf, height=h, width=w, rotation=0.0, shear=0.0, fg_scale=(1.0, 1.0),
                          fg_rotation=0.0, fg_shift=0.0, shadow_prob=0.0)
    cy, cx, r = 40.0, 60.0, 10.0
    rgb, alpha = _disk_clip(nf, h, w, cy, cx, r)
    bg = np.full((nf, h, w, 3), 0.5, np.float32)
    for seed in range(4):
        p = sample_params(np.random.default_rng(seed), cfg)
        s = composite(rgb, alpha, bg, p, cfg)
        k = 1.0 / (1.0 + p["pad"])                      # canvas (1 + pad) x frame, resized back to the frame
        ys = (cy + p["pad_top"] * p["pad"] * h + 0.5) * k - 0.5
        xs = (cx + p["pad_left"] * p["pad"] * w + 0.5) * k - 0.5
        for f, st in ((0, "a"), (nf - 1, "b")):
            sc = p[st + "_scale"]
            want = ((h - 1) / 2 + sc * (ys - (h - 1) / 2), (w - 1) / 2 + sc * (xs - (w - 1) / 2) + p[st + "_shift"] * w)
            got = _centroid(s["alpha"][f])
            assert np.allclose(got, want, atol=0.05), (seed, f, got, want)
        # eased: the centroid moves monotonically from A to B
        xs_t = [_centroid(s["alpha"][f])[1] for f in range(nf)]
        d = np.diff(xs_t)
        assert (d * np.sign(p["b_shift"] - p["a_shift"]) > 0).all()


def test_pseudo_shadow_matches_closed_form():
    """Flattening below the ground line + shear: the shadow is the affine image of the object, so its centroid and
    mass follow from the disk's (no blur, no motion)."""
    h, w = 96, 96
    cfg = CompositeConfig(num_frames=1, height=h, width=w, pad=(0.0, 0.0), shift=(0.0, 0.0), rotation=0.0,
                          scale=(1.0, 1.0), shear=0.0, fg_scale=(1.0, 1.0), fg_rotation=0.0, fg_shift=0.0,
                          shadow_blur=(0.0, 0.0))
    cy, cx, r = 30.0, 48.0, 12.0
    rgb, alpha = _disk_clip(1, h, w, cy, cx, r)
    alpha *= 0.9  # a translucent object hides none of the shadow, so a_s can be recovered everywhere
    bg = np.full((1, h, w, 3), 0.6, np.float32)
    for seed in range(6):
        p = sample_params(np.random.default_rng(seed), cfg)
        with_shadow = composite(rgb, alpha, bg, p, cfg)
        without = composite(rgb, alpha, bg, dict(p, shadow=0.0), cfg)
        a_o = without["alpha"][0]
        a_s = (with_shadow["alpha"][0] - a_o) / (1 - a_o)  # alpha = a_o + a_s (1 - a_o)
        ground = float(np.nonzero((alpha[0] > 0.5).any(axis=1))[0][-1])
        c, t = p["shadow_compress"], p["shadow_side"] * math.tan(math.radians(p["shadow_shear"]))
        height = ground - cy
        want_c = (ground + c * height, cx + t * c * height)
        got_c = _centroid(a_s)
        assert np.allclose(got_c, want_c, atol=0.15), (seed, got_c, want_c)
        want_mass = p["shadow_opacity"] * c * alpha[0].sum()   # area scales by |det| = c
        assert a_s.sum() == pytest.approx(want_mass, rel=0.02)
        # the shadow darkens the background by its opacity: V = (1 - a_s) B where only the shadow is
        only = (a_s > 0.05) & (a_o == 0)
        np.testing.assert_allclose(with_shadow["video"][0][only], ((1 - a_s[only]) * 0.6)[:, None] * np.ones(3),
                                   atol=1e-6)


def test_shadow_lies_mostly_outside_the_dilated_mask():
    cfg = CompositeConfig(num_frames=3, height=64, width=96)
    ds = SyntheticOmnimatte(cfg, seed=3)
    fractions, effect_nonempty = [], 0
    for i in range(12):
        s = ds[i]
        fg, bg = ProceduralSource(3), ProceduralSource(4)
        fi, bi = int(s["params"]["fg_index"]), int(s["params"]["bg_index"])
        rgb, alpha = fg.foreground(fi, 3, 64, 96)
        no_shadow = composite(rgb, alpha, bg.background(bi, 3, 64, 96), dict(s["params"], shadow=0.0), cfg)
        shadow = s["alpha"] - no_shadow["alpha"]
        if shadow.sum() < 1.0:
            continue  # cast out of frame
        r = max(1, round(cfg.mask_dilation * 96))
        y, x = np.mgrid[-r:r + 1, -r:r + 1]
        dil = ndimage.binary_dilation(s["mask"] > 0, structure=((y * y + x * x) <= r * r + 0.5)[None])
        fractions.append(float((shadow * ~dil).sum() / shadow.sum()))
        effect_nonempty += bool(s["effect_mask"].any())
    assert len(fractions) >= 8
    assert np.mean(fractions) > 0.7, fractions
    assert effect_nonempty >= len(fractions) - 1


def test_same_seed_same_samples():
    a, b, c = SyntheticOmnimatte(SMALL, seed=5), SyntheticOmnimatte(SMALL, seed=5), SyntheticOmnimatte(SMALL, seed=6)
    for i in (0, 3):
        sa, sb, sc = a[i], b[i], c[i]
        for k in ("video", "alpha", "mask", "background", "foreground", "effect_mask"):
            np.testing.assert_array_equal(sa[k], sb[k])
        assert sa["params"] == sb["params"]
        assert not np.array_equal(sa["video"], sc["video"])
    assert not np.array_equal(a[0]["video"], a[1]["video"])


def test_bad_inputs_raise():
    rgb, alpha = _disk_clip(5, 48, 64, 20, 30, 8)
    p = sample_params(np.random.default_rng(0), SMALL)
    with pytest.raises(ValueError, match="frames"):
        composite(rgb[:4], alpha[:4], np.zeros((4, 48, 64, 3), np.float32), p, SMALL)
    with pytest.raises(ValueError, match="disagree"):
        composite(rgb, alpha[:, :10], np.zeros((5, 48, 64, 3), np.float32), p, SMALL)
    with pytest.raises(ValueError, match="low"):
        CompositeConfig(pad=(0.5, 0.3))
    with pytest.raises(IndexError):
        SyntheticOmnimatte(SMALL, length=3)[3]


def test_region_warps_equal_full_frame_warps(monkeypatch):
    """The bounding-box shortcut against the brute force: warp (and blur) the whole frame."""
    import data.composite as comp

    cfg = CompositeConfig(num_frames=3, height=48, width=80)
    ds = SyntheticOmnimatte(cfg, seed=11)
    fast = [ds[i] for i in range(4)]

    def full(img, fwd, support, out_hw, margin=0):
        return (comp._warp(img, fwd, out_hw), (0, out_hw[0], 0, out_hw[1])) if support is not None else None

    monkeypatch.setattr(comp, "_warp_region", full)
    for i, s in enumerate(fast):
        ref = ds[i]
        for k in ("video", "alpha", "foreground", "mask", "effect_mask"):
            np.testing.assert_allclose(s[k], ref[k], atol=1e-6, err_msg=k)
