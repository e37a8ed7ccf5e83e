"""launch/evaluate_layers.py end to end on tiny folders; values checked against closed forms and skimage."""

import json
import os

import numpy as np
import pytest
from skimage.metrics import structural_similarity

from launch import evaluate_layers, preview_layers
from omnijax.io.video import write_image
from tests.data.test_logo import make_logo


def _folders(tmp_path, n=3, size=(24, 20)):
    r = np.random.default_rng(0)
    for d in ("gt", "pred", "mask"):
        (tmp_path / d).mkdir()
    gts, preds = [], []
    for i in range(n):
        gt = r.integers(0, 200, (*size, 3), dtype=np.uint8)
        m = np.zeros(size, np.uint8)
        m[2:10, 3:9] = 255
        pred = gt.copy()
        pred[m > 0] += 20                       # error 20 levels inside the mask only
        write_image(str(tmp_path / "gt" / f"im{i}.png"), gt)
        write_image(str(tmp_path / "pred" / f"im{i}.png"), pred)
        write_image(str(tmp_path / "mask" / f"im{i}.png"), m)
        gts.append(gt)
        preds.append(pred)
    return gts, preds


def test_folders_end_to_end(tmp_path, capsys):
    gts, preds = _folders(tmp_path)
    out = str(tmp_path / "report.json")
    rc = evaluate_layers.main(["--pred", str(tmp_path / "pred"), "--gt", str(tmp_path / "gt"), "--mask",
                               str(tmp_path / "mask"), "--ssim-padding", "valid", "--out", out])
    assert rc == 0
    printed = capsys.readouterr().out
    with open(out) as f:
        rep = json.load(f)
    assert rep["n"] == 3 and [r["name"] for r in rep["per_image"]] == ["im0", "im1", "im2"]
    frac = 8 * 6 / (24 * 20)
    assert rep["mean"]["rmse_w"] == pytest.approx(20 / 255 * 256)
    assert rep["mean"]["rmse"] == pytest.approx(np.sqrt(frac) * 20 / 255 * 256)
    assert rep["mean"]["psnr"] == pytest.approx(10 * np.log10(1 / (frac * (20 / 255) ** 2)))
    want = np.mean([structural_similarity(p / 255.0, g / 255.0, gaussian_weights=True, sigma=1.5,
                                          use_sample_covariance=False, data_range=1.0, channel_axis=-1)
                    for p, g in zip(preds, gts)])
    assert rep["mean"]["ssim"] == pytest.approx(want, abs=1e-9)
    # LPIPS / FID: scored only with local weights; otherwise skipped with a printed, recorded reason
    for k in ("lpips", "fid"):
        assert k in rep["mean"] or (rep["skipped"][k] and f"{k.upper()} skipped:" in printed)
    assert "rmse_w" in printed and f"wrote {out}" in printed


def test_one_line_errors(tmp_path, capsys):
    _folders(tmp_path)
    os.remove(tmp_path / "gt" / "im1.png")
    out = str(tmp_path / "r.json")
    rc = evaluate_layers.main(["--pred", str(tmp_path / "pred"), "--gt", str(tmp_path / "gt"), "--out", out,
                               "--no-perceptual"])
    assert rc == 2 and not os.path.exists(out)
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("error: 1 predictions have no match in") and err.endswith("im1")
    write_image(str(tmp_path / "gt" / "im1.png"), np.zeros((12, 12, 3), np.uint8))
    rc = evaluate_layers.main(["--pred", str(tmp_path / "pred"), "--gt", str(tmp_path / "gt"), "--out", out,
                               "--no-perceptual"])
    assert rc == 2
    assert "im1: prediction 20x24 and ground truth 12x12 differ; pass --size" in capsys.readouterr().err
    rc = evaluate_layers.main(["--pred", str(tmp_path / "pred"), "--gt", str(tmp_path / "gt"), "--out", out,
                               "--no-perceptual", "--size", "16"])
    assert rc == 0 and json.load(open(out))["settings"]["size"] == 16


def test_logo_mode(tmp_path):
    root = str(tmp_path / "10khigh")
    bgs = make_logo(root)
    (tmp_path / "pred").mkdir()
    for n in ("101-acme", "101-zeta", "202-acme"):  # a perfect background prediction
        write_image(str(tmp_path / "pred" / f"{n}.png"), bgs[n.split("-")[0]])
    out = str(tmp_path / "r.json")
    rc = evaluate_layers.main(["--pred", str(tmp_path / "pred"), "--logo", root, "--out", out, "--size", "16",
                               "--no-perceptual"])
    assert rc == 0
    rep = json.load(open(out))
    assert rep["n"] == 3 and rep["mean"]["rmse"] == pytest.approx(0, abs=1e-9) and rep["mean"]["ssim"] == 1.0


def test_preview_layers_sheet(tmp_path):
    out = str(tmp_path / "sheet.png")
    assert preview_layers.main(["--out", out, "--n", "1", "--size", "32"]) == 0
    from PIL import Image

    w, h = Image.open(out).size
    assert (w, h) == (5 * 36 + 4, 16 + 6 * 36 + 4)  # 5 columns, 6 subtasks, 4 px gaps, a 16 px header
