"""Wan2.1 DiT size table (shared/spec/wan.md §1.1). Variants are rows of one table, never copies."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class WanConfig:
    dim: int
    ffn_dim: int
    num_heads: int
    num_layers: int
    model_type: str = "t2v"  # "t2v" (in_dim 16) or "i2v" (Fun-InP: in_dim 36, CLIP image cross-attention)
    in_dim: int = 16
    out_dim: int = 16
    freq_dim: int = 256
    text_dim: int = 4096
    text_len: int = 512
    image_dim: int = 1280
    patch_size: tuple[int, int, int] = (1, 2, 2)
    eps: float = 1e-6
    rope_theta: float = 10000.0

    def __post_init__(self):
        if self.model_type not in ("t2v", "i2v"):
            raise ValueError(f"model_type must be 't2v' or 'i2v', got {self.model_type!r}")
        if self.dim % self.num_heads:
            raise ValueError(f"dim {self.dim} is not divisible by num_heads {self.num_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim {self.head_dim} must be even for RoPE")

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def is_i2v(self) -> bool:
        return self.model_type == "i2v"

    def replace(self, **kw) -> WanConfig:
        return dataclasses.replace(self, **kw)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["patch_size"] = list(self.patch_size)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> WanConfig:
        d = dict(d)
        d["patch_size"] = tuple(d.get("patch_size", (1, 2, 2)))
        return cls(**d)


_SIZES = {
    "tiny": dict(dim=64, ffn_dim=128, num_heads=2, num_layers=2, text_dim=32, image_dim=32, freq_dim=32),
    # Between tiny and 1.3B, for the from-scratch learning check (benchmarks/learn_omnimatte.py): trains in minutes
    # on one GPU at 17x128x128. text_dim / image_dim are the widths of the tiny umT5 / CLIP stand-ins (models/wan/
    # umt5.py, clip.py "tiny"): no published encoder can be downloaded here, so the text and image features are
    # those of fixed random encoders (the empty prompt's embedding is a constant).
    "small": dict(dim=256, ffn_dim=768, num_heads=4, num_layers=8, text_dim=32, image_dim=32),
    "1.3b": dict(dim=1536, ffn_dim=8960, num_heads=12, num_layers=30),
    "14b": dict(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40),
}
_TYPES = {"t2v": dict(model_type="t2v", in_dim=16), "inp": dict(model_type="i2v", in_dim=36),
          "i2v": dict(model_type="i2v", in_dim=36)}

VARIANTS = tuple(f"{s}-{t}" if t != "t2v" else s for s in _SIZES for t in ("t2v", "inp"))


def variant(name: str, **overrides) -> WanConfig:
    """Config by name: "tiny", "1.3b", "14b" (t2v) or with "-inp" / "-i2v" (Fun-InP: in_dim 36 + CLIP).

    Keyword overrides replace fields (e.g. variant("tiny", num_layers=4)).
    """
    size, _, kind = name.lower().partition("-")
    kind = kind or "t2v"
    if size not in _SIZES or kind not in _TYPES:
        raise ValueError(f"unknown Wan variant {name!r}; known: {', '.join(VARIANTS)}")
    return WanConfig(**{**_SIZES[size], **_TYPES[kind], **overrides})
