"""Scaled dot-product attention with one backend dispatch.

Axis letters: B batch, L query tokens, S key tokens, N heads, K head dim.
All entry points take q [B, L, N, K], k and v [B, S, N, K] and return [B, L, N, K].

Backends:
  "cudnn": the fused cuDNN flash kernel (GPU, bf16/fp16 only). Mandatory for long sequences on GPU:
           XLA's plain attention materialises L×S scores (see shared/gpu/NOTES.md).
  "xla":   jax.nn.dot_product_attention's XLA path (any device, any dtype); f32 softmax.
  "splash": seam for the TPU splash kernel (built with the branch masks).
  "auto":  cudnn on GPU for half-precision inputs, xla otherwise.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

BACKENDS = ("auto", "cudnn", "xla", "splash")


class AttentionBackendError(RuntimeError):
    """The requested attention backend cannot run here."""


def resolve_backend(backend: str, dtype) -> str:
    """Returns the concrete backend for `backend` on the default device and the given dtype."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; choose one of {BACKENDS}")
    platform = jax.default_backend()
    half = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
    if backend == "auto":
        return "cudnn" if platform == "gpu" and half else "xla"
    if backend == "cudnn":
        if platform != "gpu":
            raise AttentionBackendError(f"attention backend 'cudnn' needs a GPU; the default device is {platform!r}")
        if not half:
            raise AttentionBackendError(f"attention backend 'cudnn' needs bf16/fp16 inputs, got {jnp.dtype(dtype)}")
    if backend == "splash" and platform != "tpu":
        raise AttentionBackendError(
            f"attention backend 'splash' is the TPU kernel; the default device is {platform!r}")
    return backend


def attention(q, k, v, *, backend: str = "auto", scale: float | None = None):
    """Full (unmasked, bidirectional) attention.

    Args:
      q: [B, L, N, K]; k, v: [B, S, N, K].
      backend: one of BACKENDS.
      scale: logit scale, default 1/sqrt(K).
    Returns:
      [B, L, N, K] in q's dtype.
    """
    impl = resolve_backend(backend, q.dtype)
    if impl == "splash":
        raise AttentionBackendError(
            "the splash backend is reached through the branch-mask attention of omnijax.omnimatte")
    return jax.nn.dot_product_attention(q, k, v, scale=scale, implementation=impl)
