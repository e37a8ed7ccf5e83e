"""Scaled dot-product attention with one backend dispatch.

Axis letters: B batch, L query tokens, S key tokens, N heads, K head dim.
All entry points take q [B, L, N, K], k and v [B, S, N, K] and return [B, L, N, K].

Backends:
  "cudnn": the fused cuDNN flash kernel (GPU, bf16/fp16 only). Mandatory for long sequences on GPU:
           XLA's plain attention materialises L×S scores (see shared/gpu/NOTES.md). Its gradient path rejects
           odd sequence lengths (Wan's 257 CLIP tokens; measured in benchmarks/bench_attention.py), so odd
           lengths are padded to a multiple of 8 and the padding masked through the kernel's sequence lengths.
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
    if impl == "cudnn":
        return padded_attention(q, k, v, scale=scale, implementation=impl)
    return jax.nn.dot_product_attention(q, k, v, scale=scale, implementation=impl)


def padded_attention(q, k, v, *, scale: float | None = None, implementation: str = "cudnn", multiple: int = 8):
    """Attention with odd query/key lengths padded to `multiple`; padded keys are masked, padded queries dropped.

    Even lengths go straight through. Exists for cuDNN's training kernel, which raises
    NotImplementedError("Unsupported sequence length Q .., KV ..") under jax.grad for odd lengths; it takes any
    `implementation` so the padding itself is tested on the CPU with "xla".
    """
    lq, lk = q.shape[1], k.shape[1]
    if lq % 2 == 0 and lk % 2 == 0:
        return jax.nn.dot_product_attention(q, k, v, scale=scale, implementation=implementation)
    up = lambda n: -(-n // multiple) * multiple
    pad = lambda a, n: jnp.pad(a, ((0, 0), (0, n - a.shape[1]), (0, 0), (0, 0)))
    lengths = lambda n: jnp.full((q.shape[0],), n, jnp.int32)
    out = jax.nn.dot_product_attention(pad(q, up(lq)), pad(k, up(lk)), pad(v, up(lk)), scale=scale,
                                       implementation=implementation, query_seq_lengths=lengths(lq),
                                       key_value_seq_lengths=lengths(lk))
    return out[:, :lq]
