"""launch/sample_flux.py end to end on the random tiny models (a PNG comes out), and its input errors."""

import numpy as np
from PIL import Image

from launch import sample_flux


def test_tiny_cli_writes_a_png(tmp_path, capsys):
    out = tmp_path / "img" / "fox.png"
    rc = sample_flux.main(["--prompt", "a red fox", "--out", str(out), "--model", "tiny", "--steps", "2",
                           "--height", "32", "--width", "48", "--cache", str(tmp_path / "cache"), "--dtype", "f32"])
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


def test_cli_with_checkpoint_folders(tmp_path, capsys):
    """The converted-weights path: transformers / diffusers save folders (config.json beside the weights) and
    tokenizer folders, loaded through launch.common like real FLUX.1 files."""
    from tests.encoder_refs import tiny_tokenizer_dir
    from tests.models.flux.refs import diffusers_flux
    from tests.models.flux.test_text_encoders import hf_clip_text, hf_t5
    from tests.models.flux.test_vae import hf_vae

    hf_t5().save_pretrained(tmp_path / "t5")
    hf_clip_text(1).save_pretrained(tmp_path / "clip")
    hf_vae().save_pretrained(tmp_path / "vae")
    diffusers_flux(in_channels=64, pooled_projection_dim=32).save_pretrained(tmp_path / "dit")
    tok, out = tiny_tokenizer_dir(), tmp_path / "x.png"
    models = [a for k in ("dit", "vae", "t5", "clip") for a in (f"--{k}", str(tmp_path / k))]
    rc = sample_flux.main(["--prompt", "a fox", "--out", str(out), *models,
                           "--t5-tokenizer", tok, "--clip-tokenizer", tok, "--height", "32", "--width", "32",
                           "--steps", "2", "--max-length", "16", "--dtype", "f32", "--cache", ""])
    assert rc == 0, capsys.readouterr().err
    assert np.asarray(Image.open(out)).shape == (32, 32, 3)
