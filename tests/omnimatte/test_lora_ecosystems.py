"""Exported LoRA files read by the ecosystems' own loaders, not only by ours.

diffusers/PEFT: the real loaders (model-level `load_lora_adapter`, pipeline-level `load_lora_weights` on tiny Wan
pipelines) must give the output of omnijax's base with the same LoRA merged into every token's weights, for
alpha != rank. ComfyUI and VideoX-Fun cannot be installed here: their key rules are written below as data, read
from their public sources (files named at each rule), and applied to the exported files: every key must land on
a real Linear of the Wan model with the right shape and scale, and none may be left over.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from converters import load_wan_dit
from omnijax.models.wan import variant
from omnijax.omnimatte import lora_io
from omnijax.omnimatte.branch import EasyOmnimatte
from omnijax.omnimatte.experts import TARGETS, ExpertConfig, effect_expert, quality_expert
from omnijax.params import flat_params
from tests.converters.test_wan_dit import to_wan_names
from tests.omnimatte.helpers import randomize_lora_b
from tests.torch_refs import diffusers_wan, randomize_, rel_err, to_numpy_state

LAYERS = 4


@pytest.fixture(scope="module")
def ref_state():
    torch.manual_seed(0)
    return to_numpy_state(randomize_(diffusers_wan(i2v=True, layers=LAYERS)))


def _torch_model(state):
    model = diffusers_wan(i2v=True, layers=LAYERS)
    model.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()})
    return model.eval()


def _base(state):
    _, model = load_wan_dit(state, variant("tiny-inp", num_layers=LAYERS), dtype=jnp.float32,
                            param_dtype=jnp.float32)
    return model


def _expert_model(base, expert, seed=1):
    model = EasyOmnimatte(base, expert, rngs=nnx.Rngs(seed))
    randomize_lora_b(model, seed=seed + 10)
    return model


def _inputs(seed=0):
    rng = np.random.default_rng(seed)
    return dict(lat=rng.standard_normal((1, 2, 4, 6, 16)).astype(np.float32),
                y=rng.standard_normal((1, 2, 4, 6, 20)).astype(np.float32),
                ctx=rng.standard_normal((1, 7, 32)).astype(np.float32),
                clip=rng.standard_normal((1, 257, 32)).astype(np.float32), ts=np.array([700.0], np.float32))


def _torch_forward(model, d):
    x = np.concatenate([d["lat"], d["y"]], -1)
    ctx = np.zeros((1, 512, 32), np.float32)  # omnijax zero-pads the text to 512 rows inside the model
    ctx[:, :d["ctx"].shape[1]] = d["ctx"]
    with torch.no_grad():
        out = model(torch.from_numpy(x).permute(0, 4, 1, 2, 3), torch.from_numpy(d["ts"]), torch.from_numpy(ctx),
                    encoder_hidden_states_image=torch.from_numpy(d["clip"])).sample
    return out.permute(0, 2, 3, 4, 1).numpy()


def _merged_forward(state, expert_model, d):
    """omnijax's base with W + (alpha/r)·A@B written into every adapted kernel: the LoRA on all tokens.
    The scale comes from the ExpertConfig, not from any file."""
    base = _base(state)
    expert = expert_model.expert
    kernels = flat_params(base)
    for b in expert.blocks:
        for t in expert.targets:
            group, name = t.split(".")
            ad = expert_model.lora.for_block(b)[group][name]
            a, bb = np.asarray(ad.lora_a.get_value(), np.float64), np.asarray(ad.lora_b.get_value(), np.float64)
            var = kernels[f"blocks.{b}.{t}.kernel"]
            var.set_value(jnp.asarray(np.asarray(var.get_value(), np.float64) + expert.alpha / expert.rank * a @ bb,
                                      jnp.float32))
    return np.asarray(jax.jit(lambda m, *a: m(*a))(base, d["lat"], d["ts"], d["ctx"], d["clip"], d["y"]))


# Every target in two blocks, rank 4, alpha 7: a scale of 1.75 that a lost alpha (1.0) cannot hide.
STRESS = ExpertConfig("stress", 4, 7.0, (1, 3), "B", TARGETS)


@pytest.fixture(scope="module")
def stress(ref_state, tmp_path_factory):
    model = _expert_model(_base(ref_state), STRESS)
    path = str(tmp_path_factory.mktemp("lora") / "stress_peft.safetensors")
    lora_io.save_lora(path, model, fmt="peft")
    d = _inputs()
    want = _merged_forward(ref_state, model, d)
    plain = _torch_forward(_torch_model(ref_state), d)
    assert rel_err(plain, want) > 1e-2  # the LoRA changes the output clearly
    return path, d, want, model


def _pipeline(kind, transformer):
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanImageToVideoPipeline, WanPipeline

    # Tiny real components; no tokenizer/text encoder (they would need downloaded files and play no part in
    # loading a transformer LoRA).
    vae = AutoencoderKLWan(base_dim=8, z_dim=16, dim_mult=[1, 1], num_res_blocks=1, temperal_downsample=[False])
    parts = dict(tokenizer=None, text_encoder=None, vae=vae, scheduler=FlowMatchEulerDiscreteScheduler(shift=5.0),
                 transformer=transformer)
    return (WanPipeline if kind == "t2v" else WanImageToVideoPipeline)(**parts)


def test_diffusers_model_level_load(ref_state, stress):
    path, d, want, _ = stress
    model = _torch_model(ref_state)
    model.load_lora_adapter(path)  # the documented call: a file path, nothing else
    assert len(model.peft_config) == 1
    got = _torch_forward(model, d)
    assert rel_err(got, want) <= 1e-5, rel_err(got, want)


@pytest.mark.parametrize("kind", ["t2v", "i2v"])
def test_diffusers_pipeline_level_load(ref_state, stress, kind):
    path, d, want, _ = stress
    pipe = _pipeline(kind, _torch_model(ref_state))
    pipe.load_lora_weights(path)
    cfg = next(iter(pipe.transformer.peft_config.values()))
    assert cfg.r == 4 and cfg.lora_alpha == 4  # the file's declared scale (alpha/r folded into lora_B)
    adapted = {n for n, m in pipe.transformer.named_modules() if hasattr(m, "lora_A")}
    assert len(adapted) == len(STRESS.blocks) * len(TARGETS)  # exactly the file's modules, no suffix over-match
    got = _torch_forward(pipe.transformer, d)
    assert rel_err(got, want) <= 1e-5, rel_err(got, want)


def test_diffusers_pipeline_loads_the_comfy_file(ref_state, stress, tmp_path):
    """diffusers converts `diffusion_model.` Wan files itself (alpha folded by its converter)."""
    _, d, want, model = stress
    path = str(tmp_path / "stress_comfy.safetensors")
    lora_io.save_lora(path, model, fmt="comfy")
    pipe = _pipeline("i2v", _torch_model(ref_state))
    pipe.load_lora_weights(path)
    got = _torch_forward(pipe.transformer, d)
    assert rel_err(got, want) <= 1e-5, rel_err(got, want)


# ------------------------------------------------------------------------------------------------------ key rules


def _wan_linears(state):
    """{original Wan module path: weight shape [O, I]} of the Linears of the tiny model (ComfyUI and VideoX-Fun
    both build Wan with the original module names)."""
    return {k[:-len(".weight")]: v.shape for k, v in to_wan_names(state).items() if k.endswith(".weight")
            and v.ndim == 2}


# ComfyUI, comfy/lora_convert.py `convert_lora`: a VideoX-Fun ("Wan Fun") file is recognised by this one key only,
# then its prefix is rewritten.
COMFY_WAN_FUN_SENTINEL = "lora_unet__blocks_0_cross_attn_k.lora_down.weight"
COMFY_WAN_FUN_PREFIX = ("lora_unet__", "lora_unet_")
# comfy/lora.py `model_lora_keys_unet`: each model weight "diffusion_model.<path>.weight" answers to these names.
COMFY_NAMES = (lambda path: "lora_unet_" + path.replace(".", "_"), lambda path: "diffusion_model." + path)
# comfy/lora.py `load_lora`: per name, the (up, down) suffix pairs tried in order, and the alpha suffix.
COMFY_UP_DOWN = ((".lora_up.weight", ".lora_down.weight"), ("_lora.up.weight", "_lora.down.weight"),
                 (".lora_B.weight", ".lora_A.weight"), (".lora.up.weight", ".lora.down.weight"),
                 (".lora_linear_layer.up.weight", ".lora_linear_layer.down.weight"))
COMFY_ALPHA = ".alpha"


def comfy_patches(lora, key_map):
    """comfy/lora.py `load_lora` with a `model_lora_keys_unet` key map {lora name: target}: [(target, up, down,
    alpha)] ComfyUI patches, and the keys it warns `lora key not loaded` about."""
    patches, used = [], set()
    for x, target in key_map.items():
        alpha = lora.get(x + COMFY_ALPHA)
        if alpha is not None:
            used.add(x + COMFY_ALPHA)
        for up, down in COMFY_UP_DOWN:
            if x + up in lora:
                patches.append((target, lora[x + up], lora[x + down], None if alpha is None else float(alpha)))
                used |= {x + up, x + down}
                break
    return patches, sorted(set(lora) - used)


def comfy_load(lora, linears):
    """{module path: (up, down, alpha)} ComfyUI patches, and the keys it warns `lora key not loaded` about."""
    if COMFY_WAN_FUN_SENTINEL in lora:
        old, new = COMFY_WAN_FUN_PREFIX
        lora = {(new + k[len(old):] if k.startswith(old) else k): v for k, v in lora.items()}
    patches, left = comfy_patches(lora, {spell(path): path for path in linears for spell in COMFY_NAMES})
    return {path: tuple(rest) for path, *rest in patches}, left


# VideoX-Fun, videox_fun/utils/lora_utils.py `merge_lora`: key normalisation, in order (the suffix rewrites are
# (old ending, new ending) pairs), then the split into layer name and element at the first ".".
VXF_STRIP = "diffusion_model."
VXF_PREFIX = "lora_unet__"
VXF_SUFFIXES = (("_lora_up_weight", ".lora_up.weight"), ("_lora_down_weight", ".lora_down.weight"),
                ("_lora_A_default_weight", ".lora_A.weight"), ("_lora_B_default_weight", ".lora_B.weight"),
                ("_lora_A_weight", ".lora_A.weight"), ("_lora_B_weight", ".lora_B.weight"), ("_alpha", ".alpha"))
VXF_ELEMENTS = ((".lora_A.", ".lora_down."), (".lora_B.", ".lora_up."))


def _vxf_resolve(layer, children):
    """merge_lora's module search for layer "lora_unet__blocks_0_self_attn_q": after "lora_unet_", split at "_";
    try the whole rest as one attribute, else the shortest "_"-joined head that is an attribute, and descend."""
    parts = layer.split("lora_unet_")[-1].split("_")[1:]  # [0] is the empty root name
    node, path = children, []
    while parts:
        whole = "_".join(parts)
        if whole in node:
            return ".".join(path + [whole])
        for i in range(1, len(parts) + 1):
            head = "_".join(parts[:i])
            if head in node:
                node, path, parts = node[head], path + [head], parts[i:]
                break
        else:
            return None
    return ".".join(path)


def vxf_merge(lora, linears):
    """{module path: (up, down, alpha)} VideoX-Fun merges, and the layers it cannot resolve or merge."""
    tree = {}
    for path in linears:
        node = tree
        for part in path.split("."):
            node = node.setdefault(part, {})
    layers = {}
    for key, value in lora.items():
        key = key.replace(VXF_STRIP, "")
        if VXF_PREFIX not in key:
            key = VXF_PREFIX + key
        key = key.replace(".", "_")
        for old, new in VXF_SUFFIXES:
            if key.endswith(old):
                key = key[:-len(old)] + new
        for old, new in VXF_ELEMENTS:
            key = key.replace(old, new)
        layer, elem = key.split(".", 1)
        layers.setdefault(layer, {})[elem] = value
    merged, failed = {}, []
    for layer, elems in layers.items():
        path = _vxf_resolve(layer, tree)
        if path not in linears or not {"lora_up.weight", "lora_down.weight"} <= set(elems) or \
                set(elems) - {"lora_up.weight", "lora_down.weight", "alpha"}:
            failed.append(layer)
            continue
        alpha = elems.get("alpha")
        merged[path] = (elems["lora_up.weight"], elems["lora_down.weight"], None if alpha is None else float(alpha))
    return merged, failed


def _check_deltas(patches, model, linears):
    """Each patch is a real Linear of the right shape, and scale·up@down (scale alpha/r, 1 without alpha, the
    rule of both loaders) is the expert's own delta (A@B)ᵀ·alpha/r; every adapter is patched."""
    expert = model.expert
    want = {f"blocks.{b}.{lora_io._WAN_NAMES[t]}": (b, t) for b in expert.blocks for t in expert.targets}
    assert set(patches) == set(want)
    for path, (up, down, alpha) in patches.items():
        up, down = np.asarray(up, np.float64), np.asarray(down, np.float64)
        assert up.shape[0] == linears[path][0] and down.shape[1] == linears[path][1], path
        delta = (1.0 if alpha is None else alpha / down.shape[0]) * up @ down
        b, t = want[path]
        group, name = t.split(".")
        ad = model.lora.for_block(b)[group][name]
        ref = expert.alpha / expert.rank * np.asarray(ad.lora_a.get_value(), np.float64) @ np.asarray(
            ad.lora_b.get_value(), np.float64)
        np.testing.assert_allclose(delta, ref.T, rtol=1e-6, atol=1e-9, err_msg=path)


@pytest.fixture(scope="module", params=["effect", "quality"])
def default_expert(request, ref_state):
    make = effect_expert if request.param == "effect" else quality_expert
    return _expert_model(_base(ref_state), make(LAYERS))  # default rank, alpha, targets, blocks


def test_comfyui_loads_the_comfy_file(ref_state, default_expert):
    linears = _wan_linears(ref_state)
    tensors, _ = lora_io.lora_tensors(default_expert, "comfy")
    patches, left = comfy_load(tensors, linears)
    assert not left, f"ComfyUI would warn 'lora key not loaded' for {left[:5]}"
    _check_deltas(patches, default_expert, linears)
    # The VideoX-Fun file of a default expert (no block-0 cross-attention k) is what ComfyUI cannot load.
    kohya, _ = lora_io.lora_tensors(default_expert, "kohya")
    assert comfy_load(kohya, linears)[0] == {}


@pytest.mark.parametrize("fmt", ["kohya", "comfy"])
def test_videox_fun_merges_the_file(ref_state, default_expert, fmt):
    linears = _wan_linears(ref_state)
    tensors, _ = lora_io.lora_tensors(default_expert, fmt)
    merged, failed = vxf_merge(tensors, linears)
    assert not failed, f"VideoX-Fun cannot merge {failed[:5]}"
    _check_deltas(merged, default_expert, linears)


def test_key_rules_cover_every_target(ref_state):
    """All 12 targets, block indices that share prefixes (1 and 11 need 12 blocks): both rule sets resolve them."""
    state = to_numpy_state(randomize_(diffusers_wan(i2v=True, layers=12)))
    _, base = load_wan_dit(state, variant("tiny-inp", num_layers=12), dtype=jnp.float32, param_dtype=jnp.float32)
    model = _expert_model(base, ExpertConfig("all", 4, 6.0, (1, 11), "B", TARGETS))
    linears = _wan_linears(state)
    for fmt, load in (("comfy", comfy_load), ("kohya", vxf_merge), ("comfy", vxf_merge)):
        patches, left = load(lora_io.lora_tensors(model, fmt)[0], linears)
        assert not left, (fmt, left[:5])
        _check_deltas(patches, model, linears)
    meta = lora_io.lora_tensors(model, "comfy")[1]
    assert json.loads(meta["omnijax_lora"])["alpha"] == 6.0
