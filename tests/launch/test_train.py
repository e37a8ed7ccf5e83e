"""The trainer end to end on the runlocal configs (tiny models, procedural data, CPU): resume, sharded runs,
and training from a latent cache."""

import os

import numpy as np
import pytest
from flax import nnx

from configs import effect_expert, quality_expert
from omnijax.omnimatte.lora_io import read_lora_file
from tasks import SetupError
from tasks import omnimatte as task
from tasks.trainer import train
from tests.launch.runlocal import logged_losses, runlocal_config


def _lora(workdir, name="effect", fmt="omnijax"):
    tensors, _ = read_lora_file(os.path.join(workdir, f"lora_{name}_{fmt}.safetensors"))
    return {k: np.asarray(v, np.float32) for k, v in tensors.items()}


def test_effect_expert_resume_is_exact(tmp_path):
    """Stop at step 3 and resume to 6 == an uninterrupted 6-step run (data order, rng, adapters, optimizer)."""
    full = str(tmp_path / "full")
    train(runlocal_config(effect_expert, total_steps=6, ckpt_steps=3, **{"evals.preview_steps": 6}), full)
    split = str(tmp_path / "split")
    train(runlocal_config(effect_expert, total_steps=3, ckpt_steps=3, **{"evals.preview_steps": 100}), split)
    train(runlocal_config(effect_expert, total_steps=6, ckpt_steps=3, **{"evals.preview_steps": 100}), split)
    a, b = logged_losses(full), logged_losses(split)
    steps = [1, 2, 3, 4, 5, 6]
    assert sorted(a) == sorted(b) == steps
    assert [b[s] for s in steps] == [a[s] for s in steps]  # bit-identical floats
    assert len(set(a.values())) == 6  # the steps really differ
    # Exported LoRA files in every format, identical between the two runs.
    for fmt in ("omnijax", "kohya", "peft", "comfy"):
        ta, tb = _lora(full, fmt=fmt), _lora(split, fmt=fmt)
        assert ta.keys() == tb.keys() and ta
        for k in ta:
            assert ta[k].tobytes() == tb[k].tobytes(), (fmt, k)
    # The preview is labelled: a title strip with the step and loss on top (#14).
    from PIL import Image
    sheet = np.asarray(Image.open(os.path.join(full, "previews", "step_0000006.png")).convert("RGB"))
    assert (sheet[:18].min(-1) < 100).sum() > 20 and (sheet[:18].min(-1) > 250).mean() > 0.5


def test_sharded_run_equals_single_device_run(tmp_path):
    """train() on data 2 x fsdp 4 (8 fake devices) logs the losses and exports the adapters of a 1-device run;
    the frozen base leaves both runs bit-identical."""
    small = {"input.batch_size": 8, "input.frames": 5, "input.height": 32, "input.width": 32,
             "schedule.warmup_steps": 0, "evals.preview_steps": 100, "evals.export_formats": ("omnijax",)}
    runs = {}
    for name, mesh in (("one", dict(data=1, fsdp=1, context=1, tensor=1)),
                       ("eight", dict(data=2, fsdp=4, context=1, tensor=1))):
        config = runlocal_config(effect_expert, total_steps=2, ckpt_steps=2, mesh=mesh, **small)
        workdir = str(tmp_path / name)
        state = train(config, workdir)
        trained_base = {k: np.asarray(v) for k, v in _flat(state[0]["base"]).items()}
        runs[name] = logged_losses(workdir), _lora(workdir), trained_base
        if name == "eight":
            kernel = state[0]["base"]["blocks"][0]["ffn"]["linear_1"]["kernel"].get_value()
            assert kernel.sharding.spec[0] == "fsdp" and len(kernel.sharding.device_set) == 8
    (l1, lora1, base1), (l8, lora8, base8) = runs["one"], runs["eight"]
    assert sorted(l1) == sorted(l8) == [1, 2] and l1[1] != l1[2]
    np.testing.assert_allclose([l8[1], l8[2]], [l1[1], l1[2]], rtol=1e-5)
    assert lora1.keys() == lora8.keys() and lora1
    # The whole update in relative L2, not element by element: Adam divides each element by its own gradient
    # scale, so an element whose gradient is near zero turns f32 reduction-order noise into a visible difference
    # (an elementwise rtol of 1e-4 failed on 1 of 256 elements, 2-4e-3 off, whenever the data changed). Both runs
    # start from the same adapters, so lora8 - lora1 is exactly the difference of the two updates; the B matrices
    # start at zero, so their norm is a lower bound of the update's norm.
    diff = np.sqrt(sum(np.sum((lora8[k].astype(np.float64) - lora1[k]) ** 2) for k in lora1))
    update = np.sqrt(sum(np.sum(lora1[k].astype(np.float64) ** 2) for k in lora1 if k.endswith("lora_b")))
    assert diff <= 1e-3 * update, f"8-device update differs from the 1-device one by {diff / update:.2e} (rel. L2)"
    # The adapters trained: every B started at zero.
    assert all(np.abs(v).max() > 0 for k, v in lora1.items() if k.endswith("lora_b"))
    fresh, _, _ = task.build_models(runlocal_config(effect_expert, **small))
    want = {k: np.asarray(v) for k, v in _flat(nnx.state(fresh)).items()}
    assert base1.keys() == base8.keys() == want.keys()
    for k in want:
        assert base1[k].tobytes() == want[k].tobytes() and base8[k].tobytes() == want[k].tobytes(), k


def _flat(state):
    return {".".join(map(str, p)): v.get_value() if isinstance(v, nnx.Variable) else v
            for p, v in nnx.to_flat_state(state)}


def test_quality_expert_runlocal_smoke(tmp_path):
    out = str(tmp_path / "q")
    train(runlocal_config(quality_expert, total_steps=2, ckpt_steps=2, **{"evals.preview_steps": 100}), out)
    losses = logged_losses(out)
    assert sorted(losses) == [1, 2] and all(np.isfinite(list(losses.values())))
    assert os.path.isfile(os.path.join(out, "lora_quality_omnijax.safetensors"))
    # A resume with other adapter settings stops at the restore with one line naming both.
    with pytest.raises(SetupError, match=r"trained with .*'rank': 4.* this config gives .*'rank': 8"):
        train(runlocal_config(quality_expert, total_steps=3, **{"lora.rank": 8}), out)


def test_expert_k_and_analysis_are_exclusive(tmp_path):
    c = runlocal_config(effect_expert, **{"expert.k": 2, "expert.analysis": str(tmp_path / "a.json")})
    with pytest.raises(SetupError, match="both set K: keep one"):
        task.expert_config(c, 6)


def test_missing_model_init_says_how_to_convert(tmp_path):
    c = effect_expert.get_config()  # the real-size config without converted weights
    with pytest.raises(SetupError, match="launch/convert.py"):
        task.build_models(c)
