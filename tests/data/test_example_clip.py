"""The repository's example clip: two objects with shadows, their coarse masks, a ground truth that obeys the
layer equation, determinism, and the command line."""

import json
import os

import numpy as np
import pytest
from scipy import ndimage

from data import example_clip
from data.example_clip import make_example

SIZE = (9, 64, 96)


@pytest.fixture(scope="module")
def clip():
    return make_example(*SIZE)


def test_two_objects_with_shadows(clip):
    f, h, w = SIZE
    assert clip["video"].shape == clip["background"].shape == (f, h, w, 3)
    assert clip["alphas"].shape == clip["masks"].shape == (2, f, h, w)
    half = w // 2
    for k in range(2):
        a, m = clip["alphas"][k], clip["masks"][k] > 0
        assert m.any(axis=(1, 2)).all(), "each object is visible in every frame"
        assert (a[m] > 0.5).all()  # the true matte covers the coarse mask
        # A shadow: matte clearly outside the dilated object mask, and the coarse mask does not include it.
        dil = np.stack([ndimage.binary_dilation(x, iterations=2) for x in m])
        assert ((a > 0.2) & ~dil).sum() > 0.01 * m.sum()
        # Object k's mask lies in half k, so the two layers do not overlap.
        other = slice(half, None) if k == 0 else slice(0, half)
        assert not m[:, :, other].any()
    # Outside both mattes the video is the clean background.
    clear = (clip["alphas"] == 0).all(0)
    np.testing.assert_array_equal(clip["video"][clear], clip["background"][clear])
    # Where only object k's matte is present, V = a F + (1 - a) B with F in [0, 1] (paper eq. 2).
    for k in range(2):
        a = clip["alphas"][k][..., None]
        only = (clip["alphas"][1 - k] == 0) & (clip["alphas"][k] > 0.05)
        fg = (clip["video"] - (1 - a) * clip["background"]) / np.maximum(a, 1e-6)
        assert fg[only].min() > -1e-4 and fg[only].max() < 1 + 1e-4


def test_deterministic_and_seeded(clip):
    again = make_example(*SIZE)
    for key in clip:
        np.testing.assert_array_equal(again[key], clip[key])
    assert not np.array_equal(make_example(*SIZE, seed=1)["video"], clip["video"])


def test_cli_writes_the_layout(tmp_path, capsys):
    out = str(tmp_path / "ex")
    assert example_clip.main(["--out", out, "--frames", "5", "--height", "48", "--width", "64"]) == 0
    names = sorted(os.listdir(out))
    assert names == ["gt", "input_video.mp4", "mask_00.mp4", "mask_01.mp4", "prompt.json"]
    assert sorted(os.listdir(os.path.join(out, "gt"))) == ["alpha_00", "alpha_01", "background"]
    with open(os.path.join(out, "prompt.json")) as f:
        assert json.load(f) == {"bg": ""}
    assert not [p for p in os.listdir(tmp_path) if ".tmp-" in p]
    assert example_clip.main(["--out", out, "--height", "8"]) == 2
    assert capsys.readouterr().err.strip().startswith("error: example clip size")
