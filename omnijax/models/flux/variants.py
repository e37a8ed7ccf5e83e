"""Flux.1 MMDiT size table (shared/spec/flux.md §1.1). Variants are rows of one table, never copies."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class FluxConfig:
    in_channels: int = 64  # packed latent: 16 VAE channels x 2 x 2
    out_channels: int = 64
    vec_in_dim: int = 768  # CLIP-L pooled
    context_in_dim: int = 4096  # T5-XXL
    hidden_size: int = 3072
    num_heads: int = 24
    mlp_ratio: float = 4.0
    depth: int = 19  # double-stream blocks
    depth_single_blocks: int = 38
    axes_dim: tuple[int, ...] = (16, 56, 56)
    theta: float = 10000.0
    qkv_bias: bool = True
    guidance_embed: bool = True  # dev: True, schnell: False
    time_dim: int = 256  # sinusoid width of the timestep / guidance embedding
    eps: float = 1e-6

    def __post_init__(self):
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if sum(self.axes_dim) != self.head_dim:
            raise ValueError(f"RoPE axes_dim {tuple(self.axes_dim)} must sum to head_dim {self.head_dim}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def mlp_hidden(self) -> int:
        return int(self.hidden_size * self.mlp_ratio)

    def replace(self, **kw) -> FluxConfig:
        return dataclasses.replace(self, **kw)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["axes_dim"] = list(self.axes_dim)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> FluxConfig:
        d = dict(d)
        d["axes_dim"] = tuple(d.get("axes_dim", (16, 56, 56)))
        return cls(**d)


_SIZES = {
    "full": dict(),
    # head_dim 32 = 8 + 12 + 12: every RoPE axis has several pairs; text/vector widths differ from hidden so a
    # transposed kernel cannot pass unnoticed.
    "tiny": dict(in_channels=16, out_channels=16, vec_in_dim=24, context_in_dim=32, hidden_size=64, num_heads=2,
                 depth=2, depth_single_blocks=2, axes_dim=(8, 12, 12)),
    # Trained from scratch in minutes (benchmarks/learn_diffdecompose.py): dev's layout at 1/8 width, a few blocks;
    # head_dim 64 = 16 + 24 + 24. Text/vector widths and the latent channels are set by the caller to fit its
    # encoders and VAE (the dev values below are placeholders).
    "small": dict(hidden_size=384, num_heads=6, depth=4, depth_single_blocks=4, axes_dim=(16, 24, 24)),
}
_NAMES = {"dev": ("full", True), "schnell": ("full", False), "tiny": ("tiny", True), "tiny-dev": ("tiny", True),
          "tiny-schnell": ("tiny", False),
          "small": ("small", True)}
VARIANTS = tuple(_NAMES)


def variant(name: str, **overrides) -> FluxConfig:
    """Config by name: "dev", "schnell" (guidance-distilled or not), "tiny" (= "tiny-dev"), "tiny-schnell", "small"
    (a dev-layout model for training from scratch at small scale).

    Keyword overrides replace fields (e.g. variant("tiny", depth=3)).
    """
    key = name.lower()
    if key not in _NAMES:
        raise ValueError(f"unknown Flux variant {name!r}; known: {', '.join(VARIANTS)}")
    size, guidance = _NAMES[key]
    return FluxConfig(**{**_SIZES[size], "guidance_embed": guidance, **overrides})
