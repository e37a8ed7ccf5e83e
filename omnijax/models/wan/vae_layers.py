"""Building blocks of the Wan2.1 causal video VAE (shared/spec/wan.md §5.2), channels-last, Flax NNX.

Axis letters: B batch, T frames (pixel or latent, at the module's level), H/W height/width at the module's
level, C channels, I/O input/output channels of a kernel.

Every module with temporal state follows one protocol: `y, new_cache = module(x, cache)` where
x is [B, T, H, W, C] and `cache=None` means "x starts at frame 0 of the clip". Calling a module on a whole
clip with `cache=None` is the whole-sequence form; calling it on consecutive chunks, each time passing the
cache the previous call returned, gives the same frames (streaming). Caches have fixed shapes once the first
chunk has run, so they can be carried through `jax.lax.scan`:
  - a causal conv with a temporal kernel of 3 keeps its last 2 input frames ([B, 2, H, W, I]; zeros before
    the clip starts, which is exactly the zero front padding);
  - the temporal downsampler keeps its last input frame ([B, 1, H, W, C]);
  - the temporal upsampler keeps the last 2 frames of its time_conv input ([B, 2, H, W, C]).
Modules without temporal state return `None` as their cache.

Precision: convolutions run in `dtype` (f32 accumulation when dtype is f32); RMS norms compute in f32;
the single-head mid-block attention runs through `omnijax.layers.attention` (XLA backend by default, because
cuDNN's fused kernel does not take a head dim of 384).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from omnijax.layers.attention import attention
from omnijax.layers.init import torch_default
from omnijax.layers.linear import matmul_last

F32 = jnp.float32
CACHE_T = 2  # frames of context a temporal kernel of 3 needs


def _uniform(rngs, shape, fan_in, param_dtype):
    return torch_default(rngs.params(), shape, fan_in, param_dtype)


def _acc(dtype):
    return F32 if jnp.dtype(dtype) == jnp.dtype(F32) else None


class CausalConv3d(nnx.Module):
    """Conv3d that is causal in time: output frame t sees input frames t-kt+1 .. t (zeros before frame 0).

    Spatial padding is kh//2, kw//2 on both sides (Wan's `padding=1` for 3x3x3 kernels). Kernel [kt, kh, kw, I, O].
    """

    def __init__(self, in_ch: int, out_ch: int, kernel=(3, 3, 3), *, stride_t: int = 1, dtype=jnp.float32,
                 param_dtype=jnp.float32, rngs: nnx.Rngs):
        kt, kh, kw = kernel
        self.kernel_size, self.stride_t, self.dtype = tuple(kernel), stride_t, dtype
        self.kernel = nnx.Param(_uniform(rngs, (kt, kh, kw, in_ch, out_ch), in_ch * kt * kh * kw, param_dtype))
        self.bias = nnx.Param(jnp.zeros((out_ch,), param_dtype))

    def valid(self, x):
        """The conv with no temporal padding: [B, T, H, W, I] -> [B, (T-kt)//stride_t + 1, H, W, O]."""
        kt, kh, kw = self.kernel_size
        b, t, h, w, _ = x.shape
        if t < kt:  # no complete temporal window (e.g. a 1-frame clip reaching the temporal downsampler)
            return jnp.zeros((b, 0, h, w, self.kernel.shape[-1]), self.dtype)
        if self.kernel_size == (1, 1, 1):
            y = matmul_last(x, self.kernel[0, 0, 0], self.dtype)
        else:
            y = jax.lax.conv_general_dilated(
                x.astype(self.dtype), self.kernel[...].astype(self.dtype), window_strides=(self.stride_t, 1, 1),
                padding=((0, 0), (kh // 2, kh // 2), (kw // 2, kw // 2)),
                dimension_numbers=("NDHWC", "DHWIO", "NDHWC"), preferred_element_type=_acc(self.dtype))
        return (y + self.bias[...].astype(y.dtype)).astype(self.dtype)

    def __call__(self, x, cache=None):
        """Causal conv of x given the previous frames.

        Args:
          x: [B, T, H, W, I].
          cache: [B, kt-1, H, W, I], the input frames just before x; None at the start of the clip (zeros).
        Returns:
          (y [B, T, H, W, O], new cache: the last kt-1 frames of the context and x, or None when kt == 1).
        """
        kt = self.kernel_size[0]
        if kt == 1:
            return self.valid(x), None
        if cache is None:
            cache = jnp.zeros((x.shape[0], kt - 1, *x.shape[2:]), x.dtype)
        ctx = jnp.concatenate([cache.astype(x.dtype), x], axis=1)
        return self.valid(ctx), ctx[:, -(kt - 1):]


class Conv2d(nnx.Module):
    """Per-frame 2D conv. Kernel [kh, kw, I, O]; `padding` is ((top, bottom), (left, right))."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int = 3, *, stride: int = 1, padding=((1, 1), (1, 1)),
                 dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.stride, self.padding, self.dtype = stride, tuple(map(tuple, padding)), dtype
        self.kernel = nnx.Param(_uniform(rngs, (kernel, kernel, in_ch, out_ch), in_ch * kernel * kernel, param_dtype))
        self.bias = nnx.Param(jnp.zeros((out_ch,), param_dtype))

    def __call__(self, x):
        """x [B, T, H, W, I] -> [B, T, H', W', O] (each frame on its own)."""
        b, t = x.shape[:2]
        y = jax.lax.conv_general_dilated(
            x.reshape(b * t, *x.shape[2:]).astype(self.dtype), self.kernel[...].astype(self.dtype),
            window_strides=(self.stride, self.stride), padding=self.padding,
            dimension_numbers=("NHWC", "HWIO", "NHWC"), preferred_element_type=_acc(self.dtype))
        y = (y + self.bias[...].astype(y.dtype)).astype(self.dtype)
        return y.reshape(b, t, *y.shape[1:])


class PointConv(nnx.Module):
    """1x1 conv over channels (the attention's to_qkv / proj). Kernel [I, O]."""

    def __init__(self, in_ch: int, out_ch: int, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.dtype = dtype
        self.kernel = nnx.Param(_uniform(rngs, (in_ch, out_ch), in_ch, param_dtype))
        self.bias = nnx.Param(jnp.zeros((out_ch,), param_dtype))

    def __call__(self, x):
        y = matmul_last(x, self.kernel[...], self.dtype)
        return (y + self.bias[...].astype(y.dtype)).astype(self.dtype)


class RMSNormC(nnx.Module):
    """Wan's RMS_norm over channels: x / max(||x||_2, 1e-12) * sqrt(C) * gamma, computed in f32, no bias.

    (This is an L2 normalisation, not the mean-square RMSNorm of omnijax.layers.norms: the clamp is on the norm,
    and sqrt(C) restores unit RMS.) The gamma is stored in f32.
    """

    def __init__(self, dim: int, *, dtype=jnp.float32):
        self.dim, self.dtype = dim, dtype
        self.scale = nnx.Param(jnp.ones((dim,), F32))

    def __call__(self, x):
        xf = x.astype(F32)
        norm = jnp.sqrt(jnp.sum(jnp.square(xf), axis=-1, keepdims=True))
        y = xf / jnp.maximum(norm, 1e-12) * (self.dim ** 0.5) * self.scale[...].astype(F32)
        return y.astype(self.dtype)


class ResBlock(nnx.Module):
    """RMS -> SiLU -> CausalConv3x3x3 -> RMS -> SiLU -> CausalConv3x3x3, plus a (1x1x1 when in != out) shortcut."""

    def __init__(self, in_ch: int, out_ch: int, *, dtype, param_dtype, rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.norm1 = RMSNormC(in_ch, dtype=dtype)
        self.conv1 = CausalConv3d(in_ch, out_ch, **kw)
        self.norm2 = RMSNormC(out_ch, dtype=dtype)
        self.conv2 = CausalConv3d(out_ch, out_ch, **kw)
        self.conv_shortcut = CausalConv3d(in_ch, out_ch, (1, 1, 1), **kw) if in_ch != out_ch else None

    def __call__(self, x, cache=None):
        c1, c2 = cache if cache is not None else (None, None)
        h = self.conv_shortcut.valid(x) if self.conv_shortcut is not None else x
        y, c1 = self.conv1(jax.nn.silu(self.norm1(x)), c1)
        y, c2 = self.conv2(jax.nn.silu(self.norm2(y)), c2)  # Dropout(0) in the reference: nothing to do
        return (y + h.astype(y.dtype)).astype(y.dtype), (c1, c2)


class AttentionBlock(nnx.Module):
    """Single-head self-attention over the H*W positions of each frame (no temporal mixing), plus the residual.

    RMS(gamma) -> 1x1 conv C -> 3C (q, k, v are channel blocks [0:C], [C:2C], [2C:3C]) -> softmax(qk^T/sqrt(C)) v
    -> 1x1 conv C -> C.
    """

    def __init__(self, dim: int, *, dtype, param_dtype, rngs, attention_backend: str = "xla"):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.norm = RMSNormC(dim, dtype=dtype)
        self.to_qkv = PointConv(dim, 3 * dim, **kw)
        self.proj = PointConv(dim, dim, **kw)
        self.attention_backend = attention_backend

    def __call__(self, x, cache=None):
        b, t, h, w, c = x.shape
        qkv = self.to_qkv(self.norm(x)).reshape(b * t, h * w, 1, 3 * c)
        q, k, v = jnp.split(qkv, 3, axis=-1)
        y = attention(q, k, v, backend=self.attention_backend).reshape(b, t, h, w, c)
        return (self.proj(y) + x).astype(x.dtype), None


class Resample(nnx.Module):
    """Spatial (and temporal) down- or up-sampling, with Wan's first-frame special cases.

    Modes (C = channels in):
      down2d: pad right/bottom by 1, Conv2d 3x3 stride 2, C -> C.
      down3d: down2d on every frame, then `time_conv` (kernel (3,1,1), stride 2, no padding, C -> C) over the
              frame sequence starting at frame 0; frame 0 itself is passed through: T = 2k+1 -> k+1.
      up2d:   nearest 2x, Conv2d 3x3 pad 1, C -> C/2.
      up3d:   frame 0 passes through untouched; frames 1.. go through `time_conv` (causal, kernel (3,1,1),
              C -> 2C, frame 0 NOT in its context), each yielding 2 frames (channel halves); T = n -> 1 + 2(n-1).
              Then up2d on every frame.
    """

    MODES = ("down2d", "down3d", "up2d", "up3d")

    def __init__(self, dim: int, mode: str, *, dtype, param_dtype, rngs):
        if mode not in self.MODES:
            raise ValueError(f"unknown resample mode {mode!r}; choose one of {self.MODES}")
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.mode, self.dim = mode, dim
        if mode.startswith("down"):
            self.conv = Conv2d(dim, dim, 3, stride=2, padding=((0, 1), (0, 1)), **kw)
        else:
            self.conv = Conv2d(dim, dim // 2, 3, **kw)
        if mode == "down3d":
            self.time_conv = CausalConv3d(dim, dim, (3, 1, 1), stride_t=2, **kw)
        elif mode == "up3d":
            self.time_conv = CausalConv3d(dim, 2 * dim, (3, 1, 1), **kw)
        else:
            self.time_conv = None

    def _up2d(self, x):
        x = jnp.repeat(jnp.repeat(x, 2, axis=2), 2, axis=3)  # nearest(-exact) at an exact factor of 2
        return self.conv(x)

    def _double_frames(self, x):
        """time_conv on x (with its causal context), each frame becoming two: channel half 0 then half 1."""
        b, t, h, w, c = x.shape
        y = self.time_conv.valid(x)
        t = y.shape[1]
        return y.reshape(b, t, h, w, 2, self.dim).transpose(0, 1, 4, 2, 3, 5).reshape(b, 2 * t, h, w, self.dim)

    def __call__(self, x, cache=None):
        if self.mode == "down2d":
            return self.conv(x), None
        if self.mode == "up2d":
            return self._up2d(x), None
        if self.mode == "down3d":
            s = self.conv(x)
            if cache is None:  # clip start: frame 0 passes through, the stride-2 conv runs from frame 0
                y = jnp.concatenate([s[:, :1], self.time_conv.valid(s)], axis=1)
            else:
                y = self.time_conv.valid(jnp.concatenate([cache.astype(s.dtype), s], axis=1))
            return y, s[:, -1:]
        # up3d
        if cache is None:
            first, rest = x[:, :1], x[:, 1:]
            cache = jnp.zeros((x.shape[0], CACHE_T, *x.shape[2:]), x.dtype)
        else:
            first, rest = None, x
        ctx = jnp.concatenate([cache.astype(x.dtype), rest], axis=1)
        y = self._double_frames(ctx)
        if first is not None:
            y = jnp.concatenate([first.astype(y.dtype), y], axis=1)
        return self._up2d(y), ctx[:, -CACHE_T:]
