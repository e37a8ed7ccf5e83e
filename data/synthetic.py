"""Random-access synthetic omnimatte dataset: sample i = composite(foreground, background, params) from (seed, i).

A `SyntheticOmnimatte` is a grain-compatible data source (`__len__`, `__getitem__`), so a pipeline can shard,
shuffle and generate on the fly in worker processes; the same (seed, i) always gives the same sample.
"""

from __future__ import annotations

import numpy as np

from data.composite import CompositeConfig, composite, sample_params
from data.procedural import ProceduralSource


class SyntheticOmnimatte:
    """Composites of a foreground source over a background source.

    Args:
      cfg: output size and sampling ranges.
      foregrounds: object with `foreground(index, F, H, W) -> (rgb, alpha)` and `__len__`
        (default: the procedural source).
      backgrounds: object with `background(index, F, H, W) -> rgb` and `__len__` (default: procedural).
      seed: sample i draws its clip indices and parameters from default_rng([seed, i]).
      length: number of samples `__len__` reports (generation works for any index).
    """

    def __init__(self, cfg: CompositeConfig | None = None, *, foregrounds=None, backgrounds=None,
                 seed: int = 0, length: int = 10_000):
        self.cfg = cfg if cfg is not None else CompositeConfig()
        self.fg = foregrounds if foregrounds is not None else ProceduralSource(seed)
        self.bg = backgrounds if backgrounds is not None else ProceduralSource(seed + 1)
        self.seed = int(seed)
        self.length = int(length)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict:
        index = int(index)
        if not 0 <= index < self.length:
            raise IndexError(f"sample {index} outside [0, {self.length})")
        c = self.cfg
        rng = np.random.default_rng([self.seed, index])
        fi, bi = int(rng.integers(len(self.fg))), int(rng.integers(len(self.bg)))
        params = sample_params(rng, c)
        rgb, alpha = self.fg.foreground(fi, c.num_frames, c.height, c.width)
        bg = self.bg.background(bi, c.num_frames, c.height, c.width)
        sample = composite(rgb, alpha, bg, params, c)
        sample["params"].update(fg_index=float(fi), bg_index=float(bi), index=float(index))
        return sample
