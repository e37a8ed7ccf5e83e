"""One table-driven conversion engine for every model.

A table is data: rows of (source key pattern, target param path, transform name). Patterns may hold
`{i}` (and `{j}`) for layer indices. The engine applies a table to a source mapping and asserts that every
source key is used exactly once (or matches an explicit ignore pattern), every target parameter is filled,
and every shape is right; all problems are reported together, by name.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping, Sequence

import numpy as np

TRANSFORMS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "identity": lambda x: x,
    "linear_t": lambda x: x.T,  # torch Linear [O, I] -> kernel [I, O]
    "conv3d_to_thwio": lambda x: x.transpose(2, 3, 4, 1, 0),  # [O, I, t, h, w] -> [t, h, w, I, O]
    "conv2d_to_hwio": lambda x: x.transpose(2, 3, 1, 0),  # [O, I, h, w] -> [h, w, I, O]
    "conv1x1_to_io": lambda x: x.reshape(x.shape[0], x.shape[1]).T,  # [O, I, 1, ...] -> [I, O]
    "squeeze": lambda x: x.reshape(-1),  # e.g. VAE gammas [C, 1, 1, 1] -> [C]
    "flatten_to_1x2": lambda x: x.reshape(1, 2, -1),  # AdaLayerNorm bias [2D] -> table [1, 2, D]
    "drop_leading_axis": lambda x: x.reshape(x.shape[1:]),  # e.g. Wan CLIP pos_embedding [1, L, D] -> [L, D]
    # Flux final adaLN: diffusers stores (scale, shift) rows, BFL (shift, scale).
    "swap_halves": lambda x: np.concatenate(np.split(np.asarray(x), 2, axis=0)[::-1], axis=0),
    "swap_halves_linear_t": lambda x: np.concatenate(np.split(np.asarray(x), 2, axis=0)[::-1], axis=0).T,
}


class ConversionError(ValueError):
    """A checkpoint does not fit the model: lists missing, unexpected and mis-shaped keys by name."""


@dataclasses.dataclass(frozen=True)
class Rule:
    source: str
    target: str
    transform: str = "identity"

    def __post_init__(self):
        if self.transform not in TRANSFORMS:
            raise ValueError(f"unknown transform {self.transform!r} in rule {self.source!r}")


@dataclasses.dataclass(frozen=True)
class Table:
    """A named key table. `ignore` holds regexes of source keys that are deliberately unused."""

    name: str
    rules: Sequence[Rule]
    ignore: Sequence[str] = ()
    prefixes: Sequence[str] = ()  # stripped when every key carries one of them (e.g. ComfyUI's)

    def compiled(self):
        out = []
        for r in self.rules:
            pat = re.escape(r.source).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{j\}", r"(?P<j>\d+)")
            out.append((re.compile(pat + r"\Z"), r))
        return out


def linear(src: str, dst: str, bias: bool = True) -> list[Rule]:
    """Rows for a torch Linear (weight [O, I] -> kernel, bias)."""
    rows = [Rule(f"{src}.weight", f"{dst}.kernel", "linear_t")]
    return rows + [Rule(f"{src}.bias", f"{dst}.bias")] if bias else rows


def norm(src: str, dst: str, bias: bool = True, weight: str = "weight") -> list[Rule]:
    rows = [Rule(f"{src}.{weight}", f"{dst}.scale")]
    return rows + [Rule(f"{src}.bias", f"{dst}.bias")] if bias else rows


def strip_prefix(keys: Sequence[str], prefixes: Sequence[str]) -> str:
    for p in prefixes:
        if keys and all(k.startswith(p) for k in keys):
            return p
    return ""


def plan(keys: Sequence[str], table: Table) -> tuple[dict[str, tuple[str, str]], list[str], list[str]]:
    """Maps source keys to (target path, transform); returns (plan, unexpected, ignored)."""
    prefix = strip_prefix(list(keys), table.prefixes)
    rules = table.compiled()
    ignore = [re.compile(p) for p in table.ignore]
    mapping, unexpected, ignored = {}, [], []
    for key in keys:
        k = key[len(prefix):]
        for pat, rule in rules:
            m = pat.match(k)
            if m:
                mapping[key] = (rule.target.format(**m.groupdict()), rule.transform)
                break
        else:
            (ignored if any(p.match(k) for p in ignore) else unexpected).append(key)
    return mapping, unexpected, ignored


def _summarise(title: str, items: Sequence[str], limit: int = 25) -> str:
    if not items:
        return ""
    more = f"\n    ... and {len(items) - limit} more" if len(items) > limit else ""
    return f"\n  {title} ({len(items)}):\n    " + "\n    ".join(items[:limit]) + more


def convert(source: Mapping, table: Table, targets: Mapping[str, tuple[tuple[int, ...], np.dtype]], *,
            progress: Callable | None = None) -> dict[str, np.ndarray]:
    """Applies `table` to `source` and returns {target path: array in the target dtype}.

    Args:
      source: {source key: array}, read lazily (see converters.sources).
      table: the key table.
      targets: {target path: (shape, dtype)} of the model's parameters.
      progress: optional wrapper for the key iterator (e.g. tqdm).
    Raises:
      ConversionError listing every missing, unexpected, duplicate and mis-shaped key.
    """
    mapping, unexpected, _ = plan(list(source.keys()), table)
    out, mis_shaped, duplicate, no_target, bad = {}, [], [], [], set()
    items = list(mapping.items())
    for key, (target, transform) in (progress(items) if progress else items):
        if target not in targets:
            no_target.append(f"{key} -> {target}")
            continue
        if target in out:
            duplicate.append(f"{key} -> {target}")
            continue
        shape, dtype = targets[target]
        arr = TRANSFORMS[transform](source[key])
        if tuple(arr.shape) != tuple(shape):
            mis_shaped.append(f"{key}: {tuple(arr.shape)} after {transform}, model {target} wants {tuple(shape)}")
            bad.add(target)
            continue
        out[target] = np.asarray(arr).astype(dtype, copy=False)
    missing = sorted(set(targets) - set(out) - bad)
    if unexpected or no_target or duplicate or mis_shaped or missing:
        raise ConversionError(
            f"checkpoint does not fit the model (table {table.name!r}):"
            + _summarise("missing (model params no checkpoint key fills)", missing)
            + _summarise("unexpected (checkpoint keys no rule uses)", sorted(unexpected))
            + _summarise("keys for params the model does not have", no_target)
            + _summarise("keys filling the same param twice", duplicate)
            + _summarise("wrong shape", mis_shaped))
    return out


def best_table(keys: Sequence[str], tables: Sequence[Table]) -> Table:
    """The table that maps the most keys (format detection)."""
    scores = [(len(plan(keys, t)[0]), -i, t) for i, t in enumerate(tables)]
    return max(scores, key=lambda s: s[:2])[2]
