"""LoRA files: exact round trips in the four namings, the published key spellings, and clear errors."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from omnijax.omnimatte import lora_io
from omnijax.omnimatte.branch import EasyOmnimatte
from omnijax.omnimatte.experts import ExpertConfig, effect_expert
from tests.omnimatte.helpers import randomize_lora_b, tiny_base

TARGETS = ("self_attn.q", "self_attn.o", "cross_attn.k_img", "ffn.linear_1", "ffn.linear_2")


@pytest.fixture(scope="module")
def models():
    base = tiny_base(num_layers=12)  # block indices 1 and 11 share a prefix: the name table must not confuse them
    expert = ExpertConfig("e", 4, 6.0, (1, 11), "B", TARGETS)
    src = EasyOmnimatte(base, expert, lora_param_dtype=jnp.bfloat16, rngs=nnx.Rngs(1))
    randomize_lora_b(src)
    return base, expert, src


def _flat(model):
    return {".".join(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(
        nnx.state(model, nnx.LoRAParam))}


@pytest.mark.parametrize("fmt", lora_io.FORMATS)
def test_round_trip_is_exact(models, fmt, tmp_path):
    base, expert, src = models
    path = str(tmp_path / f"lora_{fmt}.safetensors")
    lora_io.save_lora(path, src, fmt=fmt)
    dst = EasyOmnimatte(base, expert, lora_param_dtype=jnp.bfloat16, rngs=nnx.Rngs(7))
    lora_io.load_lora(path, dst)
    a, b = _flat(src), _flat(dst)
    assert a.keys() == b.keys() and len(a) == 2 * 2 * len(TARGETS)
    for k in a:
        assert a[k].dtype == b[k].dtype == jnp.bfloat16 and np.array_equal(a[k], b[k]), k
    # The file describes its own expert (blocks, targets, rank, alpha).
    got = lora_io.expert_from_lora(path, mask="B", name="e")
    assert (got.blocks, got.targets, got.rank, got.alpha) == (expert.blocks, expert.targets, 4, 6.0)
    assert not [f for f in tmp_path.iterdir() if ".tmp-" in f.name]  # no temporary left


@pytest.mark.parametrize("fmt", ["omnijax", "kohya"])
def test_expert_with_lora_builds_the_files_expert_without_a_random_init(models, fmt, tmp_path):
    base, expert, src = models
    path = str(tmp_path / f"lora_{fmt}.safetensors")
    lora_io.save_lora(path, src, fmt=fmt)
    got = lora_io.expert_with_lora(base, path, mask="B", name="e", lora_param_dtype=jnp.bfloat16)
    assert (got.expert.blocks, got.expert.targets, got.expert.rank, got.expert.alpha, got.expert.mask) == (
        expert.blocks, expert.targets, 4, 6.0, "B")
    a, b = _flat(src), _flat(got)
    assert a.keys() == b.keys()
    for k in a:  # every adapter holds the file's values as a real array (none left abstract)
        assert isinstance(b[k], np.ndarray) and a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]), k
    assert got.base is base
    # A file missing an adapter fails before anything is built from it.
    tensors, meta = lora_io.read_lora_file(path)
    dropped = max(tensors, key=lambda k: tensors[k].size)  # a weight (kohya files also hold scalar alphas)
    lora_io.write_safetensors(path, {k: v for k, v in tensors.items() if k != dropped}, meta)
    with pytest.raises(lora_io.LoRAFileError):
        lora_io.expert_with_lora(base, path, mask="B", name="e")


def test_reading_a_file_moves_nothing_to_a_device(models, tmp_path):
    """read_lora_file gives host arrays of the file's dtype and values without a device round trip (a GPU would
    pay two transfers per tensor); the adapters go to the device once, when the model is filled."""
    import jax

    _, _, src = models
    path = str(tmp_path / "lora.safetensors")
    lora_io.save_lora(path, src)
    with jax.transfer_guard("disallow_explicit"):
        tensors, _ = lora_io.read_lora_file(path)
    want, _ = lora_io.lora_tensors(src)
    assert tensors.keys() == want.keys()
    for k, v in tensors.items():
        assert isinstance(v, np.ndarray) and v.dtype == want[k].dtype == jnp.bfloat16, k
        assert v.tobytes() == np.asarray(want[k]).tobytes(), k


def test_published_key_spellings(models):
    _, _, src = models
    peft = lora_io.lora_keys(src, "peft")
    kohya = lora_io.lora_keys(src, "kohya")
    assert "transformer.blocks.1.attn1.to_q.lora_A.weight" in peft
    assert "transformer.blocks.11.attn1.to_out.0.lora_B.weight" in peft
    assert "transformer.blocks.1.attn2.add_k_proj.lora_A.weight" in peft
    assert "transformer.blocks.11.ffn.net.0.proj.lora_B.weight" in peft
    assert "lora_unet__blocks_1_self_attn_q.lora_down.weight" in kohya
    assert "lora_unet__blocks_11_cross_attn_k_img.lora_up.weight" in kohya
    assert "lora_unet__blocks_1_ffn_2.alpha" in kohya
    comfy = lora_io.lora_keys(src, "comfy")
    assert "diffusion_model.blocks.1.self_attn.q.lora_down.weight" in comfy
    assert "diffusion_model.blocks.11.cross_attn.k_img.lora_up.weight" in comfy
    assert "diffusion_model.blocks.1.ffn.2.alpha" in comfy
    tensors, _ = lora_io.lora_tensors(src, "kohya")
    down = tensors["lora_unet__blocks_1_ffn_0.lora_down.weight"]
    up = tensors["lora_unet__blocks_1_ffn_0.lora_up.weight"]
    assert down.shape == (4, 64) and up.shape == (128, 4)  # torch layout [R, I] / [O, R]
    assert float(tensors["lora_unet__blocks_1_ffn_0.alpha"]) == 6.0


def test_alpha_folding_preserves_the_delta(models):
    base, expert, src = models
    tensors, _ = lora_io.lora_tensors(src, "kohya")
    tensors = {k: (np.asarray(3.0, np.float32) if k.endswith(".alpha") else v) for k, v in tensors.items()}
    dst = EasyOmnimatte(base, expert, rngs=nnx.Rngs(2))  # f32 adapters, alpha 6
    lora_io.load_lora(tensors, dst)
    ad_src, ad_dst = src.lora.for_block(1)["self_attn"]["q"], dst.lora.for_block(1)["self_attn"]["q"]
    np.testing.assert_allclose(np.asarray(ad_dst.lora_b.get_value()),
                               np.asarray(ad_src.lora_b.get_value(), np.float32) * 0.5, rtol=1e-6)


def test_errors_name_the_problem(models):
    base, expert, src = models
    tensors, meta = lora_io.lora_tensors(src, "peft")
    dst = EasyOmnimatte(base, expert, rngs=nnx.Rngs(3))
    with pytest.raises(lora_io.LoRAFileError, match="name no wan adapter"):
        lora_io.load_lora({**tensors, "transformer.time_embedding.0.lora_A.weight": np.zeros((4, 2))}, dst)
    missing = {k: v for k, v in tensors.items() if ".blocks.11.attn1.to_q." not in k}
    with pytest.raises(lora_io.LoRAFileError, match="missing from the file"):
        lora_io.load_lora(missing, dst)
    other = EasyOmnimatte(base, ExpertConfig("r8", 8, 6.0, (1, 11), "B", TARGETS), rngs=nnx.Rngs(4))
    with pytest.raises(lora_io.LoRAFileError, match="rank"):
        lora_io.load_lora(tensors, other)
    k20 = EasyOmnimatte(base, effect_expert(12, 2, rank=4, alpha=6.0, targets=TARGETS), rngs=nnx.Rngs(5))
    with pytest.raises(lora_io.LoRAFileError, match="not in the model"):
        lora_io.load_lora(tensors, k20)
    half = {k: v for k, v in tensors.items() if "lora_B" not in k}
    with pytest.raises(lora_io.LoRAFileError, match="both matrices"):
        lora_io.load_lora(half, dst)
    with pytest.raises(lora_io.LoRAFileError, match="known format"):
        lora_io.load_lora({"foo.weight": np.zeros(2)}, dst)
    # Non-strict loading skips keys that name no target (e.g. VideoX-Fun's embedding adapters).
    lora_io.load_lora({**tensors, "transformer.time_embedding.0.lora_A.weight": np.zeros((4, 2))}, dst, strict=False)


def test_peft_file_folds_the_scale_and_prefixes_its_metadata(models):
    """diffusers reads `<component>.r` etc. (its save_lora_weights prefixes them) and its model-level loader reads
    no metadata at all: the file must declare alpha = r and carry alpha/r in lora_B."""
    _, expert, src = models
    tensors, meta = lora_io.lora_tensors(src, "peft")
    peft = json.loads(meta["lora_adapter_metadata"])
    assert peft["transformer.r"] == 4 and peft["transformer.lora_alpha"] == 4
    assert "transformer.blocks.11.attn2.add_k_proj" not in peft["transformer.target_modules"]
    assert sorted(peft["transformer.target_modules"]) == sorted(
        k.removeprefix("transformer.").removesuffix(".lora_A.weight") for k in tensors if k.endswith("lora_A.weight"))
    ad = src.lora.for_block(11)["ffn"]["linear_2"]
    want = np.asarray(ad.lora_b.get_value(), np.float64).T * (expert.alpha / expert.rank)
    np.testing.assert_array_equal(tensors["transformer.blocks.11.ffn.net.2.lora_B.weight"], want.astype(np.float32))
