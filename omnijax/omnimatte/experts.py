"""Expert configurations: which blocks and linears get a branch LoRA, with which rank, alpha and mask.

shared/spec/easyomnimatte.md §3 (paper §3.3, eq. 5-6):
  Effect Expert:  LoRA rank 128 / alpha 128 on the last K blocks, attention mask "B";
  Quality Expert: LoRA rank 64 / alpha 64 on all blocks, attention mask "C".
K defaults to round(num_layers / 3) (10 of 30 for 1.3B, 13 of 40 for 14B) or the block analysis' output.

`EXPERT_KINDS` is the one table of what an expert name means (adapted blocks for a layer count, attention mask,
whether the background token set runs in a training step, default rank/alpha); everything else looks it up.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from omnijax.layers.branch_attention import MASK_TYPES, alpha_sees_background

# Linears a branch LoRA may adapt, by their path inside a WanBlock. The default is self-attention q, k, v, o
# (paper appendix A); cross-attention and FFN linears are opt-in.
SELF_ATTN = ("self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o")
CROSS_ATTN = ("cross_attn.q", "cross_attn.k", "cross_attn.v", "cross_attn.o", "cross_attn.k_img", "cross_attn.v_img")
FFN = ("ffn.linear_1", "ffn.linear_2")
TARGETS = SELF_ATTN + CROSS_ATTN + FFN


@dataclasses.dataclass(frozen=True)
class ExpertConfig:
    """One expert: LoRA rank/alpha, adapted blocks (0-based indices), adapted linears, self-attention mask."""

    name: str
    rank: int
    alpha: float
    blocks: tuple[int, ...]
    mask: str
    targets: tuple[str, ...] = SELF_ATTN

    def __post_init__(self):
        object.__setattr__(self, "blocks", tuple(sorted(int(b) for b in self.blocks)))
        object.__setattr__(self, "targets", tuple(self.targets))
        if self.mask not in MASK_TYPES:
            raise ValueError(f"expert {self.name!r}: mask must be one of {MASK_TYPES}, got {self.mask!r}")
        if self.rank <= 0:
            raise ValueError(f"expert {self.name!r}: rank must be positive, got {self.rank}")
        if not self.blocks:
            raise ValueError(f"expert {self.name!r}: no adapted blocks")
        if len(set(self.blocks)) != len(self.blocks) or self.blocks[0] < 0:
            raise ValueError(f"expert {self.name!r}: block indices must be distinct and >= 0, got {self.blocks}")
        unknown = [t for t in self.targets if t not in TARGETS]
        if unknown or not self.targets:
            raise ValueError(f"expert {self.name!r}: unknown LoRA targets {unknown}; known: {TARGETS}")
        kind = EXPERT_KINDS.get(self.name)
        if kind is not None and self.mask != kind.mask:
            raise ValueError(f"expert {self.name!r} uses attention mask {kind.mask!r}, got {self.mask!r}")

    @property
    def background_in_training(self) -> bool:
        """Whether a training step runs the background token set: only when the alpha queries attend to it
        (mask B); under mask C it cannot reach the alpha velocity, hence the loss."""
        return alpha_sees_background(self.mask)

    def validate_for(self, num_layers: int, is_i2v: bool = True):
        """Raises if the blocks or targets do not exist in a model with `num_layers` blocks."""
        if self.blocks[-1] >= num_layers:
            raise ValueError(f"expert {self.name!r}: block {self.blocks[-1]} does not exist "
                             f"(the model has {num_layers} blocks)")
        if not is_i2v and any(t.endswith("_img") for t in self.targets):
            raise ValueError(f"expert {self.name!r}: image cross-attention targets need an i2v model")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["blocks"], d["targets"] = list(self.blocks), list(self.targets)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> ExpertConfig:
        return cls(**d)


def default_k(num_layers: int) -> int:
    """Effect Expert depth: the last third of the blocks, rounded (spec §3)."""
    return max(1, round(num_layers / 3))


def _last_k(num_layers: int, k: int | None) -> tuple[int, ...]:
    k = default_k(num_layers) if k is None else int(k)
    if not 0 < k <= num_layers:
        raise ValueError(f"Effect Expert K must be in 1..{num_layers}, got {k}")
    return tuple(range(num_layers - k, num_layers))


def _all_blocks(num_layers: int, k: int | None) -> tuple[int, ...]:
    if k is not None:
        raise ValueError(f"the Quality Expert adapts all {num_layers} blocks; K ({k}) applies to the Effect Expert")
    return tuple(range(num_layers))


@dataclasses.dataclass(frozen=True)
class ExpertKind:
    """What an expert name means: its mask, which blocks it adapts, its default LoRA size."""

    name: str
    mask: str
    blocks: Callable[[int, int | None], tuple[int, ...]]  # (num_layers, K or None) -> adapted block indices
    rank: int
    alpha: float

    def config(self, num_layers: int, k: int | None = None, *, rank: int | None = None, alpha: float | None = None,
               targets=SELF_ATTN) -> ExpertConfig:
        return ExpertConfig(self.name, self.rank if rank is None else int(rank),
                            self.alpha if alpha is None else float(alpha), self.blocks(num_layers, k), self.mask,
                            tuple(targets))


EXPERT_KINDS: dict[str, ExpertKind] = {
    "effect": ExpertKind("effect", "B", _last_k, 128, 128.0),     # eq. 5: the last K blocks
    "quality": ExpertKind("quality", "C", _all_blocks, 64, 64.0),  # eq. 6: every block
}


def expert_kind(name: str) -> ExpertKind:
    if name not in EXPERT_KINDS:
        raise ValueError(f"unknown expert {name!r}; known: {', '.join(EXPERT_KINDS)}")
    return EXPERT_KINDS[name]


def effect_expert(num_layers: int, k: int | None = None, *, rank: int = 128, alpha: float = 128.0,
                  targets=SELF_ATTN) -> ExpertConfig:
    """LoRA on the last K blocks (eq. 5), mask B."""
    return EXPERT_KINDS["effect"].config(num_layers, k, rank=rank, alpha=alpha, targets=targets)


def quality_expert(num_layers: int, *, rank: int = 64, alpha: float = 64.0, targets=SELF_ATTN) -> ExpertConfig:
    """LoRA on all blocks (eq. 6), mask C."""
    return EXPERT_KINDS["quality"].config(num_layers, rank=rank, alpha=alpha, targets=targets)
