"""Flux LoRA files read by the ecosystems' own loaders, not only by ours.

diffusers/PEFT: the real loaders (FluxTransformer2DModel.load_lora_adapter, FluxPipeline.load_lora_weights on a tiny
FluxTransformer2DModel) must give omnijax's output with the same LoRA on every token, for alpha != rank. ComfyUI and
kohya's sd-scripts cannot be installed here: their key rules are written below as data, read from their public
sources (files named at each rule), and applied to the exported files: every key must land on a real Linear of the
BFL-named model with the right shape and scale, and none may be left over.
"""

import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from converters import load_flux_dit
from omnijax.models.flux import FluxLoRA, lora_spec, variant
from omnijax.models.flux.lora import DOUBLE_TARGETS, IMAGE_STREAM_TARGETS, SINGLE_TARGETS, TOP_TARGETS
from omnijax.models.flux.lora_files import lora_tensors, save_flux_lora
from tests.converters.test_flux_dit import to_bfl
from tests.models.flux.refs import (
    diffusers_flux,
    diffusers_flux_from,
    flux_pipeline,
    inputs,
    omnijax_forward,
    torch_forward,
)
from tests.omnimatte.test_lora_ecosystems import comfy_patches
from tests.torch_refs import rel_err, to_numpy_state

ALL_TARGETS = DOUBLE_TARGETS + SINGLE_TARGETS + TOP_TARGETS


@pytest.fixture(scope="module")
def base():
    ref = diffusers_flux(True)
    state = to_numpy_state(ref)
    _, model = load_flux_dit(state, variant("tiny"), dtype=jnp.float32, param_dtype=jnp.float32)
    return state, model


def _lora(targets, rank=4, alpha=7.0, seed=1):
    """Rank 4, alpha 7 (a scale of 1.75 that a lost alpha cannot hide); random A and B."""
    cfg = variant("tiny")
    lora = FluxLoRA(cfg, lora_spec(cfg, rank, alpha, targets=targets), rngs=nnx.Rngs(seed))
    r = np.random.default_rng(seed)
    for ad in lora.adapters().values():
        ad.lora_b.set_value(jnp.asarray(r.standard_normal(ad.lora_b.get_value().shape) * 0.3, jnp.float32))
    return lora


@pytest.fixture(scope="module")
def stress(base, tmp_path_factory):
    state, model = base
    lora = _lora(ALL_TARGETS)
    x = inputs()
    want = omnijax_forward(model, x, lora)
    assert rel_err(omnijax_forward(model, x), want) > 1e-2  # the LoRA changes the output clearly
    folder = tmp_path_factory.mktemp("flux_lora")
    paths = {fmt: str(folder / f"stress_{fmt}.safetensors") for fmt in ("peft", "diffusers")}
    for fmt, path in paths.items():
        save_flux_lora(path, lora, fmt=fmt)
    return paths, x, want, lora


def test_diffusers_model_level_load(base, stress):
    paths, x, want, _ = stress
    model = diffusers_flux_from(base[0])
    model.load_lora_adapter(paths["peft"])  # the documented call: a file path, nothing else
    assert len(model.peft_config) == 1
    got = torch_forward(model, x)
    assert rel_err(got, want) <= 1e-5, rel_err(got, want)


@pytest.mark.parametrize("fmt", ["peft", "diffusers"])
def test_diffusers_pipeline_level_load(base, stress, fmt):
    """Both files load at the right scale: peft with alpha/r folded into lora_B, diffusers with alpha = 7 kept in
    the adapter metadata."""
    paths, x, want, lora = stress
    pipe = flux_pipeline(diffusers_flux_from(base[0]))
    pipe.load_lora_weights(paths[fmt])
    cfg = next(iter(pipe.transformer.peft_config.values()))
    assert cfg.r == 4 and cfg.lora_alpha == (4 if fmt == "peft" else 7)
    adapted = {n for n, m in pipe.transformer.named_modules() if hasattr(m, "lora_A")}
    # q, k, v (and proj_mlp) of each fused kernel are separate diffusers modules; no suffix over-match.
    assert len(adapted) == sum({"img_attn.qkv": 3, "txt_attn.qkv": 3, "linear1": 4}.get(p.split(".", 2)[-1], 1)
                               for p in lora.adapters())
    got = torch_forward(pipe.transformer, x)
    assert rel_err(got, want) <= 1e-5, rel_err(got, want)


# ------------------------------------------------------------------------------------------------------ key rules


def _bfl_linears(state):
    """{BFL module path: weight shape [O, I]} of the Linears of the tiny model (ComfyUI and sd-scripts build Flux
    with BFL's module names)."""
    return {k[:-len(".weight")]: tuple(v.shape) for k, v in to_bfl({k: torch.from_numpy(v) for k, v in
                                                                    state.items()}).items()
            if k.endswith(".weight") and v.ndim == 2}


# ComfyUI, comfy/lora.py `model_lora_keys_unet`: every model weight "diffusion_model.<path>.weight" answers to these
# names, for any model.
COMFY_NAMES = (lambda path: "lora_unet_" + path.replace(".", "_"), lambda path: "diffusion_model." + path)
# comfy/lora.py, the `comfy.model_base.Flux` branch: "transformer.<diffusers module>" for every key of
# comfy/utils.py `flux_to_diffusers` (diffusers module -> (BFL module, first output row, rows); d = hidden size).
COMFY_FLUX_DOUBLE = {"attn.to_q": ("img_attn.qkv", 0, 1), "attn.to_k": ("img_attn.qkv", 1, 1),
                     "attn.to_v": ("img_attn.qkv", 2, 1), "attn.add_q_proj": ("txt_attn.qkv", 0, 1),
                     "attn.add_k_proj": ("txt_attn.qkv", 1, 1), "attn.add_v_proj": ("txt_attn.qkv", 2, 1),
                     "attn.to_out.0": "img_attn.proj", "norm1.linear": "img_mod.lin",
                     "norm1_context.linear": "txt_mod.lin", "attn.to_add_out": "txt_attn.proj",
                     "ff.net.0.proj": "img_mlp.0", "ff.net.2": "img_mlp.2", "ff_context.net.0.proj": "txt_mlp.0",
                     "ff_context.net.2": "txt_mlp.2"}
COMFY_FLUX_SINGLE = {"attn.to_q": ("linear1", 0, 1), "attn.to_k": ("linear1", 1, 1), "attn.to_v": ("linear1", 2, 1),
                     "proj_mlp": ("linear1", 3, 4), "norm.linear": "modulation.lin", "proj_out": "linear2"}
COMFY_FLUX_TOP = {"x_embedder": "img_in", "context_embedder": "txt_in"}


def comfy_flux_key_map(linears, d):
    """{lora name: (BFL module, (first row, rows) or None)} as ComfyUI builds it for a Flux model."""
    key_map = {spell(path): (path, None) for path in linears for spell in COMFY_NAMES}
    blocks = {"double_blocks": ("transformer_blocks", COMFY_FLUX_DOUBLE),
              "single_blocks": ("single_transformer_blocks", COMFY_FLUX_SINGLE)}
    n = {kind: len({p.split(".")[1] for p in linears if p.startswith(kind + ".")}) for kind in blocks}
    for kind, (df_kind, table) in blocks.items():
        for i in range(n[kind]):
            for df, to in table.items():
                path, rows = (to, None) if isinstance(to, str) else (to[0], (to[1] * d, to[2] * d))
                key_map[f"transformer.{df_kind}.{i}.{df}"] = (f"{kind}.{i}.{path}", rows)
    key_map |= {f"transformer.{df}": (bfl, None) for df, bfl in COMFY_FLUX_TOP.items()}
    return key_map


# kohya-ss/sd-scripts networks/lora_flux.py, `LoRANetwork.create_modules`: one LoRA module for every Linear inside a
# DoubleStreamBlock / SingleStreamBlock, named "lora_unet" + "." + block path + "." + child path with "." -> "_";
# `create_network_from_weights` splits each key at its first "." into module name and element, takes the rank from
# `lora_down.weight` [R, I] and the alpha from `alpha` (required), and the module adds up(down(x)) * alpha / R.
KOHYA_PREFIX = "lora_unet"
KOHYA_BLOCKS = ("double_blocks", "single_blocks")
KOHYA_ELEMENTS = ("lora_down.weight", "lora_up.weight", "alpha")


def kohya_load(lora, linears):
    """{BFL module: (up, down, alpha)} sd-scripts loads, and the keys no module takes."""
    names = {f"{KOHYA_PREFIX}.{p}".replace(".", "_"): p for p in linears if p.split(".")[0] in KOHYA_BLOCKS}
    found, left = {}, []
    for key, value in lora.items():
        name, elem = key.split(".", 1)
        if name in names and elem in KOHYA_ELEMENTS:
            found.setdefault(name, {})[elem] = value
        else:
            left.append(key)
    patches = {}
    for name, e in found.items():
        if set(e) != set(KOHYA_ELEMENTS):
            left += [f"{name}.{k}" for k in e]
            continue
        patches[names[name]] = (e["lora_up.weight"], e["lora_down.weight"], float(e["alpha"]))
    return patches, sorted(left)


def _check_deltas(patches, lora, linears):
    """Sum of the patches on each BFL weight (scale alpha/r, 1 without alpha, on the patch's rows) equals the
    LoRA's own delta (alpha/r)·(A@B)ᵀ; every adapter is patched and nothing else."""
    got = {}
    for path, rows, up, down, alpha in patches:
        up, down = np.asarray(up, np.float64), np.asarray(down, np.float64)
        delta = np.zeros(linears[path])
        start, n = rows or (0, linears[path][0])
        assert up.shape[0] == n and down.shape[1] == linears[path][1], path
        delta[start:start + n] = (1.0 if alpha is None else alpha / down.shape[0]) * up @ down
        got[path] = got.get(path, 0.0) + delta
    want = {}
    for path, ad in lora.adapters().items():
        bfl = path.replace("mlp.linear_1", "mlp.0").replace("mlp.linear_2", "mlp.2")
        want[bfl] = ad.alpha / ad.rank * (np.asarray(ad.lora_a.get_value(), np.float64) @ np.asarray(
            ad.lora_b.get_value(), np.float64)).T
    assert set(got) == set(want)
    for path in want:  # the peft file's B holds alpha/r·B rounded to f32
        atol = 1e-6 * np.abs(want[path]).max()
        np.testing.assert_allclose(got[path], want[path], rtol=1e-6, atol=atol, err_msg=path)


@pytest.mark.parametrize("targets", [ALL_TARGETS, IMAGE_STREAM_TARGETS], ids=["all", "image_stream"])
@pytest.mark.parametrize("fmt", ["comfy", "kohya", "peft"])
def test_comfyui_loads_the_file(base, fmt, targets):
    linears = _bfl_linears(base[0])
    lora = _lora(targets)
    tensors, _ = lora_tensors(lora, fmt)
    patches, left = comfy_patches(tensors, comfy_flux_key_map(linears, variant("tiny").hidden_size))
    assert not left, f"ComfyUI would warn 'lora key not loaded' for {left[:5]}"
    _check_deltas([(path, rows, *rest) for (path, rows), *rest in patches], lora, linears)


@pytest.mark.parametrize("targets", [DOUBLE_TARGETS + SINGLE_TARGETS, IMAGE_STREAM_TARGETS],
                         ids=["all_block_targets", "image_stream"])
def test_kohya_sd_scripts_loads_the_file(base, targets):
    linears = _bfl_linears(base[0])
    lora = _lora(targets)
    patches, left = kohya_load(lora_tensors(lora, "kohya")[0], linears)
    assert not left, f"sd-scripts would not load {left[:5]}"
    _check_deltas([(path, None, *p) for path, p in patches.items()], lora, linears)


def test_peft_metadata_is_prefixed_and_declares_the_folded_scale(stress):
    """diffusers' pipelines read `transformer.r` etc. (its save_lora_weights prefixes them)."""
    paths, _, _, _ = stress
    from omnijax.omnimatte.lora_io import read_lora_file

    peft = json.loads(read_lora_file(paths["peft"])[1]["lora_adapter_metadata"])
    assert peft["transformer.r"] == 4 and peft["transformer.lora_alpha"] == 4
    assert "transformer.single_transformer_blocks.1.proj_mlp" not in peft["transformer.target_modules"]
    assert "single_transformer_blocks.1.proj_mlp" in peft["transformer.target_modules"]
