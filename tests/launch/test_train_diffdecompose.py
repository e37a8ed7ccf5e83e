"""configs/diffdecompose.py:runlocal through the one trainer (no change to it): tiny Flux, procedural AlphaBlend
data, CPU; resume, previews with metrics, exported LoRA files that load back."""

import json
import os

import numpy as np

from configs import diffdecompose
from omnijax.diffdecompose.lora_io import read_extra
from omnijax.models.flux.lora_files import load_flux_lora
from omnijax.models.flux.variants import variant
from tasks.trainer import train
from tests.launch.runlocal import logged_losses, runlocal_config


def _config(**overrides):
    return runlocal_config(diffdecompose, **overrides)




def test_runlocal_trains_resumes_previews_and_exports(tmp_path):
    wd = str(tmp_path / "dd")
    cache = str(tmp_path / "cond")
    train(_config(total_steps=2, ckpt_steps=2, **{"evals.preview_steps": 100,
                                                            "input.conditioning_cache": cache}), wd)
    assert sorted(logged_losses(wd)) == [1, 2]
    # The prompt table is cached with the encoder identities: a second build reads it without the encoders.
    assert os.path.exists(os.path.join(cache, "flux_encoder_ids.json"))
    from tasks import diffdecompose as task

    txt, y = task.prompt_table(_config(**{"input.conditioning_cache": cache}), encoders=None)
    assert txt.shape == (6, 16, 32) and y.shape == (6, 32)
    train(_config(total_steps=4, ckpt_steps=2, **{"evals.preview_steps": 4,
                                                            "input.conditioning_cache": cache}), wd)
    losses = logged_losses(wd)
    assert sorted(losses) == [1, 2, 3, 4] and all(np.isfinite(list(losses.values())))
    assert len(set(losses.values())) == 4
    assert os.path.getsize(os.path.join(wd, "previews", "step_0000004.png")) > 0
    with open(os.path.join(wd, "previews", "step_0000004.json")) as f:
        m = json.load(f)
    assert {"bg_rmse", "bg_psnr", "fg_rmse", "baseline_bg_rmse"} <= set(m)
    cfg = variant("tiny", in_channels=64, out_channels=64, vec_in_dim=32, context_in_dim=32)
    for fmt in ("omnijax", "peft", "comfy", "kohya"):
        path = os.path.join(wd, f"lora_diffdecompose_{fmt}.safetensors")
        lora = load_flux_lora(path, cfg)
        assert lora.adapters() and read_extra(path)["icd"]["fg_ids"] == "panel"
        assert read_extra(path)["prompt"]["template"].startswith("Three sub-images.")
        assert any(float(np.abs(np.asarray(a.lora_b[...])).max()) > 0 for a in lora.adapters().values())
