"""Casper, the base model of EasyOmnimatte (paper §4: initialised from the effect-removal model of Lee et al.).

Casper's public Wan2.1 reimplementation (jh5442/gen-omnimatte-public, shared/spec/wan.md §2.3, §4.4) ships two
kinds of file on top of VideoX-Fun's Wan2.1-Fun-InP models:

- 1.3B: a fully fine-tuned transformer file (`transformer_path`) in VideoX-Fun (original Wan) keys, a
  .safetensors or a .pth that may wrap the weights in {"state_dict": ...}. VideoX-Fun loads it into the
  Fun-1.3B-InP transformer with `load_state_dict(strict=False)`: every tensor of the file replaces the base's,
  a base tensor the file lacks keeps its value. Here a file tensor that names no base weight, or has another
  shape, is an error (torch's non-strict load would silently drop the first).
- 14B: a LoRA (`lora_path`, weight 1.0) over Fun-14B-InP in kohya naming,
  `lora_unet__<module path with '.' -> '_'>.{lora_down.weight [R, I], lora_up.weight [O, R], alpha}`, merged
  the way VideoX-Fun's `merge_lora` does: W <- W + weight * (alpha / R) * up @ down in float32 (scale
  `weight` alone when the file has no alpha; R = up.shape[1]). VideoX-Fun resolves module names by greedy
  underscore splitting; here names come from the base's real module names (the key table), so an ambiguous or
  unknown name is an error, not a guess.

Both are lazy views over the base checkpoint in the base's own key naming, so the result goes through the
ordinary table-driven conversion (converters.load_wan_dit) and nothing is read before it is converted.

  python launch/convert.py --kind wan_dit --source Wan2.1-Fun-1.3B-InP --casper casper_1.3b.safetensors --out DIR
  python launch/convert.py --kind wan_dit --source Wan2.1-Fun-14B-InP --casper-lora casper_14b_lora.safetensors \
      --out DIR
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping

import numpy as np

from converters.build import mapped_shapes
from converters.engine import best_table, plan
from converters.sources import CheckpointError, open_checkpoint, read_config_json
from converters.tables.wan_dit import CIVITAI, TABLES

KOHYA_PREFIX = "lora_unet_"
_LORA_ELEMS = ("lora_down.weight", "lora_up.weight", "alpha")


class CasperError(CheckpointError):
    """A Casper transformer or LoRA file does not fit the base model (one line, naming the file)."""


def _name(source) -> str:
    return "<mapping>" if isinstance(source, Mapping) else os.fspath(source)


def _listing(items, limit=4) -> str:
    items = list(items)
    more = f" (+{len(items) - limit} more)" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


class Replaced(Mapping):
    """`base` with some keys' tensors taken from `update` ({base key: update key})."""

    def __init__(self, base: Mapping, update: Mapping, keys: Mapping[str, str]):
        self._base, self._update, self._keys = base, update, dict(keys)

    def __getitem__(self, key):
        return self._update[self._keys[key]] if key in self._keys else self._base[key]

    def __iter__(self):
        return iter(self._base)

    def __len__(self):
        return len(self._base)


class LoRAMerged(Mapping):
    """`base` with W + scale * up @ down (float32) for the keys in `deltas` ({base key: (up, down, scale)})."""

    def __init__(self, base: Mapping, deltas: Mapping[str, tuple[str, str, float]], lora: Mapping):
        self._base, self._deltas, self._lora = base, dict(deltas), lora

    def __getitem__(self, key):
        if key not in self._deltas:
            return self._base[key]
        up, down, scale = self._deltas[key]
        up = np.asarray(self._lora[up], np.float32)
        down = np.asarray(self._lora[down], np.float32)
        return np.asarray(self._base[key], np.float32) + np.float32(scale) * (up @ down)

    def __iter__(self):
        return iter(self._base)

    def __len__(self):
        return len(self._base)


def _by_target(src: Mapping) -> dict[str, tuple[str, str]]:
    """{our param path: (source key, transform)} under the table that fits `src` best."""
    mapping, _, _ = plan(list(src), best_table(list(src), TABLES))
    return {target: (key, tf) for key, (target, tf) in mapping.items()}


def overlay_transformer(base: Mapping, casper: Mapping, *, name: str = "<casper>") -> Mapping:
    """The base weights with every tensor of a Casper transformer file put in its place (see module doc).

    Both may be in either key format (original Wan / VideoX-Fun or diffusers); they are matched by the
    parameter they fill. Raises CasperError when a file tensor fits no base weight.
    """
    keys = list(casper)
    table = best_table(keys, TABLES)
    mapping, unexpected, _ = plan(keys, table)
    if not mapping:
        hint = " (a LoRA? pass it as --casper-lora)" if any(k.startswith(KOHYA_PREFIX) for k in keys) else ""
        raise CasperError(f"{name}: none of its {len(keys)} tensors is a Wan DiT weight{hint}; "
                          f"e.g. {_listing(sorted(keys), 3)}")
    base_by_target = _by_target(base)
    problems, replace = [], {}
    for key, (target, tf) in mapping.items():
        if target not in base_by_target:
            problems.append(f"{key} (the base has no such weight)")
            continue
        bkey, btf = base_by_target[target]
        a, b = np.shape(casper[key]), np.shape(base[bkey])
        if btf != tf or a != b:
            problems.append(f"{key} {tuple(a)} (base {bkey} is {tuple(b)})")
            continue
        replace[bkey] = key
    problems += [f"{k} (not a Wan DiT weight)" for k in sorted(unexpected)]
    if problems:
        raise CasperError(f"{name}: {len(problems)} tensor(s) do not fit the base model: {_listing(problems)}")
    return Replaced(base, casper, replace)


def kohya_module_names(base: Mapping) -> dict[str, str]:
    """{kohya module name: base weight key} for every Linear weight of the base (the LoRA targets of VideoX-Fun).

    The kohya name is "lora_unet_" + "_" + the original Wan module path with '.' -> '_' (the root module's name
    is empty, hence two underscores), e.g. lora_unet__blocks_0_cross_attn_k_img. Built from the key table's
    rows, whatever the base's own format.
    """
    rows = [(re.compile(re.escape(r.target).replace(r"\{i\}", r"(?P<i>\d+)") + r"\Z"), r.source)
            for r in CIVITAI.rules if r.transform == "linear_t"]
    out = {}
    for target, (bkey, tf) in _by_target(base).items():
        if tf != "linear_t":
            continue
        for pat, source in rows:
            m = pat.match(target)
            if m:
                module = source.format(**m.groupdict())[: -len(".weight")]
                out[KOHYA_PREFIX + "_" + module.replace(".", "_")] = bkey
                break
    return out


def merge_lora(base: Mapping, lora: Mapping, weight: float = 1.0, *, name: str = "<lora>") -> Mapping:
    """The base weights with a kohya/VideoX-Fun LoRA merged in (see module doc). Raises CasperError naming
    every module the base lacks, incomplete adapters and shape mismatches."""
    modules = kohya_module_names(base)
    groups: dict[str, dict[str, str]] = {}
    bad = []
    for key in lora:
        layer, _, elem = key.partition(".")
        if elem not in _LORA_ELEMS:
            bad.append(f"{key} (not a kohya LoRA key: <module>.lora_down.weight / .lora_up.weight / .alpha)")
        elif not layer.startswith(KOHYA_PREFIX):
            what = "a text-encoder adapter (Casper has none)" if layer.startswith("lora_te") else "not lora_unet_*"
            bad.append(f"{key} ({what})")
        else:
            groups.setdefault(layer, {})[elem] = key
    if not groups and not bad:
        raise CasperError(f"{name}: no LoRA tensors in this file")
    deltas = {}
    for layer, elems in sorted(groups.items()):
        if layer not in modules:
            bad.append(f"{layer} (the base has no such Linear)")
            continue
        if "lora_up.weight" not in elems or "lora_down.weight" not in elems:
            bad.append(f"{layer} (needs both lora_up.weight and lora_down.weight)")
            continue
        up, down = np.shape(lora[elems["lora_up.weight"]]), np.shape(lora[elems["lora_down.weight"]])
        w = np.shape(base[modules[layer]])
        if len(up) != 2 or len(down) != 2 or up[1] != down[0] or (up[0], down[1]) != tuple(w):
            bad.append(f"{layer} (up {tuple(up)} @ down {tuple(down)} does not fit the weight {tuple(w)})")
            continue
        scale = float(weight)
        if "alpha" in elems:
            alpha = np.asarray(lora[elems["alpha"]], np.float32)
            if alpha.size != 1:
                bad.append(f"{elems['alpha']} (alpha must be a scalar, has shape {alpha.shape})")
                continue
            scale *= float(alpha.reshape(())) / up[1]
        deltas[modules[layer]] = (elems["lora_up.weight"], elems["lora_down.weight"], scale)
    if bad:
        raise CasperError(f"{name}: {len(bad)} problem(s) merging into the base model: {_listing(bad)}")
    return LoRAMerged(base, deltas, lora)


def casper_source(base, transformer=None, lora=None, lora_weight: float = 1.0) -> Mapping:
    """Lazy {key: array} of "Fun-InP base + Casper": the transformer file replaces the base's tensors, then the
    LoRA (if any) is merged. Each argument is a path (file or directory) or a mapping."""
    src = open_checkpoint(base)
    if transformer is not None:
        src = overlay_transformer(src, open_checkpoint(transformer), name=_name(transformer))
    if lora is not None:
        src = merge_lora(src, open_checkpoint(lora), lora_weight, name=_name(lora))
    return src


def load_casper_wan_dit(base, transformer=None, lora=None, *, lora_weight: float = 1.0, config=None, **kw):
    """(config, WanDiT) of Casper: a Fun-InP base with a Casper transformer file and/or LoRA (see module doc).

    Args:
      base: the Wan2.1-Fun-InP transformer (file, directory or mapping; a config.json beside it is read).
      transformer: Casper's fine-tuned transformer file (1.3B), or None.
      lora: Casper's LoRA file (14B), or None.
      lora_weight: the LoRA multiplier (Casper uses 1.0).
      config, **kw: as converters.load_wan_dit (dtype, param_dtype, shardings, progress).
    """
    from converters.wan_dit import infer_config, load_wan_dit

    if transformer is None and lora is None:
        raise CasperError("Casper needs a transformer file (1.3B) or a LoRA file (14B) on top of the Fun-InP base")
    src = casper_source(base, transformer, lora, lora_weight)
    if config is None:
        config = infer_config(mapped_shapes(src, best_table(list(src), TABLES)), read_config_json(base))
    return load_wan_dit(src, config, **kw)
