"""Branch-LoRA files: safetensors in three namings, all driven by one name table (no underscore splitting).

Formats (shared/spec/wan.md §2.3):
  "omnijax": `blocks.{i}.{group}.{name}.lora_a` [I, R] and `.lora_b` [R, O] (our layout), with the expert
             config (rank, alpha, blocks, targets, mask) as JSON metadata.
  "peft":    diffusers/PEFT naming of the Wan transformer, `transformer.blocks.{i}.attn1.to_q.lora_A.weight`
             [R, I] and `.lora_B.weight` [O, R]; alpha in the metadata `lora_adapter_metadata` as
             {"r", "lora_alpha"} (files without it get alpha = R, PEFT's scale 1).
  "kohya":   the VideoX-Fun / kohya naming, `lora_unet__blocks_{i}_self_attn_q.lora_down.weight` [R, I],
             `.lora_up.weight` [O, R] and `.alpha` (0-d), module paths in the original Wan names.
Round trips are exact (transposes only). Loading checks every key: unknown names, missing adapters, rank
and shape mismatches raise LoRAFileError naming them. Files are written atomically.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping

import jax.numpy as jnp
import numpy as np

from omnijax.omnimatte.branch import BranchLoRA, EasyOmnimatte
from omnijax.omnimatte.experts import TARGETS, ExpertConfig

FORMATS = ("omnijax", "peft", "kohya")
_META_OURS = "omnijax_lora"
_META_PEFT = "lora_adapter_metadata"
_MAX_BLOCKS = 128  # name tables cover block indices below this (Wan has 30 or 40)

# target (our block-relative path) -> diffusers module path / original Wan module path
_PEFT_NAMES = {
    "self_attn.q": "attn1.to_q", "self_attn.k": "attn1.to_k", "self_attn.v": "attn1.to_v",
    "self_attn.o": "attn1.to_out.0", "cross_attn.q": "attn2.to_q", "cross_attn.k": "attn2.to_k",
    "cross_attn.v": "attn2.to_v", "cross_attn.o": "attn2.to_out.0", "cross_attn.k_img": "attn2.add_k_proj",
    "cross_attn.v_img": "attn2.add_v_proj", "ffn.linear_1": "ffn.net.0.proj", "ffn.linear_2": "ffn.net.2",
}
_WAN_NAMES = {t: t for t in TARGETS if not t.startswith("ffn.")} | {"ffn.linear_1": "ffn.0", "ffn.linear_2": "ffn.2"}


class LoRAFileError(ValueError):
    """A LoRA file does not fit the model or is malformed."""


def _module_names(fmt: str, block: int, target: str) -> str:
    if fmt == "omnijax":
        return f"blocks.{block}.{target}"
    if fmt == "peft":
        return f"transformer.blocks.{block}.{_PEFT_NAMES[target]}"
    return "lora_unet__" + f"blocks.{block}.{_WAN_NAMES[target]}".replace(".", "_")


_SUFFIXES = {"omnijax": ("lora_a", "lora_b", None), "peft": ("lora_A.weight", "lora_B.weight", None),
             "kohya": ("lora_down.weight", "lora_up.weight", "alpha")}


def _name_table(fmt: str) -> dict[str, tuple[int, str]]:
    """{module name in `fmt`: (block, target)} for every block index and target."""
    return {_module_names(fmt, b, t): (b, t) for b in range(_MAX_BLOCKS) for t in TARGETS}


_TABLES: dict[str, dict[str, tuple[int, str]]] = {}


def _table(fmt):
    if fmt not in _TABLES:
        _TABLES[fmt] = _name_table(fmt)
    return _TABLES[fmt]


def _branch_lora(model) -> BranchLoRA:
    if isinstance(model, EasyOmnimatte):
        return model.lora
    if isinstance(model, BranchLoRA):
        return model
    raise TypeError(f"expected an EasyOmnimatte or BranchLoRA, got {type(model).__name__}")


def _adapters(lora: BranchLoRA):
    for b in lora.expert.blocks:
        groups = lora.for_block(b)
        for target in lora.expert.targets:
            group, name = target.split(".")
            yield b, target, groups[group][name]


# ------------------------------------------------------------------------------------------------------ writing


def lora_tensors(model, fmt: str = "omnijax") -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """({key: array}, metadata) of the model's adapters in format `fmt` (arrays keep their stored dtype)."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown LoRA format {fmt!r}; choose one of {FORMATS}")
    lora = _branch_lora(model)
    expert = lora.expert
    a_suffix, b_suffix, alpha_suffix = _SUFFIXES[fmt]
    out = {}
    for block, target, ad in _adapters(lora):
        mod = _module_names(fmt, block, target)
        a, b = np.asarray(ad.lora_a.get_value()), np.asarray(ad.lora_b.get_value())
        if fmt != "omnijax":  # torch layout: down/A [R, I], up/B [O, R]
            a, b = a.T, b.T
        out[f"{mod}.{a_suffix}"], out[f"{mod}.{b_suffix}"] = np.ascontiguousarray(a), np.ascontiguousarray(b)
        if alpha_suffix:
            out[f"{mod}.{alpha_suffix}"] = np.asarray(ad.alpha, np.float32)
    meta = {"format": fmt}
    if fmt == "omnijax":
        meta[_META_OURS] = json.dumps(expert.to_dict())
    elif fmt == "peft":
        meta[_META_PEFT] = json.dumps({"r": expert.rank, "lora_alpha": expert.alpha,
                                       "target_modules": sorted({_PEFT_NAMES[t] for t in expert.targets})})
    return out, meta


def save_lora(path: str, model, *, fmt: str = "omnijax"):
    """Writes the adapters as safetensors (atomically: a temporary file in the same folder, then rename)."""
    from safetensors.flax import save_file

    tensors, meta = lora_tensors(model, fmt)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".lora-", suffix=".safetensors.tmp", dir=folder)
    os.close(fd)
    try:
        save_file({k: jnp.asarray(v) for k, v in tensors.items()}, tmp, metadata=meta)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


# ------------------------------------------------------------------------------------------------------ reading


def read_lora_file(path: str) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """({key: numpy array}, metadata) of a safetensors file (bf16 stays bf16 via ml_dtypes)."""
    from safetensors import safe_open

    if not os.path.isfile(path):
        raise FileNotFoundError(f"no LoRA file at {path}")
    with safe_open(path, framework="flax") as f:
        meta = dict(f.metadata() or {})
        return {k: np.asarray(f.get_tensor(k)) for k in f.keys()}, meta


def detect_format(keys) -> str:
    """The LoRA naming ("omnijax", "peft" or "kohya") of a file's keys."""
    keys = list(keys)
    for fmt in ("kohya", "peft", "omnijax"):
        table = _table(fmt)
        if any(_split_key(fmt, k)[0] in table for k in keys):
            return fmt
    raise LoRAFileError(f"not a Wan branch-LoRA file in a known format {FORMATS}; first keys: {keys[:5]}")


def _split_key(fmt, key):
    for suffix in filter(None, _SUFFIXES[fmt]):
        if key.endswith("." + suffix):
            return key[:-len(suffix) - 1], suffix
    return None, None


def lora_entries(tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None = None, *,
                 strict: bool = True):
    """Parses a file's tensors into {(block, target): {"a": [I, R], "b": [R, O], "alpha": float}} (our layout).

    Returns (format, entries, ignored keys). Unknown keys raise LoRAFileError unless `strict` is False.
    """
    metadata = dict(metadata or {})
    fmt = detect_format(tensors.keys())
    table = _table(fmt)
    a_suf, b_suf, alpha_suf = _SUFFIXES[fmt]
    default_alpha = None
    if fmt == "omnijax" and _META_OURS in metadata:
        default_alpha = float(json.loads(metadata[_META_OURS])["alpha"])
    if fmt == "peft" and _META_PEFT in metadata:
        default_alpha = float(json.loads(metadata[_META_PEFT])["lora_alpha"])
    entries: dict[tuple[int, str], dict] = {}
    unknown = []
    for key, arr in tensors.items():
        mod, suffix = _split_key(fmt, key)
        if mod is None or mod not in table:
            unknown.append(key)
            continue
        slot = {a_suf: "a", b_suf: "b", alpha_suf: "alpha"}[suffix]
        entries.setdefault(table[mod], {})[slot] = arr
    if unknown and strict:
        raise LoRAFileError(f"{len(unknown)} {fmt} LoRA keys name no branch-LoRA target: {sorted(unknown)[:10]}")
    for (block, target), e in entries.items():
        if "a" not in e or "b" not in e:
            raise LoRAFileError(f"block {block} {target}: the file has only {sorted(e)} (needs both matrices)")
        a, b = np.asarray(e["a"]), np.asarray(e["b"])
        if fmt != "omnijax":
            a, b = a.T, b.T
        if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[0]:
            raise LoRAFileError(f"block {block} {target}: down/up shapes {a.shape} and {b.shape} do not chain")
        rank = a.shape[1]
        alpha = float(np.asarray(e["alpha"], np.float64)) if "alpha" in e else (
            default_alpha if default_alpha is not None else float(rank))
        entries[(block, target)] = {"a": a, "b": b, "alpha": alpha}
    return fmt, entries, unknown


def expert_from_lora(source, *, mask: str, name: str = "loaded", strict: bool = True) -> ExpertConfig:
    """The ExpertConfig (blocks, targets, rank, alpha) that a LoRA file describes; `mask` is not stored in it."""
    tensors, meta = read_lora_file(source) if isinstance(source, str) else (source, {})
    if _META_OURS in meta:
        d = json.loads(meta[_META_OURS])
        return ExpertConfig.from_dict({**d, "mask": mask or d["mask"], "name": name})
    _, entries, _ = lora_entries(tensors, meta, strict=strict)
    if not entries:
        raise LoRAFileError("the file holds no branch-LoRA adapters")
    ranks = {e["a"].shape[1] for e in entries.values()}
    alphas = {e["alpha"] for e in entries.values()}
    if len(ranks) != 1 or len(alphas) != 1:
        raise LoRAFileError(f"adapters with mixed ranks {sorted(ranks)} or alphas {sorted(alphas)}")
    blocks = sorted({b for b, _ in entries})
    targets = [t for t in TARGETS if any(tt == t for _, tt in entries)]
    missing = [(b, t) for b in blocks for t in targets if (b, t) not in entries]
    if missing:
        raise LoRAFileError(f"adapters are not the same in every block; missing {missing[:10]}")
    return ExpertConfig(name, ranks.pop(), alphas.pop(), tuple(blocks), mask, tuple(targets))


def load_lora(source, model, *, strict: bool = True):
    """Fills the model's adapters from a file path or a {key: array} mapping (any of the three formats).

    The file must hold exactly the model's adapters (same blocks and targets, same rank). An alpha that differs
    from the model's is folded into B (the delta stays the same function). Returns the model.
    """
    tensors, meta = read_lora_file(source) if isinstance(source, str) else (source, {})
    fmt, entries, _ = lora_entries(tensors, meta, strict=strict)
    lora = _branch_lora(model)
    expected = {(b, t): ad for b, t, ad in _adapters(lora)}
    extra = sorted(set(entries) - set(expected))
    missing = sorted(set(expected) - set(entries))
    if extra or missing:
        raise LoRAFileError(f"{fmt} LoRA file does not match the expert {lora.expert.name!r}: "
                            f"adapters not in the model {extra[:10]}, adapters missing from the file {missing[:10]}")
    updates = []
    for key, ad in expected.items():
        e = entries[key]
        if e["a"].shape[1] != ad.rank:
            raise LoRAFileError(f"block {key[0]} {key[1]}: file rank {e['a'].shape[1]}, model rank {ad.rank}")
        a_var, b_var = ad.lora_a, ad.lora_b
        if e["a"].shape != a_var.get_value().shape or e["b"].shape != b_var.get_value().shape:
            raise LoRAFileError(f"block {key[0]} {key[1]}: file shapes {e['a'].shape}/{e['b'].shape}, model "
                                f"{a_var.get_value().shape}/{b_var.get_value().shape}")
        b = e["b"]
        if e["alpha"] != ad.alpha:
            b = (b.astype(np.float32) * (e["alpha"] / ad.alpha)).astype(b.dtype)
        updates.append((ad, jnp.asarray(e["a"], a_var.get_value().dtype), jnp.asarray(b, b_var.get_value().dtype)))
    for ad, a, b in updates:  # all checks passed: now write
        ad.lora_a.set_value(a)
        ad.lora_b.set_value(b)
    return model


def lora_keys(model, fmt: str) -> list[str]:
    """The keys a file of `fmt` holds for this model (for docs and tests)."""
    return sorted(lora_tensors(model, fmt)[0])

