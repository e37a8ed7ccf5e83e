"""Lazy key views over a checkpoint mapping, for formats whose tensors do not map one-to-one onto ours.

The engine maps one source key to one target. Two layouts need a structural step first, done here as
views (nothing is read until a tensor is used): tied duplicates (transformers stores the umT5 token
embedding as both `shared.weight` and `encoder.embed_tokens.weight`) and split attention projections
(transformers' CLIP q/k/v, where Wan and open_clip store one fused qkv tensor).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import numpy as np


class Without(Mapping):
    """`source` minus `drop` keys."""

    def __init__(self, source: Mapping, drop: Iterable[str]):
        self._src, self._drop = source, frozenset(drop)

    def __getitem__(self, key):
        if key in self._drop:
            raise KeyError(key)
        return self._src[key]

    def __iter__(self):
        return (k for k in self._src if k not in self._drop)

    def __len__(self):
        return sum(1 for _ in self)


class Concatenated(Mapping):
    """`source` where each group of keys is replaced by one new key: their tensors concatenated on axis 0.

    Args:
      source: the checkpoint mapping.
      groups: {new key: [source keys in order]}; a group is used only when all its keys are present.
    """

    def __init__(self, source: Mapping, groups: Mapping[str, Sequence[str]]):
        self._src = source
        self._groups = {new: tuple(parts) for new, parts in groups.items() if all(p in source for p in parts)}
        self._hidden = frozenset(p for parts in self._groups.values() for p in parts)

    def __getitem__(self, key):
        if key in self._groups:
            return np.concatenate([np.asarray(self._src[p]) for p in self._groups[key]], axis=0)
        if key in self._hidden:
            raise KeyError(key)
        return self._src[key]

    def __iter__(self):
        yield from (k for k in self._src if k not in self._hidden)
        yield from self._groups

    def __len__(self):
        return sum(1 for _ in self)
