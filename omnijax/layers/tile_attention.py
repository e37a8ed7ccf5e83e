"""Exact softmax attention through a kernel that only takes whole key tiles: JAX's Hopper FlashAttention-3.

Axis letters: B batch, L query tokens, S key tokens, N heads, K head dim.

Why: cuDNN's kernel reached through jax.nn is about 12 % slower at Wan's 32,760 tokens than at 32,768, and its
masked padded call is no faster than the plain one (docs/benchmarks.md, issue 19). JAX's Pallas Mosaic-GPU
FlashAttention-3 kernel (jax.experimental.pallas.ops.gpu.attention_mgpu) is as fast as cuDNN's unmasked
aligned call, but it takes float16 only, no logit scale, whole query tiles (2 x block_q) and whole key tiles
(block_kv), and has no mask. It does return each row's log-sum-exp, which is enough to pad the keys exactly:

  Pad the keys with P copies of one real key r whose values are zero. Each row's softmax denominator grows by
  P exp(s_r) and its numerator not at all (s_r: the row's scaled logit against key r), so with the kernel's
  log-sum-exp over the padded keys
      out = out_padded / (1 - P exp(s_r - lse_padded)).
  Key r is itself real, so P exp(s_r - lse_padded) <= P / (P + 1): the correction divides by at least
  1 / (P + 1), never by a difference of nearly equal numbers.

Padded query rows (zeros) are dropped. q is scaled in f32 before the cast; each head's v is multiplied by the
power of two that puts its largest magnitude in [2^13, 2^14) (exact) and its output divided back, so float16
neither overflows nor goes subnormal on a head's largest values whatever their range (entries more than 2^27
below their head's largest still do). q * scale and k must lie within float16's
range (|x| < 65504); the Wan and Flux DiTs RMS-normalise both. The result then equals plain attention up to
float16/bf16 rounding (max |diff| 2.4e-4 in bf16 at 32,760 tokens, benchmarks/bench_attention.py --variants).

`tile_padded_attention` is the formulation with the kernel as an argument (tested on the CPU with a dense
stand-in); `fa3_kernel` calls the Hopper kernel.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp

F16, F32 = jnp.float16, jnp.float32
FA3_BLOCK_Q = 64  # the kernel's two consumer warpgroups take 2 x 64 query rows per program
FA3_BLOCK_KV = 128
FA3_STEPS = 2  # key/value tiles in flight


@functools.cache
def fa3_supported() -> bool:
    """Whether the default device is a Hopper GPU (compute capability 9.x) and this JAX has the FA3 kernel."""
    dev = jax.devices()[0]
    if dev.platform != "gpu" or not str(getattr(dev, "compute_capability", "")).startswith("9."):
        return False
    try:
        from jax.experimental.pallas.ops.gpu import attention_mgpu  # noqa: F401
    except ImportError:
        return False
    return True


def fa3_kernel(q, k, v, *, block_q: int = FA3_BLOCK_Q, block_kv: int = FA3_BLOCK_KV, steps: int = FA3_STEPS):
    """The FA3 kernel on float16 q (already scaled), k, v [B, L|S, N, K]; S a multiple of block_kv.

    Returns (out [B, L, N, K] float16, lse [B, L, N] f32, natural log). Queries are padded to the kernel's tile
    and the extra rows dropped; its base-2 log-sum-exp is converted.
    """
    from jax.experimental.pallas.ops.gpu import attention_mgpu

    lq = q.shape[1]
    q = jnp.pad(q, ((0, 0), (0, -lq % (2 * block_q)), (0, 0), (0, 0)))
    config = attention_mgpu.TuningConfig(block_q=block_q, block_kv=block_kv, max_concurrent_steps=steps)
    out, (lse2,) = attention_mgpu.attention(q, k, v, config, save_residuals=True)
    return out[:, :lq], jnp.swapaxes(lse2[:, :, :lq], 1, 2) * math.log(2.0)


def tile_padded_attention(q, k, v, *, kernel: Callable = fa3_kernel, block_kv: int = FA3_BLOCK_KV,
                          block_q: int = 2 * FA3_BLOCK_Q, scale: float | None = None):
    """Softmax attention of q [B, L, N, K] over k, v [B, S, N, K] for any L and S through `kernel`.

    Args:
      kernel: (q16 scaled, k16, v16) -> (out16 [B, L, N, K], lse [B, L, N] natural log); takes S % block_kv == 0.
        k and v have q's B and N (no grouped heads).
      block_q: the queries are padded (zero rows, dropped again) to a multiple of this before the kernel, so that the
        float16 rows the kernel reads are one array made in one pass with q's producer (the RoPE), and the
        correction's logits s_r are read from those same rows in a reduction of its own. Computing s_r from the
        unpadded q gave the RoPE'd q two readers, so it was stored once more in bf16, and XLA fused s_r with the
        log-sum-exp's transpose into one slow pass (242 µs a call at 32,760 tokens on the H200, now 56 µs; q's
        RoPE, cast, pad and s_r 0.42 -> 0.24 ms, docs/benchmarks.md, session 9).
      scale: logit scale, default 1/sqrt(K).
    Returns:
      [B, L, N, K] in q's dtype.
    """
    b, lq, n, d = q.shape
    lk = k.shape[1]
    scale = d ** -0.5 if scale is None else scale
    q16 = jnp.pad((q.astype(F32) * scale).astype(F16), ((0, 0), (0, -lq % block_q), (0, 0), (0, 0)))
    k16 = k.astype(F16)
    _, top = jnp.frexp(jnp.max(jnp.abs(v), axis=(1, 3), keepdims=True).astype(F32))  # per (B, N): max |v| < 2^top
    shift = jnp.clip(14 - top, -126, 126)
    v16 = (v.astype(F32) * _power_of_two(shift)).astype(F16)
    pad = -lk % block_kv
    if pad:
        k16 = jnp.concatenate([k16, jnp.broadcast_to(k16[:, -1:], (b, pad, n, d))], axis=1)
        v16 = jnp.concatenate([v16, jnp.zeros((b, pad, n, d), F16)], axis=1)
    out, lse = kernel(q16, k16, v16)
    out = out[:, :lq].astype(F32)
    if pad:
        # s_r: each row's logit against the copied key, from the kernel's own float16 inputs; the barrier keeps
        # this reduction a pass of its own over q16 (one fused with the transpose of lse is 4x slower).
        s_r = jax.lax.optimization_barrier(
            jnp.sum(q16[:, :lq].astype(F32) * k16[:, lk - 1:lk].astype(F32), axis=-1))
        out = out * (1.0 / (1.0 - pad * jnp.exp(s_r - lse[:, :lq])))[..., None]
    return (out * _power_of_two(-shift)).astype(q.dtype)


def _power_of_two(e):
    """2.0**e as f32, exactly, for integers e in [-126, 127] (from the bits; exp2 may round)."""
    return jax.lax.bitcast_convert_type((e.astype(jnp.int32) + 127) << 23, F32)


def with_reference_gradient(fast: Callable, reference: Callable) -> Callable:
    """f(q, k, v) whose value is `fast`'s and whose derivative is `reference`'s.

    Under differentiation the forward runs `reference` too (its VJP needs its own residuals); calls none of whose
    inputs carry a gradient (inference, or a frozen stream inside a training step) take `fast`.
    """

    @jax.custom_vjp
    def f(q, k, v):
        return fast(q, k, v)

    def fwd(q, k, v):
        return jax.vjp(reference, q, k, v)

    def bwd(vjp, g):
        return vjp(g)

    f.defvjp(fwd, bwd)
    return f
