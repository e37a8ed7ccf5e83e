"""AlphaBlend operators against their closed forms (written here, per pixel, in float64), and the generator."""

import os

import numpy as np
import pytest

from data import alphablend as ab
from data.procedural_layers import ProceduralLayers
from omnijax.io.video import VideoError, write_image


def _layers(seed=0, h=5, w=7):
    r = np.random.default_rng(seed)
    fg = r.uniform(0, 1, (h, w, 3)).astype(np.float32)
    a = r.uniform(0, 1, (h, w)).astype(np.float32)
    bg = r.uniform(0, 1, (h, w, 3)).astype(np.float32)
    bg[0, 0] = 0.5  # the glass rule's boundary value takes the screen branch
    return fg, a, bg


def _closed_form(subtask, f, a, b):
    """The paper's formulas (module docstring of data.alphablend), one scalar at a time."""
    if subtask in ("watermark", "occlusion"):
        return a * f + (1 - a) * b
    if subtask == "flare":
        return 1 - (1 - a * f) * (1 - b)
    if subtask == "cell":
        return min(b + a * f, 1.0)
    if subtask == "xray":
        return (1 - a) * b + a * (f * 255 / 255 * b / 255 * 255)
    if subtask == "glassware":
        g = f * b if b < 0.5 else 1 - (1 - f) * (1 - b)
        return (1 - a) * b + a * g
    raise AssertionError(subtask)


@pytest.mark.parametrize("subtask", ab.SUBTASKS)
def test_operator_matches_closed_form(subtask):
    fg, a, bg = _layers()
    got = ab.blend(subtask, fg, a, bg)
    want = np.empty(got.shape, np.float64)
    for i, j, c in np.ndindex(*got.shape):
        want[i, j, c] = _closed_form(subtask, float(fg[i, j, c]), float(a[i, j]), float(bg[i, j, c]))
    np.testing.assert_allclose(got, want, atol=1e-6)
    assert got.min() >= 0 and got.max() <= 1


def test_cell_clips_and_glass_switches_on_background():
    f = np.array([[[0.8, 0.8, 0.8]]], np.float32)
    one = np.ones((1, 1), np.float32)
    np.testing.assert_allclose(ab.blend("cell", f, one, np.full((1, 1, 3), 0.7, np.float32)), 1.0)
    dark = ab.blend("glassware", f, one, np.full((1, 1, 3), 0.4, np.float32))
    bright = ab.blend("glassware", f, one, np.full((1, 1, 3), 0.6, np.float32))
    np.testing.assert_allclose(dark, 0.32, atol=1e-6)              # 0.8 * 0.4
    np.testing.assert_allclose(bright, 1 - 0.2 * 0.4, atol=1e-6)   # 1 - (1 - 0.8)(1 - 0.6)


def test_foreground_layer_is_blend_over_the_neutral():
    fg, a, _ = _layers(1)
    for s in ("flare", "cell", "xray"):  # for these the layer equals the operator applied to its neutral
        n = np.full(fg.shape, ab.NEUTRAL[s], np.float32)
        np.testing.assert_allclose(ab.foreground_layer(s, fg, a), ab.blend(s, fg, a, n), atol=1e-6)
    np.testing.assert_allclose(ab.foreground_layer("xray", fg, a), 1 - a[..., None] * (1 - fg), atol=1e-6)


def test_unknown_subtask_is_one_line_error():
    with pytest.raises(ValueError, match="unknown subtask 'rain'"):
        ab.blend("rain", *_layers())
    with pytest.raises(ValueError, match="multiples of 16"):
        ab.AlphaBlendConfig(height=40)


def test_prompt_has_template_and_blend_type():
    p = ab.build_prompt("xray")
    assert p.startswith("Three sub-images. <image-1>: contraband")
    assert "<image-3>: The overlapped of <image-1> and <image-2> by multiplicative X-ray attenuation." in p
    q = ab.build_prompt("cell", "{foreground}|{background}|{blend}", {"cell": ("c", "d", "e")})
    assert q == "c|d|e"


def test_generated_samples_are_exact_composites_in_range_and_reproducible():
    cfg = ab.AlphaBlendConfig(height=32, width=48)
    ds = ab.AlphaBlendDataset(cfg, seed=3, length=12)
    seen = set()
    for i in range(12):
        s = ds[i]
        sub = ab.SUBTASKS[int(s["subtask"])]
        seen.add(sub)
        assert sub == cfg.subtasks[i % 6]
        for k in ("composite", "background", "foreground", "fg_rgb"):
            assert s[k].shape == (32, 48, 3) and s[k].dtype == np.float32, k
            assert 0 <= s[k].min() and s[k].max() <= 1, k
        assert s["alpha"].shape == s["mask"].shape == (32, 48)
        assert 0 <= s["alpha"].min() and s["alpha"].max() <= 1
        assert s["alpha"].max() > 0, f"{sub}: empty foreground"
        # composite == blend(fg, bg) bit for bit, and the independent closed form holds too
        np.testing.assert_array_equal(s["composite"], ab.blend(sub, s["fg_rgb"], s["alpha"], s["background"]))
        y, x = np.unravel_index(np.argmax(s["alpha"]), s["alpha"].shape)
        for c in range(3):
            want = _closed_form(sub, float(s["fg_rgb"][y, x, c]), float(s["alpha"][y, x]),
                                float(s["background"][y, x, c]))
            assert abs(float(s["composite"][y, x, c]) - want) < 1e-6
        np.testing.assert_array_equal(s["mask"], (s["alpha"] > cfg.mask_threshold).astype(np.float32))
        if sub == "watermark":
            assert s["alpha"].max() <= 0.25 + 1e-6
            # box side 96..128 at 512 px scales to 6..8 at 32 px; never below the 8 px floor
            assert 8 <= s["params"]["box_h"] <= 8
    assert seen == set(ab.SUBTASKS)
    again = ab.AlphaBlendDataset(cfg, seed=3, length=12)[7]
    np.testing.assert_array_equal(again["composite"], ds[7]["composite"])
    other = ab.AlphaBlendDataset(cfg, seed=4, length=12)[7]
    assert not np.array_equal(other["composite"], ds[7]["composite"])
    with pytest.raises(IndexError):
        ds[12]


def test_watermark_size_and_opacity_follow_the_paper_at_512():
    cfg = ab.AlphaBlendConfig(height=512, width=512, subtasks=("watermark",))
    ds = ab.AlphaBlendDataset(cfg, length=3)
    for i in range(3):
        s = ds[i]
        assert 96 <= s["params"]["box_h"] <= 128 and s["params"]["box_w"] == s["params"]["box_h"]
        assert 0.1 <= s["params"]["opacity"] <= 0.25
        ys, xs = np.nonzero(s["alpha"])
        assert np.ptp(ys) < 128 and np.ptp(xs) < 128


def test_folder_sources_and_pipeline(tmp_path):
    from data.pipeline import make_pipeline

    (tmp_path / "fg").mkdir()
    (tmp_path / "bg").mkdir()
    logo = np.zeros((20, 30, 4), np.uint8)
    logo[5:15, 5:25] = (250, 10, 10, 255)
    write_image(str(tmp_path / "fg" / "logo.png"), logo)
    write_image(str(tmp_path / "bg" / "b.png"), np.full((40, 40, 3), 100, np.uint8))
    cfg = ab.AlphaBlendConfig(height=32, width=32, subtasks=("watermark", "xray"))
    ds = ab.AlphaBlendDataset(cfg, foregrounds=ab.RGBAFolderSource(str(tmp_path / "fg")),
                              backgrounds=ab.ImageFolderSource(str(tmp_path / "bg")), length=4)
    s = ds[1]  # xray: the red bar, fit into the object box, attenuating the grey background
    np.testing.assert_allclose(s["background"], 100 / 255, atol=1e-6)
    inside = s["alpha"] > 0.5
    assert inside.any()
    np.testing.assert_allclose(s["fg_rgb"][inside][:, 0], 250 / 255, atol=0.02)
    np.testing.assert_array_equal(s["composite"], ab.blend("xray", s["fg_rgb"], s["alpha"], s["background"]))
    batch = next(iter(make_pipeline(ds, batch_size=2, shuffle=False, shard=(0, 1))))
    assert batch["composite"].shape == (2, 32, 32, 3) and batch["subtask"].tolist() == [2, 5]
    (tmp_path / "empty").mkdir()
    with pytest.raises(VideoError, match="empty: no images"):
        ab.RGBAFolderSource(str(tmp_path / "empty"))
    with pytest.raises(VideoError, match="none: no such folder"):
        ab.ImageFolderSource(str(tmp_path / "none"))


def test_procedural_layers_are_deterministic_and_nonempty():
    p = ProceduralLayers(5)
    for s in ab.SUBTASKS:
        rgb, a = p.asset(s, 2, 32, 32)
        rgb2, a2 = ProceduralLayers(5).asset(s, 2, 32, 32)
        np.testing.assert_array_equal(rgb, rgb2)
        np.testing.assert_array_equal(a, a2)
        assert rgb.shape == (32, 32, 3) and a.shape == (32, 32) and a.max() > 0.05, s
        bg = p.background(s, 2, 32, 32)
        assert bg.shape == (32, 32, 3) and 0 <= bg.min() and bg.max() <= 1


def test_config_builds_data_and_prompts(tmp_path):
    from configs import diffdecompose
    from tests.data.test_logo import make_logo

    c = diffdecompose.get_config("subtasks=watermark+xray,runlocal")
    ds = ab.dataset_from_config(c.input, length=4)
    s = ds[1]
    assert s["composite"].shape == (64, 64, 3) and ab.SUBTASKS[int(s["subtask"])] == "xray"
    c.prompt.descriptions["xray"] = ["a knife", "a suitcase", "multiplication"]
    p = ab.prompts_from_config(c.prompt, c.input.subtasks)
    assert p == {"watermark": ab.build_prompt("watermark"),
                 "xray": "Three sub-images. <image-1>: a knife, <image-2>: a suitcase, <image-3>: The overlapped "
                         "of <image-1> and <image-2> by multiplication."}
    c = diffdecompose.get_config("res=1024x512")
    assert (c.input.height, c.input.width, c.total_steps) == (512, 1024, 50_000)
    make_logo(str(tmp_path / "v"))
    os.rename(tmp_path / "v" / "val_images", tmp_path / "v" / "train_images")
    c = diffdecompose.get_config(f"logo={tmp_path / 'v'}")
    logo = ab.dataset_from_config(c.input)
    assert len(logo) == 3 and logo[0]["composite"].shape == (256, 256, 3)
    with pytest.raises(ValueError, match="unknown subtasks"):
        diffdecompose.get_config("subtasks=rain")


def test_config_opacity_replaces_every_subtasks_range():
    from configs import diffdecompose

    c = diffdecompose.get_config("subtasks=watermark+xray,runlocal")
    c.input.opacity = (0.5, 0.6)
    ds = ab.dataset_from_config(c.input, length=8)
    for i in range(8):
        s = ds[i]
        assert 0.5 <= s["params"]["opacity"] <= 0.6
        # The watermark is the over operator: the mark's alpha is opacity x the logo's own alpha.
        assert float(s["alpha"].max()) <= 0.6 + 1e-6
    c.input.opacity = (0.6, 0.5)
    with pytest.raises(ValueError, match="input.opacity"):
        ab.dataset_from_config(c.input, length=1)


def test_config_watermark_size_sets_the_box_at_512_scaled_to_the_size():
    from configs import diffdecompose

    c = diffdecompose.get_config("subtasks=watermark,runlocal")
    c.input.update(height=128, width=128, watermark_size=(256, 384))  # 64-96 px at 128 (x 128/512)
    ds = ab.dataset_from_config(c.input, length=6)
    for i in range(6):
        p = ds[i]["params"]
        assert 64 <= p["box_h"] <= 96 and p["box_w"] == p["box_h"]
    c.input.watermark_size = (0, 100)
    with pytest.raises(ValueError, match="input.watermark_size"):
        ab.dataset_from_config(c.input, length=1)
