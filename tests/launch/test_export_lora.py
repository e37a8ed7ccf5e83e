"""launch/export_lora.py: every format from a trainer checkpoint or a LoRA file, one-line errors."""

import jax
import numpy as np
import optax
import pytest
from flax import nnx

from launch import export_lora
from omnijax.omnimatte import lora_io
from omnijax.omnimatte.branch import EasyOmnimatte
from omnijax.omnimatte.experts import effect_expert
from omnijax.training.checkpoint import Checkpointer
from tests.omnimatte.helpers import randomize_lora_b, tiny_base


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A training workdir with checkpoints at steps 3 and 5 (the adapters differ) and the live models."""
    workdir = tmp_path_factory.mktemp("run")
    base = tiny_base(num_layers=3)
    expert = effect_expert(3, 2, rank=4, alpha=6.0)
    models = {}
    with Checkpointer(workdir / "checkpoints", async_save=False) as ckpt:
        for step, seed in ((3, 1), (5, 2)):
            model = EasyOmnimatte(base, expert, rngs=nnx.Rngs(seed))
            randomize_lora_b(model, seed=seed)
            opt = nnx.Optimizer(model, optax.sgd(1e-3), wrt=nnx.LoRAParam)
            ckpt.save(step, model, opt, rng=jax.random.key(0), extra=dict(expert=expert.to_dict()))
            models[step] = model
    return workdir, models


def _same(path, model, fmt, exact=True):
    got, meta = lora_io.read_lora_file(str(path))
    want, want_meta = lora_io.lora_tensors(model, fmt)
    assert got.keys() == want.keys() and meta == want_meta
    for k in want:
        if exact:
            np.testing.assert_array_equal(got[k], want[k], err_msg=k)
        else:
            np.testing.assert_allclose(got[k], want[k], rtol=1e-6, atol=1e-8, err_msg=k)


def test_from_checkpoint_every_format(run, tmp_path):
    workdir, models = run
    out = tmp_path / "exports"
    assert export_lora.main(["--source", str(workdir), "--out", str(out)]
                            + sum((["--format", f] for f in lora_io.FORMATS), [])) == 0
    for fmt in lora_io.FORMATS:  # the latest step, named after the expert
        _same(out / f"lora_effect_{fmt}.safetensors", models[5], fmt)
    # A step directory, and --step on the checkpoints directory, pick that step.
    one = tmp_path / "step3.safetensors"
    step3 = str(workdir / "checkpoints" / "3")
    assert export_lora.main(["--source", step3, "--format", "comfy", "--out", str(one)]) == 0
    _same(one, models[3], "comfy")
    assert export_lora.main(["--source", str(workdir / "checkpoints"), "--step", "3", "--format", "kohya",
                             "--out", str(out / "k3.safetensors")]) == 0
    _same(out / "k3.safetensors", models[3], "kohya")
    assert not [f for f in out.iterdir() if ".tmp-" in f.name]


def test_from_file_converts_between_formats(run, tmp_path):
    _, models = run
    src = tmp_path / "effect_peft.safetensors"
    lora_io.save_lora(str(src), models[5], fmt="peft")  # alpha/r folded into B
    for fmt in ("kohya", "omnijax"):
        dst = tmp_path / f"from_peft_{fmt}.safetensors"
        assert export_lora.main(["--source", str(src), "--format", fmt, "--out", str(dst)]) == 0
        _same(dst, models[5], fmt, exact=False)  # the expert's own alpha and B again


def test_errors_are_one_line(run, tmp_path, capsys):
    workdir, models = run
    taken = tmp_path / "taken.safetensors"
    taken.write_bytes(b"x")
    bare = tmp_path / "bare.safetensors"
    tensors, _ = lora_io.lora_tensors(models[5], "kohya")
    lora_io.write_tensors(str(bare), tensors, {})  # no expert record: the mask is unknown
    cases = [
        (["--source", str(tmp_path / "nope"), "--format", "comfy", "--out", str(tmp_path / "o")],
         "no file or directory"),
        (["--source", str(workdir), "--format", "comfy", "--out", str(taken)], "exists"),
        (["--source", str(workdir), "--format", "comfy", "--format", "peft", "--out", str(tmp_path / "a.safetensors")],
         "one file"),
        (["--source", str(workdir), "--step", "4", "--format", "comfy", "--out", str(tmp_path / "o")], "step 4"),
        (["--source", str(tmp_path), "--format", "comfy", "--out", str(tmp_path / "o")], "no training checkpoint"),
        (["--source", str(taken), "--format", "comfy", "--out", str(tmp_path / "o"), "--overwrite"],
         "not a readable safetensors"),
        (["--source", str(bare), "--format", "comfy", "--out", str(tmp_path / "o")], "mask"),
    ]
    for argv, message in cases:
        assert export_lora.main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and message in err and "\n" not in err, err
    assert export_lora.main(["--source", str(bare), "--mask", "B", "--format", "comfy",
                             "--out", str(tmp_path / "b.safetensors")]) == 0


def test_flux_file_converts_between_formats(run, tmp_path, capsys):
    """A Flux LoRA file (no expert) converts to every Flux naming; a Wan file refuses a Flux-only naming."""
    import jax.numpy as jnp

    from omnijax.models.flux import FluxLoRA, lora_spec, variant
    from omnijax.models.flux.lora_files import FORMATS, load_flux_lora, save_flux_lora

    cfg = variant("tiny")
    lora = FluxLoRA(cfg, lora_spec(cfg, 3, 5.0), rngs=nnx.Rngs(0))
    for i, ad in enumerate(lora.adapters().values()):
        ad.lora_b.set_value(jnp.full(ad.lora_b.get_value().shape, 0.1 * (i + 1), jnp.float32))
    src = tmp_path / "flux_omnijax.safetensors"
    save_flux_lora(str(src), lora)
    out = tmp_path / "out"
    formats = sum((["--format", f] for f in FORMATS), [])
    assert export_lora.main(["--source", str(src), "--out", str(out)] + formats) == 0
    for fmt in FORMATS:
        back = load_flux_lora(str(out / f"lora_flux_{fmt}.safetensors"), cfg).adapters()
        for k, ad in lora.adapters().items():  # the same delta (alpha/r)·A@B in every naming (peft: B rounded)
            delta = [x.alpha / x.rank * np.asarray(x.lora_a.get_value(), np.float64) @ np.asarray(
                x.lora_b.get_value(), np.float64) for x in (back[k], ad)]
            np.testing.assert_allclose(*delta, rtol=1e-6, atol=1e-6 * np.abs(delta[1]).max(), err_msg=f"{fmt} {k}")
    capsys.readouterr()
    wan = tmp_path / "wan_omnijax.safetensors"
    lora_io.save_lora(str(wan), run[1][5])
    assert export_lora.main(["--source", str(wan), "--format", "bfl", "--out", str(tmp_path / "w.safetensors")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "no bfl format" in err and "\n" not in err, err
