"""The LOGO reader on a tiny folder in SplitNet's layout (spec/flux.md §5), built here."""

import os

import numpy as np
import pytest

from data.logo import LogoDataset, LogoError
from omnijax.io.video import write_image


def make_logo(root, names=("101-acme", "101-zeta", "202-acme"), size=(24, 32), wm=True, grey=255):
    """A variant folder: composite = a·W + (1 − a)·B with a 0.5-opaque grey-level `grey` square watermark."""
    h, w = size
    rng = np.random.default_rng(0)
    for d in ("val_images/image", "val_images/mask", "val_images/wm", "natural"):
        os.makedirs(os.path.join(root, d), exist_ok=True)
    bgs = {}
    for n in names:
        bid = n.split("-")[0]
        if bid not in bgs:
            bgs[bid] = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            write_image(os.path.join(root, "natural", bid + ".png"), bgs[bid])
        m = np.zeros((h, w), np.uint8)
        m[4:12, 6:18] = 255
        layer = np.zeros((h, w, 4), np.uint8)
        layer[..., 1] = 255  # invisible green where alpha = 0: must not bleed into the mark when resized
        layer[m > 0] = (grey, grey, grey, 128)
        a = layer[..., 3:] / 255.0
        comp = np.rint(a * grey + (1 - a) * bgs[bid]).astype(np.uint8)
        write_image(os.path.join(root, "val_images/image", n + ".png"), comp)
        write_image(os.path.join(root, "val_images/mask", n + ".png"), m)
        if wm:
            write_image(os.path.join(root, "val_images/wm", n + ".png"), layer)
    return bgs


def test_reads_pairs_native_size(tmp_path):
    bgs = make_logo(str(tmp_path))
    ds = LogoDataset(str(tmp_path), size=None)
    assert len(ds) == 3 and ds.names == ["101-acme", "101-zeta", "202-acme"]
    s = ds[2]
    np.testing.assert_allclose(s["background"], bgs["202"] / 255.0, atol=1e-6)
    assert s["mask"].shape == (24, 32) and s["mask"].sum() == 8 * 12
    np.testing.assert_allclose(s["alpha"][s["mask"] > 0], 128 / 255, atol=1e-6)
    np.testing.assert_allclose(s["foreground"][s["mask"] > 0], 128 / 255, atol=1e-6)  # premultiplied white
    # the composite is the watermark over the background (to uint8 rounding)
    a = s["alpha"][..., None]
    np.testing.assert_allclose(s["composite"], a * s["fg_rgb"] + (1 - a) * s["background"], atol=0.6 / 255)
    assert bool(s["has_wm"]) and int(s["subtask"]) == 2


def test_resizes_to_protocol_size(tmp_path):
    make_logo(str(tmp_path), grey=0)
    s = LogoDataset(str(tmp_path), size=16)[0]
    assert s["composite"].shape == (16, 16, 3) and s["mask"].shape == (16, 16)
    assert set(np.unique(s["mask"]).tolist()) <= {0.0, 1.0}
    edge = (s["alpha"] > 0.01) & (s["alpha"] < 0.45)  # resampled border pixels of the mark
    assert edge.any()
    np.testing.assert_allclose(s["fg_rgb"][edge], 0.0, atol=1e-4)  # black, no green from outside


def test_without_wm_folder(tmp_path):
    make_logo(str(tmp_path), wm=False)
    s = LogoDataset(str(tmp_path), size=16)[0]
    assert not bool(s["has_wm"]) and s["alpha"].max() == 0 and s["foreground"].shape == (16, 16, 3)


def test_missing_pair_is_one_line_error(tmp_path):
    make_logo(str(tmp_path))
    os.remove(tmp_path / "natural" / "202.png")
    with pytest.raises(LogoError, match=r"^1 of 3 images have no background in .*natural: 202-acme$"):
        LogoDataset(str(tmp_path))
    os.remove(tmp_path / "val_images" / "mask" / "101-zeta.png")
    with pytest.raises(LogoError, match=r"1 of 3 images have no mask .*: 101-zeta$"):
        LogoDataset(str(tmp_path))
    with pytest.raises(LogoError, match="not a LOGO variant folder: missing"):
        LogoDataset(str(tmp_path), split="train")


def test_size_mismatch_is_one_line_error(tmp_path):
    make_logo(str(tmp_path))
    write_image(str(tmp_path / "val_images" / "mask" / "101-acme.png"), np.zeros((10, 10), np.uint8))
    ds = LogoDataset(str(tmp_path))
    with pytest.raises(LogoError, match=r"^101-acme: sizes differ: image 32x24, mask 10x10, natural 32x24, wm 32x24$"):
        ds[0]
