"""Bad input to the trainer and the converter stops with one line (exit code 2) before any model is built, and
the non-finite guard never leaves a wrecked checkpoint to resume from (#14)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import save_file

from configs import effect_expert
from launch import convert
from tasks import SetupError
from tasks.trainer import train
from tests.launch.runlocal import runlocal_config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _config(**overrides):
    return runlocal_config(effect_expert, **overrides)


def _one_error_line(stderr: str) -> str:
    lines = [x for x in stderr.splitlines() if x.strip()]
    assert len(lines) == 1, stderr
    assert lines[0].startswith("error: ")
    return lines[0]


# ------------------------------------------------------------------ trainer


def test_lr_1e30_stops_and_a_sane_lr_resumes_from_the_kept_checkpoint(tmp_path, caplog):
    """runlocal warms up from lr 0: step 1 is a no-op update (good), step 2 explodes the adapters (finite but
    ~1e29), step 3's loss is non-finite. Checkpoint 2 holds the wrecked state and must not survive."""
    work = str(tmp_path / "run")
    quick = {"ckpt_steps": 1, "total_steps": 3, "evals.preview_steps": 100, "evals.export_formats": ("omnijax",),
             "input.frames": 5, "input.height": 32, "input.width": 32}
    with pytest.raises(SystemExit, match=r"the last good checkpoint is step 1 .*deleted checkpoint\(s\) \[2\]"):
        train(_config(lr=1e30, **quick), work)
    assert sorted(os.listdir(os.path.join(work, "checkpoints"))) == ["1"]
    caplog.set_level("INFO")
    train(_config(lr=1e-3, **quick), work)
    assert "resumed from step 1" in caplog.text
    assert "changed settings: lr 1e+30 -> 0.001" in caplog.text
    with open(os.path.join(work, "metrics.jsonl")) as f:
        rows = [json.loads(x) for x in f]
    assert [r["step"] for r in rows][-2:] == [2, 3] and all(np.isfinite(r["loss"]) for r in rows)
    assert rows[-1]["lr"] == pytest.approx(1e-3)  # the new lr is the one in use after the resume
    assert os.path.isfile(os.path.join(work, "lora_effect_omnijax.safetensors"))


@pytest.mark.parametrize("override, message", [
    ({"total_steps": 0}, "config.total_steps = 0: must be an integer >= 1"),
    ({"log_steps": -1}, "config.log_steps = -1: must be an integer >= 1"),
    ({"lr": float("nan")}, "config.lr = nan: must be a finite number > 0"),
    ({"model_init.dit": "/nonexistent/dit"}, "config.model_init.dit = '/nonexistent/dit': no such file"),
])
def test_trainer_checks_before_work(tmp_path, override, message):
    work = tmp_path / "run"
    with pytest.raises(SetupError, match=message.replace("(", r"\(").replace("+", r"\+")):
        train(_config(**override), str(work))
    assert not work.exists()  # nothing was written, nothing built


def test_trainer_workdir_that_is_a_file(tmp_path):
    f = tmp_path / "file"
    f.write_text("keep")
    with pytest.raises(SetupError, match="exists and is not a folder"):
        train(_config(), str(f))
    assert f.read_text() == "keep"


def _cli(*args, cwd):
    env = dict(os.environ, PYTHONPATH=ROOT)
    return subprocess.run([sys.executable, os.path.join(ROOT, "launch", "train.py"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


def test_unknown_config_key_one_line_with_close_matches(tmp_path):
    r = _cli("--config", os.path.join(ROOT, "configs", "effect_expert.py") + ":runlocal", "--workdir",
             str(tmp_path / "w"), "--config.loss.nonfinite_patiense=2", cwd=tmp_path)
    assert r.returncode == 2
    line = _one_error_line(r.stderr)
    assert "unknown config key config.loss.nonfinite_patiense" in line
    assert "close matches: loss.nonfinite_patience" in line
    assert os.listdir(tmp_path) == []
    r = _cli("--config=" + os.path.join(ROOT, "configs", "effect_expert.py") + ":runlocal", "--workdir",
             str(tmp_path / "w"), "--config.total_steps=0", cwd=tmp_path)
    assert r.returncode == 2 and "config.total_steps = 0" in _one_error_line(r.stderr)
    assert os.listdir(tmp_path) == []


# ------------------------------------------------------------------ converter


def _convert(capsys, *args):
    rc = convert.main(list(args))
    return rc, capsys.readouterr().err


def test_truncated_safetensors_names_the_file(tmp_path, capsys):
    whole = tmp_path / "w.safetensors"
    save_file({"img_in.weight": np.ones((64, 16), np.float32)}, str(whole))
    data = whole.read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: len(data) // 2])
    rc, err = _convert(capsys, "--source", str(cut), "--kind", "flux_dit", "--out", str(tmp_path / "o"))
    assert rc == 2
    assert f"{cut}: truncated safetensors file" in _one_error_line(err)
    assert not (tmp_path / "o").exists()


def test_no_config_json_beside_the_weights_is_one_line(tmp_path, capsys):
    src = tmp_path / "flux.safetensors"  # hidden 64 is no multiple of Flux's head_dim: heads need a config.json
    save_file({"img_in.weight": np.ones((64, 16), np.float32), "img_in.bias": np.ones(64, np.float32)}, str(src))
    rc, err = _convert(capsys, "--source", str(src), "--kind", "flux_dit", "--out", str(tmp_path / "o"))
    assert rc == 2
    line = _one_error_line(err)
    assert str(src) in line and "config.json" in line


def test_pth_refusal_does_not_suggest_weights_only_false(tmp_path, capsys):
    import fractions

    import torch

    src = tmp_path / "x.pth"
    torch.save({"w": torch.zeros(2), "extra": fractions.Fraction(1, 3)}, str(src))
    rc, err = _convert(capsys, "--source", str(src), "--kind", "wan_vae", "--out", str(tmp_path / "o"))
    assert rc == 2
    line = _one_error_line(err)
    assert "refused" in line and "fractions.Fraction" in line and "weights_only" not in line
    assert "likely succeed" not in line


def test_convert_checks_out_before_reading(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("keep")
    src = tmp_path / "w.safetensors"
    save_file({"a": np.ones(2, np.float32)}, str(src))
    rc, err = _convert(capsys, "--source", str(src), "--kind", "flux_dit", "--out", str(blocker / "o"))
    assert rc == 2 and f"{blocker} is a file, not a folder" in _one_error_line(err)
    rc, err = _convert(capsys, "--source", str(tmp_path / "missing"), "--kind", "flux_dit", "--out",
                       str(tmp_path / "o"))
    assert rc == 2 and "missing: no such file or folder" in _one_error_line(err)
    assert blocker.read_text() == "keep" and sorted(os.listdir(tmp_path)) == ["file", "w.safetensors"]


def test_decompose_image_checks_out_before_work(tmp_path, capsys):
    from launch import decompose_image

    blocker = tmp_path / "file"
    blocker.write_text("keep")
    rc = decompose_image.main(["--image", str(blocker), "--model", "tiny", "--out", str(blocker / "layers")])
    assert rc == 2
    assert f"--out {blocker / 'layers'}: {blocker} is a file, not a folder" in _one_error_line(capsys.readouterr().err)
    assert os.listdir(tmp_path) == ["file"] and blocker.read_text() == "keep"


def test_export_lora_checks_out_before_writing(tmp_path, capsys):
    from launch import export_lora

    blocker = tmp_path / "file"
    blocker.write_text("keep")
    src = tmp_path / "l.safetensors"
    save_file({"a": np.ones(2, np.float32)}, str(src))
    rc = export_lora.main(["--source", str(src), "--format", "omnijax", "--out", str(blocker / "x.safetensors")])
    assert rc == 2
    line = _one_error_line(capsys.readouterr().err)
    assert f"--out {blocker}/x.safetensors: {blocker} is a file, not a folder" in line
    assert blocker.read_text() == "keep"
