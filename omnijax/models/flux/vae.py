"""The Flux.1 image VAE ("ae.safetensors", diffusers AutoencoderKL; shared/spec/flux.md §1.11-§1.12), Flax NNX.

Axis letters: B batch, H/W pixel height/width, h/w latent height/width (H/8, W/8 for the published VAE),
C channels, Z latent channels (16), L packed tokens ((h/2)(w/2)), P packed features (4Z = 64).

Geometry: images [B, H, W, 3] in [-1, 1], H and W multiples of the spatial factor  <->  latents [B, h, w, Z].
Inside, activations carry a frame axis of length 1 ([B, 1, H, W, C]) so that the per-frame convolutions of the
Wan VAE (vae_layers.Conv2d, PointConv) and its spatial tiling (vae_tiling.tiled_apply) serve this VAE too.

LATENT SCALING lives in exactly one place, `FluxVAE._scale` / `FluxVAE._unscale`: `encode` returns
z = scaling * (mean - shift) (what the Flux DiT consumes), `decode` takes such z. Nothing else in omnijax may
scale or shift Flux latents again (diffusers' AutoencoderKL leaves this to its pipelines; BFL's AutoEncoder
does it inside encode/decode, as here).

Posterior: the encoder yields (mean, logvar), logvar clamped to [-30, 20]. `encode` returns the scaled mean
(BFL's inference choice); pass `sample_key` for a posterior draw (diffusers' `latent_dist.sample()`).

Module names follow diffusers' AutoencoderKL (down_blocks.i.resnets.j, mid_block.attentions.0.to_q, up_blocks in
execution order); converters/tables/flux_vae.py maps both the BFL and the diffusers names onto them.
Precision: weights in `param_dtype`, convolutions in `dtype`; GroupNorm statistics, softmax, the scaling and the
posterior in f32.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from omnijax.layers.attention import attention
from omnijax.layers.norms import GroupNorm
from omnijax.models.wan.vae_layers import Conv2d, PointConv
from omnijax.models.wan.vae_tiling import TileSpec, tiled_apply

F32 = jnp.float32
TILE_MIN_PIXELS = 2048 * 2048  # images with at least this many pixels are tiled under tile="auto"
# Relative L2 of the tiled vs whole decode, tiny RANDOM model, a 24x32 latent in 16-latent tiles overlapping 8
# (tests/models/flux/test_vae.py; measured 0.064). Random weights mix far more globally than trained ones, so this is
# a loose bound on the effect of tiling, not a quality figure for the real VAE.
TILE_TOLERANCE = 0.1


@dataclasses.dataclass(frozen=True)
class FluxVAEConfig:
    """Hyper-parameters (defaults: the published Flux.1 VAE)."""

    base_dim: int = 128
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2  # the decoder has one more per level
    z_dim: int = 16
    groups: int = 32
    eps: float = 1e-6
    in_channels: int = 3
    out_channels: int = 3
    scaling_factor: float = 0.3611
    shift_factor: float = 0.1159

    def __post_init__(self):
        for m in self.dim_mult:
            if (self.base_dim * m) % self.groups:
                raise ValueError(f"width {self.base_dim * m} is not divisible into {self.groups} GroupNorm groups")
        if not self.scaling_factor > 0:
            raise ValueError(f"scaling_factor must be > 0, got {self.scaling_factor}")

    @property
    def spatial_factor(self) -> int:
        return 2 ** (len(self.dim_mult) - 1)

    def replace(self, **kw) -> FluxVAEConfig:
        return dataclasses.replace(self, **kw)

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict) -> FluxVAEConfig:
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown FluxVAEConfig fields: {sorted(unknown)}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


_VARIANTS = {"flux": {}, "tiny": dict(base_dim=16, dim_mult=(1, 2), num_res_blocks=1, groups=8)}


def flux_vae_variant(name: str, **overrides) -> FluxVAEConfig:
    """"flux" (the published VAE) or "tiny" (tests, the tiny CLI); overrides replace fields."""
    if name not in _VARIANTS:
        raise ValueError(f"unknown Flux VAE variant {name!r}; known: {', '.join(_VARIANTS)}")
    return FluxVAEConfig(**{**_VARIANTS[name], **overrides})


class ResnetBlock(nnx.Module):
    """GN -> SiLU -> conv3x3 -> GN -> SiLU -> conv3x3, plus the input (through a 1x1 conv when widths differ)."""

    def __init__(self, cin: int, cout: int, cfg: FluxVAEConfig, *, dtype, param_dtype, rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.norm1 = GroupNorm(cin, cfg.groups, eps=cfg.eps, param_dtype=param_dtype)
        self.conv1 = Conv2d(cin, cout, 3, **kw)
        self.norm2 = GroupNorm(cout, cfg.groups, eps=cfg.eps, param_dtype=param_dtype)
        self.conv2 = Conv2d(cout, cout, 3, **kw)
        self.conv_shortcut = PointConv(cin, cout, **kw) if cin != cout else None

    def __call__(self, x):
        h = self.conv1(jax.nn.silu(self.norm1(x)))
        h = self.conv2(jax.nn.silu(self.norm2(h)))
        skip = self.conv_shortcut(x) if self.conv_shortcut is not None else x
        return (skip.astype(h.dtype) + h).astype(h.dtype)


class Attention(nnx.Module):
    """Single-head self-attention over the h*w positions (scale 1/sqrt(C)), plus the residual."""

    def __init__(self, dim: int, cfg: FluxVAEConfig, *, dtype, param_dtype, rngs, backend: str = "xla"):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.group_norm = GroupNorm(dim, cfg.groups, eps=cfg.eps, param_dtype=param_dtype)
        self.to_q, self.to_k = PointConv(dim, dim, **kw), PointConv(dim, dim, **kw)
        self.to_v, self.to_out = PointConv(dim, dim, **kw), PointConv(dim, dim, **kw)
        self.backend = backend

    def __call__(self, x):
        b, t, h, w, c = x.shape
        y = self.group_norm(x)
        q, k, v = (p(y).reshape(b * t, h * w, 1, c) for p in (self.to_q, self.to_k, self.to_v))
        out = attention(q, k, v, backend=self.backend).reshape(b, t, h, w, c)
        return (self.to_out(out) + x).astype(x.dtype)


class MidBlock(nnx.Module):
    def __init__(self, dim: int, cfg: FluxVAEConfig, *, dtype, param_dtype, rngs, backend):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.resnets = nnx.List([ResnetBlock(dim, dim, cfg, **kw), ResnetBlock(dim, dim, cfg, **kw)])
        self.attentions = nnx.List([Attention(dim, cfg, backend=backend, **kw)])

    def __call__(self, x):
        return self.resnets[1](self.attentions[0](self.resnets[0](x)))


class DownBlock(nnx.Module):
    """Residual blocks, then (except at the deepest level) pad right/bottom by 1 and a stride-2 conv3x3."""

    def __init__(self, cin, cout, cfg: FluxVAEConfig, downsample: bool, *, dtype, param_dtype, rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.resnets = nnx.List([ResnetBlock(cin if j == 0 else cout, cout, cfg, **kw)
                                 for j in range(cfg.num_res_blocks)])
        self.downsampler = Conv2d(cout, cout, 3, stride=2, padding=((0, 1), (0, 1)), **kw) if downsample else None

    def __call__(self, x):
        for r in self.resnets:
            x = r(x)
        return self.downsampler(x) if self.downsampler is not None else x


class UpBlock(nnx.Module):
    """num_res_blocks + 1 residual blocks, then (except at the last level) nearest x2 and a conv3x3."""

    def __init__(self, cin, cout, cfg: FluxVAEConfig, upsample: bool, *, dtype, param_dtype, rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.resnets = nnx.List([ResnetBlock(cin if j == 0 else cout, cout, cfg, **kw)
                                 for j in range(cfg.num_res_blocks + 1)])
        self.upsampler = Conv2d(cout, cout, 3, **kw) if upsample else None

    def __call__(self, x):
        for r in self.resnets:
            x = r(x)
        if self.upsampler is not None:
            x = self.upsampler(jnp.repeat(jnp.repeat(x, 2, axis=2), 2, axis=3))
        return x


class Encoder(nnx.Module):
    """[B, 1, H, W, 3] -> [B, 1, h, w, 2Z] (mean, logvar)."""

    def __init__(self, cfg: FluxVAEConfig, *, dtype, param_dtype, rngs, backend):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        dims = [cfg.base_dim * m for m in cfg.dim_mult]
        self.conv_in = Conv2d(cfg.in_channels, dims[0], 3, **kw)
        self.down_blocks = nnx.List([DownBlock(dims[max(i - 1, 0)], d, cfg, i < len(dims) - 1, **kw)
                                     for i, d in enumerate(dims)])
        self.mid_block = MidBlock(dims[-1], cfg, backend=backend, **kw)
        self.conv_norm_out = GroupNorm(dims[-1], cfg.groups, eps=cfg.eps, param_dtype=param_dtype)
        self.conv_out = Conv2d(dims[-1], 2 * cfg.z_dim, 3, **kw)

    def __call__(self, x):
        x = self.conv_in(x)
        for blk in self.down_blocks:
            x = blk(x)
        x = self.mid_block(x)
        return self.conv_out(jax.nn.silu(self.conv_norm_out(x)))


class Decoder(nnx.Module):
    """[B, 1, h, w, Z] (unscaled latents) -> [B, 1, H, W, 3] (not clamped)."""

    def __init__(self, cfg: FluxVAEConfig, *, dtype, param_dtype, rngs, backend):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        dims = [cfg.base_dim * m for m in cfg.dim_mult][::-1]
        self.conv_in = Conv2d(cfg.z_dim, dims[0], 3, **kw)
        self.mid_block = MidBlock(dims[0], cfg, backend=backend, **kw)
        self.up_blocks = nnx.List([UpBlock(dims[max(k - 1, 0)], d, cfg, k < len(dims) - 1, **kw)
                                   for k, d in enumerate(dims)])
        self.conv_norm_out = GroupNorm(dims[-1], cfg.groups, eps=cfg.eps, param_dtype=param_dtype)
        self.conv_out = Conv2d(dims[-1], cfg.out_channels, 3, **kw)

    def __call__(self, z):
        x = self.mid_block(self.conv_in(z))
        for blk in self.up_blocks:
            x = blk(x)
        return self.conv_out(jax.nn.silu(self.conv_norm_out(x)))


class FluxVAE(nnx.Module):
    """`encode` images -> scaled latents, `decode` scaled latents -> images.

    Args:
      config: FluxVAEConfig (`flux_vae_variant("flux")`).
      dtype, param_dtype: compute and storage types.
      rngs: initial (random) weights; load real ones with converters.load_flux_vae.
      attention_backend: for the mid-block attention; "xla" (cuDNN's fused kernel does not take the 512-wide head).
    """

    def __init__(self, config: FluxVAEConfig, *, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, rngs: nnx.Rngs,
                 attention_backend: str = "xla"):
        self.config, self.dtype = config, dtype
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs, backend=attention_backend)
        self.encoder = Encoder(config, **kw)
        self.decoder = Decoder(config, **kw)

    # ---- the one place where latents are scaled and shifted (see module docstring) ----
    def _scale(self, mean):
        return (mean.astype(F32) - self.config.shift_factor) * self.config.scaling_factor

    def _unscale(self, z):
        return z.astype(F32) / self.config.scaling_factor + self.config.shift_factor

    def _check(self, x, channels: int, what: str, factor: int):
        if x.ndim != 4 or x.shape[-1] != channels:
            raise ValueError(f"{what} must be [B, H, W, {channels}], got shape {tuple(x.shape)}")
        if x.shape[1] % factor or x.shape[2] % factor:
            raise ValueError(f"{what} size {x.shape[1]}x{x.shape[2]} is not a multiple of {factor}")

    def moments(self, images, *, tile=None):
        """Unscaled posterior (mean, logvar), each [B, h, w, Z] f32 (logvar clamped to [-30, 20]).

        Args:
          images: [B, H, W, 3] in [-1, 1], H and W multiples of the spatial factor.
          tile: a TileSpec (latent units), None, or "auto" (TileSpec() for images of TILE_MIN_PIXELS and up).
        """
        sf = self.config.spatial_factor
        self._check(images, self.config.in_channels, "images", sf)
        x = images[:, None]
        spec = _resolve_tile(tile, images.shape[1] * images.shape[2])
        out = tiled_apply(self.encoder, x, spec, scale_in=sf, scale_out=1) if spec else self.encoder(x)
        mean, logvar = jnp.split(out[:, 0].astype(F32), 2, axis=-1)
        return mean, jnp.clip(logvar, -30.0, 20.0)

    def encode(self, images, *, sample_key=None, tile=None):
        """Images [B, H, W, 3] in [-1, 1] -> SCALED latents [B, H/8, W/8, Z] f32 (posterior mean, or a draw)."""
        mean, logvar = self.moments(images, tile=tile)
        if sample_key is not None:
            mean = mean + jnp.exp(0.5 * logvar) * jax.random.normal(sample_key, mean.shape, F32)
        return self._scale(mean)

    def decode(self, latents, *, tile="auto"):
        """SCALED latents [B, h, w, Z] -> images [B, 8h, 8w, 3] in [-1, 1] (clamped), f32.

        tile: a TileSpec (latent units), None, or "auto" (tiles when the image has TILE_MIN_PIXELS or more).
        """
        sf = self.config.spatial_factor
        self._check(latents, self.config.z_dim, "latents", 1)
        z = self._unscale(latents).astype(self.dtype)[:, None]
        spec = _resolve_tile(tile, latents.shape[1] * latents.shape[2] * sf * sf)
        out = tiled_apply(self.decoder, z, spec, scale_in=1, scale_out=sf) if spec else self.decoder(z)
        return jnp.clip(out[:, 0].astype(F32), -1.0, 1.0)


def _resolve_tile(tile, pixels: int) -> TileSpec | None:
    if tile is None or isinstance(tile, TileSpec):
        return tile
    if tile == "auto":
        return TileSpec() if pixels >= TILE_MIN_PIXELS else None
    raise ValueError(f"tile must be a TileSpec, None or 'auto', got {tile!r}")


# ---------------------------------------------------------------------------------------------------------
# Latent packing (spec §1.11) and the image position ids (§1.9).

def pack_latents(latents):
    """[B, h, w, Z] -> [B, (h/2)(w/2), 4Z]; token index row-major over (h/2, w/2), feature z*4 + ph*2 + pw."""
    b, h, w, z = latents.shape
    if h % 2 or w % 2:
        raise ValueError(f"latent size {h}x{w} must be even to pack 2x2 patches")
    x = latents.reshape(b, h // 2, 2, w // 2, 2, z)
    return jnp.einsum("bhpwqz->bhwzpq", x).reshape(b, (h // 2) * (w // 2), 4 * z)


def unpack_latents(tokens, h: int, w: int):
    """The inverse of pack_latents: [B, (h/2)(w/2), 4Z] -> [B, h, w, Z] for latent size h x w."""
    b, length, p = tokens.shape
    if h % 2 or w % 2 or length != (h // 2) * (w // 2) or p % 4:
        raise ValueError(f"cannot unpack {tuple(tokens.shape)} tokens into a {h}x{w} latent grid")
    x = tokens.reshape(b, h // 2, w // 2, p // 4, 2, 2)
    return jnp.einsum("bhwzpq->bhpwqz", x).reshape(b, h, w, p // 4)


def image_ids(h: int, w: int, batch: int = 1, axis0: float = 0.0):
    """Position ids [batch, (h/2)(w/2), 3] f32 of the packed tokens of an h x w latent: (axis0, row, col)."""
    rows, cols = jnp.meshgrid(jnp.arange(h // 2, dtype=F32), jnp.arange(w // 2, dtype=F32), indexing="ij")
    ids = jnp.stack([jnp.full_like(rows, axis0), rows, cols], axis=-1).reshape(-1, 3)
    return jnp.broadcast_to(ids[None], (batch, *ids.shape))


def text_ids(length: int, batch: int = 1):
    """Position ids [batch, length, 3] of the text tokens: all zero."""
    return jnp.zeros((batch, length, 3), F32)
