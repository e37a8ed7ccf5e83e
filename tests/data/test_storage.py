"""TFDS array_record round trip, latent cache round trip, and VideoMatte / background folder sources."""

import os

import numpy as np
import pytest

from data.composite import CompositeConfig
from data.latent_cache import LatentSource, cache_latents, standin_encoder
from data.pipeline import TfdsOmnimatte, make_pipeline
from data.sources import VideoFolderSource, VideoMatteSource, find_clips
from data.synthetic import SyntheticOmnimatte
from omnijax.io.video import VideoError, write_frames, write_video


def test_tfds_build_and_read_round_trip(tmp_path):
    import tensorflow_datasets as tfds

    from data.tfds_omnimatte import PARAM_KEYS, OmnimatteSynth, OmnimatteSynthConfig, decode

    cfg = OmnimatteSynthConfig(name="t", num_frames=5, height=32, width=48, num_train=4, num_validation=2, seed=2)
    b = OmnimatteSynth(config=cfg, data_dir=str(tmp_path))
    b.download_and_prepare(file_format="array_record")
    src = b.as_data_source("train")
    assert len(src) == 4 and len(b.as_data_source("validation")) == 2
    ref = SyntheticOmnimatte(CompositeConfig(num_frames=5, height=32, width=48), seed=2)
    seen = set()
    for j in range(4):
        ex = src[j]
        assert ex["video"].dtype == np.uint8 and ex["video"].shape == (5, 32, 48, 3)
        assert ex["params"].shape == (len(PARAM_KEYS),)
        s = decode(ex)
        i = int(s["params"]["index"])
        seen.add(i)
        want = ref[i]  # regenerated independently: stored = round(255 x)
        for k in ("video", "background", "foreground", "alpha", "mask", "effect_mask"):
            np.testing.assert_allclose(s[k], want[k], atol=0.5 / 255 + 1e-6, err_msg=k)
        a = s["alpha"][..., None]
        assert np.abs(a * s["foreground"] + (1 - a) * s["background"] - s["video"]).max() < 2.5 / 255
    assert seen == {0, 1, 2, 3}
    # the registered builder reads the same files by name; pipelines consume the decoded source
    by_name = tfds.data_source("omnimatte_synth", split="train", data_dir=str(tmp_path),
                               builder_kwargs={"config": cfg})
    batch = next(iter(make_pipeline(TfdsOmnimatte(by_name), batch_size=2, shard=(0, 1))))
    assert batch["video"].shape == (2, 5, 32, 48, 3) and batch["video"].dtype == np.float32


def test_latent_cache_round_trip_and_resume(tmp_path):
    ds = SyntheticOmnimatte(CompositeConfig(num_frames=9, height=32, width=48), seed=1, length=3)
    out = str(tmp_path / "lat")
    calls = []

    def enc(x):
        calls.append(x.shape)
        assert x.min() >= -1 and x.max() <= 1
        return standin_encoder(x)

    assert cache_latents(ds, enc, out, batch_size=2, dtype=np.float32) == 3
    assert calls == [(6, 9, 32, 48, 3), (3, 9, 32, 48, 3)]
    assert cache_latents(ds, enc, out) == 0 and len(calls) == 2  # resumes: nothing left to do
    src = LatentSource(out)
    assert len(src) == 3
    for i in range(3):
        s, ref = src[i], ds[i]
        grey = np.repeat(ref["alpha"][..., None], 3, -1)
        for key, pix in (("z_video", ref["video"]), ("z_background", ref["background"]), ("z_alpha", grey)):
            want = standin_encoder(pix[None] * 2 - 1)[0]
            assert s[key].shape == (3, 4, 6, 16)
            np.testing.assert_allclose(s[key], want, atol=1e-5, err_msg=key)
        np.testing.assert_array_equal(s["mask"], ref["mask"])
        assert s["params"] == pytest.approx(ref["params"])
    b = next(iter(make_pipeline(src, batch_size=2, shard=(0, 1))))
    assert b["z_alpha"].shape == (2, 3, 4, 6, 16) and b["mask"].shape == (2, 9, 32, 48)
    with pytest.raises(ValueError, match="expected"):
        cache_latents(SyntheticOmnimatte(ds.cfg, seed=9, length=1), lambda x: x, str(tmp_path / "bad"))
    with pytest.raises(FileNotFoundError):
        LatentSource(str(tmp_path / "none"))


def _moving_clip(f, h, w, seed):
    rng = np.random.default_rng(seed)
    base = rng.uniform(0.2, 0.8, 3)
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([np.clip(base + 0.2 * np.sin((x + 2 * t) / 5.0)[..., None], 0, 1) for t in range(f)])


def test_videomatte_and_background_folders(tmp_path):
    root = tmp_path / "vm"
    (root / "train" / "fgr").mkdir(parents=True)
    (root / "train" / "pha").mkdir(parents=True)
    f, h, w = 6, 40, 56
    y, x = np.mgrid[0:h, 0:w]
    pha = np.stack([((x - 20 - t) ** 2 + (y - 20) ** 2 < 100).astype(np.float32) for t in range(f)])
    write_video(str(root / "train" / "fgr" / "0000.mp4"), _moving_clip(f, h, w, 0), fps=10)
    write_frames(str(root / "train" / "pha" / "0000"), pha)          # alpha as a frame folder
    write_video(str(root / "train" / "fgr" / "0001.mp4"), _moving_clip(f, h, w, 1), fps=10)  # no alpha: ignored
    bgs = tmp_path / "bgs"
    write_video(str(bgs / "a" / "clip.mp4"), _moving_clip(3, 24, 30, 2), fps=10)  # shorter than F: ping-pong
    write_frames(str(bgs / "b" / "frames"), _moving_clip(8, 50, 90, 3))
    fg = VideoMatteSource(str(root), seed=0)
    assert len(fg) == 1 and fg.unmatched == ["0001"]
    bg = VideoFolderSource(str(bgs))
    assert [os.path.relpath(c, bgs) for c in bg.clips] == ["a/clip.mp4", os.path.join("b", "frames")]
    rgb, alpha = fg.foreground(0, 5, 32, 32)
    assert rgb.shape == (5, 40, 56, 3) and alpha.shape == (5, 40, 56)
    assert set(np.unique(alpha)) <= {0.0, 1.0} and alpha.sum() > 0
    assert bg.background(0, 5, 32, 32).shape == (5, 24, 30, 3)
    cfg = CompositeConfig(num_frames=5, height=32, width=32)
    ds = SyntheticOmnimatte(cfg, foregrounds=fg, backgrounds=bg, seed=0, length=4)
    for i in range(4):
        s = ds[i]
        a = s["alpha"][..., None]
        np.testing.assert_allclose(a * s["foreground"] + (1 - a) * s["background"], s["video"], atol=2e-6)
        assert s["mask"].any()
    with pytest.raises(VideoError, match="pha"):
        VideoMatteSource(str(bgs))
    (tmp_path / "empty").mkdir()
    with pytest.raises(VideoError, match="no videos"):
        VideoFolderSource(str(tmp_path / "empty"))
    assert find_clips(str(root / "train" / "pha")) == [str(root / "train" / "pha" / "0000")]


def test_data_sheet():
    from data.composite import CompositeConfig
    from data.preview import COLUMNS, data_sheet
    from data.synthetic import SyntheticOmnimatte

    ds = SyntheticOmnimatte(CompositeConfig(num_frames=5, height=32, width=48), seed=0)
    img = data_sheet([ds[0], ds[1]])
    assert img.shape == (16 + 2 * 36 + 4, len(COLUMNS) * 52 + 4, 3) and img.dtype == np.uint8
    # Tile (row 0, column 0) is the first frame of sample 0, placed after the header and the 4-pixel gap.
    want = np.clip(np.rint(ds[0]["video"][0] * 255), 0, 255).astype(np.uint8)
    np.testing.assert_array_equal(img[16 + 4:16 + 4 + 32, 4:4 + 48], want)
