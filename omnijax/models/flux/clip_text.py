"""The CLIP ViT-L/14 text tower as Flux uses it (spec/flux.md §1.13): its pooled output conditions the DiT.

Token embedding + learned absolute positions -> pre-LN blocks with CAUSAL self-attention (the blocks of the
vision tower in omnijax.models.wan.clip, built causal) -> final LayerNorm. The pooled output is the final hidden
state at the end-of-text token, chosen as transformers' CLIPTextModel chooses it: for configs with the legacy
`eos_token_id == 2` (openai/clip-vit-large-patch14, the one Flux ships) the position of the largest token id
(EOS is the last id of the vocabulary), otherwise the first position holding `eos_token_id`. No projection
(Flux uses CLIPTextModel's pooler_output, not CLIPTextModelWithProjection's text_embeds). No attention mask:
diffusers and BFL pad to 77 tokens and run without one; causality keeps padding after EOS out of the pooled row.

Axis letters: B batch, L tokens (<= max_positions), D width, V vocabulary.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from omnijax.layers.norms import LayerNorm
from omnijax.models.wan.clip import ACTIVATIONS, CLIPBlock


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
    """Text tower hyper-parameters (defaults: openai/clip-vit-large-patch14's text model, Flux's text_encoder)."""

    vocab_size: int = 49408
    width: int = 768
    num_layers: int = 12
    num_heads: int = 12
    mlp_dim: int = 3072
    max_positions: int = 77
    activation: str = "quick_gelu"
    eps: float = 1e-5
    eos_token_id: int = 2  # the legacy value in CLIP-L's config: pool at argmax(ids) (see module docstring)

    def __post_init__(self):
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"unknown CLIP activation {self.activation!r}; choose one of {sorted(ACTIVATIONS)}")
        if self.width % self.num_heads:
            raise ValueError(f"width {self.width} is not divisible by num_heads {self.num_heads}")

    def replace(self, **kw) -> CLIPTextConfig:
        return dataclasses.replace(self, **kw)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> CLIPTextConfig:
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown CLIPTextConfig fields: {sorted(unknown)}")
        return cls(**d)


CLIP_TEXT_VARIANTS = {
    "clip-l": {},
    # Vocabulary sized for the tiny test tokenizer; eos_token_id = its "</s>" (1), pooled by first occurrence.
    "tiny": dict(vocab_size=1024, width=32, num_layers=2, num_heads=4, mlp_dim=64, eos_token_id=1),
}


def clip_text_variant(name: str, **overrides) -> CLIPTextConfig:
    """CLIPTextConfig by name ("clip-l" or "tiny"); keyword overrides replace fields."""
    if name not in CLIP_TEXT_VARIANTS:
        raise ValueError(f"unknown CLIP text variant {name!r}; known: {', '.join(CLIP_TEXT_VARIANTS)}")
    return CLIPTextConfig(**{**CLIP_TEXT_VARIANTS[name], **overrides})


class CLIPTextModel(nnx.Module):
    """Token ids [B, L] -> (last hidden state [B, L, D], pooled [B, D]).

    Parameter paths: token_embedding.embedding [V, D], pos_embedding [max_positions, D], blocks.{i} (as the vision
    tower's), final_norm.
    """

    def __init__(self, config: CLIPTextConfig, *, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, rngs: nnx.Rngs):
        c = config
        self.config, self.dtype = c, dtype
        self.token_embedding = nnx.Embed(c.vocab_size, c.width, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.pos_embedding = nnx.Param(jax.random.normal(rngs.params(), (c.max_positions, c.width), param_dtype) * 0.01)
        self.blocks = nnx.List([CLIPBlock(c, dtype=dtype, param_dtype=param_dtype, rngs=rngs, causal=True)
                                for _ in range(c.num_layers)])
        self.final_norm = LayerNorm(c.width, eps=c.eps, param_dtype=param_dtype)

    def __call__(self, input_ids):
        if input_ids.ndim != 2 or not jnp.issubdtype(input_ids.dtype, jnp.integer):
            raise ValueError(f"input_ids must be an integer array [B, L], got {input_ids.dtype}{list(input_ids.shape)}")
        length = input_ids.shape[1]
        if length > self.config.max_positions:
            raise ValueError(f"{length} tokens exceed the CLIP text model's {self.config.max_positions} positions")
        x = self.token_embedding(input_ids) + self.pos_embedding[:length].astype(self.dtype)[None]
        for block in self.blocks:
            x = block(x)
        x = self.final_norm(x)
        if self.config.eos_token_id == 2:
            eos = jnp.argmax(input_ids, axis=-1)
        else:
            eos = jnp.argmax(input_ids == self.config.eos_token_id, axis=-1)
        return x, jnp.take_along_axis(x, eos[:, None, None], axis=1)[:, 0]


def tokenize(tokenizer, prompts: Sequence[str], max_length: int):
    """ids [B, max_length] int32, padded to max_length and truncated (as diffusers' Flux pipeline tokenizes)."""
    if isinstance(prompts, str):
        raise TypeError("prompts must be a sequence of strings, not one string")
    enc = tokenizer(list(prompts), padding="max_length", truncation=True, max_length=max_length,
                    return_tensors="np")
    return np.asarray(enc["input_ids"], np.int32)


@nnx.jit
def _pooled(model, ids):
    return model(ids)[1]


def encode_pooled(model: CLIPTextModel, tokenizer, prompts: Sequence[str], max_length: int = 77) -> np.ndarray:
    """Flux's vector conditioning: pooled CLIP text features [B, D] of the prompts (77 tokens, no mask)."""
    return np.asarray(_pooled(model, jnp.asarray(tokenize(tokenizer, prompts, max_length))))
