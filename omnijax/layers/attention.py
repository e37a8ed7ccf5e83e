"""Scaled dot-product attention with one backend dispatch.

Axis letters: B batch, L query tokens, S key tokens, N heads, K head dim.
All entry points take q [B, L, N, K], k and v [B, S, N, K] and return [B, L, N, K].

Backends:
  "cudnn": the fused cuDNN flash kernel (GPU, bf16/fp16 only). Mandatory for long sequences on GPU:
           XLA's plain attention materialises L×S scores (see shared/gpu/NOTES.md). Its gradient path rejects
           odd sequence lengths (Wan's 257 CLIP tokens; measured in benchmarks/bench_attention.py), so odd
           lengths are padded to a multiple of 8 and the padding masked through the kernel's sequence lengths.
  "fa3":   Hopper GPUs: JAX's FlashAttention-3 kernel with the keys padded exactly to its tile
           (omnijax/layers/tile_attention.py), faster than cuDNN at Wan's 32,760 tokens. Gradients are cuDNN's
           (a custom VJP), so only calls whose inputs carry no gradient (inference, a frozen stream) run the
           FA3 kernel. Head dims other than 64 and 128 (the VAEs' 384/512, CLIP's 80) go to cuDNN (the kernel's
           shared-memory tiles do not fit them), and so do key sets under FA3_MIN_KEYS (cross-attention,
           33-frame clips), where FA3 measured slower, and grouped heads.
  "xla":   jax.nn.dot_product_attention's XLA path (any device, any dtype); f32 softmax.
  "splash": seam for the TPU splash kernel (built with the branch masks).
  "auto":  for half-precision inputs on a GPU, fa3 when the process has one Hopper GPU, else cudnn; xla otherwise.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from omnijax.layers.tile_attention import fa3_supported, tile_padded_attention, with_reference_gradient

BACKENDS = ("auto", "cudnn", "fa3", "xla", "splash")
FA3_HEAD_DIMS = (64, 128)
# Measured (docs/benchmarks.md): FA3 faster at 32,760 keys, slower at 14,040 (2.33 vs 2.24 ms) and on the
# cross-attention's 512 / 257; the crossover in between is not measured.
FA3_MIN_KEYS = 16384


class AttentionBackendError(RuntimeError):
    """The requested attention backend cannot run here."""


def resolve_backend(backend: str, dtype) -> str:
    """Returns the concrete backend for `backend` on the default device and the given dtype."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; choose one of {BACKENDS}")
    platform = jax.default_backend()
    half = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
    if backend == "auto":
        if platform != "gpu" or not half:
            return "xla"
        # The Pallas kernel has no SPMD partitioning rule (sharded inputs would be gathered whole onto every
        # device), so with several devices "auto" keeps cuDNN; ask for "fa3" where the inputs are unsharded.
        return "fa3" if fa3_supported() and jax.device_count() == 1 else "cudnn"
    if backend in ("cudnn", "fa3"):
        if platform != "gpu":
            raise AttentionBackendError(
                f"attention backend {backend!r} needs a GPU; the default device is {platform!r}")
        if not half:
            raise AttentionBackendError(f"attention backend {backend!r} needs bf16/fp16 inputs, got {jnp.dtype(dtype)}")
    if backend == "fa3" and not fa3_supported():
        raise AttentionBackendError("attention backend 'fa3' needs a Hopper GPU (compute capability 9.x) and "
                                    "jax.experimental.pallas.ops.gpu.attention_mgpu")
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
    if impl == "fa3" and q.shape[-1] in FA3_HEAD_DIMS and k.shape[1] >= FA3_MIN_KEYS and k.shape[2] == q.shape[2]:
        return kernel_with_cudnn_gradient(q, k, v, scale=scale, kernel_attention=tile_padded_attention)
    if impl in ("cudnn", "fa3"):
        return padded_attention(q, k, v, scale=scale, implementation="cudnn")
    return jax.nn.dot_product_attention(q, k, v, scale=scale, implementation=impl)


def kernel_with_cudnn_gradient(q, k, v, *, scale, kernel_attention, reference_implementation: str = "cudnn"):
    """`kernel_attention(q, k, v, scale=)` for the value, `padded_attention`'s gradient (cuDNN's) for training.
    `reference_implementation` exists for the CPU tests ("xla")."""
    reference = functools.partial(padded_attention, scale=scale, implementation=reference_implementation)
    return with_reference_gradient(functools.partial(kernel_attention, scale=scale), reference)(q, k, v)


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
