"""The trainer end to end on the runlocal configs (tiny models, procedural data, CPU)."""

import json
import os

import numpy as np
import pytest

from configs import effect_expert, quality_expert
from launch import train as train_cli
from omnijax.omnimatte.lora_io import read_lora_file


def _config(module, **overrides):
    c = module.get_config("runlocal")
    for k, v in overrides.items():
        node = c
        *parents, leaf = k.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = v
    return c


def _losses(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return {r["step"]: r["loss"] for r in map(json.loads, f)}


def test_effect_expert_resume_is_exact(tmp_path):
    """Stop at step 2 and resume to 4 == an uninterrupted 4-step run (data order, rng, adapters, optimizer)."""
    full = str(tmp_path / "full")
    train_cli.train(_config(effect_expert, total_steps=4, ckpt_steps=2, **{"evals.preview_steps": 4}), full)
    split = str(tmp_path / "split")
    train_cli.train(_config(effect_expert, total_steps=2, ckpt_steps=2, **{"evals.preview_steps": 100}), split)
    train_cli.train(_config(effect_expert, total_steps=4, ckpt_steps=2, **{"evals.preview_steps": 100}), split)
    a, b = _losses(full), _losses(split)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    np.testing.assert_allclose([b[s] for s in (1, 2, 3, 4)], [a[s] for s in (1, 2, 3, 4)], rtol=1e-6)
    assert len(set(a.values())) == 4  # the steps really differ
    # Exported LoRA files in every format, identical between the two runs.
    for fmt in ("omnijax", "kohya", "peft"):
        ta, _ = read_lora_file(os.path.join(full, f"lora_effect_{fmt}.safetensors"))
        tb, _ = read_lora_file(os.path.join(split, f"lora_effect_{fmt}.safetensors"))
        assert ta.keys() == tb.keys() and ta
        for k in ta:
            np.testing.assert_allclose(np.asarray(ta[k], np.float32), np.asarray(tb[k], np.float32), rtol=1e-6)
    assert os.path.getsize(os.path.join(full, "previews", "step_0000004.png")) > 0


def test_quality_expert_runlocal_smoke(tmp_path):
    out = str(tmp_path / "q")
    train_cli.train(_config(quality_expert, total_steps=2, ckpt_steps=2, **{"evals.preview_steps": 100}), out)
    losses = _losses(out)
    assert sorted(losses) == [1, 2] and all(np.isfinite(list(losses.values())))
    assert os.path.isfile(os.path.join(out, "lora_quality_omnijax.safetensors"))


def test_missing_model_init_says_how_to_convert(tmp_path):
    c = effect_expert.get_config()  # the real-size config without converted weights
    with pytest.raises(train_cli.SetupError, match="launch/convert.py"):
        train_cli.build_models(c)
