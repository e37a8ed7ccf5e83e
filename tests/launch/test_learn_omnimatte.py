"""benchmarks/learn_omnimatte.py --tiny: every stage runs through the real code paths for a couple of steps
(mechanics only, no quality assertion), writes its report, and a rerun skips what exists."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "benchmarks", "learn_omnimatte.py")


def _run(*args):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])),
               JAX_PLATFORMS="cpu",  # CPU compiles dominate a 2-step run; the fast backend options halve them
               XLA_FLAGS="--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true")
    return subprocess.run([sys.executable, SCRIPT, *args], env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow  # about a minute on 2 CPU cores: five stages' compiles
def test_tiny_pipeline_runs_every_stage_and_resumes(tmp_path):
    wd, out = tmp_path / "wd", tmp_path / "out"
    r = _run("--tiny", "--workdir", str(wd), "--out", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((out / "learn_omnimatte.json").read_text())
    assert [row["row"] for row in res["table"]] == ["mask as alpha (no model)", "Quality Expert alone (tau=1)",
                                                   "Effect Expert alone (tau=0)", "dual experts, tau=0.5",
                                                   "ceiling: true alpha and background through the VAE"]
    assert res["table"][0]["shadow_recall"] == 0.0  # the coarse mask never covers the shadow
    assert set(res["curves"]) == {"vae", "base", "effect", "quality"} and all(res["curves"].values())
    assert set(res["stage_seconds"]) == {"vae", "base", "effect", "quality", "eval"}
    for name in ("learning_curves.png", "learning_sheet.png", "learn_omnimatte.log"):
        assert (out / name).stat().st_size > 0
    assert (wd / "base" / "base" / "omnijax.json").is_file()  # the base as a converted folder registry.load reads
    assert (wd / "quality" / "lora_quality_omnijax.safetensors").is_file()

    again = _run("--tiny", "--workdir", str(wd), "--out", str(out), "--stage", "vae,base,effect,quality")
    assert again.returncode == 0, again.stderr[-3000:]
    for name in ("vae", "base", "effect", "quality"):
        assert f"{name}: output exists" in again.stdout

    table = _run("--markdown", str(out / "learn_omnimatte.json"))
    assert table.returncode == 0 and "| dual experts, tau=0.5 |" in table.stdout

    bad = _run("--workdir", str(wd), "--out", str(out), "--stage", "nope")
    assert bad.returncode == 2 and "unknown stage" in bad.stderr
