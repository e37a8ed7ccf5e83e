"""Flux LoRA files in four namings, driven by name tables (shared/spec/flux.md §2.3.5).

Formats:
  "omnijax":   `{our module path}.lora_a` [I, R] / `.lora_b` [R, O] (FluxLoRA's layout); spec as JSON metadata.
  "bfl":       BFL module names, `double_blocks.0.img_attn.qkv.lora_A.weight` [R, I] / `.lora_B.weight` [O, R]
               (BFL's control-LoRA naming); alphas in our JSON metadata, else alpha = R.
  "kohya":     `lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight` / `.lora_up.weight` / `.alpha` (sd-scripts'
               Flux naming: BFL modules, fused qkv and linear1).
  "diffusers": PEFT on FluxTransformer2DModel, `transformer.transformer_blocks.0.attn.to_q.lora_A.weight` /
               `.lora_B.weight`; rank and alpha from the `lora_adapter_metadata` JSON (r, lora_alpha,
               rank_pattern, alpha_pattern), else alpha = R.

Fusing (diffusers -> ours): separate to_q / to_k / to_v (/ proj_mlp in single blocks) adapters of one fused kernel
become one adapter: with identical A's (what our export writes) A is shared and the B's are stacked on O; otherwise
A's are stacked on R and B is block-diagonal (rank = sum of ranks). Both are exact. Splitting (ours -> diffusers)
writes each part's columns of B with the shared A, or each block alone when B is block-diagonal, so a file read
from diffusers and written back keeps its ranks. Every key is checked before anything is written: unknown names,
half adapters, shapes that do not chain or do not fit the model raise LoRAFileError naming them.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx

from omnijax.conditioning import write_safetensors
from omnijax.models.flux.lora import DOUBLE_TARGETS, SINGLE_TARGETS, TOP_TARGETS, FluxLoRA, split_path, target_dims
from omnijax.models.flux.variants import FluxConfig
from omnijax.omnimatte.lora_io import LoRAFileError, read_lora_file

FORMATS = ("omnijax", "bfl", "kohya", "diffusers")
_META_OURS = "omnijax_flux_lora"
_META_PEFT = "lora_adapter_metadata"
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
_SUFFIXES = {"omnijax": ("lora_a", "lora_b", None), "bfl": ("lora_A.weight", "lora_B.weight", None),
             "kohya": ("lora_down.weight", "lora_up.weight", "alpha"),
             "diffusers": ("lora_A.weight", "lora_B.weight", None)}
_DF_PREFIX = "transformer."


def _paths():
    """Every adaptable module path of a Flux model with up to _MAX_BLOCKS blocks of each kind."""
    yield from TOP_TARGETS
    for i in range(_MAX_BLOCKS):
        yield from (f"double_blocks.{i}.{t}" for t in DOUBLE_TARGETS)
        yield from (f"single_blocks.{i}.{t}" for t in SINGLE_TARGETS)


def _file_modules(fmt: str, path: str) -> tuple[str, ...]:
    """The module name(s) a format uses for one of our paths (several: the parts of a fused kernel)."""
    kind, idx, target = split_path(path)
    if fmt == "omnijax":
        return (path,)
    if fmt in ("bfl", "kohya"):
        name = _BFL[target] if kind is None else f"{kind}.{idx}.{_BFL[target]}"
        return (name,) if fmt == "bfl" else ("lora_unet_" + name.replace(".", "_"),)
    if kind is None:
        return _DF_TOP[target]
    table, block = (_DF_DOUBLE, "transformer_blocks") if kind == "double_blocks" else (_DF_SINGLE,
                                                                                      "single_transformer_blocks")
    return tuple(f"{block}.{idx}.{m}" for m in table[target])


_TABLES: dict[str, dict[str, tuple[str, int]]] = {}


def _table(fmt: str) -> dict[str, tuple[str, int]]:
    """{file module name: (our path, part index)}."""
    if fmt not in _TABLES:
        _TABLES[fmt] = {m: (p, j) for p in _paths() for j, m in enumerate(_file_modules(fmt, p))}
    return _TABLES[fmt]


def _part_sizes(cfg: FluxConfig, path: str) -> list[int]:
    target = split_path(path)[2]
    d, f = cfg.hidden_size, cfg.mlp_hidden
    return {"img_attn.qkv": [d] * 3, "txt_attn.qkv": [d] * 3, "linear1": [d, d, d, f]}.get(
        target, [target_dims(cfg, target)[1]])


def _split_key(fmt, key):
    if fmt == "diffusers" and key.startswith(_DF_PREFIX):
        key = key[len(_DF_PREFIX):]
    for slot, suffix in zip(("a", "b", "alpha"), _SUFFIXES[fmt]):
        if suffix and key.endswith("." + suffix):
            return key[:-len(suffix) - 1], slot
    if fmt == "bfl" and key.endswith(".lora_B.bias"):
        return key[:-len(".lora_B.bias")], "bias"
    return None, None


def detect_format(keys) -> str:
    keys = list(keys)
    for fmt in ("kohya", "diffusers", "bfl", "omnijax"):
        table = _table(fmt)
        if any(_split_key(fmt, k)[0] in table for k in keys):
            return fmt
    raise LoRAFileError(f"not a Flux LoRA file in a known format {FORMATS}; first keys: {keys[:5]}")


def _peft_alphas(metadata: Mapping[str, str]):
    """(default alpha or None, {module: alpha}) from diffusers/PEFT adapter metadata."""
    if _META_PEFT not in metadata:
        return None, {}
    raw = json.loads(metadata[_META_PEFT])
    raw = {k[len(_DF_PREFIX):] if k.startswith(_DF_PREFIX) else k: v for k, v in raw.items()}
    return raw.get("lora_alpha"), dict(raw.get("alpha_pattern") or {})


def lora_entries(tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None, cfg: FluxConfig, *,
                 strict: bool = True):
    """Parses a file into {our path: {"a": [I, R], "b": [R, O], "alpha": float}} (fused, our layout).

    Returns (format, entries, ignored keys).
    """
    metadata = dict(metadata or {})
    fmt = detect_format(tensors.keys())
    table = _table(fmt)
    ours = json.loads(metadata[_META_OURS]) if _META_OURS in metadata else {}
    peft_default, peft_pattern = _peft_alphas(metadata)
    modules: dict[str, dict] = {}
    unknown = []
    for key, arr in tensors.items():
        mod, slot = _split_key(fmt, key)
        if mod is None or mod not in table:
            unknown.append(key)
            continue
        modules.setdefault(mod, {})[slot] = np.asarray(arr)
    if unknown and strict:
        raise LoRAFileError(f"{len(unknown)} {fmt} LoRA keys name no adaptable Flux module: {sorted(unknown)[:10]}")
    parts: dict[str, dict[int, tuple]] = {}
    for mod, e in modules.items():
        if "a" not in e or "b" not in e:
            raise LoRAFileError(f"{mod}: the file has only {sorted(e)} (needs both matrices)")
        if "bias" in e and np.any(e["bias"]):
            raise LoRAFileError(f"{mod}: a LoRA up-projection with a non-zero bias is not supported")
        a, b = (e["a"], e["b"]) if fmt == "omnijax" else (e["a"].T, e["b"].T)  # -> [I, R], [R, O]
        if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[0]:
            raise LoRAFileError(f"{mod}: down/up shapes {a.shape} and {b.shape} do not chain")
        path, j = table[mod]
        rank = a.shape[1]
        if "alpha" in e:
            alpha = float(np.asarray(e["alpha"], np.float64).reshape(-1)[0])
        elif path in ours:
            alpha = float(ours[path][1])
        elif fmt == "diffusers" and (peft_pattern or peft_default is not None):
            alpha = float(next((v for k, v in peft_pattern.items() if mod == k or mod.endswith("." + k)),
                               peft_default if peft_default is not None else rank))
        else:
            alpha = float(rank)
        parts.setdefault(path, {})[j] = (a, b, alpha)
    return fmt, {path: _fuse(cfg, path, p, len(_file_modules(fmt, path))) for path, p in parts.items()}, unknown


def _fuse(cfg: FluxConfig, path: str, parts: dict[int, tuple], n_modules: int) -> dict:
    sizes = _part_sizes(cfg, path)
    if n_modules == 1:
        a, b, alpha = parts[0]
        return {"a": a, "b": b, "alpha": alpha}
    for j, (_, b, _) in parts.items():
        if b.shape[1] != sizes[j]:
            raise LoRAFileError(f"{path} part {j}: up-projection has {b.shape[1]} outputs, the model {sizes[j]}")
    items = [parts[j] for j in sorted(parts)]
    scales = [alpha / a.shape[1] for a, _, alpha in items]
    a0 = items[0][0]
    cols = np.cumsum([0] + sizes)
    if all(a.shape == a0.shape and np.array_equal(a, a0) for a, _, _ in items) and len(set(scales)) == 1:
        b = np.zeros((a0.shape[1], cols[-1]), items[0][1].dtype)
        for j, (_, bj, _) in parts.items():
            b[:, cols[j]:cols[j + 1]] = bj
        return {"a": a0, "b": b, "alpha": items[0][2]}
    # Different A's: stack on the rank axis, B block-diagonal; differing scales are folded into B.
    common = scales[0] if len(set(scales)) == 1 else 1.0
    ranks = [parts[j][0].shape[1] for j in sorted(parts)]
    rows = np.cumsum([0] + ranks)
    a = np.concatenate([parts[j][0] for j in sorted(parts)], axis=1)
    b = np.zeros((rows[-1], cols[-1]), np.result_type(*[p[1].dtype for p in items]))
    for n, j in enumerate(sorted(parts)):
        _, bj, alpha = parts[j]
        b[rows[n]:rows[n + 1], cols[j]:cols[j + 1]] = bj * (alpha / bj.shape[0] / common)
    return {"a": a, "b": b, "alpha": common * rows[-1]}


# ------------------------------------------------------------------------------------------------------ writing

def _split(a, b, sizes):
    """Per-part (A [I, r], B [r, o]) of a fused adapter: block-diagonal B gives each part its own rows."""
    cols = np.cumsum([0] + sizes)
    blocks = [b[:, cols[j]:cols[j + 1]] for j in range(len(sizes))]
    used = [np.flatnonzero(np.any(bj != 0, axis=1)) for bj in blocks]
    spans = [(u[0], u[-1] + 1) if u.size else None for u in used]
    contiguous = all(s is not None for s in spans) and spans[0][0] == 0 and spans[-1][1] == b.shape[0] and all(
        spans[j][1] == spans[j + 1][0] for j in range(len(spans) - 1))
    if contiguous:
        return [(a[:, s:e], bj[s:e]) for (s, e), bj in zip(spans, blocks)]
    return [(a, bj) for bj in blocks]


def lora_tensors(lora: FluxLoRA, fmt: str = "omnijax") -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """({key: array}, metadata) of the adapters in format `fmt` (arrays keep their stored dtype)."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown LoRA format {fmt!r}; choose one of {FORMATS}")
    a_suf, b_suf, alpha_suf = _SUFFIXES[fmt]
    out, ranks, alphas = {}, {}, {}
    for path, ad in lora.adapters().items():
        a, b = np.asarray(ad.lora_a.get_value()), np.asarray(ad.lora_b.get_value())
        mods = _file_modules(fmt, path)
        pieces = _split(a, b, _part_sizes(lora.config, path)) if len(mods) > 1 else [(a, b)]
        for mod, (pa, pb) in zip(mods, pieces):
            scale_alpha = ad.scale * pa.shape[1]  # keep (alpha / r) of the host adapter at the piece's rank
            if fmt != "omnijax":
                pa, pb = pa.T, pb.T
            key = _DF_PREFIX + mod if fmt == "diffusers" else mod
            out[f"{key}.{a_suf}"], out[f"{key}.{b_suf}"] = np.ascontiguousarray(pa), np.ascontiguousarray(pb)
            if alpha_suf:
                out[f"{key}.{alpha_suf}"] = np.asarray(scale_alpha, np.float32)
            ranks[mod], alphas[mod] = int(pa.shape[0] if fmt != "omnijax" else pa.shape[1]), scale_alpha
    meta = {"format": fmt}
    if fmt in ("omnijax", "bfl"):
        meta[_META_OURS] = json.dumps({p: list(ra) for p, ra in lora.spec})
    elif fmt == "diffusers":
        r0 = max(set(ranks.values()), key=list(ranks.values()).count)
        a0 = max(set(alphas.values()), key=list(alphas.values()).count)
        meta[_META_PEFT] = json.dumps({"r": r0, "lora_alpha": a0, "target_modules": sorted(ranks),
                                       "rank_pattern": {m: r for m, r in ranks.items() if r != r0},
                                       "alpha_pattern": {m: v for m, v in alphas.items() if v != a0}})
    return out, meta


def save_flux_lora(path: str, lora: FluxLoRA, *, fmt: str = "omnijax"):
    """Writes the adapters as safetensors, atomically."""
    tensors, meta = lora_tensors(lora, fmt)
    write_safetensors(path, tensors, meta)


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
    fmt, entries, _ = lora_entries(tensors, meta, config, strict=strict)
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
    adapters = lora.adapters()
    extra, missing = sorted(set(entries) - set(adapters)), sorted(set(adapters) - set(entries))
    if extra or missing:
        raise LoRAFileError(f"{fmt} LoRA file does not match the adapters: not in the model {extra[:10]}, "
                            f"missing from the file {missing[:10]}")
    updates = []
    for path, ad in adapters.items():
        e = entries[path]
        if e["a"].shape[1] != ad.rank:
            raise LoRAFileError(f"{path}: file rank {e['a'].shape[1]}, model rank {ad.rank}")
        b = e["b"] if e["alpha"] == ad.alpha else (e["b"].astype(np.float32) * (e["alpha"] / ad.alpha))
        updates.append((ad, jnp.asarray(e["a"], ad.lora_a.get_value().dtype),
                        jnp.asarray(b, ad.lora_b.get_value().dtype)))
    for ad, a, b in updates:
        ad.lora_a.set_value(a)
        ad.lora_b.set_value(b)
    return lora
