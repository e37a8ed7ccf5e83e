"""DiffDecompose LoRA files: a Flux LoRA file (omnijax.models.flux.lora_files, any of its formats) whose metadata
also carries what sampling must reuse from training (the ICD settings: foreground ids, LoRA switches; the prompt
block), under one key that other loaders ignore."""

from __future__ import annotations

import json
import struct

from omnijax.conditioning import write_safetensors
from omnijax.models.flux.lora import FluxLoRA
from omnijax.models.flux.lora_files import lora_tensors
from omnijax.omnimatte.lora_io import LoRAFileError

META_KEY = "omnijax_diffdecompose"


def save_decomposer_lora(path: str, lora: FluxLoRA, *, fmt: str = "omnijax", extra: dict | None = None) -> str:
    """Writes `lora` in `fmt` atomically with `extra` (JSON-able) in the metadata. Returns path."""
    tensors, meta = lora_tensors(lora, fmt)
    meta[META_KEY] = json.dumps(extra or {})
    write_safetensors(path, tensors, meta)
    return path


def read_extra(path: str) -> dict:
    """The `extra` of a file written by save_decomposer_lora, from its header alone ({} for other files)."""
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
    except (OSError, struct.error, ValueError) as e:
        raise LoRAFileError(f"{path}: not a readable safetensors file ({e})") from None
    meta = header.get("__metadata__") or {}
    return json.loads(meta[META_KEY]) if META_KEY in meta else {}
