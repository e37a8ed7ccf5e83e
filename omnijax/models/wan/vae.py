"""Wan2.1 causal video VAE (shared/spec/wan.md §5) in Flax NNX, channels-last.

Axis letters: B batch, F pixel frames, T latent frames, H/W pixel height/width, h/w latent height/width
(H/8, W/8), C channels, Z latent channels (16).

Geometry: video [B, F, H, W, 3] in [-1, 1], F = 4k+1, H and W multiples of 8  <->  latents [B, T, h, w, Z],
T = (F-1)/4 + 1. Other frame counts or sizes raise ValueError unless `pad=True` (see `pad_video`).

LATENT NORMALISATION lives in exactly one place, `WanVAE._normalize` / `WanVAE._denormalize` (the published
per-channel mean/std in `VAEConfig.latents_mean/std`): `encode` returns NORMALISED latents (z = (mu - mean)/std,
as the VideoX-Fun VAE and therefore the Wan DiT expect), and `decode` takes normalised latents. diffusers'
AutoencoderKLWan returns UN-normalised latents and leaves the normalisation to its pipelines; nothing else in
omnijax may normalise again.

Execution forms (all give the same frames; see vae_layers for the cache protocol):
  - whole-sequence: one pass over the clip (memory grows with F);
  - streamed: encode chunks of 1, 4, 4, ... pixel frames and decode one latent frame at a time, carrying every
    causal conv's cache through `jax.lax.scan`, so peak memory does not grow with the clip length;
  - tiled: either form run tile by tile over overlapping spatial tiles (vae_tiling), for 720p and up.
`mode="auto"` streams when F*H*W exceeds `WHOLE_MAX_PIXELS`; `tile="auto"` tiles frames of 720x1280 pixels and up.

Posterior: the encoder yields (mu, logvar); logvar is clamped to [-30, 20]. `encode` returns the normalised
mean, or with `sample_key` the normalised mean plus exp(logvar/2)*eps, where the std is NOT divided by the
latent std (the reference quirk the training latents carry; spec §5.4).

Precision: weights in `param_dtype`, compute in `dtype`; norms, the normalisation, blending and the posterior
in f32. Module names mostly follow diffusers' AutoencoderKLWan (converters/tables/wan_vae.py maps both
formats).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from omnijax.models.wan.vae_layers import AttentionBlock, CausalConv3d, Resample, ResBlock, RMSNormC
from omnijax.models.wan.vae_tiling import TileSpec, tiled_apply

F32 = jnp.float32
WHOLE_MAX_PIXELS = 17 * 480 * 832  # above this many pixel-frames (F*H*W) "auto" streams instead
TILE_MIN_PIXELS = 720 * 1280  # frames with at least this many pixels are tiled under tile="auto"

LATENTS_MEAN = (-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
                0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921)
LATENTS_STD = (2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
               3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160)


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    base_dim: int = 96
    z_dim: int = 16
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    temporal_downsample: tuple[bool, ...] = (False, True, True)
    in_channels: int = 3
    out_channels: int = 3
    latents_mean: tuple[float, ...] = LATENTS_MEAN
    latents_std: tuple[float, ...] = LATENTS_STD

    def __post_init__(self):
        if len(self.temporal_downsample) != len(self.dim_mult) - 1:
            raise ValueError(f"temporal_downsample needs {len(self.dim_mult) - 1} entries (one per downsampling "
                             f"level), got {self.temporal_downsample}")
        if len(self.latents_mean) != self.z_dim or len(self.latents_std) != self.z_dim:
            raise ValueError(f"latents_mean/std need z_dim={self.z_dim} entries")
        if any(s <= 0 for s in self.latents_std):
            raise ValueError("latents_std must be positive")

    @property
    def temporal_factor(self) -> int:
        return 2 ** sum(self.temporal_downsample)

    @property
    def spatial_factor(self) -> int:
        return 2 ** (len(self.dim_mult) - 1)

    def replace(self, **kw) -> VAEConfig:
        return dataclasses.replace(self, **kw)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def from_dict(cls, d: dict) -> VAEConfig:
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - fields
        if unknown:
            raise ValueError(f"unknown VAEConfig fields: {sorted(unknown)}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


# "small": the Wan layout at base dim 16 (1/36 of the parameters), trained from scratch by
# benchmarks/learn_omnimatte.py (omnijax.training.autoencoder) since no published VAE can be downloaded here.
_VAE_VARIANTS = {"wan2.1": {}, "small": dict(base_dim=16), "tiny": dict(base_dim=8)}


def vae_variant(name: str, **overrides) -> VAEConfig:
    """"wan2.1" (the published VAE), "small" (base dim 16) or "tiny" (base dim 8, same layout, for tests); overrides
    replace fields."""
    if name not in _VAE_VARIANTS:
        raise ValueError(f"unknown VAE variant {name!r}; known: {', '.join(_VAE_VARIANTS)}")
    return VAEConfig(**{**_VAE_VARIANTS[name], **overrides})


class MidBlock(nnx.Module):
    """ResBlock -> per-frame AttentionBlock -> ResBlock at one width."""

    def __init__(self, dim, *, dtype, param_dtype, rngs, attention_backend):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.resnets = nnx.List([ResBlock(dim, dim, **kw), ResBlock(dim, dim, **kw)])
        self.attentions = nnx.List([AttentionBlock(dim, attention_backend=attention_backend, **kw)])

    def __call__(self, x, cache=None):
        c0, c1 = cache if cache is not None else (None, None)
        x, c0 = self.resnets[0](x, c0)
        x, _ = self.attentions[0](x)
        x, c1 = self.resnets[1](x, c1)
        return x, (c0, c1)


def _run(layers, x, cache):
    caches = cache if cache is not None else (None,) * len(layers)
    new = []
    for layer, c in zip(layers, caches, strict=True):
        x, c = layer(x, c)
        new.append(c)
    return x, tuple(new)


class Encoder(nnx.Module):
    """video [B, F, H, W, 3] -> [B, T, h, w, 2Z] (mu, logvar before quant_conv). Layer list as in §5.3."""

    def __init__(self, cfg: VAEConfig, *, dtype, param_dtype, rngs, attention_backend):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        dims = [cfg.base_dim * m for m in (1, *cfg.dim_mult)]
        self.conv_in = CausalConv3d(cfg.in_channels, dims[0], **kw)
        layers = []
        for i, (cin, cout) in enumerate(zip(dims[:-1], dims[1:])):
            for _ in range(cfg.num_res_blocks):
                layers.append(ResBlock(cin, cout, **kw))
                cin = cout
            if i < len(cfg.dim_mult) - 1:
                layers.append(Resample(cout, "down3d" if cfg.temporal_downsample[i] else "down2d", **kw))
        self.down_blocks = nnx.List(layers)
        self.mid_block = MidBlock(dims[-1], attention_backend=attention_backend, **kw)
        self.norm_out = RMSNormC(dims[-1], dtype=dtype)
        self.conv_out = CausalConv3d(dims[-1], 2 * cfg.z_dim, **kw)

    def __call__(self, x, cache=None):
        c_in, c_down, c_mid, c_out = cache if cache is not None else (None,) * 4
        x, c_in = self.conv_in(x, c_in)
        x, c_down = _run(self.down_blocks, x, c_down)
        x, c_mid = self.mid_block(x, c_mid)
        x, c_out = self.conv_out(jax.nn.silu(self.norm_out(x)), c_out)
        return x, (c_in, c_down, c_mid, c_out)


class UpBlock(nnx.Module):
    def __init__(self, cin, cout, num_res, mode, *, dtype, param_dtype, rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.resnets = nnx.List([ResBlock(cin if j == 0 else cout, cout, **kw) for j in range(num_res + 1)])
        self.upsampler = Resample(cout, mode, **kw) if mode else None

    def __call__(self, x, cache=None):
        c_res, c_up = cache if cache is not None else (None, None)
        x, c_res = _run(self.resnets, x, c_res)
        if self.upsampler is not None:
            x, c_up = self.upsampler(x, c_up)
        return x, (c_res, c_up)


class Decoder(nnx.Module):
    """[B, T, h, w, Z] (after post_quant_conv) -> video [B, 1 + 4(T-1), H, W, 3] (not clamped)."""

    def __init__(self, cfg: VAEConfig, *, dtype, param_dtype, rngs, attention_backend):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        mults = cfg.dim_mult
        dims = [cfg.base_dim * m for m in (mults[-1], *mults[::-1])]
        temporal_up = cfg.temporal_downsample[::-1]
        self.conv_in = CausalConv3d(cfg.z_dim, dims[0], **kw)
        self.mid_block = MidBlock(dims[0], attention_backend=attention_backend, **kw)
        blocks = []
        for i, (cin, cout) in enumerate(zip(dims[:-1], dims[1:])):
            cin = cin // 2 if i > 0 else cin  # each upsampler halves the channels (Wan2.1 layout)
            mode = None if i == len(mults) - 1 else ("up3d" if temporal_up[i] else "up2d")
            blocks.append(UpBlock(cin, cout, cfg.num_res_blocks, mode, **kw))
        self.up_blocks = nnx.List(blocks)
        self.norm_out = RMSNormC(dims[-1], dtype=dtype)
        self.conv_out = CausalConv3d(dims[-1], cfg.out_channels, **kw)

    def __call__(self, x, cache=None):
        c_in, c_mid, c_up, c_out = cache if cache is not None else (None,) * 4
        x, c_in = self.conv_in(x, c_in)
        x, c_mid = self.mid_block(x, c_mid)
        x, c_up = _run(self.up_blocks, x, c_up)
        x, c_out = self.conv_out(jax.nn.silu(self.norm_out(x)), c_out)
        return x, (c_in, c_mid, c_up, c_out)


def _stream(step, x, first: int, chunk: int):
    """Runs `step(x_chunk, cache) -> (y, cache)` on x[:, :first], then on consecutive chunks of `chunk` frames
    through jax.lax.scan (a shorter tail, if any, runs once more after the scan). Returns the outputs joined on T."""
    y, cache = step(x[:, :first], None)
    outs = [y]
    rest = x[:, first:]
    n = rest.shape[1] // chunk
    if n:
        b = rest.shape[0]
        xs = rest[:, :n * chunk].reshape(b, n, chunk, *rest.shape[2:]).swapaxes(0, 1)
        cache, ys = jax.lax.scan(lambda c, xc: step(xc, c)[::-1], cache, xs)
        outs.append(ys.swapaxes(0, 1).reshape(b, -1, *ys.shape[3:]))
    if rest.shape[1] > n * chunk:
        outs.append(step(rest[:, n * chunk:], cache)[0])
    return jnp.concatenate(outs, axis=1) if len(outs) > 1 else outs[0]


def pad_video(video, temporal: int = 4, spatial: int = 8):
    """Edge-pads a video to F = 4k+1 frames (repeating the last frame) and H, W multiples of 8 (edge pixels).

    Returns (padded video, (F, H, W) of the input). Decoding the padded latents yields the padded size: crop
    with `[:, :F, :H, :W]`. Nothing is ever dropped.
    """
    _, f, h, w, _ = video.shape
    pf = (-(f - 1)) % temporal
    ph, pw = (-h) % spatial, (-w) % spatial
    if pf or ph or pw:
        video = jnp.pad(video, ((0, 0), (0, pf), (0, ph), (0, pw), (0, 0)), mode="edge")
    return video, (f, h, w)


class WanVAE(nnx.Module):
    """The Wan2.1 VAE: `encode` video -> normalised latents, `decode` normalised latents -> video.

    Args:
      config: a VAEConfig (`vae_variant("wan2.1")`).
      dtype: compute dtype; param_dtype: storage dtype.
      rngs: initial weights (random; load real ones with converters.load_wan_vae).
      attention_backend: for the mid-block attention (omnijax.layers.attention); "xla" because cuDNN's fused
        kernel does not take the 384-wide single head.
    """

    def __init__(self, config: VAEConfig, *, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, rngs: nnx.Rngs,
                 attention_backend: str = "xla"):
        self.config, self.dtype = config, dtype
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        z = config.z_dim
        self.encoder = Encoder(config, attention_backend=attention_backend, **kw)
        self.quant_conv = CausalConv3d(2 * z, 2 * z, (1, 1, 1), **kw)
        self.post_quant_conv = CausalConv3d(z, z, (1, 1, 1), **kw)
        self.decoder = Decoder(config, attention_backend=attention_backend, **kw)

    # ---- the one place where latents are normalised (see module docstring) ----
    def _normalize(self, mu):
        mean = jnp.asarray(self.config.latents_mean, F32)
        std = jnp.asarray(self.config.latents_std, F32)
        return (mu.astype(F32) - mean) / std

    def _denormalize(self, z):
        mean = jnp.asarray(self.config.latents_mean, F32)
        std = jnp.asarray(self.config.latents_std, F32)
        return z.astype(F32) * std + mean

    # ---- encoder ----
    def _check_video(self, video, pad: bool):
        if video.ndim != 5 or video.shape[-1] != self.config.in_channels:
            raise ValueError(f"video must be [B, F, H, W, {self.config.in_channels}], got shape {video.shape}")
        if pad:
            return pad_video(video, self.config.temporal_factor, self.config.spatial_factor)[0]
        _, f, h, w, _ = video.shape
        tf, sf = self.config.temporal_factor, self.config.spatial_factor
        if (f - 1) % tf:
            raise ValueError(f"video has {f} frames; the VAE needs {tf}k+1 frames (e.g. {f - (f - 1) % tf} or "
                             f"{f - (f - 1) % tf + tf}); pass pad=True to repeat the last frame")
        if h % sf or w % sf:
            raise ValueError(f"video size {h}x{w} is not a multiple of {sf}; pass pad=True to edge-pad it")
        return video

    def _encode_chunk(self, x, cache):
        y, cache = self.encoder(x, cache)
        return self.quant_conv.valid(y), cache

    def moments(self, video, *, mode: str = "auto", tile="auto", frames_per_step: int = 1, pad: bool = False):
        """Un-normalised posterior moments (mu, logvar), each [B, T, h, w, Z] f32 (logvar clamped to [-30, 20]).

        Args:
          video: [B, F, H, W, 3] in [-1, 1].
          mode: "whole", "stream" or "auto" (stream when F*H*W > WHOLE_MAX_PIXELS).
          tile: a TileSpec, None (no tiling) or "auto" (TileSpec() for frames of 720x1280 pixels and up).
          frames_per_step: streamed encode takes 4*frames_per_step pixel frames per scan step.
          pad: edge-pad to a valid size instead of raising (see pad_video).
        """
        video = self._check_video(video, pad)
        _, f, h, w, _ = video.shape
        tf = self.config.temporal_factor
        stream = _resolve_mode(mode, f * h * w, frames_per_step)

        def run(x):
            if stream:
                return _stream(self._encode_chunk, x, 1, tf * frames_per_step)
            return self._encode_chunk(x, None)[0]

        spec = _resolve_tile(tile, h * w)
        if spec is not None:
            out = tiled_apply(run, video, spec, scale_in=self.config.spatial_factor, scale_out=1)
        else:
            out = run(video)
        mu, logvar = jnp.split(out.astype(F32), 2, axis=-1)
        return mu, jnp.clip(logvar, -30.0, 20.0)

    def posterior(self, video, *, mode: str = "auto", tile="auto", frames_per_step: int = 1, pad: bool = False):
        """Video -> (NORMALISED posterior mean, un-normalised logvar), each [B, T, h, w, Z] f32.

        What a latent cache stores so that training can still draw `sample_posterior` per step.
        Args: see `moments`.
        """
        mu, logvar = self.moments(video, mode=mode, tile=tile, frames_per_step=frames_per_step, pad=pad)
        return self._normalize(mu), logvar

    def encode(self, video, *, sample_key=None, mode: str = "auto", tile="auto", frames_per_step: int = 1,
               pad: bool = False):
        """Video -> NORMALISED latents.

        Args:
          video: [B, F, H, W, 3] in [-1, 1], F = 4k+1, H and W multiples of 8 (or pad=True).
          sample_key: None for the posterior mean (inference); a PRNG key to sample mean + exp(logvar/2)*eps with
            the un-normalised std (the reference's training quirk, see `sample_posterior`).
          mode, tile, frames_per_step, pad: see `moments`.
        Returns:
          [B, (F-1)/4 + 1, H/8, W/8, Z] f32.
        """
        mean, logvar = self.posterior(video, mode=mode, tile=tile, frames_per_step=frames_per_step, pad=pad)
        return mean if sample_key is None else sample_posterior(mean, logvar, sample_key)

    # ---- decoder ----
    def _decode_chunk(self, z, cache):
        return self.decoder(self.post_quant_conv.valid(z), cache)

    def decode(self, latents, *, mode: str = "auto", tile="auto", frames_per_step: int = 1):
        """NORMALISED latents [B, T, h, w, Z] -> video [B, 1 + 4(T-1), 8h, 8w, 3] in [-1, 1] (clamped), f32.

        Args:
          mode: "whole", "stream" (one latent frame per scan step, times frames_per_step) or "auto".
          tile: a TileSpec, None or "auto" (see `moments`).
        """
        if latents.ndim != 5 or latents.shape[-1] != self.config.z_dim:
            raise ValueError(f"latents must be [B, T, h, w, {self.config.z_dim}], got shape {latents.shape}")
        _, t, lh, lw, _ = latents.shape
        sf, tf = self.config.spatial_factor, self.config.temporal_factor
        stream = _resolve_mode(mode, (1 + tf * (t - 1)) * lh * lw * sf * sf, frames_per_step)
        z = self._denormalize(latents).astype(self.dtype)

        def run(x):
            if stream:
                return _stream(self._decode_chunk, x, 1, frames_per_step)
            return self._decode_chunk(x, None)[0]

        spec = _resolve_tile(tile, lh * lw * sf * sf)
        out = tiled_apply(run, z, spec, scale_in=1, scale_out=sf) if spec is not None else run(z)
        return jnp.clip(out.astype(F32), -1.0, 1.0)


def sample_posterior(mean, logvar, key):
    """One draw of the training latent: normalised mean + exp(logvar/2)*eps, f32.

    The std is the UN-normalised one (not divided by the per-channel latent std): the reference's `.sample()`
    adds it to the normalised mean, and the base model was trained on latents carrying that quirk (spec §5.4).
    """
    return mean.astype(F32) + jnp.exp(0.5 * logvar.astype(F32)) * jax.random.normal(key, mean.shape, F32)


def _resolve_mode(mode: str, pixels: int, frames_per_step: int) -> bool:
    """True to stream."""
    if not isinstance(frames_per_step, int) or frames_per_step < 1:
        raise ValueError(f"frames_per_step must be a positive int, got {frames_per_step!r}")
    if mode not in ("auto", "whole", "stream"):
        raise ValueError(f"mode must be 'auto', 'whole' or 'stream', got {mode!r}")
    return mode == "stream" or (mode == "auto" and pixels > WHOLE_MAX_PIXELS)


def _resolve_tile(tile, frame_pixels: int) -> TileSpec | None:
    if tile is None or isinstance(tile, TileSpec):
        return tile
    if tile == "auto":
        return TileSpec() if frame_pixels >= TILE_MIN_PIXELS else None
    raise ValueError(f"tile must be a TileSpec, None or 'auto', got {tile!r}")
