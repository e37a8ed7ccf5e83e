"""T5 v1.1 / umT5 encoders (Wan2.1's umT5, shared/spec/wan.md §3.6; Flux's T5-XXL, spec/flux.md §1.13), Flax NNX.

One encoder, two position-bias layouts chosen by `UMT5Config.shared_position_bias`: umT5 gives every layer its
own relative-position bias table; T5 v1.1 has a table in layer 0 only and adds that one bias in every layer.
Both gate the feed-forward with tanh-approximated GELU ("gelu_new", T5 v1.1's "gated-gelu"):
ffn(x) = fc2(gelu_tanh(gate(x)) * fc1(x)). Attention logits are not scaled by 1/sqrt(K) (T5 folds the
scale into the weights); norms are RMS-style without a mean or bias.

Axis letters: B batch, L query tokens, S key tokens (S = L here), N heads, K head dim (d_kv),
D model dim (d_model), F feed-forward dim (d_ff), V vocabulary.

Padding: `attention_mask` [B, L] marks real tokens (1) and padding (0). Padded keys are masked out, so the
rows of real tokens do not depend on how much padding follows them (relative positions only).
"""

from __future__ import annotations

import dataclasses
import html
import re
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from omnijax.layers.linear import Linear
from omnijax.layers.norms import RMSNorm

ACTIVATIONS = {
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),  # transformers' "gelu_new", Wan's T5 GELU
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "relu": jax.nn.relu,
}


@dataclasses.dataclass(frozen=True)
class UMT5Config:
    """umT5 encoder hyper-parameters (defaults: umT5-XXL as used by Wan2.1)."""

    vocab_size: int = 256384
    d_model: int = 4096
    num_layers: int = 24
    num_heads: int = 64
    d_kv: int = 64
    d_ff: int = 10240
    num_buckets: int = 32
    max_distance: int = 128
    eps: float = 1e-6
    activation: str = "gelu_tanh"
    shared_position_bias: bool = False  # True: T5 v1.1 (one table, layer 0); False: umT5 (one per layer)

    def __post_init__(self):
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"unknown umT5 activation {self.activation!r}; choose one of {sorted(ACTIVATIONS)}")
        if self.num_buckets % 4:
            raise ValueError(f"num_buckets must be a multiple of 4 (half exact, half log, per direction), "
                             f"got {self.num_buckets}")

    @property
    def inner_dim(self) -> int:
        return self.num_heads * self.d_kv

    def replace(self, **kw) -> UMT5Config:
        return dataclasses.replace(self, **kw)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> UMT5Config:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown UMT5Config fields: {sorted(unknown)}")
        return cls(**d)


UMT5_VARIANTS = {
    "xxl": {},
    # Output width 32 = the tiny Wan DiT's text_dim; vocabulary sized for the tiny test tokenizer.
    "tiny": dict(vocab_size=1024, d_model=32, num_layers=2, num_heads=4, d_kv=8, d_ff=64),
    # google/t5-v1_1-xxl's encoder, Flux's text encoder (FLUX.1-dev text_encoder_2).
    "t5-v1.1-xxl": dict(vocab_size=32128, shared_position_bias=True),
    "tiny-t5": dict(vocab_size=1024, d_model=32, num_layers=2, num_heads=4, d_kv=8, d_ff=64,
                    shared_position_bias=True),
}


def umt5_variant(name: str, **overrides) -> UMT5Config:
    """UMT5Config by name ("xxl", "tiny", "t5-v1.1-xxl", "tiny-t5"); keyword overrides replace fields."""
    if name not in UMT5_VARIANTS:
        raise ValueError(f"unknown umT5 variant {name!r}; known: {', '.join(UMT5_VARIANTS)}")
    return UMT5Config(**{**UMT5_VARIANTS[name], **overrides})


def relative_position_buckets(length: int, num_buckets: int, max_distance: int) -> np.ndarray:
    """Bidirectional T5 bucket index [L, S] for relative position s - l (host side, static shapes).

    Half the buckets are for keys after the query. In each half, distances below num_buckets/4 get one
    bucket each; larger ones share log-spaced buckets up to max_distance. The log is taken in float32 and
    truncated, as the PyTorch reference does, so boundary distances land in the same bucket.
    """
    rel = np.arange(length)[None, :] - np.arange(length)[:, None]
    half = num_buckets // 2
    exact = half // 2
    base = (rel > 0).astype(np.int64) * half
    dist = np.abs(rel)
    # Distances below `exact` take the exact branch; clamping them keeps the unused log finite.
    far = np.maximum(dist, exact).astype(np.float32)
    ratio = np.log(far / np.float32(exact)) / np.float32(np.log(max_distance / exact))
    large = exact + (ratio * np.float32(half - exact)).astype(np.int64, copy=False)
    large = np.minimum(large, half - 1)
    return base + np.where(dist < exact, dist, large)


class UMT5Attention(nnx.Module):
    """Self-attention plus a relative-position bias (its own table when `has_bias`, else the caller's);
    logits unscaled, softmax in f32."""

    def __init__(self, config: UMT5Config, *, dtype, param_dtype, rngs: nnx.Rngs, has_bias: bool = True):
        c = config
        self.config, self.dtype = c, dtype
        kw = dict(use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.q = Linear(c.d_model, c.inner_dim, **kw)
        self.k = Linear(c.d_model, c.inner_dim, **kw)
        self.v = Linear(c.d_model, c.inner_dim, **kw)
        self.o = Linear(c.inner_dim, c.d_model, **kw)
        self.pos_embedding = nnx.Embed(c.num_buckets, c.num_heads, dtype=jnp.float32, param_dtype=param_dtype,
                                       rngs=rngs) if has_bias else None

    def position_bias(self, length: int):
        """[N, L, S] f32 bias from this layer's bucket table."""
        c = self.config
        buckets = jnp.asarray(relative_position_buckets(length, c.num_buckets, c.max_distance))
        return jnp.transpose(self.pos_embedding(buckets), (2, 0, 1)).astype(jnp.float32)

    def __call__(self, x, key_mask, bias):
        """x [B, L, D], key_mask [B, S] bool, bias [N, L, S] f32 -> [B, L, D]."""
        b, l, _ = x.shape
        c = self.config
        split = lambda t: t.reshape(b, l, c.num_heads, c.d_kv)
        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
        logits = jnp.einsum("blnk,bsnk->bnls", q, k, preferred_element_type=jnp.float32)
        logits = logits + bias[None]
        # Masked keys get the most negative finite logit (not -inf), so an all-padding row stays finite.
        logits = jnp.where(key_mask[:, None, None, :], logits, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
        out = jnp.einsum("bnls,bsnk->blnk", probs, v.astype(self.dtype))
        return self.o(out.reshape(b, l, c.inner_dim))


class UMT5FeedForward(nnx.Module):
    """Gated feed-forward: fc2(act(gate(x)) * fc1(x)); gate/fc1 [D, F], fc2 [F, D]."""

    def __init__(self, config: UMT5Config, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.act = ACTIVATIONS[config.activation]
        self.gate = Linear(config.d_model, config.d_ff, **kw)
        self.fc1 = Linear(config.d_model, config.d_ff, **kw)
        self.fc2 = Linear(config.d_ff, config.d_model, **kw)

    def __call__(self, x):
        return self.fc2(self.act(self.gate(x)) * self.fc1(x))


class UMT5Block(nnx.Module):
    """Pre-norm residual block: x + attn(norm1(x)), then x + ffn(norm2(x))."""

    def __init__(self, config: UMT5Config, *, dtype, param_dtype, rngs: nnx.Rngs, has_bias: bool = True):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.norm1 = RMSNorm(config.d_model, eps=config.eps, param_dtype=param_dtype)
        self.attn = UMT5Attention(config, has_bias=has_bias, **kw)
        self.norm2 = RMSNorm(config.d_model, eps=config.eps, param_dtype=param_dtype)
        self.ffn = UMT5FeedForward(config, **kw)

    def __call__(self, x, key_mask, bias):
        x = x + self.attn(self.norm1(x), key_mask, bias)
        return x + self.ffn(self.norm2(x))


class UMT5Encoder(nnx.Module):
    """umT5 / T5 v1.1 encoder stack: token embedding -> blocks -> final RMS norm.

    Parameter paths follow Wan's `T5Encoder` names (token_embedding, blocks.{i}.attn.q, ...,
    blocks.{i}.attn.pos_embedding (T5 v1.1: blocks.0 only), blocks.{i}.ffn.{gate,fc1,fc2}, norm).
    """

    def __init__(self, config: UMT5Config, *, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, rngs: nnx.Rngs):
        self.config, self.dtype = config, dtype
        self.token_embedding = nnx.Embed(config.vocab_size, config.d_model, dtype=dtype, param_dtype=param_dtype,
                                         rngs=rngs)
        self.blocks = nnx.List([UMT5Block(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
                                          has_bias=i == 0 or not config.shared_position_bias)
                                for i in range(config.num_layers)])
        self.norm = RMSNorm(config.d_model, eps=config.eps, param_dtype=param_dtype)

    def __call__(self, input_ids, attention_mask=None):
        """Encodes token ids.

        Args:
          input_ids: [B, L] integer token ids.
          attention_mask: [B, L], nonzero for real tokens; None means no padding.
        Returns:
          [B, L, D] hidden states in `dtype` (rows of padding tokens are defined but meaningless).
        """
        if input_ids.ndim != 2 or not jnp.issubdtype(input_ids.dtype, jnp.integer):
            raise ValueError(f"input_ids must be an integer array [B, L], got {input_ids.dtype}{list(input_ids.shape)}")
        if attention_mask is None:
            key_mask = jnp.ones(input_ids.shape, bool)
        else:
            if attention_mask.shape != input_ids.shape:
                raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} differs from input_ids "
                                 f"shape {tuple(input_ids.shape)}")
            key_mask = attention_mask != 0
        x = self.token_embedding(input_ids)
        for block in self.blocks:
            if block.attn.pos_embedding is not None:  # every layer (umT5), or layer 0 only (T5 v1.1)
                bias = block.attn.position_bias(input_ids.shape[1])
            x = block(x, key_mask, bias)
        return self.norm(x)


# ---------------------------------------------------------------------------------------------------------
# Prompts -> embeddings (Wan's text path: pad to 512, encode, keep each prompt's true tokens incl. EOS).

def clean_prompt(text: str) -> str:
    """Wan's "whitespace" prompt cleaning: fix text (ftfy, when installed), unescape HTML twice, collapse spaces."""
    try:
        import ftfy  # optional, as in the reference; only repairs mojibake

        text = ftfy.fix_text(text)
    except ImportError:
        pass
    text = html.unescape(html.unescape(text)).strip()
    return re.sub(r"\s+", " ", text).strip()


def tokenize(tokenizer, prompts: Sequence[str], max_length: int = 512, *, clean: bool = True):
    """(ids [B, max_length] int32, mask [B, max_length] int32) with a transformers tokenizer (EOS appended)."""
    if isinstance(prompts, str):
        raise TypeError("prompts must be a sequence of strings, not one string")
    texts = [clean_prompt(p) if clean else p for p in prompts]
    enc = tokenizer(texts, padding="max_length", truncation=True, max_length=max_length, add_special_tokens=True,
                    return_attention_mask=True, return_tensors="np")
    return np.asarray(enc["input_ids"], np.int32), np.asarray(enc["attention_mask"], np.int32)


@nnx.jit
def umt5_encode(model, ids, mask):
    return model(ids, mask)


def encode_prompts(model: UMT5Encoder, tokenizer, prompts: Sequence[str], max_length: int = 512, *,
                   clean: bool = True, batch_size: int = 8) -> list[np.ndarray]:
    """Text embeddings for the DiT, one [L_i, D] array per prompt, cut to its true token count (incl. EOS).

    All batches are padded to `max_length`, so one compiled program serves every call.
    """
    out = []
    for start in range(0, len(prompts), batch_size):
        ids, mask = tokenize(tokenizer, prompts[start:start + batch_size], max_length, clean=clean)
        hidden = np.asarray(umt5_encode(model, jnp.asarray(ids), jnp.asarray(mask)))
        out += [h[:n] for h, n in zip(hidden, mask.sum(1))]
    return out


def pad_text_context(embeddings: Sequence[np.ndarray], length: int | None = None) -> np.ndarray:
    """Stacks [L_i, D] embeddings into [B, length, D], zero-padding each (length defaults to max L_i).

    Wan's DiT zero-pads its context to text_len (512) itself, so any length >= max L_i is equivalent.
    """
    if not embeddings:
        raise ValueError("no embeddings to stack")
    dims = {e.shape[-1] for e in embeddings}
    if len(dims) != 1 or any(e.ndim != 2 for e in embeddings):
        raise ValueError(f"embeddings must all be [L_i, D] with one D, got {[tuple(e.shape) for e in embeddings]}")
    longest = max(e.shape[0] for e in embeddings)
    length = longest if length is None else length
    if length < longest:
        raise ValueError(f"length {length} is shorter than the longest embedding ({longest} tokens)")
    out = np.zeros((len(embeddings), length, dims.pop()), np.asarray(embeddings[0]).dtype)
    for i, e in enumerate(embeddings):
        out[i, :e.shape[0]] = np.asarray(e)
    return out
