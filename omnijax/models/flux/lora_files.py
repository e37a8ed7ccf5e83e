"""Flux LoRA files: the Flux naming of omnijax.omnimatte.lora_io's formats (shared/spec/flux.md §2.3.5).

Every format, its metadata and its checks are lora_io's; this module only says how Flux spells its adapters
(FLUX_NAMING) and how a fused kernel is split into, and joined back from, per-module adapters.

  "omnijax":   `double_blocks.0.img_mlp.linear_1.lora_a` [I, R] / `.lora_b` [R, O] (FluxLoRA's paths and layout).
  "bfl":       BFL module names, `double_blocks.0.img_attn.qkv.lora_A.weight` [R, I] / `.lora_B.weight` [O, R].
  "kohya":     sd-scripts' Flux naming, `lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight` / `.lora_up.weight`
               / `.alpha` (BFL modules, fused qkv and linear1); ComfyUI loads it too.
  "comfy":     ComfyUI's own, `diffusion_model.double_blocks.0.img_attn.qkv.lora_down.weight` / `.lora_up.weight` /
               `.alpha`.
  "peft":      diffusers/PEFT on FluxTransformer2DModel, `transformer.transformer_blocks.0.attn.to_q.lora_A.weight`,
               alpha/R folded into lora_B: FluxPipeline.load_lora_weights, FluxTransformer2DModel.load_lora_adapter
               and ComfyUI all load it at the right scale.
  "diffusers": the same names as diffusers' save_lora_weights writes them (unscaled B, alphas in the metadata).

Splitting (ours -> diffusers): the fused img/txt qkv (and single blocks' linear1 = q, k, v, proj_mlp) becomes one
adapter per diffusers module: each part's columns of B with the shared A, or, when B is block-diagonal, each part's
own rows of A and B, so a LoRA read from diffusers and written back keeps its ranks. Fusing (diffusers -> ours): with
identical A's and scales A is shared and the B's are stacked on O; otherwise A's are stacked on R and B is
block-diagonal (rank = sum of ranks), differing scales folded into B. Both are exact.
"""

from __future__ import annotations

import os

import jax.numpy as jnp
import numpy as np
from flax import nnx

from omnijax.models.flux.lora import DOUBLE_TARGETS, SINGLE_TARGETS, TOP_TARGETS, FluxLoRA, split_path, target_dims
from omnijax.models.flux.variants import FluxConfig
from omnijax.omnimatte.lora_io import (
    LoRAFileError,
    Naming,
    adapters_to_tensors,
    fill_adapters,
    read_lora_file,
    tensors_to_adapters,
    write_tensors,
)

_MAX_BLOCKS = 64  # name tables cover block indices below this (Flux has 19 and 38)

# our block-relative target -> BFL module (the MLPs are nn.Sequential there)
_BFL = {t: t.replace("mlp.linear_1", "mlp.0").replace("mlp.linear_2", "mlp.2")
        for t in DOUBLE_TARGETS + SINGLE_TARGETS + TOP_TARGETS}
# our target -> diffusers modules, in the fused kernel's output order
_DF_DOUBLE = {
    "img_mod.lin": ("norm1.linear",), "txt_mod.lin": ("norm1_context.linear",),
    "img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "img_attn.proj": ("attn.to_out.0",), "txt_attn.proj": ("attn.to_add_out",),
    "img_mlp.linear_1": ("ff.net.0.proj",), "img_mlp.linear_2": ("ff.net.2",),
    "txt_mlp.linear_1": ("ff_context.net.0.proj",), "txt_mlp.linear_2": ("ff_context.net.2",),
}
_DF_SINGLE = {"modulation.lin": ("norm.linear",), "linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"),
              "linear2": ("proj_out",)}
_DF_TOP = {"img_in": ("x_embedder",), "txt_in": ("context_embedder",)}
_DF_BLOCKS = {"double_blocks": ("transformer_blocks", _DF_DOUBLE), "single_blocks": ("single_transformer_blocks",
                                                                                     _DF_SINGLE)}


def _paths():
    """Every adaptable module path of a Flux model with up to _MAX_BLOCKS blocks of each kind."""
    yield from TOP_TARGETS
    for i in range(_MAX_BLOCKS):
        yield from (f"double_blocks.{i}.{t}" for t in DOUBLE_TARGETS)
        yield from (f"single_blocks.{i}.{t}" for t in SINGLE_TARGETS)


def _bfl(path: str) -> str:
    kind, idx, target = split_path(path)
    return _BFL[target] if kind is None else f"{kind}.{idx}.{_BFL[target]}"


def _diffusers(path: str) -> tuple[str, ...]:
    kind, idx, target = split_path(path)
    if kind is None:
        return tuple("transformer." + m for m in _DF_TOP[target])
    block, table = _DF_BLOCKS[kind]
    return tuple(f"transformer.{block}.{idx}.{m}" for m in table[target])


def _part_sizes(path: str, d: int, parts_out: dict[int, int]) -> list[int]:
    """Output widths of the diffusers parts of a fused kernel with input width d (q, k, v are d wide; proj_mlp's
    width is read from the file, else Flux.1's mlp_ratio 4; a wrong guess fails the model-fit check on load)."""
    if split_path(path)[2] == "linear1":
        return [d, d, d, parts_out.get(3, 4 * d)]
    return [d, d, d]


def _split(path, a, b):
    """Per-part (A [I, r], B [r, o]) of a fused adapter: a block-diagonal B gives each part its own rows."""
    sizes = _part_sizes(path, a.shape[0], {3: b.shape[1] - 3 * a.shape[0]})
    cols = np.cumsum([0] + sizes)
    blocks = [b[:, cols[j]:cols[j + 1]] for j in range(len(sizes))]
    used = [np.flatnonzero(np.any(bj != 0, axis=1)) for bj in blocks]
    spans = [(u[0], u[-1] + 1) if u.size else None for u in used]
    contiguous = all(s is not None for s in spans) and spans[0][0] == 0 and spans[-1][1] == b.shape[0] and all(
        spans[j][1] == spans[j + 1][0] for j in range(len(spans) - 1))
    if contiguous:
        return [(a[:, s:e], bj[s:e]) for (s, e), bj in zip(spans, blocks)]
    return [(a, bj) for bj in blocks]


def _fuse(path, parts: dict[int, tuple], n_parts: int) -> dict:
    """One adapter of the fused kernel from the parts the file has (missing parts contribute zero columns)."""
    d = next(iter(parts.values()))[0].shape[0]
    sizes = _part_sizes(path, d, {j: b.shape[1] for j, (_, b, _) in parts.items()})
    for j, (_, b, _) in parts.items():
        if b.shape[1] != sizes[j]:
            raise LoRAFileError(f"{path} part {j}: up-projection has {b.shape[1]} outputs, expected {sizes[j]}")
    order = sorted(parts)
    scales = [parts[j][2] / parts[j][0].shape[1] for j in order]
    a0 = parts[order[0]][0]
    cols = np.cumsum([0] + sizes)
    if all(parts[j][0].shape == a0.shape and np.array_equal(parts[j][0], a0) for j in order) and len(set(scales)) == 1:
        b = np.zeros((a0.shape[1], cols[-1]), parts[order[0]][1].dtype)
        for j in order:
            b[:, cols[j]:cols[j + 1]] = parts[j][1]
        return {"a": a0, "b": b, "alpha": parts[order[0]][2]}
    # Different A's: stack on the rank axis, B block-diagonal; differing scales are folded into B.
    common = scales[0] if len(set(scales)) == 1 else 1.0
    rows = np.cumsum([0] + [parts[j][0].shape[1] for j in order])
    a = np.concatenate([parts[j][0] for j in order], axis=1)
    b = np.zeros((rows[-1], cols[-1]), np.result_type(*[parts[j][1].dtype for j in order]))
    for n, j in enumerate(order):
        b[rows[n]:rows[n + 1], cols[j]:cols[j + 1]] = parts[j][1] * (scales[n] / common)
    return {"a": a, "b": b, "alpha": common * rows[-1]}


FLUX_NAMING = Naming(
    "flux", _paths(),
    {"omnijax": lambda p: p, "bfl": _bfl, "peft": _diffusers, "diffusers": _diffusers,
     # sd-scripts networks/lora_flux.py: "lora_unet" + "." + module path, dots to underscores.
     "kohya": lambda p: "lora_unet_" + _bfl(p).replace(".", "_"),
     "comfy": lambda p: "diffusion_model." + _bfl(p)},
    split=_split, fuse=_fuse)
FORMATS = FLUX_NAMING.formats


def flux_adapters(lora: FluxLoRA) -> dict:
    """{module path: {"a": [I, R], "b": [R, O], "alpha"}} of a FluxLoRA (numpy, stored dtype): what
    lora_io.save_adapters(path, adapters, naming=FLUX_NAMING, fmt=...) writes."""
    return {path: {"a": np.asarray(ad.lora_a.get_value()), "b": np.asarray(ad.lora_b.get_value()),
                   "alpha": float(ad.alpha)} for path, ad in lora.adapters().items()}


def lora_tensors(lora: FluxLoRA, fmt: str = "omnijax") -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """({key: array}, metadata) of the adapters in format `fmt`."""
    return adapters_to_tensors(flux_adapters(lora), fmt, FLUX_NAMING)


def save_flux_lora(path: str, lora: FluxLoRA, *, fmt: str = "omnijax"):
    """Writes the adapters as safetensors, atomically."""
    write_tensors(path, *lora_tensors(lora, fmt))


def load_flux_lora(source, config: FluxConfig, *, lora: FluxLoRA | None = None, dtype=jnp.float32,
                   param_dtype=jnp.float32, strict: bool = True) -> FluxLoRA:
    """A FluxLoRA from a file path or {key: array} mapping in any of FORMATS.

    With `lora` given, fills it (same modules and ranks required; a different alpha is folded into B); otherwise
    builds one whose ranks and alphas are the file's. Raises LoRAFileError before any write on a mismatch.
    """
    if isinstance(source, (str, os.PathLike)):
        tensors, meta = read_lora_file(os.fspath(source))
    else:
        tensors, meta = source, {}
    fmt, entries, _ = tensors_to_adapters(tensors, meta, naming=FLUX_NAMING, strict=strict)
    if not entries:
        raise LoRAFileError("the file holds no Flux LoRA adapters")
    bad = []
    for path, e in entries.items():
        want = target_dims(config, split_path(path)[2])
        if (e["a"].shape[0], e["b"].shape[1]) != want:
            bad.append(f"{path}: file {e['a'].shape[0]}->{e['b'].shape[1]}, model {want[0]}->{want[1]}")
        kind, idx, _ = split_path(path)
        if kind is not None and idx >= (config.depth if kind == "double_blocks" else config.depth_single_blocks):
            bad.append(f"{path}: the model has no such block")
    if bad:
        raise LoRAFileError(f"{fmt} LoRA file does not fit the model: " + "; ".join(bad[:10]))
    if lora is None:
        spec = {p: (e["a"].shape[1], e["alpha"]) for p, e in entries.items()}
        lora = FluxLoRA(config, spec, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(0))
    fill_adapters(lora.adapters(), entries, f"{fmt} LoRA file", "the Flux LoRA's adapters")
    return lora
