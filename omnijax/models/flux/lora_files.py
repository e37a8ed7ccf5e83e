"""Flux LoRA files (safetensors) for a FluxLoRA, keyed by BFL module paths.

Axis letters: I input features, O output features, R rank.

Formats:
  "omnijax": `{path}.lora_a` [I, R] and `{path}.lora_b` [R, O] (our layout), the spec {path: (rank, alpha)}
             and any caller metadata (e.g. DiffDecompose's ICD settings) as JSON metadata.
  "comfy":   ComfyUI's BFL naming, `diffusion_model.{path}.lora_A.weight` [R, I], `.lora_B.weight` [O, R] and
             `.alpha` (one value, stored as [1]): the layout ComfyUI's LoRA loader maps onto the key names of a
             Flux checkpoint.
Round trips are exact (transposes only); files are written atomically. Loading checks every key and shape and
raises LoRAFileError naming the problem.
"""

from __future__ import annotations

import json

import numpy as np

from omnijax.conditioning import CacheError, read_safetensors, write_safetensors
from omnijax.models.flux.lora import FluxLoRA, split_path, target_dims
from omnijax.models.flux.variants import FluxConfig

FORMATS = ("omnijax", "comfy")
_META = "omnijax_flux_lora"
_COMFY_PREFIX = "diffusion_model."


class LoRAFileError(ValueError):
    """A Flux LoRA file is malformed or does not fit the model."""


def lora_tensors(lora: FluxLoRA, fmt: str = "omnijax", extra: dict | None = None):
    """(tensors, metadata) of `lora` in `fmt` (numpy float32)."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown Flux LoRA format {fmt!r}; known: {', '.join(FORMATS)}")
    tensors = {}
    for path, ad in lora.adapters().items():
        a, b = np.asarray(ad.lora_a[...], np.float32), np.asarray(ad.lora_b[...], np.float32)
        if fmt == "omnijax":
            tensors[f"{path}.lora_a"], tensors[f"{path}.lora_b"] = a, b
        else:
            p = _COMFY_PREFIX + path
            tensors[f"{p}.lora_A.weight"], tensors[f"{p}.lora_B.weight"] = a.T.copy(), b.T.copy()
            tensors[f"{p}.alpha"] = np.asarray(ad.alpha, np.float32)
    meta = {_META: json.dumps(dict(spec={k: list(v) for k, v in lora.spec}, **(extra or {})))}
    return tensors, meta


def save_lora(path: str, lora: FluxLoRA, fmt: str = "omnijax", extra: dict | None = None) -> str:
    """Writes `lora` to `path` atomically; `extra` (JSON-able) goes into the metadata. Returns path."""
    tensors, meta = lora_tensors(lora, fmt, extra)
    write_safetensors(path, tensors, meta)
    return path


def read_lora(path: str, config: FluxConfig) -> tuple[dict[str, tuple[np.ndarray, np.ndarray, float]], dict]:
    """{BFL path: (A [I, R], B [R, O], alpha)} of a file in either format, checked against `config`, and the
    omnijax metadata (empty for foreign files)."""
    try:
        tensors, meta = read_safetensors(path)
    except CacheError as e:
        raise LoRAFileError(f"{path}: not a readable safetensors file ({e})") from e
    extra = json.loads(meta[_META]) if _META in meta else {}
    comfy = any(k.endswith(".lora_A.weight") for k in tensors)
    groups: dict[str, dict] = {}
    for key, arr in tensors.items():
        if comfy:
            for suffix, name in ((".lora_A.weight", "a"), (".lora_B.weight", "b"), (".alpha", "alpha")):
                if key.endswith(suffix):
                    mod, slot = key[:-len(suffix)], name
                    break
            else:
                raise LoRAFileError(f"{path}: unexpected key {key!r} in a ComfyUI-style LoRA")
            mod = mod.removeprefix(_COMFY_PREFIX).removeprefix("model.diffusion_model.")
            if slot in ("a", "b"):
                arr = arr.T
        else:
            mod, _, slot = key.rpartition(".")
            if slot not in ("lora_a", "lora_b"):
                raise LoRAFileError(f"{path}: unexpected key {key!r}")
            slot = slot[-1]
        groups.setdefault(mod, {})[slot] = arr
    spec = {k: tuple(v) for k, v in extra.get("spec", {}).items()}
    out = {}
    for mod, g in groups.items():
        try:
            _, _, target = split_path(mod)
        except ValueError as e:
            raise LoRAFileError(f"{path}: {e}") from e
        if "a" not in g or "b" not in g:
            raise LoRAFileError(f"{path}: module {mod!r} lacks its {'A' if 'a' not in g else 'B'} matrix")
        a, b = np.asarray(g["a"], np.float32), np.asarray(g["b"], np.float32)
        din, dout = target_dims(config, target)
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != din or b.shape[1] != dout or a.shape[1] != b.shape[0]:
            raise LoRAFileError(f"{path}: {mod!r} has A {a.shape} and B {b.shape}; the model needs [{din}, R] and "
                                f"[R, {dout}]")
        rank = a.shape[1]
        alpha = float(np.asarray(g["alpha"]).reshape(-1)[0]) if "alpha" in g else float(spec.get(mod, (rank, rank))[1])
        out[mod] = (a, b, alpha)
    if not out:
        raise LoRAFileError(f"{path}: holds no LoRA tensors")
    return out, extra


def read_metadata(path: str) -> dict:
    """The omnijax metadata of a LoRA file (spec, caller extras) from its header alone; {} for foreign files."""
    import struct

    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
    except (OSError, struct.error, ValueError) as e:
        raise LoRAFileError(f"{path}: not a readable safetensors file ({e})") from e
    meta = header.get("__metadata__") or {}
    return json.loads(meta[_META]) if _META in meta else {}


def load_lora(path: str, config: FluxConfig, *, rngs=None, dtype=None, param_dtype=None) -> tuple[FluxLoRA, dict]:
    """A FluxLoRA holding the adapters of the file at `path` and the file's omnijax metadata."""
    import jax.numpy as jnp
    from flax import nnx

    entries, extra = read_lora(path, config)
    spec = {k: (a.shape[1], alpha) for k, (a, _, alpha) in entries.items()}
    kw = dict(dtype=dtype or jnp.float32, param_dtype=param_dtype or jnp.float32)
    lora = FluxLoRA(config, spec, rngs=rngs or nnx.Rngs(0), **kw)
    for k, ad in lora.adapters().items():
        a, b, _ = entries[k]
        ad.lora_a[...] = jnp.asarray(a, ad.lora_a.dtype)
        ad.lora_b[...] = jnp.asarray(b, ad.lora_b.dtype)
    return lora, extra
