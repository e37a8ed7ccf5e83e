"""Video I/O: write -> read round trips, alpha, the repository's example clip, errors, atomic writes."""

import os

import numpy as np
import pytest

from omnijax.io.video import (
    VideoError,
    iter_frames,
    list_frames,
    probe,
    read_mask,
    read_video,
    write_frames,
    write_image,
    write_rgba_video,
    write_video,
)


def _clip(f=9, h=48, w=64, seed=0):
    """Smooth moving colour ramps (codec friendly) plus a soft alpha ramp."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    frames = []
    for t in range(f):
        r = 0.5 + 0.4 * np.sin((x + 3 * t) / 9.0)
        g = 0.5 + 0.4 * np.cos((y - 2 * t) / 7.0)
        b = np.full_like(x, 0.2 + 0.05 * t)
        a = np.clip((x - 8 - 2 * t) / 24.0, 0, 1)
        frames.append(np.stack([r, g, b, a], -1))
    return np.clip(np.rint(np.stack(frames) * 255), 0, 255).astype(np.uint8)


def _no_temp_files(folder):
    return [n for n in os.listdir(folder) if ".tmp" in n]


def test_mp4_round_trip_keeps_count_size_fps(tmp_path):
    clip = _clip()[..., :3]
    path = str(tmp_path / "a.mp4")
    assert write_video(path, clip, fps=12.5) == (9, 48, 64)
    info = probe(path)
    assert (info.num_frames, info.height, info.width, info.codec, info.has_alpha) == (9, 48, 64, "h264", False)
    assert info.fps == pytest.approx(12.5)
    back, fps = read_video(path)
    assert back.shape == clip.shape and back.dtype == np.uint8 and fps == pytest.approx(12.5)
    assert np.abs(back.astype(int) - clip).mean() < 6.0  # yuv420p halves chroma resolution; crf 18
    assert _no_temp_files(tmp_path) == []


def test_mp4_streams_from_an_iterator_and_pads_odd_sizes(tmp_path):
    clip = _clip(f=5, h=31, w=45)[..., :3]
    path = str(tmp_path / "odd.mp4")
    assert write_video(path, iter(list(clip)), fps=24) == (5, 32, 46)
    back, _ = read_video(path)
    assert back.shape == (5, 32, 46, 3)
    assert np.abs(back[:, :31, :45].astype(int) - clip).mean() < 6.0
    # start / max_frames stream a window of the clip
    window = list(iter_frames(path, start=2, max_frames=2))
    assert len(window) == 2 and np.abs(window[0].astype(int) - back[2]).max() == 0


@pytest.mark.parametrize("channels", [3, 4])
def test_png_sequence_round_trip_is_lossless(tmp_path, channels):
    clip = _clip(f=4)[..., :channels]
    folder = str(tmp_path / "frames")
    assert write_frames(folder, clip) == 4
    back, fps = read_video(folder, alpha=channels == 4)
    np.testing.assert_array_equal(back, clip)
    info = probe(folder)
    assert (info.num_frames, info.height, info.width, info.has_alpha) == (4, 48, 64, channels == 4)
    # overwrite replaces the folder atomically; no temporary folders stay behind
    write_frames(folder, clip[:2])
    assert len(list_frames(folder)) == 2 and _no_temp_files(tmp_path) == []


@pytest.mark.parametrize("suffix", [".webm", ".mov"])
def test_rgba_video_keeps_alpha(tmp_path, suffix):
    clip = _clip()
    path = str(tmp_path / ("layer" + suffix))
    write_rgba_video(path, clip, fps=16)
    info = probe(path)
    assert info.has_alpha and (info.num_frames, info.height, info.width) == (9, 48, 64)
    assert info.fps == pytest.approx(16)
    back, _ = read_video(path, alpha=True)
    assert back.shape == clip.shape
    assert np.abs(back[..., 3].astype(int) - clip[..., 3]).max() <= 2
    assert np.abs(back[..., :3].astype(int) - clip[..., :3]).mean() < 4.0
    assert read_mask(path, threshold=None).shape == (9, 48, 64)


@pytest.mark.parametrize("suffix", [".webm", ".mov"])
def test_rgba_video_in_runs_is_one_stream_in_frame_order(tmp_path, suffix):
    """Runs of frames encoded by separate encoders on a pool come back as one stream: every frame where it was
    (each frame of this clip has its own brightness, so a run muxed out of order fails), a keyframe at the start
    of each run, increasing timestamps, the frame rate kept."""
    import av

    clip = _clip(f=11)
    clip[..., 2] = (np.arange(11) * 20 + 20).astype(np.uint8)[:, None, None]
    path = str(tmp_path / ("layer" + suffix))
    assert write_rgba_video(path, iter(clip), fps=16, keyframe_every=4, workers=3) == (11, 48, 64)
    back, fps = read_video(path, alpha=True)
    assert back.shape == clip.shape and fps == pytest.approx(16)
    per_frame_blue = back[..., 2].reshape(11, -1).mean(1)
    np.testing.assert_allclose(per_frame_blue, clip[..., 2].reshape(11, -1).mean(1), atol=3)
    assert np.abs(back[..., 3].astype(int) - clip[..., 3]).max() <= 2
    with av.open(path) as c:
        packets = [p for p in c.demux(c.streams.video[0]) if p.size]
    pts = [p.pts for p in packets]
    assert pts == sorted(pts) and len(set(pts)) == 11
    keys = [i for i, p in enumerate(sorted(packets, key=lambda p: p.pts)) if p.is_keyframe]
    assert keys == ([0, 4, 8] if suffix == ".webm" else list(range(11)))  # ProRes frames are all keyframes
    assert _no_temp_files(tmp_path) == []


def test_rgba_video_in_runs_fails_whole(tmp_path):
    frames = [np.zeros((16, 16, 4), np.uint8)] * 5 + [np.zeros((8, 8, 4), np.uint8)]
    with pytest.raises(VideoError, match="frame 5: size"):
        write_rgba_video(str(tmp_path / "x.webm"), frames, fps=8, keyframe_every=2, workers=2)
    with pytest.raises(VideoError, match="keyframe_every"):
        write_rgba_video(str(tmp_path / "x.webm"), frames, fps=8, keyframe_every=0)
    with pytest.raises(VideoError, match="workers"):
        write_rgba_video(str(tmp_path / "x.webm"), frames, fps=8, workers=0)
    with pytest.raises(VideoError, match="no frames"):
        write_rgba_video(str(tmp_path / "x.webm"), [], fps=8)
    assert os.listdir(tmp_path) == []


def test_write_image_and_single_image_read(tmp_path):
    img = _clip(f=1)[0]
    path = str(tmp_path / "one.png")
    write_image(path, img.astype(np.float32) / 255.0)
    back, _ = read_video(path, alpha=True)
    np.testing.assert_array_equal(back[0], img)


def test_frame_folder_natural_order_and_masks(tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    vals = [0, 60, 200, 255]
    for i, v in zip([1, 2, 10, 11], vals):  # lexical order would put 10 and 11 before 2
        write_image(str(folder / f"frame_{i}.png"), np.full((8, 10), v, np.uint8))
    raw = read_mask(str(folder), threshold=None)
    assert raw[:, 0, 0].tolist() == vals
    assert read_mask(str(folder))[:, 0, 0].tolist() == [0, 0, 1, 1]


def test_reads_the_example_clip(example_clip):
    """The repository's example clip (data/example_clip.py) in the layout the decompose CLI reads."""
    from data.example_clip import make_example

    info = probe(os.path.join(example_clip, "input_video.mp4"))
    assert (info.num_frames, info.height, info.width, info.codec) == (11, 96, 160, "h264")
    video, fps = read_video(os.path.join(example_clip, "input_video.mp4"), max_frames=5)
    assert video.shape == (5, 96, 160, 3) and fps == pytest.approx(info.fps)
    truth = make_example(11, 96, 160)
    # h264 (crf 18, 4:2:0 chroma) on a grainy background: about 6/255; another clip would be 10x further off.
    assert np.abs(video.astype(np.float32) / 255 - truth["video"][:5]).mean() < 8 / 255
    for k in range(2):
        m = read_mask(os.path.join(example_clip, f"mask_{k:02d}.mp4"))
        assert m.shape == (11, 96, 160) and set(np.unique(m)) <= {0, 1}
        assert 0 < m.mean() < 0.5  # an object, not the whole frame
        want = truth["masks"][k] > 0.5
        iou = (want & (m > 0)).sum() / (want | (m > 0)).sum()
        assert iou > 0.97, iou
        alpha, _ = read_video(os.path.join(example_clip, "gt", f"alpha_{k:02d}"))
        np.testing.assert_array_equal(alpha[..., 0], np.rint(truth["alphas"][k] * 255).astype(np.uint8))


def test_clear_errors(tmp_path):
    with pytest.raises(VideoError, match="no such file"):
        probe(str(tmp_path / "missing.mp4"))
    with pytest.raises(VideoError, match="no such file"):
        list(iter_frames(str(tmp_path / "missing")))
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"not a video at all" * 10)
    with pytest.raises(VideoError, match="not a readable"):
        read_video(str(bad))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(VideoError, match="no frames"):
        probe(str(empty))
    with pytest.raises(VideoError, match="webm"):
        write_rgba_video(str(tmp_path / "x.mp4"), _clip(f=2), fps=8)
    sizes = tmp_path / "sizes"
    sizes.mkdir()
    write_image(str(sizes / "0.png"), np.zeros((8, 8, 3), np.uint8))
    write_image(str(sizes / "1.png"), np.zeros((9, 8, 3), np.uint8))
    with pytest.raises(VideoError, match="differs"):
        read_video(str(sizes))


def test_failed_write_leaves_nothing(tmp_path):
    frames = [np.zeros((16, 16, 3), np.uint8), np.zeros((8, 8, 3), np.uint8)]  # size changes mid-clip
    with pytest.raises(VideoError, match="differs"):
        write_video(str(tmp_path / "x.mp4"), frames, fps=8)
    with pytest.raises(VideoError, match="expected"):
        write_frames(str(tmp_path / "f"), [np.zeros((4, 4, 2), np.uint8)])
    assert os.listdir(tmp_path) == []


def test_to_uint8_rounds_and_clips_as_a_float64_formula():
    from omnijax.io.video import to_uint8

    rng = np.random.default_rng(0)
    x = np.concatenate([np.arange(256) / 255.0, rng.uniform(-0.2, 1.2, 10_000)]).astype(np.float32)
    want = np.clip(np.round(x.astype(np.float64) * 255.0), 0, 255).astype(np.uint8)
    np.testing.assert_array_equal(to_uint8(x), want)
    u = rng.integers(0, 256, 10, dtype=np.uint8)
    assert to_uint8(u) is u
    with pytest.raises(VideoError, match="uint8 or float"):
        to_uint8(np.arange(3))
