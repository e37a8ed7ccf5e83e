"""Flux.1 MMDiT (dev / schnell) in Flax NNX, with a segment-aware forward.

Axis letters: B batch, L image tokens, S text tokens, J joint tokens (S + L, text first), C packed latent
channels, D hidden size, N heads, K head dim, F MLP hidden, A position-id axes, P = K/2 RoPE pairs,
G image segments (G + 1 modulation rows: the text row first, then one per segment).

The parameter tree is BFL's (shared/spec/flux.md §2.4): fused `qkv` in the double blocks, fused `linear1`
(q, k, v, MLP-in) and `linear2` in the single blocks; names follow flux/model.py so the BFL table is a rename.

Segments (spec §4.1-§4.3): the image tokens are a static list of segments, each with its own tokens, position ids,
timestep (+ guidance), hence its own modulation vector, and its own LoRA switch. Every modulation, gate and
the final layer act on each segment's static token slice with that segment's vector; attention stays one joint
call over [txt; img_0; img_1; ...]. Plain Flux is one segment whose vector the text shares.

LoRA: adapters are passed in (a FluxLoRA, omnijax.models.flux.lora) and reach each Linear through its `lora=`
argument, wrapped by omnijax.layers.lora.gated so they touch only the tokens (or modulation rows) of segments
whose switch is on; the frozen kernels are never merged.

Precision: the embedders of the timestep, guidance and pooled vector are f32 islands (f32 parameters and math);
modulation outputs, LayerNorm / RMSNorm statistics, RoPE and the gated residual adds run in f32; matmuls and
attention run in `dtype` and the residual streams are stored in `dtype`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from omnijax.layers.attention import attention
from omnijax.layers.embeddings import sinusoidal_embedding
from omnijax.layers.linear import Linear
from omnijax.layers.lora import gated, merge_runs
from omnijax.layers.norms import LayerNorm, RMSNorm
from omnijax.layers.rope import apply_rope, nd_rope_angles
from omnijax.models.flux.variants import FluxConfig
from omnijax.sharding import constrain

F32 = jnp.float32


def _gelu_tanh(x):
    return jax.nn.gelu(x, approximate=True)


@dataclasses.dataclass(frozen=True)
class Segment:
    """One static run of image tokens.

    img [B, L_g, C] packed latent tokens; ids [B, L_g, A] or [L_g, A]; timesteps [B] in [0, 1];
    guidance [B] or None (dev models); lora: whether LoRA adapters act on these tokens (static).
    """

    img: Any
    ids: Any
    timesteps: Any
    guidance: Any = None
    lora: bool = True


jax.tree_util.register_dataclass(Segment, data_fields=["img", "ids", "timesteps", "guidance"], meta_fields=["lora"])


@dataclasses.dataclass(frozen=True)
class Layout:
    """Static token bookkeeping of one segment-aware forward."""

    txt_len: int
    bounds: tuple[tuple[int, int], ...]  # image segments, in image-stream coordinates
    lora_on: tuple[bool, ...]
    text_lora: bool

    @property
    def img_len(self) -> int:
        return self.bounds[-1][1]

    @property
    def img_runs(self):
        return merge_runs(self.bounds, self.lora_on)

    @property
    def txt_runs(self):
        return ((0, self.txt_len),) if self.text_lora else ()

    @property
    def joint_bounds(self):
        s = self.txt_len
        return ((0, s),) + tuple((a + s, b + s) for a, b in self.bounds)

    @property
    def joint_runs(self):
        return merge_runs(self.joint_bounds, (self.text_lora,) + self.lora_on)

    @property
    def row_runs(self):
        """Runs over the G + 1 modulation rows (text first) whose tokens are adapted."""
        return merge_runs([(g, g + 1) for g in range(len(self.bounds) + 1)], (self.text_lora,) + self.lora_on)


def _per_segment(fn, bounds, arrays, rows):
    """concat_g fn(*(a[:, start_g:end_g] for a in arrays), *(r[g] for r in rows)) along tokens (axis 1)."""
    if len(bounds) == 1:
        return fn(*arrays, *(r[0] for r in rows))
    return jnp.concatenate([fn(*(a[:, s:e] for a in arrays), *(r[g] for r in rows))
                            for g, (s, e) in enumerate(bounds)], axis=1)


def _pick(lora, name):
    return None if lora is None else lora.get(name)


class MLPEmbedder(nnx.Module):
    """Linear -> SiLU -> Linear (in_layer / out_layer), all f32: the vector every modulation reads."""

    def __init__(self, din: int, dim: int, *, rngs: nnx.Rngs):
        self.in_layer = Linear(din, dim, dtype=F32, param_dtype=F32, rngs=rngs)
        self.out_layer = Linear(dim, dim, dtype=F32, param_dtype=F32, rngs=rngs)

    def __call__(self, x):
        return self.out_layer(jax.nn.silu(self.in_layer(x.astype(F32))))


class Modulation(nnx.Module):
    """SiLU -> Linear(D, m*D): the m shift/scale/gate vectors of each modulation row."""

    def __init__(self, dim: int, multiplier: int, *, dtype, param_dtype, rngs):
        self.lin = Linear(dim, multiplier * dim, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.multiplier = multiplier

    def __call__(self, vec, lora=None):
        """vec [G, B, D] f32 -> [G, B, m, D] f32 (chunk order shift, scale, gate[, shift, scale, gate])."""
        out = self.lin(jax.nn.silu(vec), lora).astype(F32)
        return out.reshape(*out.shape[:-1], self.multiplier, -1)


class QKNorm(nnx.Module):
    def __init__(self, head_dim: int, *, eps: float):
        self.query_norm = RMSNorm(head_dim, eps=eps)
        self.key_norm = RMSNorm(head_dim, eps=eps)


def _split_qkv(y, norm: QKNorm, heads: int):
    """[B, L, 3*D] (q | k | v, head-major inside each) -> normalised q, k and v, each [B, L, N, K]."""
    y = y.reshape(*y.shape[:-1], 3, heads, -1)
    q, k, v = y[..., 0, :, :], y[..., 1, :, :], y[..., 2, :, :]
    return norm.query_norm(q).astype(v.dtype), norm.key_norm(k).astype(v.dtype), v


class SelfAttention(nnx.Module):
    def __init__(self, cfg: FluxConfig, *, dtype, param_dtype, rngs):
        d = cfg.hidden_size
        self.qkv = Linear(d, 3 * d, use_bias=cfg.qkv_bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.norm = QKNorm(cfg.head_dim, eps=cfg.eps)
        self.proj = Linear(d, d, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.num_heads = cfg.num_heads


class MLP(nnx.Module):
    """Linear -> GELU(tanh) -> Linear (BFL's `*_mlp.0` / `*_mlp.2`)."""

    def __init__(self, d: int, f: int, *, dtype, param_dtype, rngs):
        self.linear_1 = Linear(d, f, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.linear_2 = Linear(f, d, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x, lora_1=None, lora_2=None):
        return self.linear_2(_gelu_tanh(self.linear_1(x, lora_1)), lora_2)


class _Mixin:
    """Modulated LayerNorm and gated residual, in f32, shared by both block kinds."""

    def modulated(self, x, shift, scale):
        """LN(x) * (1 + scale) + shift; x [B, l, D], shift/scale [B, D] f32 -> [B, l, D] in `dtype`."""
        return (self.prenorm(x.astype(F32)) * (1 + scale[:, None]) + shift[:, None]).astype(self.dtype)

    @staticmethod
    def gated_add(x, y, gate):
        """x + gate * y in f32, stored in x's dtype; gate [B, D]."""
        return (x.astype(F32) + y.astype(F32) * gate[:, None]).astype(x.dtype)


class DoubleStreamBlock(nnx.Module, _Mixin):
    def __init__(self, cfg: FluxConfig, *, dtype, param_dtype, rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        d = cfg.hidden_size
        self.img_mod = Modulation(d, 6, **kw)
        self.img_attn = SelfAttention(cfg, **kw)
        self.img_mlp = MLP(d, cfg.mlp_hidden, **kw)
        self.txt_mod = Modulation(d, 6, **kw)
        self.txt_attn = SelfAttention(cfg, **kw)
        self.txt_mlp = MLP(d, cfg.mlp_hidden, **kw)
        self.prenorm = LayerNorm(d, eps=cfg.eps, affine=False)
        self.dtype = dtype

    def __call__(self, img, txt, vec, rope, layout: Layout, lora=None, *, backend: str):
        """img [B, L, D], txt [B, S, D], vec [G+1, B, D] f32, rope (cos, sin) [B|1, J, P] -> (img, txt).

        `lora`: optional {BFL-relative target ("img_attn.qkv", ...): LoRA} of this block.
        """
        li, lt, g = img.shape[1], txt.shape[1], len(layout.bounds)
        pick = lambda name, runs, n, axis=-2: gated(_pick(lora, name), runs, n, axis=axis)
        img_rows = merge_runs([(i, i + 1) for i in range(g)], layout.lora_on)
        txt_rows = ((0, 1),) if layout.text_lora else ()
        im = self.img_mod(vec[1:], pick("img_mod.lin", img_rows, g, axis=0))  # [G, B, 6, D]
        tm = self.txt_mod(vec[:1], pick("txt_mod.lin", txt_rows, 1, axis=0))[0]  # [B, 6, D]
        ir, tr = layout.img_runs, layout.txt_runs

        h = _per_segment(lambda x, m: self.modulated(x, m[:, 0], m[:, 1]), layout.bounds, (img,), (im,))
        qi, ki, vi = _split_qkv(self.img_attn.qkv(h, pick("img_attn.qkv", ir, li)), self.img_attn.norm,
                                self.img_attn.num_heads)
        h = self.modulated(txt, tm[:, 0], tm[:, 1])
        qt, kt, vt = _split_qkv(self.txt_attn.qkv(h, pick("txt_attn.qkv", tr, lt)), self.txt_attn.norm,
                                self.txt_attn.num_heads)
        cat = lambda a, b: jnp.concatenate([a, b], axis=1)
        out = attention(apply_rope(cat(qt, qi), *rope), apply_rope(cat(kt, ki), *rope), cat(vt, vi), backend=backend)
        out = out.reshape(*out.shape[:2], -1)

        a = self.img_attn.proj(out[:, lt:], pick("img_attn.proj", ir, li))
        img = _per_segment(lambda x, y, m: self.gated_add(x, y, m[:, 2]), layout.bounds, (img, a), (im,))
        h = _per_segment(lambda x, m: self.modulated(x, m[:, 3], m[:, 4]), layout.bounds, (img,), (im,))
        y = self.img_mlp(h, pick("img_mlp.linear_1", ir, li), pick("img_mlp.linear_2", ir, li))
        img = _per_segment(lambda x, y, m: self.gated_add(x, y, m[:, 5]), layout.bounds, (img, y), (im,))

        txt = self.gated_add(txt, self.txt_attn.proj(out[:, :lt], pick("txt_attn.proj", tr, lt)), tm[:, 2])
        h = self.modulated(txt, tm[:, 3], tm[:, 4])
        y = self.txt_mlp(h, pick("txt_mlp.linear_1", tr, lt), pick("txt_mlp.linear_2", tr, lt))
        txt = self.gated_add(txt, y, tm[:, 5])
        return img, txt


class SingleStreamBlock(nnx.Module, _Mixin):
    def __init__(self, cfg: FluxConfig, *, dtype, param_dtype, rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        d, f = cfg.hidden_size, cfg.mlp_hidden
        self.linear1 = Linear(d, 3 * d + f, **kw)
        self.linear2 = Linear(d + f, d, **kw)
        self.norm = QKNorm(cfg.head_dim, eps=cfg.eps)
        self.modulation = Modulation(d, 3, **kw)
        self.prenorm = LayerNorm(d, eps=cfg.eps, affine=False)
        self.hidden_size, self.num_heads = d, cfg.num_heads
        self.dtype = dtype

    def __call__(self, x, vec, rope, layout: Layout, lora=None, *, backend: str):
        """x [B, J, D] ([txt; img]), vec [G+1, B, D] f32 -> [B, J, D]."""
        j = x.shape[1]
        pick = lambda name, runs, n, axis=-2: gated(_pick(lora, name), runs, n, axis=axis)
        mod = self.modulation(vec, pick("modulation.lin", layout.row_runs, vec.shape[0], axis=0))  # [G+1, B, 3, D]
        bounds = layout.joint_bounds
        h = _per_segment(lambda x, m: self.modulated(x, m[:, 0], m[:, 1]), bounds, (x,), (mod,))
        y = self.linear1(h, pick("linear1", layout.joint_runs, j))
        q, k, v = _split_qkv(y[..., :3 * self.hidden_size], self.norm, self.num_heads)
        out = attention(apply_rope(q, *rope), apply_rope(k, *rope), v, backend=backend)
        y = jnp.concatenate([out.reshape(*out.shape[:2], -1), _gelu_tanh(y[..., 3 * self.hidden_size:])], axis=-1)
        y = self.linear2(y, pick("linear2", layout.joint_runs, j))
        return _per_segment(lambda x, y, m: self.gated_add(x, y, m[:, 2]), bounds, (x, y), (mod,))


class LastLayer(nnx.Module, _Mixin):
    def __init__(self, cfg: FluxConfig, *, dtype, param_dtype, rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.adaLN_modulation = Modulation(cfg.hidden_size, 2, **kw)  # BFL: adaLN_modulation.1, (shift, scale)
        self.linear = Linear(cfg.hidden_size, cfg.out_channels, **kw)
        self.prenorm = LayerNorm(cfg.hidden_size, eps=cfg.eps, affine=False)
        self.dtype = dtype

    def __call__(self, img, vec_img, bounds):
        """img [B, L, D], vec_img [G, B, D] f32 -> [B, L, out_channels] in `dtype`."""
        m = self.adaLN_modulation(vec_img)
        return self.linear(_per_segment(lambda x, m: self.modulated(x, m[:, 0], m[:, 1]), bounds, (img,), (m,)))


def _as_batched_ids(ids, name: str, axes: int):
    ids = jnp.asarray(ids)
    if ids.ndim == 2:
        ids = ids[None]
    if ids.ndim != 3 or ids.shape[-1] != axes:
        raise ValueError(f"{name} must be [B, L, {axes}] or [L, {axes}] position ids, got shape {ids.shape}")
    return ids.astype(F32)


def _remat_call(remat):
    """How a block is called: directly, or under jax.checkpoint (True: save nothing; a str: the name of a
    jax.checkpoint_policies policy). The modules go in as (graphdef, state) so the checkpoint is a pure function
    (see omnijax.omnimatte.branch._rematerialized for why)."""
    if not remat:
        return lambda fn, mods, *args: fn(mods, *args)
    policy = None if remat is True else getattr(jax.checkpoint_policies, remat, None)
    if remat is not True and policy is None:
        raise ValueError(f"remat must be a bool or a jax.checkpoint_policies name, got {remat!r}")

    def call(fn, mods, *args):
        graphdef, state = nnx.split(mods)
        return jax.checkpoint(lambda st, *a: fn(nnx.merge(graphdef, st), *a), policy=policy)(state, *args)

    return call


class FluxDiT(nnx.Module):
    """Flux.1 transformer. `__call__(img, img_ids, txt, txt_ids, timesteps, y, guidance=None)` -> velocity
    [B, L, out_channels]; `forward_segments(...)` is the segment-aware call."""

    def __init__(self, config: FluxConfig, *, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, rngs: nnx.Rngs):
        self.config = config
        self.dtype = dtype
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        d = config.hidden_size
        self.img_in = Linear(config.in_channels, d, **kw)
        self.txt_in = Linear(config.context_in_dim, d, **kw)
        self.time_in = MLPEmbedder(config.time_dim, d, rngs=rngs)
        self.vector_in = MLPEmbedder(config.vec_in_dim, d, rngs=rngs)
        if config.guidance_embed:
            self.guidance_in = MLPEmbedder(config.time_dim, d, rngs=rngs)
        self.double_blocks = nnx.List([DoubleStreamBlock(config, **kw) for _ in range(config.depth)])
        self.single_blocks = nnx.List([SingleStreamBlock(config, **kw) for _ in range(config.depth_single_blocks)])
        self.final_layer = LastLayer(config, **kw)

    def vectors(self, timesteps, guidance, y):
        """Modulation vectors [G, B, D] f32 from timesteps [G, B] in [0, 1], guidance [G, B] (dev) and y [B, V]."""
        cfg = self.config
        g, b = timesteps.shape
        emb = lambda t: sinusoidal_embedding(1000.0 * t.reshape(-1).astype(F32), cfg.time_dim).reshape(g, b, -1)
        vec = self.time_in(emb(timesteps)) + self.vector_in(y)[None]
        if cfg.guidance_embed:
            vec = vec + self.guidance_in(emb(guidance))
        return vec

    def __call__(self, img, img_ids, txt, txt_ids, timesteps, y, guidance=None, *, lora=None,
                 attention_backend: str = "auto", remat: bool | str = False):
        """Velocity for the packed image tokens (BFL's Flux.forward).

        Args:
          img: [B, L, in_channels] packed latent tokens.
          img_ids: [B, L, 3] (or [L, 3]) position ids.
          txt: [B, S, context_in_dim] T5 hidden states; txt_ids: [B, S, 3] or [S, 3] (zeros).
          timesteps: [B] in [0, 1] (sigma; 1 is noise).
          y: [B, vec_in_dim] pooled CLIP vector.
          guidance: [B] guidance strength (dev models; ignored by schnell).
          lora: optional FluxLoRA, active on every token (text included), as diffusers applies a PEFT LoRA.
          attention_backend: see omnijax.layers.attention; remat: see forward_segments.
        Returns:
          [B, L, out_channels] in `dtype`.
        """
        seg = Segment(img, img_ids, timesteps, guidance, lora=True)
        return self.forward_segments([seg], txt, txt_ids, y, text_lora=True, lora=lora,
                                     attention_backend=attention_backend, remat=remat)[0]

    def forward_segments(self, segments: Sequence[Segment], txt, txt_ids, y, *, txt_timesteps=None,
                         txt_guidance=None, text_lora: bool = False, lora=None, attention_backend: str = "auto",
                         remat: bool | str = False):
        """The segment-aware forward: image tokens [img_0; img_1; ...] after the text, one joint attention.

        Args:
          segments: static list of Segment (tokens, ids, timesteps, guidance, LoRA switch).
          txt, txt_ids, y: as in __call__ (shared by all segments).
          txt_timesteps, txt_guidance: [B] the text stream's modulation inputs; default: segment 0's.
          text_lora: whether LoRA adapters act on the text tokens.
          lora: optional FluxLoRA.
          attention_backend: see omnijax.layers.attention.
          remat: recompute each block in the backward pass: False, True, or a jax.checkpoint_policies name.
        Returns:
          list of velocities, one [B, L_g, out_channels] per segment.
        """
        cfg = self.config
        if not segments:
            raise ValueError("forward_segments needs at least one image segment")
        b = txt.shape[0]
        if txt.ndim != 3 or txt.shape[-1] != cfg.context_in_dim:
            raise ValueError(f"txt must be [B, S, {cfg.context_in_dim}], got shape {txt.shape}")
        if y.shape != (b, cfg.vec_in_dim):
            raise ValueError(f"y (pooled vector) must be [{b}, {cfg.vec_in_dim}], got shape {y.shape}")
        for i, s in enumerate(segments):
            if s.img.ndim != 3 or s.img.shape[0] != b or s.img.shape[-1] != cfg.in_channels:
                raise ValueError(f"segment {i}: img must be [{b}, L, {cfg.in_channels}], got shape {s.img.shape}")
            if cfg.guidance_embed and s.guidance is None:
                raise ValueError(f"segment {i}: a guidance-distilled (dev) model needs a guidance strength")
        ts = [jnp.broadcast_to(jnp.asarray(s.timesteps, F32).reshape(-1), (b,)) for s in segments]
        gs = [jnp.broadcast_to(jnp.asarray(s.guidance if cfg.guidance_embed else 0.0, F32).reshape(-1), (b,))
              for s in segments]
        t_txt = ts[0] if txt_timesteps is None else jnp.broadcast_to(jnp.asarray(txt_timesteps, F32).reshape(-1), (b,))
        g_txt = gs[0] if txt_guidance is None or not cfg.guidance_embed else \
            jnp.broadcast_to(jnp.asarray(txt_guidance, F32).reshape(-1), (b,))
        vec = self.vectors(jnp.stack([t_txt, *ts]), jnp.stack([g_txt, *gs]), y)  # [G+1, B, D]

        starts = [0]
        for s in segments:
            starts.append(starts[-1] + s.img.shape[1])
        layout = Layout(txt_len=txt.shape[1], bounds=tuple(zip(starts[:-1], starts[1:])),
                        lora_on=tuple(bool(s.lora) for s in segments), text_lora=bool(text_lora))
        a = len(cfg.axes_dim)
        ids = [_as_batched_ids(txt_ids, "txt_ids", a)] + [_as_batched_ids(s.ids, f"segment {i} ids", a)
                                                           for i, s in enumerate(segments)]
        nb = max(i.shape[0] for i in ids)
        ids = jnp.concatenate([jnp.broadcast_to(i, (nb, *i.shape[1:])) for i in ids], axis=1)
        if ids.shape[1] != layout.txt_len + layout.img_len:
            raise ValueError(f"position ids cover {ids.shape[1]} tokens, the inputs have "
                             f"{layout.txt_len + layout.img_len}")
        angles = nd_rope_angles(ids, cfg.axes_dim, cfg.theta)  # [B|1, J, P]
        rope = (jnp.cos(angles), jnp.sin(angles))

        top = None if lora is None else lora.top()
        img_x = jnp.concatenate([s.img for s in segments], axis=1) if len(segments) > 1 else segments[0].img
        img = self.img_in(img_x, gated(_pick(top, "img_in"), layout.img_runs, layout.img_len))
        txt = self.txt_in(txt, gated(_pick(top, "txt_in"), layout.txt_runs, layout.txt_len))
        stream = lambda x: constrain(x, "batch", "tokens", "embed")
        call = _remat_call(remat)
        for i, blk in enumerate(self.double_blocks):
            mods = (blk, None if lora is None else lora.double(i))
            img, txt = call(lambda m, img, txt, vec, rope: m[0](img, txt, vec, rope, layout, m[1],
                                                                 backend=attention_backend), mods, img, txt, vec, rope)
            img, txt = stream(img), stream(txt)
        x = jnp.concatenate([txt, img], axis=1)
        for i, blk in enumerate(self.single_blocks):
            mods = (blk, None if lora is None else lora.single(i))
            x = stream(call(lambda m, x, vec, rope: m[0](x, vec, rope, layout, m[1], backend=attention_backend),
                            mods, x, vec, rope))
        out = self.final_layer(x[:, layout.txt_len:], vec[1:], layout.bounds)
        return [out[:, s:e] for s, e in layout.bounds]
