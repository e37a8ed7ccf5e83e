"""LoRA files: safetensors in the namings other tools load, all spelled from one name table per backbone.

Formats (shared/spec/wan.md §2.3; which tool loads which file: README, "LoRA files"):
  "omnijax": `blocks.{i}.{group}.{name}.lora_a` [I, R] and `.lora_b` [R, O] (our layout); alpha in the metadata.
  "peft":    diffusers/PEFT naming, `transformer.blocks.{i}.attn1.to_q.lora_A.weight` [R, I], `.lora_B.weight` [O, R].
             The scale alpha/R is folded into lora_B and the file declares alpha = R: diffusers' model-level
             `load_lora_adapter(path)` never reads a file's metadata (it infers alpha = R), while the pipelines'
             `load_lora_weights` do, so a folded file is the only one both load at the same, right scale.
             `lora_adapter_metadata` is written the way diffusers' own `save_lora_weights` writes it: keys prefixed
             by the pipeline component (`transformer.r`, `transformer.lora_alpha`, `transformer.target_modules`,
             the last as full module paths so that PEFT adapts exactly the file's modules; modules whose rank
             differs from the most common one are listed in `rank_pattern` / `alpha_pattern`).
  "diffusers": the peft naming as diffusers' own `save_lora_weights` writes it: lora_B unscaled, each module's rank
             and alpha only in the prefixed adapter metadata (r, lora_alpha, rank_pattern, alpha_pattern). Lossless;
             diffusers' pipelines load it at the right scale, its model-level `load_lora_adapter(path)` at alpha = r.
  "kohya":   VideoX-Fun / kohya naming, `lora_unet__blocks_{i}_self_attn_q.lora_down.weight` [R, I],
             `.lora_up.weight` [O, R] and `.alpha` (0-d); module paths in the original Wan names.
  "comfy":   ComfyUI's own naming, `diffusion_model.blocks.{i}.self_attn.q.lora_down.weight` / `.lora_up.weight` /
             `.alpha`: ComfyUI maps every `diffusion_model.<module>` of its Wan model, for any subset of blocks
             (it recognises the "kohya" file only when block 0's cross-attention k is in it). VideoX-Fun's
             `merge_lora` and diffusers' Wan pipelines read this naming too.
  "bfl":     the backbone's original module names with `.lora_A.weight` / `.lora_B.weight` (BFL's Flux LoRAs).
Formats without alpha tensors or PEFT metadata (omnijax, bfl) keep each module's alpha as JSON `omnijax_alphas`.
A Wan file also carries its expert config (rank, alpha, blocks, targets, mask) as JSON metadata `omnijax_lora`.
Round trips are exact, except the folded peft B of f32 adapters (rounded once; bf16 ones are exact, stored in
f32). Loading checks every key: unknown names, missing adapters, rank and shape mismatches raise LoRAFileError
naming them. Files are written atomically.

Backbones: a `Naming` lists a backbone's adapter slots and spells each slot in the formats it supports. The
generic functions (`adapters_to_tensors`, `tensors_to_adapters`, `save_adapters`) take a Naming; the Wan functions
below pass WAN_NAMING, omnijax.models.flux.lora_files passes FLUX_NAMING. Adapters are
{slot: {"a": [I, R], "b": [R, O], "alpha": float}}; formats, metadata and checks are shared. A slot may be spelled
as several modules in a format (Flux's fused qkv is q, k and v in diffusers): the Naming's `split` hook cuts one
adapter into per-module adapters for writing and its `fuse` hook joins them back when reading.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections import Counter
from collections.abc import Callable, Hashable, Iterable, Mapping

import jax.numpy as jnp
import numpy as np

from omnijax.conditioning import write_safetensors
from omnijax.omnimatte.branch import BranchLoRA, EasyOmnimatte
from omnijax.omnimatte.experts import TARGETS, ExpertConfig

_META_OURS = "omnijax_lora"
_META_PEFT = "lora_adapter_metadata"  # diffusers' LORA_ADAPTER_METADATA_KEY
_META_ALPHAS = "omnijax_alphas"  # {module name: alpha} where no alpha tensor or PEFT metadata holds it


@dataclasses.dataclass(frozen=True)
class FileFormat:
    """How one ecosystem stores an adapter: key suffixes, matrix layout, where alpha lives."""

    down: str  # suffix of A / lora_down
    up: str  # suffix of B / lora_up
    alpha: str | None  # suffix of a 0-d alpha tensor; None: alpha in the metadata
    torch_layout: bool  # A stored [R, I] and B [O, R] (else ours: [I, R] and [R, O])
    peft_meta: bool = False  # ranks and alphas in diffusers' `lora_adapter_metadata`
    fold_alpha: bool = False  # alpha/R multiplied into B, the file declares alpha = R


_KOHYA_SUFFIXES = ("lora_down.weight", "lora_up.weight", "alpha")
_PEFT_SUFFIXES = ("lora_A.weight", "lora_B.weight", None)
FILE_FORMATS = {"omnijax": FileFormat("lora_a", "lora_b", None, False),
                "peft": FileFormat(*_PEFT_SUFFIXES, True, peft_meta=True, fold_alpha=True),
                "diffusers": FileFormat(*_PEFT_SUFFIXES, True, peft_meta=True),
                "kohya": FileFormat(*_KOHYA_SUFFIXES, True),
                "comfy": FileFormat(*_KOHYA_SUFFIXES, True),
                "bfl": FileFormat(*_PEFT_SUFFIXES, True)}


class LoRAFileError(ValueError):
    """A LoRA file does not fit the model or is malformed."""


class Naming:
    """One backbone's adapter names: every slot (a hashable key such as (block, target)) spelled in its formats.

    Args:
      backbone: name for messages ("wan").
      slots: every adapter slot the backbone can have.
      spell: {format: slot -> module name, or a tuple of names when the format splits the slot's kernel}; the peft
        and diffusers spellings start with `component + "."`.
      component: the diffusers pipeline component the peft file loads into (its metadata prefix).
      split: (slot, a [I, R], b [R, O]) -> [(a_j, b_j)] one adapter per module of a split slot (same scale).
      fuse: (slot, {part: (a, b, alpha)}, n_parts) -> {"a", "b", "alpha"}, the inverse of `split` when reading.
    """

    def __init__(self, backbone: str, slots: Iterable[Hashable], spell: Mapping[str, Callable[[Hashable], object]],
                 component: str = "transformer", split: Callable | None = None, fuse: Callable | None = None):
        unknown = [f for f in spell if f not in FILE_FORMATS]
        if unknown:
            raise ValueError(f"naming {backbone!r} spells unknown formats {unknown}; known: {tuple(FILE_FORMATS)}")
        self.backbone, self.slots, self.component = backbone, tuple(slots), component
        self.spell, self.split, self.fuse = dict(spell), split, fuse
        self.formats = tuple(f for f in FILE_FORMATS if f in self.spell)
        self._tables: dict[str, dict[str, tuple[Hashable, int]]] = {}

    def names(self, fmt: str, slot) -> tuple[str, ...]:
        names = self.spell[fmt](slot)
        return (names,) if isinstance(names, str) else tuple(names)

    def table(self, fmt: str) -> dict[str, tuple[Hashable, int]]:
        """{module name in `fmt`: (slot, part index)}."""
        if fmt not in self._tables:
            self._tables[fmt] = {n: (s, j) for s in self.slots for j, n in enumerate(self.names(fmt, s))}
        return self._tables[fmt]

    def check(self, fmt: str) -> FileFormat:
        if fmt not in self.formats:
            raise ValueError(f"unknown {self.backbone} LoRA format {fmt!r}; choose one of {self.formats}")
        return FILE_FORMATS[fmt]


# ------------------------------------------------------------------------------------------------------ Wan

_MAX_BLOCKS = 128  # the Wan table covers block indices below this (Wan has 30 or 40)
# target (our block-relative path) -> diffusers module path / original Wan module path
_PEFT_NAMES = {
    "self_attn.q": "attn1.to_q", "self_attn.k": "attn1.to_k", "self_attn.v": "attn1.to_v",
    "self_attn.o": "attn1.to_out.0", "cross_attn.q": "attn2.to_q", "cross_attn.k": "attn2.to_k",
    "cross_attn.v": "attn2.to_v", "cross_attn.o": "attn2.to_out.0", "cross_attn.k_img": "attn2.add_k_proj",
    "cross_attn.v_img": "attn2.add_v_proj", "ffn.linear_1": "ffn.net.0.proj", "ffn.linear_2": "ffn.net.2",
}
_WAN_NAMES = {t: t for t in TARGETS if not t.startswith("ffn.")} | {"ffn.linear_1": "ffn.0", "ffn.linear_2": "ffn.2"}


def _wan(slot):
    return f"blocks.{slot[0]}.{_WAN_NAMES[slot[1]]}"


WAN_NAMING = Naming(
    "wan", [(b, t) for b in range(_MAX_BLOCKS) for t in TARGETS],
    {"omnijax": lambda s: f"blocks.{s[0]}.{s[1]}",
     "peft": lambda s: f"transformer.blocks.{s[0]}.{_PEFT_NAMES[s[1]]}",
     # VideoX-Fun names modules "lora_unet" + "." + (root name "") + "." + path, dots to underscores: two underscores.
     "kohya": lambda s: "lora_unet__" + _wan(s).replace(".", "_"),
     "comfy": lambda s: "diffusion_model." + _wan(s)})
FORMATS = WAN_NAMING.formats


# ------------------------------------------------------------------------------------------------------ generic


def _most_common(values: Mapping[str, float]):
    """The value most modules have (ties: the first module's by name), as PEFT's `r` / `lora_alpha` beside the
    patterns."""
    ordered = [v for _, v in sorted(values.items())]
    counts = Counter(ordered)
    return max(counts, key=lambda v: (counts[v], -ordered.index(v)))


def _peft_metadata(ranks: Mapping[str, int], alphas: Mapping[str, float], prefix: str) -> str:
    """diffusers' `lora_adapter_metadata` (keys prefixed by the pipeline component) for these modules."""
    r, alpha = _most_common(ranks), _most_common(alphas)
    meta = {"r": r, "lora_alpha": alpha, "target_modules": sorted(ranks)}
    # "^" anchors each pattern at the module path's start, as diffusers writes its inferred patterns.
    if any(v != r for v in ranks.values()):
        meta["rank_pattern"] = {f"^{m}": v for m, v in ranks.items() if v != r}
    if any(v != alpha for v in alphas.values()):
        meta["alpha_pattern"] = {f"^{m}": v for m, v in alphas.items() if v != alpha}
    return json.dumps({prefix + k: v for k, v in meta.items()}, sort_keys=True)


def adapters_to_tensors(adapters: Mapping, fmt: str, naming: Naming, *, info: Mapping | None = None
                        ) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """({key: array}, metadata) of `adapters` {slot: {"a": [I, R], "b": [R, O], "alpha": float}} in format `fmt`.

    `info` (JSON-able, e.g. the expert config) is kept in the metadata under "omnijax_lora". Arrays keep their
    dtype, except a folded peft B (stored in at least f32, so that reading a bf16 adapter back is exact).
    """
    spec = naming.check(fmt)
    out, ranks, alphas = {}, {}, {}
    for slot, ad in adapters.items():
        names = naming.names(fmt, slot)
        a, b, alpha = np.asarray(ad["a"]), np.asarray(ad["b"]), float(ad["alpha"])
        scale = alpha / a.shape[1]
        pieces = naming.split(slot, a, b) if len(names) > 1 else [(a, b)]
        for mod, (pa, pb) in zip(names, pieces, strict=True):
            rank = pa.shape[1]
            piece_alpha = scale * rank  # a piece keeps its adapter's scale alpha/R at its own rank
            if spec.fold_alpha and piece_alpha != rank:
                pb = (pb.astype(np.float64) * scale).astype(np.result_type(pb.dtype, np.float32))
                piece_alpha = float(rank)
            if spec.torch_layout:
                pa, pb = pa.T, pb.T
            out[f"{mod}.{spec.down}"], out[f"{mod}.{spec.up}"] = np.ascontiguousarray(pa), np.ascontiguousarray(pb)
            if spec.alpha:
                out[f"{mod}.{spec.alpha}"] = np.asarray(piece_alpha, np.float32)
            ranks[mod], alphas[mod] = rank, piece_alpha
    # PyTorch-layout files say "pt" like torch's own safetensors writers; our format name goes in its own key.
    meta = {"format": "pt" if spec.torch_layout else "flax", "omnijax_format": fmt}
    if info is not None:
        meta[_META_OURS] = json.dumps(dict(info))
    if spec.peft_meta and ranks:
        prefix = naming.component + "."
        meta[_META_PEFT] = _peft_metadata({m.removeprefix(prefix): r for m, r in ranks.items()},
                                          {m.removeprefix(prefix): v for m, v in alphas.items()}, prefix)
    elif not spec.alpha and ranks:
        meta[_META_ALPHAS] = json.dumps(alphas, sort_keys=True)
    return out, meta


def write_tensors(path: str, tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str]):
    """Writes safetensors atomically (a temporary `.lora-…` file in the same folder, then rename)."""
    write_safetensors(path, {k: np.asarray(v) for k, v in tensors.items()}, metadata)


def read_lora_file(path: str) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """({key: numpy array}, metadata) of a safetensors file (bf16 stays bf16 via ml_dtypes).

    Read as numpy: read as jax arrays, every tensor went to the default device only for `np.asarray` to copy it
    back (on a GPU two transfers and a wait per tensor; the adapters are put on the device once, when filled).
    """
    from safetensors import safe_open

    if not os.path.isfile(path):
        raise FileNotFoundError(f"no LoRA file at {path}")
    try:
        with safe_open(path, framework="numpy") as f:
            meta = dict(f.metadata() or {})
            return {k: np.asarray(f.get_tensor(k)) for k in f.keys()}, meta
    except Exception as e:  # safetensors raises its own error types for a truncated or foreign file
        if isinstance(e, OSError):
            raise
        raise LoRAFileError(f"{path} is not a readable safetensors file: {e}") from e


def _split_key(fmt, key):
    for suffix in filter(None, dataclasses.astuple(FILE_FORMATS[fmt])[:3]):
        if key.endswith("." + suffix):
            return key[:-len(suffix) - 1], suffix
    return None, None


def detect_format(keys, naming: Naming | None = None) -> str:
    """The LoRA naming (one of the naming's formats) of a file's keys; a peft-named file reads as "peft"."""
    naming = naming or WAN_NAMING
    keys = list(keys)
    for fmt in naming.formats:
        table = naming.table(fmt)
        if any(_split_key(fmt, k)[0] in table for k in keys):
            return fmt
    raise LoRAFileError(f"not a {naming.backbone} LoRA file in a known format {naming.formats}; "
                        f"first keys: {keys[:5]}")


def _alpha_reader(fmt: str, metadata: Mapping[str, str], naming: Naming) -> Callable[[str], float | None]:
    """module name -> the alpha the file's metadata declares for it (None: not declared)."""
    if _META_ALPHAS in metadata:
        alphas = json.loads(metadata[_META_ALPHAS])
        return lambda mod: alphas.get(mod)
    if FILE_FORMATS[fmt].peft_meta and _META_PEFT in metadata:
        prefix = naming.component + "."
        # diffusers prefixes the keys by the pipeline component; older omnijax files did not.
        peft = {k.removeprefix(prefix): v for k, v in json.loads(metadata[_META_PEFT]).items()}
        default, pattern = peft.get("lora_alpha"), dict(peft.get("alpha_pattern") or {})

        def peft_alpha(mod):  # PEFT's rule (peft.utils.other.get_pattern_key): the first key matching a suffix
            mod = mod.removeprefix(prefix)
            key = next((k for k in pattern if re.match(rf"(.*\.)?({k})$", mod)), None)
            return float(pattern[key]) if key is not None else default
        return peft_alpha
    if _META_OURS in metadata and "alpha" in json.loads(metadata[_META_OURS]):  # Wan files before omnijax_alphas
        alpha = float(json.loads(metadata[_META_OURS])["alpha"])
        return lambda mod: alpha
    return lambda mod: None


def tensors_to_adapters(tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None = None, *,
                        naming: Naming | None = None, strict: bool = True):
    """Parses a file's tensors into {slot: {"a": [I, R], "b": [R, O], "alpha": float}} (our layout).

    Returns (format, adapters, ignored keys). Unknown keys raise LoRAFileError unless `strict` is False. A module
    whose alpha the file does not state has alpha = R (scale 1), as PEFT, ComfyUI and kohya read it. The modules of
    a split slot are joined by the naming's `fuse` hook.
    """
    naming = naming or WAN_NAMING
    metadata = dict(metadata or {})
    fmt = detect_format(tensors.keys(), naming)
    table, spec = naming.table(fmt), FILE_FORMATS[fmt]
    declared = _alpha_reader(fmt, metadata, naming)
    field = {spec.down: "a", spec.up: "b", spec.alpha: "alpha"}
    modules: dict[str, dict] = {}
    unknown = []
    for key, arr in tensors.items():
        mod, suffix = _split_key(fmt, key)
        if mod is None or mod not in table:
            unknown.append(key)
            continue
        modules.setdefault(mod, {})[field[suffix]] = arr
    if unknown and strict:
        raise LoRAFileError(f"{len(unknown)} {fmt} LoRA keys name no {naming.backbone} adapter: {sorted(unknown)[:10]}")
    parts: dict = {}
    for mod, e in modules.items():
        if "a" not in e or "b" not in e:
            raise LoRAFileError(f"{mod}: the file has only {sorted(e)} (needs both matrices)")
        a, b = np.asarray(e["a"]), np.asarray(e["b"])
        if spec.torch_layout:
            a, b = a.T, b.T
        if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[0]:
            raise LoRAFileError(f"{mod}: down/up shapes {a.shape} and {b.shape} do not chain")
        rank = a.shape[1]
        alpha = float(np.asarray(e["alpha"], np.float64).reshape(-1)[0]) if "alpha" in e else declared(mod)
        slot, part = table[mod]
        parts.setdefault(slot, {})[part] = (a, b, float(rank if alpha is None else alpha))
    entries = {}
    for slot, p in parts.items():
        n = len(naming.names(fmt, slot))
        if n == 1:
            a, b, alpha = p[0]
            entries[slot] = {"a": a, "b": b, "alpha": alpha}
        else:
            entries[slot] = naming.fuse(slot, p, n)
    return fmt, entries, unknown


def _slot_str(slot) -> str:
    return " ".join(map(str, slot)) if isinstance(slot, tuple) else str(slot)


# ------------------------------------------------------------------------------------------------------ Wan experts


def _branch_lora(model) -> BranchLoRA:
    if isinstance(model, EasyOmnimatte):
        return model.lora
    if isinstance(model, BranchLoRA):
        return model
    raise TypeError(f"expected an EasyOmnimatte or BranchLoRA, got {type(model).__name__}")


def _modules(lora: BranchLoRA):
    for b in lora.expert.blocks:
        groups = lora.for_block(b)
        for target in lora.expert.targets:
            group, name = target.split(".")
            yield (b, target), groups[group][name]


def model_adapters(model) -> dict:
    """{(block, target): {"a": [I, R], "b": [R, O], "alpha"}} of an expert's adapters (numpy, stored dtype)."""
    return {slot: {"a": np.asarray(ad.lora_a.get_value()), "b": np.asarray(ad.lora_b.get_value()),
                   "alpha": float(ad.alpha)} for slot, ad in _modules(_branch_lora(model))}


_PARAM_PATH = re.compile(r"^(?:.*\.)?blocks\.(\d+)\.(\w+)\.(\w+)\.(lora_a|lora_b)$")


def params_adapters(flat: Mapping[str, np.ndarray], expert: ExpertConfig) -> dict:
    """The adapters of `expert` from flat trainer params ({"lora.blocks.27.self_attn.q.lora_a": [I, R], ...})."""
    found: dict = {}
    for path, arr in flat.items():
        m = _PARAM_PATH.match(path)
        if m is None:
            raise LoRAFileError(f"checkpoint parameter {path!r} is not a branch-LoRA matrix")
        slot = (int(m.group(1)), f"{m.group(2)}.{m.group(3)}")
        found.setdefault(slot, {})[m.group(4)[-1]] = np.asarray(arr)
    want = {(b, t) for b in expert.blocks for t in expert.targets}
    if set(found) != want or any(len(v) != 2 for v in found.values()):
        raise LoRAFileError(f"checkpoint adapters do not match the expert {expert.name!r}: extra "
                            f"{sorted(set(found) - want)[:10]}, missing {sorted(want - set(found))[:10]}, "
                            f"incomplete {sorted(s for s, v in found.items() if len(v) != 2)[:10]}")
    return {s: {"a": found[s]["a"], "b": found[s]["b"], "alpha": float(expert.alpha)} for s in sorted(found)}


def lora_tensors(model, fmt: str = "omnijax") -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """({key: array}, metadata) of the model's adapters in format `fmt`."""
    WAN_NAMING.check(fmt)
    lora = _branch_lora(model)
    return adapters_to_tensors(model_adapters(lora), fmt, WAN_NAMING, info=lora.expert.to_dict())


def save_lora(path: str, model, *, fmt: str = "omnijax"):
    """Writes the model's adapters as a safetensors file in format `fmt` (atomically)."""
    write_tensors(path, *lora_tensors(model, fmt))


def save_adapters(path: str, adapters: Mapping, expert: ExpertConfig | Mapping | None = None, *, fmt: str,
                  naming: Naming | None = None):
    """Writes adapters {slot: {"a": [I, R], "b": [R, O], "alpha"}} (e.g. from a checkpoint) in format `fmt`,
    atomically. `naming`: the backbone's (default WAN_NAMING; FLUX_NAMING for {"double_blocks.3.img_attn.qkv": ...});
    `expert`: an ExpertConfig or JSON-able record kept in the metadata."""
    info = expert.to_dict() if isinstance(expert, ExpertConfig) else expert
    write_tensors(path, *adapters_to_tensors(adapters, fmt, naming or WAN_NAMING, info=info))


def lora_entries(tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None = None, *,
                 strict: bool = True):
    """(format, {(block, target): {"a": [I, R], "b": [R, O], "alpha"}}, ignored keys) of a Wan LoRA file."""
    return tensors_to_adapters(tensors, metadata, naming=WAN_NAMING, strict=strict)


def expert_with_lora(base, path: str, *, mask: str | None, name: str | None = "loaded", strict: bool = True,
                     **kw) -> EasyOmnimatte:
    """An EasyOmnimatte expert over `base` whose adapters are the file's: the file is read once, the expert's
    structure comes from it (`expert_from_lora`), and its adapters are built abstractly and filled from it
    (no random init that the file would overwrite). `kw` goes to EasyOmnimatte (lora_dtype, mesh, ...)."""
    tensors, meta = read_lora_file(path)
    expert = expert_from_lora((tensors, meta), mask=mask, name=name, strict=strict)
    return load_lora((tensors, meta), EasyOmnimatte(base, expert, rngs=None, **kw), strict=strict)


def _read(source):
    """(tensors, metadata) of a path, a {key: array} mapping (no metadata), or an already read (tensors, meta)."""
    if isinstance(source, str):
        return read_lora_file(source)
    if isinstance(source, tuple):
        return source
    return source, {}


def expert_from_lora(source, *, mask: str | None, name: str | None = "loaded", strict: bool = True) -> ExpertConfig:
    """The ExpertConfig (blocks, targets, rank, alpha) that a LoRA file describes. `mask` and `name` replace the
    ones the file states (None: the file's; a file without an expert record needs a mask)."""
    tensors, meta = _read(source)
    if _META_OURS in meta:
        d = json.loads(meta[_META_OURS])
        return ExpertConfig.from_dict({**d, "mask": mask or d["mask"], "name": name or d["name"]})
    if mask is None:
        raise LoRAFileError("the file does not state its attention mask; give one (B for Effect, C for Quality)")
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
    return ExpertConfig(name or "loaded", ranks.pop(), alphas.pop(), tuple(blocks), mask, tuple(targets))


def load_lora(source, model, *, strict: bool = True):
    """Fills the model's adapters from a file path, a {key: array} mapping or a read (tensors, metadata) pair
    (any format in FORMATS).

    The file must hold exactly the model's adapters (same blocks and targets, same rank). An alpha that differs
    from the model's is folded into B (the delta stays the same function). Returns the model.
    """
    tensors, meta = _read(source)
    fmt, entries, _ = lora_entries(tensors, meta, strict=strict)
    lora = _branch_lora(model)
    fill_adapters(dict(_modules(lora)), entries, f"{fmt} LoRA file", f"the expert {lora.expert.name!r}")
    return model


def fill_adapters(adapters: Mapping, entries: Mapping, source: str, target: str):
    """Writes parsed entries {slot: {"a", "b", "alpha"}} into adapters {slot: omnijax.layers.lora.LoRA}.

    The entries must be exactly the adapters' slots with the same shapes; an alpha that differs from the adapter's
    is folded into B in f64 (the delta stays the same function, and unfolding a folded bf16 file is exact). Every
    check runs before the first write. `source` / `target` name the two sides in error messages.
    """
    extra = sorted(set(entries) - set(adapters), key=str)
    missing = sorted(set(adapters) - set(entries), key=str)
    if extra or missing:
        raise LoRAFileError(f"{source} does not match {target}: adapters not in the model {extra[:10]}, "
                            f"adapters missing from the file {missing[:10]}")
    updates = []
    for slot, ad in adapters.items():
        e, a_var, b_var = entries[slot], ad.lora_a, ad.lora_b
        if e["a"].shape[1] != ad.rank:
            raise LoRAFileError(f"{_slot_str(slot)}: file rank {e['a'].shape[1]}, model rank {ad.rank}")
        if e["a"].shape != a_var.get_value().shape or e["b"].shape != b_var.get_value().shape:
            raise LoRAFileError(f"{_slot_str(slot)}: file shapes {e['a'].shape}/{e['b'].shape}, model "
                                f"{a_var.get_value().shape}/{b_var.get_value().shape}")
        b = e["b"] if e["alpha"] == ad.alpha else e["b"].astype(np.float64) * (e["alpha"] / ad.alpha)
        updates.append((ad, jnp.asarray(e["a"], a_var.get_value().dtype), jnp.asarray(b, b_var.get_value().dtype)))
    for ad, a, b in updates:
        ad.lora_a.set_value(a)
        ad.lora_b.set_value(b)


def lora_keys(model, fmt: str) -> list[str]:
    """The keys a file of `fmt` holds for this model (for docs and tests)."""
    return sorted(lora_tensors(model, fmt)[0])
