"""launch/decompose.py end to end on the repository's example clip with the tiny random model (eq. 2 checked on
the written layers), and its input errors."""

import json
import os

import numpy as np
import pytest

from launch import decompose
from omnijax.io.video import list_frames, probe, read_video
from omnijax.omnimatte.decompose import pingpong_indices, processing_size


def test_pingpong_and_sizes():
    assert pingpong_indices(4, 9).tolist() == [0, 1, 2, 3, 2, 1, 0, 1, 2]
    assert pingpong_indices(1, 5).tolist() == [0] * 5
    assert processing_size(384, 640, 480) == (480, 800)
    assert processing_size(1080, 1920, 480) == (480, 848)


def test_example_clip_end_to_end(tmp_path, example_clip):
    """The CLI on the repository's example clip (11 frames, so padded to 13 and trimmed back) with the tiny
    random model; the written layers satisfy eq. 2 wherever the equation can hold."""
    out = str(tmp_path / "layers")
    video_path = os.path.join(example_clip, "input_video.mp4")
    masks = [os.path.join(example_clip, f"mask_0{k}.mp4") for k in (0, 1)]
    rc = decompose.main(["--video", video_path, "--masks", *masks, "--out", out, "--model", "tiny", "--steps", "2",
                         "--cache", str(tmp_path / "cache"), "--compile-cache", str(tmp_path / "jax")])
    assert rc == 0
    info = probe(video_path)
    n, h, w = info.num_frames, info.height, info.width
    assert (n, h, w) == (11, 96, 160)
    with open(os.path.join(out, "report.json")) as f:
        report = json.load(f)
    assert report["frames"] == n and report["size"] == [h, w] and report["processing_frames"] == 13
    assert len(report["recomposition_psnr_db"]) == 2
    assert {"encoders", "vae_encode", "sampler", "vae_decode", "write", "total"} <= set(report["timings_s"])
    # JAX's seconds per program under the programs' own names: the VAE's and the sampler's among the costliest.
    assert {"vae_encode", "vae_decode", "run"} <= set(report["jax_compile_by_program_s"])
    assert report["programs_compiled_at_dispatch"] >= 3
    per_object = {f"object_{k}/{f}" for k in range(2) for f in ("rgba.webm", "alpha.mp4", "rgba")}
    assert set(report["write_files_s"]) == {"background.mp4", "preview.png"} | per_object
    assert max(report["write_files_s"].values()) <= report["timings_s"]["write"]
    # The start-up split and the process clock account for the run: start-up + load + the clip <= since start.
    assert set(report["startup_s"]) == {"to_run", "backend"}
    before_clip = sum(report["startup_s"].values()) + report["load_models_s"]
    assert before_clip + report["timings_s"]["total"] <= report["since_start_s"] + 0.01
    video, _ = read_video(video_path)
    bg, fps = read_video(os.path.join(out, "background.mp4"))
    assert bg.shape == (n, h, w, 3) and fps == info.fps
    v, b = video / 255.0, bg / 255.0
    for k in range(2):
        d = os.path.join(out, f"object_{k}")
        pngs = list_frames(os.path.join(d, "rgba"))
        assert len(pngs) == n
        rgba, _ = read_video(os.path.join(d, "rgba"), alpha=True)
        assert rgba.shape == (n, h, w, 4)
        a = probe(os.path.join(d, "rgba.webm"))
        assert (a.num_frames, a.height, a.width) == (n, h, w) and a.has_alpha
        grey, _ = read_video(os.path.join(d, "alpha.mp4"))
        assert grey.shape == (n, h, w, 3)
        # Eq. 2 on the written files: alpha*F + (1-alpha)*B == V wherever it can hold, i.e. where alpha is not
        # tiny and the unclipped F = (V - (1-alpha)B)/alpha lies in [0, 1]. The files are 8-bit and the
        # background is h264 (lossy on the random model's noisy output), so the bound is a few levels: measured
        # mean 4.3/255, median 3.3/255; F = V gives 18/255, another layer's alpha 7/255, a time-flipped B 17/255.
        fg, alpha = rgba[..., :3] / 255.0, rgba[..., 3:] / 255.0
        unclipped = (v - (1 - alpha) * b) / np.maximum(alpha, 1e-6)
        where = (alpha >= 0.1) & (unclipped >= 0) & (unclipped <= 1)
        assert where.mean() > 0.3, where.mean()  # not vacuous
        err = np.abs(alpha * fg + (1 - alpha) * b - v)[where]
        assert err.mean() < 5.5 / 255 and np.median(err) < 4.5 / 255, (k, err.mean() * 255, np.median(err) * 255)
        # alpha.mp4 is the same matte as the RGBA layer's alpha (up to h264).
        assert np.abs(grey.mean(-1) / 255.0 - alpha[..., 0]).mean() < 3 / 255
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
    rc = decompose.main(["--video", vid, "--masks", mask, "--out", out, "--model", "tiny", "--no-compile-cache"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert rc == 2 and err.startswith("error:")
    assert {"missing": "no such", "frames": "frames", "size": "is 48x16", "empty": "empty"}[case] in err
    assert not os.path.exists(out)
