"""launch/analyze_blocks.py on the tiny random model and the project's synthetic dataset, and its input errors."""

import json
import os

import numpy as np
import pytest

from data.composite import CompositeConfig
from data.pipeline import fit_to_latent
from data.sources import VideoFolderSource, VideoMatteSource
from data.synthetic import SyntheticOmnimatte
from launch import analyze_blocks
from omnijax.io.video import write_frames
from omnijax.omnimatte import analysis


def test_cli_analyses_the_synthetic_dataset(tmp_path, capsys, monkeypatch):
    seen = []
    real = analysis.analyze

    def recording(base, samples, *args, **kwargs):
        samples = list(samples)
        seen.extend(samples)
        return real(base, samples, *args, **kwargs)

    monkeypatch.setattr(analysis, "analyze", recording)
    out = tmp_path / "analysis"
    rc = analyze_blocks.main(["--model", "tiny", "--layers", "4", "--samples", "2", "--frames", "5", "--size",
                              "32x48", "--seed", "3", "--out", str(out), "--emit-k", "--cache", str(tmp_path / "c")])
    assert rc == 0
    rep = json.loads((out / "block_analysis.json").read_text())
    assert len(rep["contribution"]) == 4 and abs(sum(rep["contribution"]) - 1) < 1e-5
    assert rep["num_samples"] + rep["skipped"] == 2 and rep["num_samples"] > 0
    assert 1 <= rep["effect_expert_k"] <= 4 and rep["effect_expert_k"] == 4 - rep["troughs"][1]
    assert rep["data"]["dataset"] == "data.synthetic.SyntheticOmnimatte" and rep["data"]["seed"] == 3
    assert rep["data"]["foregrounds"] == rep["data"]["backgrounds"] == "procedural"
    assert rep["conditioning"]["text"] == "umT5 embedding of the empty prompt" and rep["conditioning"]["umt5"] == "tiny"
    assert (out / "block_analysis.png").stat().st_size > 0 and (out / "block_analysis_maps.png").stat().st_size > 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(rep["effect_expert_k"])
    assert not [p for p in os.listdir(out) if p.startswith(".tmp-")]
    # What the analysis read is the dataset's samples, fitted as the trainer fits them.
    ds = SyntheticOmnimatte(CompositeConfig(num_frames=5, height=32, width=48), seed=3)
    assert len(seen) == 2
    for i, got in enumerate(seen):
        want = fit_to_latent(ds[i])
        assert set(got) == {"video", "mask", "effect_mask"}
        for k in got:
            np.testing.assert_array_equal(got[k], want[k])
        assert got["effect_mask"].any()


def _videomatte(root, frames=6):
    rng = np.random.default_rng(0)
    write_frames(str(root / "test" / "fgr" / "0000"), rng.integers(0, 255, (frames, 40, 56, 3), np.uint8))
    alpha = np.zeros((frames, 40, 56), np.uint8)
    alpha[:, 10:30, 20:40] = 255
    write_frames(str(root / "test" / "pha" / "0000"), alpha)
    write_frames(str(root / "bg" / "clip"), rng.integers(0, 255, (frames, 48, 64, 3), np.uint8))


def test_videomatte_folders(tmp_path):
    _videomatte(tmp_path)
    args = analyze_blocks._args(["--fg-dir", str(tmp_path), "--bg-dir", str(tmp_path / "bg"), "--frames", "5",
                                 "--size", "32x48", "--samples", "3", "--out", str(tmp_path / "out")])
    ds = analyze_blocks.dataset(args)
    assert isinstance(ds.fg, VideoMatteSource) and isinstance(ds.bg, VideoFolderSource) and len(ds) == 3
    assert ds.fg.root == str(tmp_path / "test")  # the held-out split by default
    got = next(analyze_blocks.samples(ds))
    assert got["video"].shape == (5, 32, 48, 3) and got["effect_mask"].shape == (5, 32, 48)
    data = analyze_blocks.describe(args, ds)
    assert data["foregrounds"].startswith("VideoMatte") and data["backgrounds"].startswith(str(tmp_path / "bg"))


@pytest.mark.parametrize("case", ["size", "frames", "format", "fg-missing", "fg-layout", "bg-missing", "blocks"])
def test_input_errors_are_one_line_and_nonzero(tmp_path, capsys, case):
    out = tmp_path / "out"
    (tmp_path / "empty").mkdir()
    args = {"size": ["--size", "40x48"], "frames": ["--frames", "6"], "format": ["--size", "32"],
            "fg-missing": ["--fg-dir", str(tmp_path / "nope")], "fg-layout": ["--fg-dir", str(tmp_path / "empty")],
            "bg-missing": ["--bg-dir", str(tmp_path / "nope")], "blocks": ["--layers", "2"]}[case]
    rc = analyze_blocks.main(["--model", "tiny", "--layers", "4", "--frames", "5", "--size", "32x32", "--out",
                              str(out), *args])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert rc == 2 and err.startswith("error:")
    assert {"size": "multiples of 16", "frames": "4k+1", "format": "HxW", "fg-missing": "no such folder",
            "fg-layout": "fgr/", "bg-missing": "no such folder", "blocks": "at least 3"}[case] in err
    assert not out.exists()


def test_worker_processes_give_the_same_samples():
    args = analyze_blocks._args(["--frames", "5", "--size", "32x48", "--samples", "2", "--out", "unused"])
    ds = analyze_blocks.dataset(args)
    inline = list(analyze_blocks.samples(ds))
    spawned = list(analyze_blocks.samples(ds, workers=2))
    assert len(spawned) == 2
    for a, b in zip(inline, spawned):
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])


def test_converted_checkpoints_and_the_vae_encoder(tmp_path, monkeypatch):
    """--checkpoint and --vae take converted omnijax folders; the VAE's latents reach the analysis."""
    import jax.numpy as jnp
    from flax import nnx

    from omnijax.checkpoint import save_pretrained
    from omnijax.models.wan import WanDiT, variant
    from omnijax.models.wan.vae import WanVAE, vae_variant

    dit = save_pretrained(str(tmp_path / "dit"), WanDiT(variant("tiny-inp", num_layers=3), rngs=nnx.Rngs(0)), "wan_dit")
    vae_model = WanVAE(vae_variant("tiny"), dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(1))
    vae = save_pretrained(str(tmp_path / "vae"), vae_model, "wan_vae")
    latents = []
    real = analysis.analyze

    def recording(base, samples, encoder, *args, **kwargs):
        def spy(video):
            z = encoder(video)
            latents.append((np.asarray(video), np.asarray(z)))
            return z
        return real(base, samples, spy, *args, **kwargs)

    monkeypatch.setattr(analysis, "analyze", recording)
    out = tmp_path / "analysis"
    assert analyze_blocks.main(["--checkpoint", dit, "--vae", vae, "--umt5", "tiny", "--clip", "tiny", "--tokenizer",
                                "tiny", "--cache", str(tmp_path / "cache"), "--samples", "1", "--frames", "5",
                                "--size", "32x48", "--out", str(out)]) == 0
    rep = json.loads((out / "block_analysis.json").read_text())
    assert rep["encoder"] == "vae" and len(rep["contribution"]) == 3
    video, z = latents[0]
    want = vae_model.encode(jnp.asarray(video)[None])[0]  # the saved model itself, eagerly
    np.testing.assert_allclose(z, np.asarray(want), rtol=1e-4, atol=1e-5)


def test_dit_needs_the_conditioning_encoders(tmp_path, capsys):
    rc = analyze_blocks.main(["--dit", str(tmp_path), "--umt5", "tiny", "--frames", "5", "--size", "32x32",
                              "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert rc == 2 and err.startswith("error: --dit needs --tokenizer, --clip")
