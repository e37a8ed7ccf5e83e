"""Wan2.1 diffusion transformer (t2v and i2v / Fun-InP) in Flax NNX.

Axis letters: B batch, T latent frames, H/W latent grid, C channels, F/h/w patch grid (T/pt, H/ph, W/pw),
L tokens (F*h*w, row-major over (F, h, w)), S context tokens, N heads, K head dim, D model dim.

Tensors are channels-last: latents [B, T, H, W, 16], y [B, T, H, W, 20]. Parameter names follow the
original Wan / VideoX-Fun module names so the converter tables stay short (shared/spec/wan.md §1.5).

Precision (spec §1.6): parameters are stored in `param_dtype` except the f32 islands (time embedding and
projection, modulation tables, affine norms), which are always f32. The timestep embedding, modulation,
norms, RoPE and the residual adds run in f32; the residual stream is stored in `dtype`; matmuls and
attention run in `dtype`.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import jax
import jax.numpy as jnp
from flax import nnx

from omnijax.layers.attention import attention
from omnijax.layers.embeddings import sinusoidal_embedding
from omnijax.layers.init import torch_default
from omnijax.layers.linear import Linear
from omnijax.layers.norms import LayerNorm, RMSNorm
from omnijax.layers.rope import apply_rope, wan_rope_cos_sin
from omnijax.models.wan.variants import WanConfig

F32 = jnp.float32
AttnFn = Callable  # (q [B,L,N,K], k [B,S,N,K], v [B,S,N,K]) -> [B,L,N,K]


def _gelu_tanh(x):
    return jax.nn.gelu(x, approximate=True)


def _pick(lora, name):
    """The adapter for sub-linear `name` from an optional {name: LoRA} mapping (None: plain frozen linear)."""
    return None if lora is None else lora.get(name)


class MLP(nnx.Module):
    """Linear -> activation -> Linear (names linear_1 / linear_2)."""

    def __init__(self, din, dhidden, dout, act, *, dtype, param_dtype, rngs):
        self.linear_1 = Linear(din, dhidden, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.linear_2 = Linear(dhidden, dout, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.act = act

    def __call__(self, x, lora=None):
        """`lora`: optional {"linear_1"|"linear_2": adapter} applied to these tokens (branch LoRA)."""
        return self.linear_2(self.act(self.linear_1(x, _pick(lora, "linear_1"))), _pick(lora, "linear_2"))


class PatchEmbed(nnx.Module):
    """Conv3d with kernel = stride = patch, as an einsum over non-overlapping patches. Kernel [pt,ph,pw,C,D]."""

    def __init__(self, cfg: WanConfig, *, dtype, param_dtype, rngs):
        pt, ph, pw = cfg.patch_size
        fan_in = cfg.in_dim * pt * ph * pw
        self.kernel = nnx.Param(torch_default(rngs.params(), (pt, ph, pw, cfg.in_dim, cfg.dim), fan_in, param_dtype))
        self.bias = nnx.Param(jnp.zeros((cfg.dim,), param_dtype))
        self.patch = cfg.patch_size
        self.dtype = dtype

    def __call__(self, x):
        """x [B, T, H, W, C] -> tokens [B, L, D] and the patch grid (F, h, w)."""
        b, t, hh, ww, c = x.shape
        pt, ph, pw = self.patch
        if t % pt or hh % ph or ww % pw:
            raise ValueError(f"latent grid {(t, hh, ww)} is not divisible by the patch size {self.patch}")
        grid = (t // pt, hh // ph, ww // pw)
        x = x.astype(self.dtype).reshape(b, grid[0], pt, grid[1], ph, grid[2], pw, c)
        y = jnp.einsum("bfahpwqc,apqcd->bfhwd", x, self.kernel[...].astype(self.dtype))
        y = y + self.bias[...].astype(y.dtype)
        return y.reshape(b, -1, y.shape[-1]), grid


class SelfAttention(nnx.Module):
    def __init__(self, cfg: WanConfig, *, dtype, param_dtype, rngs):
        lin = partial(Linear, cfg.dim, cfg.dim, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.q, self.k, self.v, self.o = lin(), lin(), lin(), lin()
        self.norm_q = RMSNorm(cfg.dim, eps=cfg.eps)
        self.norm_k = RMSNorm(cfg.dim, eps=cfg.eps)
        self.num_heads = cfg.num_heads

    def qkv(self, x, cos, sin, lora=None):
        """x [B, L, D] -> rotated q, k and v, each [B, L, N, K]. `lora`: optional {"q"|"k"|"v": adapter}."""
        split = lambda a: a.reshape(*a.shape[:-1], self.num_heads, -1)
        q = apply_rope(split(self.norm_q(self.q(x, _pick(lora, "q")))), cos, sin)
        k = apply_rope(split(self.norm_k(self.k(x, _pick(lora, "k")))), cos, sin)
        return q, k, split(self.v(x, _pick(lora, "v")))

    def project(self, out, lora=None):
        """Attention output [B, L, N, K] -> [B, L, D] through o (optionally adapted)."""
        return self.o(out.reshape(*out.shape[:-2], -1), _pick(lora, "o"))

    def __call__(self, x, cos, sin, attn_fn: AttnFn):
        q, k, v = self.qkv(x, cos, sin)
        return self.project(attn_fn(q, k, v))


class CrossAttention(nnx.Module):
    """Text cross-attention; for i2v also image cross-attention, summed before the output projection."""

    def __init__(self, cfg: WanConfig, *, dtype, param_dtype, rngs):
        lin = partial(Linear, cfg.dim, cfg.dim, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.q, self.k, self.v, self.o = lin(), lin(), lin(), lin()
        self.norm_q = RMSNorm(cfg.dim, eps=cfg.eps)
        self.norm_k = RMSNorm(cfg.dim, eps=cfg.eps)
        if cfg.is_i2v:
            self.k_img, self.v_img = lin(), lin()
            self.norm_k_img = RMSNorm(cfg.dim, eps=cfg.eps)
        self.is_i2v = cfg.is_i2v
        self.num_heads = cfg.num_heads

    def __call__(self, x, text, image, *, backend: str, lora=None):
        """`lora`: optional {name: adapter} over q, k, v, o, k_img, v_img. Adapters on k/v act on the context
        tokens, so a branch that uses them sees its own adapted text/image keys and values."""
        split = lambda a: a.reshape(*a.shape[:-1], self.num_heads, -1)
        q = split(self.norm_q(self.q(x, _pick(lora, "q"))))
        out = attention(q, split(self.norm_k(self.k(text, _pick(lora, "k")))), split(self.v(text, _pick(lora, "v"))),
                        backend=backend)
        if self.is_i2v:
            k_img = split(self.norm_k_img(self.k_img(image, _pick(lora, "k_img"))))
            out = out + attention(q, k_img, split(self.v_img(image, _pick(lora, "v_img"))), backend=backend)
        return self.o(out.reshape(*out.shape[:-2], -1), _pick(lora, "o"))


def _residual(x, y, gate=None):
    """x + y * gate computed in f32, stored in x's dtype."""
    y = y.astype(F32)
    return (x.astype(F32) + (y if gate is None else y * gate)).astype(x.dtype)


class WanBlock(nnx.Module):
    def __init__(self, cfg: WanConfig, *, dtype, param_dtype, rngs):
        self.modulation = nnx.Param(jax.random.normal(rngs.params(), (1, 6, cfg.dim), F32) / cfg.dim ** 0.5)
        self.norm1 = LayerNorm(cfg.dim, eps=cfg.eps, affine=False)
        self.self_attn = SelfAttention(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.norm3 = LayerNorm(cfg.dim, eps=cfg.eps, affine=True)
        self.cross_attn = CrossAttention(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.norm2 = LayerNorm(cfg.dim, eps=cfg.eps, affine=False)
        self.ffn = MLP(cfg.dim, cfg.ffn_dim, cfg.dim, _gelu_tanh, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.dtype = dtype

    # The block in two phases around self-attention, so the branch model (omnijax.omnimatte) can run the
    # self-attention of two token sets jointly (structured masks) and everything else per set.
    def modulate(self, e0):
        """e0 [B, 6, D] f32 -> the six modulation slots, each [B, 1, D] f32."""
        mod = self.modulation[...] + e0
        return tuple(mod[:, i:i + 1] for i in range(6))

    def attn_input(self, x, mod):
        """Modulated self-attention input h [B, L, D] in `dtype`."""
        shift_sa, scale_sa = mod[0], mod[1]
        return (self.norm1(x.astype(F32)) * (1 + scale_sa) + shift_sa).astype(self.dtype)

    def finish(self, x, attn_out, mod, text, image, *, backend: str, lora=None):
        """Gated self-attention residual, cross-attention and FFN. `lora`: optional {"cross_attn"|"ffn": {...}}."""
        gate_sa, shift_ff, scale_ff, gate_ff = mod[2], mod[3], mod[4], mod[5]
        x = _residual(x, attn_out, gate_sa)
        x = _residual(x, self.cross_attn(self.norm3(x), text, image, backend=backend, lora=_pick(lora, "cross_attn")))
        h = (self.norm2(x.astype(F32)) * (1 + scale_ff) + shift_ff).astype(self.dtype)
        return _residual(x, self.ffn(h, _pick(lora, "ffn")), gate_ff)

    def __call__(self, x, e0, text, image, cos, sin, *, attn_fn: AttnFn, backend: str):
        """x [B, L, D]; e0 [B, 6, D] f32; text [B, S, D]; image [B, 257, D] or None."""
        mod = self.modulate(e0)
        h = self.attn_input(x, mod)
        return self.finish(x, self.self_attn(h, cos, sin, attn_fn), mod, text, image, backend=backend)


class Head(nnx.Module):
    def __init__(self, cfg: WanConfig, *, dtype, param_dtype, rngs):
        out = cfg.out_dim * cfg.patch_size[0] * cfg.patch_size[1] * cfg.patch_size[2]
        self.modulation = nnx.Param(jax.random.normal(rngs.params(), (1, 2, cfg.dim), F32) / cfg.dim ** 0.5)
        self.norm = LayerNorm(cfg.dim, eps=cfg.eps, affine=False)
        self.head = Linear(cfg.dim, out, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.dtype = dtype

    def __call__(self, x, e):
        mod = self.modulation[...] + e[:, None, :]  # [B, 2, D] f32
        shift, scale = mod[:, 0:1], mod[:, 1:2]
        return self.head((self.norm(x.astype(F32)) * (1 + scale) + shift).astype(self.dtype))


def gelu_erf(x):
    """GELU with the exact erf (torch's nn.GELU()). One function object for every model, so that the graphdefs of
    two separately built models compare equal (a fresh functools.partial per model would not)."""
    return jax.nn.gelu(x, approximate=False)


class ImageEmbedding(nnx.Module):
    """CLIP features [B, 257, 1280] -> [B, 257, D]: LN -> Linear -> GELU(erf) -> Linear -> LN."""

    def __init__(self, cfg: WanConfig, *, dtype, param_dtype, rngs):
        self.norm1 = LayerNorm(cfg.image_dim, eps=1e-5)
        self.mlp = MLP(cfg.image_dim, cfg.image_dim, cfg.dim, gelu_erf,
                       dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.norm2 = LayerNorm(cfg.dim, eps=1e-5)

    def __call__(self, x):
        return self.norm2(self.mlp(self.norm1(x.astype(F32))))


class Conditioning(nnx.Module):
    """Timestep, text and image embeddings shared by all blocks."""

    def __init__(self, cfg: WanConfig, *, dtype, param_dtype, rngs):
        self.time_embedding = MLP(cfg.freq_dim, cfg.dim, cfg.dim, jax.nn.silu, dtype=F32, param_dtype=F32, rngs=rngs)
        self.time_projection = Linear(cfg.dim, 6 * cfg.dim, dtype=F32, param_dtype=F32, rngs=rngs)
        self.text_embedding = MLP(cfg.text_dim, cfg.dim, cfg.dim, _gelu_tanh, dtype=dtype, param_dtype=param_dtype,
                                  rngs=rngs)
        if cfg.is_i2v:
            self.img_emb = ImageEmbedding(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.cfg = cfg

    def __call__(self, timesteps, context, clip_features=None):
        """Returns e [B, D] f32, e0 [B, 6, D] f32, text [B, text_len, D], image [B, 257, D] or None."""
        cfg = self.cfg
        b, s, c = context.shape
        if c != cfg.text_dim:
            raise ValueError(f"text context has {c} features, the model expects {cfg.text_dim}")
        if s > cfg.text_len:
            raise ValueError(f"text context has {s} tokens, more than text_len={cfg.text_len}")
        # Zero rows up to text_len: the reference attends to them (no key mask), so they matter.
        context = jnp.pad(context, ((0, 0), (0, cfg.text_len - s), (0, 0)))
        e = self.time_embedding(sinusoidal_embedding(jnp.asarray(timesteps, F32).reshape(b), cfg.freq_dim))
        e0 = self.time_projection(jax.nn.silu(e)).reshape(b, 6, cfg.dim)
        text = self.text_embedding(context)
        image = None
        if cfg.is_i2v:
            if clip_features is None:
                raise ValueError("an i2v (Fun-InP) model needs clip_features [B, 257, image_dim]")
            image = self.img_emb(clip_features)
        elif clip_features is not None:
            raise ValueError("clip_features were given to a t2v model, which has no image cross-attention")
        return e, e0, text, image


class WanDiT(nnx.Module):
    """Wan2.1 DiT. `__call__(latents, timesteps, context, clip_features=None, y=None)` -> velocity [B,T,H,W,out]."""

    def __init__(self, config: WanConfig, *, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, rngs: nnx.Rngs):
        self.config = config
        self.dtype = dtype
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.patch_embedding = PatchEmbed(config, **kw)
        self.condition = Conditioning(config, **kw)
        self.blocks = nnx.List([WanBlock(config, **kw) for _ in range(config.num_layers)])
        self.head = Head(config, **kw)

    # The forward pass in pieces, so the branch model (omnijax.omnimatte) composes the same parts.
    def embed(self, latents, y=None):
        """[B,T,H,W,16] (+ y [B,T,H,W,in_dim-16]) -> tokens [B, L, D], RoPE (cos, sin) [L, K/2], grid (F,h,w)."""
        cfg = self.config
        if y is not None:
            if y.shape[:4] != latents.shape[:4]:
                raise ValueError(f"condition y {y.shape} does not match latents {latents.shape} in [B, T, H, W]")
            latents = jnp.concatenate([latents, y.astype(latents.dtype)], axis=-1)
        if latents.shape[-1] != cfg.in_dim:
            hint = " (i2v/Fun-InP models need y with the mask and masked-video latent)" if cfg.is_i2v else ""
            raise ValueError(f"the model takes {cfg.in_dim} input channels, got {latents.shape[-1]}{hint}")
        x, grid = self.patch_embedding(latents)
        cos, sin = wan_rope_cos_sin(grid, cfg.head_dim, cfg.rope_theta)
        return x, (cos, sin), grid

    def unpatchify(self, x, grid):
        """[B, L, pt*ph*pw*out] -> [B, T, H, W, out] (channel fastest inside each patch)."""
        pt, ph, pw = self.config.patch_size
        f, h, w = grid
        b = x.shape[0]
        x = x.reshape(b, f, h, w, pt, ph, pw, -1).transpose(0, 1, 4, 2, 5, 3, 6, 7)
        return x.reshape(b, f * pt, h * ph, w * pw, -1)

    def run_blocks(self, x, e0, text, image, rope, *, attn_fn: AttnFn, backend: str, blocks=None,
                   remat: bool = False):
        cos, sin = rope
        call = lambda blk, x: blk(x, e0, text, image, cos, sin, attn_fn=attn_fn, backend=backend)
        if remat:
            call = nnx.remat(call)
        for blk in (self.blocks if blocks is None else blocks):
            x = call(blk, x)
        return x

    def __call__(self, latents, timesteps, context, clip_features=None, y=None, *, attention_backend: str = "auto",
                 remat: bool = False):
        """Velocity prediction.

        Args:
          latents: [B, T, H, W, 16] noisy latents.
          timesteps: [B] in 0..1000 (1000 * sigma).
          context: [B, S<=512, text_dim] text embeddings (rows past each sample's length zero).
          clip_features: [B, 257, image_dim] for i2v models.
          y: [B, T, H, W, in_dim - 16] condition (i2v: 4 mask channels + 16 masked-video latent channels).
          attention_backend: see omnijax.layers.attention.
          remat: recompute each block in the backward pass.
        Returns:
          [B, T, H, W, out_dim] in `dtype`.
        """
        x, rope, grid = self.embed(latents, y)
        e, e0, text, image = self.condition(timesteps, context, clip_features)
        attn_fn = partial(attention, backend=attention_backend)
        x = self.run_blocks(x, e0, text, image, rope, attn_fn=attn_fn, backend=attention_backend, remat=remat)
        return self.unpatchify(self.head(x, e), grid)
