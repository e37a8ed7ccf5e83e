"""launch/sample_flux.py end to end on the random tiny models (a PNG comes out), and its input errors."""

import numpy as np
from PIL import Image

from launch import sample_flux


def test_tiny_cli_writes_a_png(tmp_path, capsys):
    out = tmp_path / "img" / "fox.png"
    rc = sample_flux.main(["--prompt", "a red fox", "--out", str(out), "--model", "tiny", "--steps", "2",
                           "--height", "32", "--width", "48", "--cache", "", "--dtype", "f32"])
    assert rc == 0
    image = np.asarray(Image.open(out))
    assert image.shape == (32, 48, 3) and image.dtype == np.uint8 and image.std() > 0
    assert not [p for p in out.parent.iterdir() if p.name != "fox.png"]  # no temporary files left behind
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith(f"wrote {out}") and "sample" in line and "decode" in line


def test_input_errors(tmp_path, capsys):
    png = str(tmp_path / "x.png")
    assert sample_flux.main(["--prompt", "p", "--out", png, "--cache", ""]) == 2
    assert "--t5 is required" in capsys.readouterr().err
    assert sample_flux.main(["--prompt", "p", "--out", str(tmp_path / "x.jpg"), "--model", "tiny"]) == 2
    assert ".png" in capsys.readouterr().err
    assert sample_flux.main(["--prompt", "p", "--out", png, "--t5", str(tmp_path / "missing"), "--clip", "c",
                             "--t5-tokenizer", str(tmp_path), "--clip-tokenizer", str(tmp_path), "--cache", ""]) == 2
    assert "not found" in capsys.readouterr().err
