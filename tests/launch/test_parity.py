"""launch/parity.py on tiny random checkpoints written here, one per kind: within tolerance as converted, and a
deliberately corrupted block in a converted folder is the first stage named (exit status 1).

The checkpoints are tiny diffusers / transformers modules with random weights (tests/torch_refs.py,
tests/encoder_refs.py), saved in the formats users have: original Wan names (safetensors + config.json, the VAE's
.pth) and transformers / diffusers folders.
"""

import json
import sys

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from converters import parity
from launch import convert as convert_cli
from launch import parity as parity_cli
from omnijax.checkpoint import load_pretrained, save_pretrained
from omnijax.params import flat_params
from tests.converters.test_wan_dit import to_wan_names
from tests.converters.test_wan_vae import to_original
from tests.encoder_refs import hf_clip_vision, hf_umt5
from tests.models.wan.test_vae import diffusers_vae
from tests.torch_refs import diffusers_wan, randomize_


def _run(tmp_path, name, *args):
    out = tmp_path / f"{name}.json"
    rc = parity_cli.main([*args, "--out", str(out)])
    return rc, (json.loads(out.read_text()) if out.exists() else None)


def _corrupt(converted, out, kind, key, scale=1.01):
    """A copy of a converted folder with one parameter scaled: the damage a bad conversion table or kernel does."""
    _, model = load_pretrained(str(converted), kind=kind, dtype=jnp.float32, param_dtype=jnp.float32)
    p = flat_params(model)[key]
    p.set_value(p.get_value() * scale)
    save_pretrained(str(out), model, kind)
    return str(out)


def _convert(src, kind, out):
    assert convert_cli.main(["--source", str(src), "--kind", kind, "--out", str(out), "--param-dtype", "f32"]) == 0
    return out


def _assert_within(rep):
    assert rep["ok"] and rep["first_failure"] is None and not rep["missing_in_jax"]
    for r in rep["stages"] + [rep["output"]]:
        assert r["rel_l2"] <= r["tolerance"], r
        assert r["cosine"] > 0.999, r


def _assert_first_failure(rep, stage, capsys):
    assert not rep["ok"] and rep["first_failure"] == stage
    names = [r["stage"] for r in rep["stages"]]
    assert all(r["ok"] for r in rep["stages"][:names.index(stage)])  # everything before it still matches
    assert capsys.readouterr().out.strip().splitlines()[-2].endswith(f"first stage over tolerance: {stage}")


def test_wan_dit_original_format_then_corrupted_block(tmp_path, capsys):
    torch.manual_seed(0)
    ref = randomize_(diffusers_wan(i2v=True))
    src = tmp_path / "wan"
    src.mkdir()
    save_file({k: v.contiguous() for k, v in to_wan_names(ref.state_dict()).items()}, str(src / "model.safetensors"))
    (src / "config.json").write_text(json.dumps({"num_heads": 2}))
    common = ["--kind", "wan_dit", "--source", str(src), "--size", "5x32x48"]
    rc, rep = _run(tmp_path, "ok", *common)
    assert rc == 0
    _assert_within(rep)
    names = [r["stage"] for r in rep["stages"]]
    assert names == ["patch_embedding", "time_embedding", "time_projection", "text_embedding", "image_embedding",
                     "blocks.0", "blocks.1"]
    assert (tmp_path / "ok.png").stat().st_size > 0
    capsys.readouterr()
    bad = _corrupt(_convert(src, "wan_dit", tmp_path / "conv"), tmp_path / "bad", "wan_dit",
                   "blocks.1.ffn.linear_2.kernel")
    rc, rep = _run(tmp_path, "bad", *common, "--converted", bad)
    assert rc == 1
    _assert_first_failure(rep, "blocks.1", capsys)


def test_wan_dit_diffusers_folder(tmp_path):
    torch.manual_seed(1)
    randomize_(diffusers_wan(i2v=True), seed=1).save_pretrained(tmp_path / "transformer")
    rc, rep = _run(tmp_path, "df", "--kind", "wan_dit", "--source", str(tmp_path / "transformer"), "--size", "5x32x48")
    assert rc == 0
    _assert_within(rep)


def test_t2v_state_dict_in_memory():
    """The library entry point takes a state dict (no files) and any loader; the t2v DiT has no image stages."""
    from converters import load_wan_dit
    from omnijax.models.wan import variant

    torch.manual_seed(2)
    sd = {k: v.detach().clone() for k, v in randomize_(diffusers_wan(i2v=False), seed=2).state_dict().items()}
    load = lambda kind, src, dt: load_wan_dit(src, variant("tiny"), dtype=dt, param_dtype=dt)
    rep = parity.run_parity("wan_dit", sd, load_jax=load, size="1x16x16", reference_config={"num_heads": 2})
    _assert_within(rep)
    assert "image_embedding" not in [r["stage"] for r in rep["stages"]]
    assert rep["output"]["rel_l2"] > 0  # two independent computations, not one compared with itself


def test_wan_vae_pth_then_corrupted_decoder_stage(tmp_path, capsys):
    ref = diffusers_vae()
    src = tmp_path / "Wan2.1_VAE.pth"
    torch.save({to_original(k): v for k, v in ref.state_dict().items()}, src)
    common = ["--kind", "wan_vae", "--source", str(src), "--size", "5x16x24"]
    rc, rep = _run(tmp_path, "ok", *common)
    assert rc == 0
    _assert_within(rep)
    capsys.readouterr()
    # The decoder runs on seeded latents, so a decoder fault is named there even though every encoder stage passes.
    bad = _corrupt(_convert(src, "wan_vae", tmp_path / "conv"), tmp_path / "bad", "wan_vae",
                   "decoder.up_blocks.1.resnets.0.conv1.kernel")
    rc, rep = _run(tmp_path, "bad", *common, "--converted", bad)
    assert rc == 1
    _assert_first_failure(rep, "decoder.up_blocks.1", capsys)


def test_umt5_transformers_folder_then_corrupted_block(tmp_path, capsys):
    hf_umt5().save_pretrained(tmp_path / "text_encoder")
    common = ["--kind", "umt5", "--source", str(tmp_path / "text_encoder"), "--size", "2x40"]
    rc, rep = _run(tmp_path, "ok", *common)
    assert rc == 0
    _assert_within(rep)
    capsys.readouterr()
    bad = _corrupt(_convert(tmp_path / "text_encoder", "umt5", tmp_path / "conv"), tmp_path / "bad", "umt5",
                   "blocks.1.attn.q.kernel", scale=1.05)
    rc, rep = _run(tmp_path, "bad", *common, "--converted", bad)
    assert rc == 1
    _assert_first_failure(rep, "blocks.1", capsys)


def test_clip_bf16_against_torch_bf16_then_corrupted_block(tmp_path, capsys):
    hf_clip_vision().save_pretrained(tmp_path / "image_encoder")
    common = ["--kind", "wan_clip", "--source", str(tmp_path / "image_encoder"), "--size", "1", "--dtype", "bf16"]
    rc, rep = _run(tmp_path, "ok", *common)
    assert rc == 0
    _assert_within(rep)
    for r in rep["stages"]:  # the bound is measured: 2x torch's own bf16 error (or the bf16 roundoff floor)
        assert r["tolerance"] == pytest.approx(2 * max(r["torch_bf16_rel_l2"], 2 ** -8))
        assert 1e-4 < r["torch_bf16_rel_l2"] < 0.05
    capsys.readouterr()
    bad = _corrupt(_convert(tmp_path / "image_encoder", "wan_clip", tmp_path / "conv"), tmp_path / "bad",
                   "wan_clip", "blocks.1.mlp.fc2.kernel", scale=1.5)
    rc, rep = _run(tmp_path, "bad", *common, "--converted", bad)
    assert rc == 1
    _assert_first_failure(rep, "blocks.1", capsys)


def test_compare_against_closed_forms():
    rng = np.random.default_rng(0)
    b = rng.standard_normal(1000)
    noise = rng.standard_normal(1000)
    a = b + 1e-3 * noise
    m = parity.compare(a, b)
    assert m["rel_l2"] == pytest.approx(1e-3 * np.sqrt(noise @ noise / (b @ b)), rel=1e-9)
    assert m["max_abs"] == pytest.approx(1e-3 * np.abs(noise).max(), rel=1e-9)
    assert parity.compare(-b, b)["cosine"] == pytest.approx(-1.0)
    assert parity.tolerance_for("f32") == 1e-5
    assert parity.tolerance_for("bf16", 1e-2) == 2e-2 and parity.tolerance_for("bf16", 1e-6) == 2 * 2 ** -8


def test_input_errors(tmp_path, capsys, monkeypatch):
    out = ["--out", str(tmp_path / "r.json")]
    assert parity_cli.main(["--kind", "wan_dit", "--source", str(tmp_path / "nope"), *out]) == 2
    assert "not found" in capsys.readouterr().err
    assert parity_cli.main(["--kind", "wan_dit", "--source", str(tmp_path), "--size", "4x32x48", *out]) == 2
    assert "4k+1" in capsys.readouterr().err
    pth = tmp_path / "models_t5_umt5-xxl-enc-bf16.pth"
    torch.save({"token_embedding.weight": torch.zeros(4, 4)}, pth)
    assert parity_cli.main(["--kind", "umt5", "--source", str(pth), *out]) == 2
    assert "transformers-format" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "diffusers", None)  # as if the extra were not installed
    assert parity_cli.main(["--kind", "wan_dit", "--source", str(tmp_path), "--size", "5x32x48", *out]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pip install 'omnijax[parity]'" in err[0]
    assert not (tmp_path / "r.json").exists()
