"""launch/parity.py on tiny random Flux-pipeline checkpoints (transformers / diffusers folders written here): the
Flux DiT, T5, CLIP-L and the Flux VAE within tolerance; a corrupted block of a converted folder is the first stage
named."""

import pytest

from tests.launch.test_parity import _assert_first_failure, _assert_within, _convert, _corrupt, _run
from tests.models.flux.refs import diffusers_flux
from tests.models.flux.test_text_encoders import hf_clip_text, hf_t5
from tests.models.flux.test_vae import hf_vae


def test_flux_dit_bf16_then_corrupted_double_block(tmp_path, capsys):
    diffusers_flux(guidance=True).save_pretrained(tmp_path / "transformer")
    common = ["--kind", "flux_dit", "--source", str(tmp_path / "transformer"), "--size", "1x48x80", "--dtype", "bf16"]
    rc, rep = _run(tmp_path, "ok", *common)
    assert rc == 0
    _assert_within(rep)
    assert [r["stage"] for r in rep["stages"]] == ["img_in", "vec", "txt_in", "double_blocks.0", "double_blocks.1",
                                                   "single_blocks.0", "single_blocks.1"]
    assert rep["output"]["torch_bf16_rel_l2"] < 0.02  # the reference's own bf16 error is not its rounded timestep
    capsys.readouterr()
    bad = _corrupt(_convert(tmp_path / "transformer", "flux_dit", tmp_path / "conv"), tmp_path / "bad", "flux_dit",
                   "double_blocks.1.txt_mlp.linear_2.kernel", scale=1.5)  # bf16: a fault well above rounding
    rc, rep = _run(tmp_path, "bad", *common, "--converted", bad)
    assert rc == 1
    _assert_first_failure(rep, "double_blocks.1", capsys)


def test_t5_then_corrupted_block(tmp_path, capsys):
    hf_t5().save_pretrained(tmp_path / "text_encoder_2")
    common = ["--kind", "t5", "--source", str(tmp_path / "text_encoder_2"), "--size", "2x40"]
    rc, rep = _run(tmp_path, "ok", *common)
    assert rc == 0
    _assert_within(rep)
    capsys.readouterr()
    # blocks.1 has no position table of its own (T5 v1.1 shares layer 0's): the shared bias must still reach it.
    bad = _corrupt(_convert(tmp_path / "text_encoder_2", "t5", tmp_path / "conv"), tmp_path / "bad", "t5",
                   "blocks.1.ffn.fc2.kernel", scale=1.05)
    rc, rep = _run(tmp_path, "bad", *common, "--converted", bad)
    assert rc == 1
    _assert_first_failure(rep, "blocks.1", capsys)


@pytest.mark.parametrize("eos", [2, 1000])  # the legacy argmax pooling and the EOS-id pooling
def test_clip_l(tmp_path, eos):
    hf_clip_text(eos).save_pretrained(tmp_path / "text_encoder")
    rc, rep = _run(tmp_path, "ok", "--kind", "clip_l", "--source", str(tmp_path / "text_encoder"), "--size", "2x77")
    assert rc == 0
    _assert_within(rep)
    assert [r["stage"] for r in rep["stages"]] == ["embed", "blocks.0", "blocks.1", "final_norm"]


def test_flux_vae_then_corrupted_decoder_block(tmp_path, capsys):
    hf_vae().save_pretrained(tmp_path / "vae")
    common = ["--kind", "flux_vae", "--source", str(tmp_path / "vae"), "--size", "1x16x24"]
    rc, rep = _run(tmp_path, "ok", *common)
    assert rc == 0
    _assert_within(rep)
    capsys.readouterr()
    bad = _corrupt(_convert(tmp_path / "vae", "flux_vae", tmp_path / "conv"), tmp_path / "bad", "flux_vae",
                   "decoder.up_blocks.1.resnets.0.conv1.kernel")
    rc, rep = _run(tmp_path, "bad", *common, "--converted", bad)
    assert rc == 1
    _assert_first_failure(rep, "decoder.up_blocks.1", capsys)
