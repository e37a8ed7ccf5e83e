"""launch/decompose_image.py end to end on the random tiny models, and its one-line input errors."""

import json

import numpy as np
from PIL import Image

from launch import decompose_image as cli

TINY = ["--model", "tiny", "--steps", "2", "--size", "32", "--cache", "", "--dtype", "f32", "--max-length", "8"]


def test_tiny_cli_writes_layers_report_and_preview(tmp_path, capsys):
    img = tmp_path / "composite.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 56, 3), dtype=np.uint8)).save(img)
    out = tmp_path / "layers"
    assert cli.main(["--image", str(img), "--out", str(out), "--blend", "xray", *TINY]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["background.png", "foreground.png", "preview.png",
                                                     "report.json"]
    for name in ("background.png", "foreground.png"):
        assert np.asarray(Image.open(out / name)).shape == (40, 56, 3)  # back at the input's size
    report = json.loads((out / "report.json").read_text())
    assert report["processed_size"] == [32, 32] and "X-ray" in report["prompt"]
    assert {"load_dit_vae", "encode_prompt", "encode", "sample", "decode", "write", "total"} <= set(report["timings_s"])
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporaries left
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith(f"wrote {out}")


def test_input_errors(tmp_path, capsys):
    img = tmp_path / "c.png"
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(img)
    (tmp_path / "text.png").write_text("not an image")
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("precious")
    cases = [(["--image", str(tmp_path / "missing.png")], "--image not found"),
             (["--image", str(tmp_path / "text.png")], "not a readable image"),
             (["--image", str(img), "--blend", "smoke"], "--blend must be one of"),
             (["--image", str(img), "--size", "30"], "multiples of 16"),
             (["--image", str(img), "--lora", str(tmp_path / "none.safetensors")], "--lora not found")]
    for args, msg in cases:
        assert cli.main([*TINY, *args, "--out", str(tmp_path / "o")]) == 2
        err = capsys.readouterr().err.strip()
        assert msg in err and len(err.splitlines()) == 1, err
    assert cli.main(["--image", str(img), "--out", str(full), *TINY]) == 2
    assert "not an empty folder" in capsys.readouterr().err
    assert (full / "keep.txt").read_text() == "precious"
    assert cli.main(["--image", str(img), "--out", str(tmp_path / "o2"), "--cache", ""]) == 2
    assert "--dit is required" in capsys.readouterr().err
