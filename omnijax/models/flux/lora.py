"""LoRA adapters for FluxDiT, addressed by the model's module paths ("double_blocks.3.img_attn.qkv", BFL names
except the MLPs: "img_mlp.linear_1" for BFL's "img_mlp.0").

Axis letters: I input features, O output features, R rank.

Each adapter is an omnijax.layers.lora.LoRA (nnx.LoRAParam A [I, R], B [R, O]); the model passes it to the
host Linear's `lora=` argument, gated to the tokens of the segments whose switch is on (FluxDiT.forward_segments).
Adapters may have different ranks: a diffusers/PEFT LoRA on separate to_q / to_k / to_v becomes one adapter of
the fused qkv kernel with rank 3r (A stacked, B block-diagonal), which is exact (spec §2.3.5).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

import jax.numpy as jnp
from flax import nnx

from omnijax.layers.lora import LoRA
from omnijax.models.flux.variants import FluxConfig

DOUBLE_TARGETS = ("img_mod.lin", "img_attn.qkv", "img_attn.proj", "img_mlp.linear_1", "img_mlp.linear_2",
                  "txt_mod.lin", "txt_attn.qkv", "txt_attn.proj", "txt_mlp.linear_1", "txt_mlp.linear_2")
SINGLE_TARGETS = ("modulation.lin", "linear1", "linear2")
TOP_TARGETS = ("img_in", "txt_in")
# OminiControl's image-stream list in BFL names (spec §4.1), the default for DiffDecompose-style training.
IMAGE_STREAM_TARGETS = ("img_mod.lin", "img_attn.qkv", "img_attn.proj", "img_mlp.linear_2", "modulation.lin",
                        "linear1", "linear2")

_PATH = re.compile(r"(?:(double_blocks|single_blocks)\.(\d+)\.)?(.+)\Z")


def target_dims(cfg: FluxConfig, target: str) -> tuple[int, int]:
    """(in, out) features of the Linear at a block-relative (or top-level) BFL target."""
    d, f = cfg.hidden_size, cfg.mlp_hidden
    dims = {"img_in": (cfg.in_channels, d), "txt_in": (cfg.context_in_dim, d), "modulation.lin": (d, 3 * d),
            "linear1": (d, 3 * d + f), "linear2": (d + f, d)}
    for s in ("img", "txt"):
        dims |= {f"{s}_mod.lin": (d, 6 * d), f"{s}_attn.qkv": (d, 3 * d), f"{s}_attn.proj": (d, d),
                 f"{s}_mlp.linear_1": (d, f), f"{s}_mlp.linear_2": (f, d)}
    if target not in dims:
        raise ValueError(f"unknown Flux LoRA target {target!r}; known: {sorted(dims)}")
    return dims[target]


def split_path(path: str) -> tuple[str | None, int | None, str]:
    """"double_blocks.3.img_attn.qkv" -> ("double_blocks", 3, "img_attn.qkv"); "img_in" -> (None, None, "img_in")."""
    m = _PATH.match(path)
    kind, idx, target = m.group(1), m.group(2), m.group(3)
    allowed = DOUBLE_TARGETS if kind == "double_blocks" else SINGLE_TARGETS if kind else TOP_TARGETS
    if target not in allowed:
        raise ValueError(f"{path!r} names no adaptable Flux Linear ({kind or 'top level'} targets: {allowed})")
    return kind, None if idx is None else int(idx), target


def lora_spec(cfg: FluxConfig, rank: int, alpha: float | None = None, *,
              targets: Iterable[str] = IMAGE_STREAM_TARGETS, double_blocks: Iterable[int] | None = None,
              single_blocks: Iterable[int] | None = None) -> dict[str, tuple[int, float]]:
    """{module path: (rank, alpha)} for `targets` (block-relative BFL names, or "img_in"/"txt_in") in the given
    blocks (default: all). alpha defaults to the rank (scale 1)."""
    alpha = float(rank if alpha is None else alpha)
    targets = tuple(targets)
    for t in targets:
        target_dims(cfg, t)
    doubles = range(cfg.depth) if double_blocks is None else double_blocks
    singles = range(cfg.depth_single_blocks) if single_blocks is None else single_blocks
    spec = {t: (rank, alpha) for t in targets if t in TOP_TARGETS}
    spec |= {f"double_blocks.{i}.{t}": (rank, alpha) for i in doubles for t in targets if t in DOUBLE_TARGETS}
    spec |= {f"single_blocks.{i}.{t}": (rank, alpha) for i in singles for t in targets if t in SINGLE_TARGETS}
    return spec


class FluxLoRA(nnx.Module):
    """The adapters of one Flux LoRA: `spec` {BFL module path: (rank, alpha)}.

    State paths read like the base model's ("double_blocks.3.img_attn.qkv.lora_a" beside the base's
    "double_blocks.3.img_attn.qkv.kernel").
    """

    def __init__(self, config: FluxConfig, spec: Mapping[str, tuple[int, float]], *, dtype=jnp.float32,
                 param_dtype=jnp.float32, rngs: nnx.Rngs):
        if not spec:
            raise ValueError("a FluxLoRA needs at least one adapted module")
        self.config = config
        self.spec = tuple(sorted((k, (int(r), float(a))) for k, (r, a) in spec.items()))
        groups: dict[str, dict] = {"top": {}, "double_blocks": {}, "single_blocks": {}}
        for path, (rank, alpha) in self.spec:
            kind, idx, target = split_path(path)
            limit = config.depth if kind == "double_blocks" else config.depth_single_blocks
            if kind is not None and not 0 <= idx < limit:
                raise ValueError(f"{path!r}: the model has {limit} {kind}")
            din, dout = target_dims(config, target)
            ad = LoRA(din, dout, rank=rank, alpha=alpha, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
            if kind is None:
                groups["top"][target] = ad
            else:
                groups[kind].setdefault(str(idx), {})[target] = ad
        self.top_level = nnx.Dict(groups["top"])
        self.double_blocks = nnx.Dict({i: nnx.Dict(m) for i, m in groups["double_blocks"].items()})
        self.single_blocks = nnx.Dict({i: nnx.Dict(m) for i, m in groups["single_blocks"].items()})

    def top(self):
        return self.top_level

    def double(self, i: int):
        return self.double_blocks.get(str(i))

    def single(self, i: int):
        return self.single_blocks.get(str(i))

    def adapters(self) -> dict[str, LoRA]:
        """{module path: adapter} in spec order."""
        out = {}
        for path, _ in self.spec:
            kind, idx, target = split_path(path)
            out[path] = (self.top_level if kind is None else getattr(self, kind)[str(idx)])[target]
        return out
