"""cuDNN fused attention on the shapes the Wan DiT and the experts use: which (query, key) lengths its training
(gradient) path accepts, and whether padding the token count to a multiple of 128 (padded keys masked through
`key_value_seq_lengths`) is faster than the odd length.

  python benchmarks/bench_attention.py             # GPU, about a minute
  python benchmarks/bench_attention.py --variants  # GPU: exact formulations of the 32,760-token forward, timed
  python benchmarks/bench_attention.py --profile   # GPU: device kernels of the cuDNN call and the 'fa3' backend
  python benchmarks/bench_attention.py --check     # GPU: the 'fa3' correction where it is large, vs f32
Prints one JSON object and writes it to $OUT/bench_attention.json when $OUT is set.
"""

from __future__ import annotations

import inspect
import os
import sys
from collections.abc import Callable
from functools import partial

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from benchmarks.common import emit, time_jax  # noqa: E402
from omnijax.layers.attention import attention  # noqa: E402
from omnijax.layers.tile_attention import fa3_kernel, tile_padded_attention  # noqa: E402

HEADS, DIM = 12, 128  # Wan 1.3B


def _qkv(lq, lk, key=0):
    ks = jax.random.split(jax.random.key(key), 3)
    q = jax.random.normal(ks[0], (1, lq, HEADS, DIM), jnp.bfloat16)
    k = jax.random.normal(ks[1], (1, lk, HEADS, DIM), jnp.bfloat16)
    v = jax.random.normal(ks[2], (1, lk, HEADS, DIM), jnp.bfloat16)
    return q, k, v


def _attn(q, k, v, kv_len=None, q_len=None):
    lens = {}
    if kv_len is not None:
        lens = dict(key_value_seq_lengths=jnp.full((q.shape[0],), kv_len, jnp.int32),
                    query_seq_lengths=jnp.full((q.shape[0],), q_len, jnp.int32))
    return jax.nn.dot_product_attention(q, k, v, implementation="cudnn", **lens)


def _grad_fn(kv_len=None, q_len=None):
    def loss(q, k, v):
        return jnp.sum(_attn(q, k, v, kv_len, q_len).astype(jnp.float32))
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))


def accepts(lq, lk):
    """Does the gradient path compile and run for these lengths (no mask, no padding)?"""
    try:
        jax.block_until_ready(_grad_fn()(*_qkv(lq, lk)))
        return "ok"
    except Exception as e:  # the unsupported shapes raise NotImplementedError at trace time
        return f"{type(e).__name__}: {str(e)[:300]}"


def padded_vs_plain(n, pad_to=128):
    """Forward and forward+backward time of self-attention at n tokens, plain vs padded to a multiple."""
    p = -(-n // pad_to) * pad_to
    q, k, v = _qkv(n, n)
    pad = lambda a: jnp.pad(a, ((0, 0), (0, p - n), (0, 0), (0, 0)))
    qp, kp, vp = pad(q), pad(k), pad(v)
    out = {"tokens": n, "padded": p}
    fwd = jax.jit(_attn)
    fwd_p = jax.jit(lambda a, b, c: _attn(a, b, c, n, n))
    ref = fwd(q, k, v).astype(jnp.float32)
    out["max_abs_diff_padded_vs_plain"] = float(jnp.max(jnp.abs(fwd_p(qp, kp, vp)[:, :n].astype(jnp.float32) - ref)))
    out["fwd_ms_plain"] = time_jax(fwd, q, k, v) * 1e3
    out["fwd_ms_padded"] = time_jax(fwd_p, qp, kp, vp) * 1e3
    try:
        out["fwd_bwd_ms_plain"] = time_jax(_grad_fn(), q, k, v) * 1e3
    except Exception as e:
        out["fwd_bwd_ms_plain"] = f"{type(e).__name__}: {str(e)[:200]}"
    out["fwd_bwd_ms_padded"] = time_jax(_grad_fn(n, n), qp, kp, vp) * 1e3
    return out


# --- Exact attention over a key count the fast kernels do not tile (tried for issue 19, 2026-11-29: no faster).
# Attention over all S keys is the merge of attention over the first S - S mod block keys (a kernel's aligned
# path) and over the few remaining, each weighted by its log-sum-exp of the scaled logits:
#   out = (exp(lse_a - m) out_a + exp(lse_b - m) out_b) / (exp(lse_a - m) + exp(lse_b - m)),  m = max(lse_a, lse_b)
# (the softmax over all keys written as two sums). tests/benchmarks/test_attention_split.py checks the merge on
# the CPU; the aligned part here is JAX's Pallas Mosaic-GPU FlashAttention-3 kernel, which returns its lse.

def dense_partial(q, k, v, scale: float):
    """Softmax attention of q [B, L, H, D] over k, v [B, S, H, D] in f32: (out [B, L, H, D], lse [B, L, H])."""
    s = jnp.einsum("blhd,bshd->blhs", q.astype(jnp.float32), k.astype(jnp.float32)) * scale
    m = jnp.max(s, axis=-1)
    p = jnp.exp(s - m[..., None])
    den = jnp.sum(p, axis=-1)
    out = jnp.einsum("blhs,bshd->blhd", p, v.astype(jnp.float32)) / den[..., None]
    return out, m + jnp.log(den)


def merge_partials(out_a, lse_a, out_b, lse_b):
    """Attention over the union of two key sets from each set's (out [B, L, H, D], lse [B, L, H])."""
    m = jnp.maximum(lse_a, lse_b)
    wa, wb = jnp.exp(lse_a - m)[..., None], jnp.exp(lse_b - m)[..., None]
    return (out_a.astype(jnp.float32) * wa + out_b.astype(jnp.float32) * wb) / (wa + wb)


def split_key_attention(q, k, v, *, aligned: Callable, block: int, scale: float | None = None):
    """Softmax attention of q [B, L, H, D] over k, v [B, S, H, D], the first S - S mod `block` keys through
    `aligned(q, k, v, scale) -> (out, lse)` and the rest through `dense_partial`. Returns q's dtype."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    cut = k.shape[1] // block * block
    if cut == 0:
        return dense_partial(q, k, v, scale)[0].astype(q.dtype)
    out_a, lse_a = aligned(q, k[:, :cut], v[:, :cut], scale)
    if cut == k.shape[1]:
        return out_a.astype(q.dtype)
    out_b, lse_b = dense_partial(q, k[:, cut:], v[:, cut:], scale)
    return merge_partials(out_a, lse_a, out_b, lse_b).astype(q.dtype)


def mgpu_partial(q, k, v, scale: float, *, block_kv: int = 128):
    """(out, lse) of JAX's Pallas Mosaic-GPU FlashAttention-3 kernel (Hopper GPUs) through
    omnijax.layers.tile_attention.fa3_kernel: q scaled in f32, all cast to float16. Key count: a multiple of
    block_kv."""
    f16 = jnp.float16
    return fa3_kernel((q.astype(jnp.float32) * scale).astype(f16), k.astype(f16), v.astype(f16), block_kv=block_kv)


def mgpu_attention(q, k, v, *, scale: float | None = None, block_kv: int = 128):
    """Exact attention through the FA3 kernel for any key count (see the module doc)."""
    return split_key_attention(q, k, v, aligned=lambda *a: mgpu_partial(*a, block_kv=block_kv), block=block_kv,
                               scale=scale)


def _mgpu(q, k, v, block_kv=128):
    return mgpu_attention(q, k, v, block_kv=block_kv)


def _fa3_kernel_only(q, k, v, up):
    """Diagnostic: the FA3 kernel's own time on the keys padded (unmasked, so inexact) with the casts hoisted."""
    cast = lambda a: jnp.pad(a.astype(jnp.float16), ((0, 0), (0, up - a.shape[1]), (0, 0), (0, 0)))
    q16, k16, v16 = jax.block_until_ready((cast(q), cast(k), cast(v)))
    return lambda *_: fa3_kernel(q16, k16, v16)[0][:, :q.shape[1]]


def fa3_gradient_check(n=32760):
    """The 'fa3' backend's gradient is cuDNN's: jax.grad through both backends, max |difference|."""
    q, k, v = _qkv(n, n)
    w = jax.random.normal(jax.random.key(3), q.shape, jnp.bfloat16)
    grads = {b: jax.jit(jax.grad(lambda q, k, v, b=b: jnp.sum(attention(q, k, v, backend=b) * w).astype(jnp.float32),
                                 argnums=(0, 1, 2)))(q, k, v) for b in ("cudnn", "fa3")}
    return {"max_abs_grad_diff_fa3_vs_cudnn": max(float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32))))
                                                  for a, b in zip(grads["cudnn"], grads["fa3"]))}


def forward_variants(n=32760, up=32768):
    """Exact reformulations of the n-token self-attention forward (inference), each checked against the plain call.

    cuDNN picks a slower path when the length is not a multiple of 128 (shared/gpu/NOTES.md: 12.1 ms at 32,760
    vs 10.5 ms at 32,768). Padding only the queries leaves the keys, and so every softmax, unchanged: the extra
    query rows are computed and dropped. Splitting the queries into a 128-multiple part and a remainder is exact
    for the same reason. Timings of the inexact all-padded-unmasked call locate the slow path (query or key side).
    """
    q, k, v = _qkv(n, n)
    padq = lambda a, m: jnp.pad(a, ((0, 0), (0, m - a.shape[1]), (0, 0), (0, 0)))
    cut = (n // 128) * 128
    variants = {
        "plain": lambda q, k, v: _attn(q, k, v),
        "pad_queries": lambda q, k, v: _attn(padq(q, up), k, v)[:, :n],
        "split_queries_128": lambda q, k, v: jnp.concatenate(
            [_attn(q[:, :cut], k, v), _attn(padq(q[:, cut:], 128), k, v)[:, :n - cut]], axis=1),
        "pad_all_masked": lambda q, k, v: _attn(padq(q, up), padq(k, up), padq(v, up), n, n)[:, :n],
        "mgpu_split_keys (FA3 fp16 on 128-multiple keys + dense remainder, merged by lse)": _mgpu,
        "mgpu_split_keys block_kv 64": lambda q, k, v: _mgpu(q, k, v, 64),
        "fa3_tile_padded (the 'fa3' backend: keys padded with copies of one key, lse-corrected)":
            lambda q, k, v: tile_padded_attention(q, k, v),
        "fa3_tile_padded steps 3": lambda q, k, v: tile_padded_attention(q, k, v, kernel=partial(fa3_kernel, steps=3)),
        "fa3_tile_padded steps 4": lambda q, k, v: tile_padded_attention(q, k, v, kernel=partial(fa3_kernel, steps=4)),
        "fa3_tile_padded block_kv 64": lambda q, k, v: tile_padded_attention(
            q, k, v, kernel=partial(fa3_kernel, block_kv=64), block_kv=64),
        "diag_fa3_kernel_only (float16 inputs ready, keys already whole tiles; inexact)":
            lambda q, k, v: _fa3_kernel_only(q, k, v, up),
        "diag_pad_keys_unmasked(inexact)": lambda q, k, v: _attn(q, padq(k, up), padq(v, up)),
        "diag_pad_all_unmasked(inexact)": lambda q, k, v: _attn(padq(q, up), padq(k, up), padq(v, up))[:, :n],
    }
    ref = jax.jit(variants["plain"])(q, k, v).astype(jnp.float32)
    out = {"tokens": n, "padded_to": up}
    for name, fn in variants.items():
        if name.startswith("diag_fa3_kernel_only"):
            fn = fn(q, k, v)
        f = jax.jit(fn)
        try:
            diff = float(jnp.max(jnp.abs(f(q, k, v).astype(jnp.float32) - ref)))
            out[name] = {"fwd_ms": round(time_jax(f, q, k, v, n=20) * 1e3, 3), "max_abs_diff_vs_plain": diff}
        except Exception as e:  # a kernel that rejects the shape
            out[name] = f"{type(e).__name__}: {str(e)[:200]}"
    return out


def profile(n=32760):
    """Device kernels, by name, of the Wan 1.3B attention calls at 81x480x832: self-attention through cuDNN and
    the 'fa3' backend, text cross-attention (512 keys) and image cross-attention (257 CLIP keys) padded and
    masked as the gradient path needs, or plain."""
    import tempfile

    from benchmarks.common import profile_kernels
    from omnijax.layers.attention import padded_attention

    calls = {
        "self_cudnn": ((n, n), lambda q, k, v: _attn(q, k, v)),
        "self_fa3_tile_padded": ((n, n), lambda q, k, v: tile_padded_attention(q, k, v)),
        "text_cross_cudnn_512": ((n, 512), lambda q, k, v: _attn(q, k, v)),
        "image_cross_cudnn_257_padded_masked": ((n, 257), lambda q, k, v: padded_attention(q, k, v)),
        "image_cross_cudnn_257_plain": ((n, 257), lambda q, k, v: _attn(q, k, v)),
    }
    out = {}
    for name, ((lq, lk), fn) in calls.items():
        q, k, v = _qkv(lq, lk)
        f = jax.jit(fn)
        try:
            out[name] = profile_kernels(lambda f=f, q=q, k=k, v=v: f(q, k, v), 5,
                                        tempfile.mkdtemp(prefix=f"att-{name}-"), top=12)
        except Exception as e:  # a kernel that rejects the shape
            out[name] = f"{type(e).__name__}: {str(e)[:200]}"
    return out


def padding_check(lq=2048, heads=4):
    """The `fa3` correction on the real kernel where it matters: P = 127 padded keys (S = 2,049) or 8 (32,760),
    the copied (last) key every query's best match. Errors relative to an f32 dense reference; "uncorrected" is
    what the padded keys alone would do to the result (dense, f32), i.e. what the correction has to remove."""
    out = {}
    for lk in (2049, 32760):
        ks = jax.random.split(jax.random.key(lk), 3)
        q = jax.random.normal(ks[0], (1, lq, heads, DIM), jnp.float32)
        k = jax.random.normal(ks[1], (1, lk, heads, DIM), jnp.float32)
        v = jax.random.normal(ks[2], (1, lk, heads, DIM), jnp.float32)
        k = k.at[:, -1].set(0.3 * q.mean(axis=1))
        q, k, v = (a.astype(jnp.bfloat16) for a in (q, k, v))
        scale = DIM ** -0.5
        ref = dense_partial(q, k, v, scale)[0]
        pad = -lk % 128
        k_pad = jnp.concatenate([k, jnp.broadcast_to(k[:, -1:], (1, pad, heads, DIM))], axis=1)
        v_pad = jnp.concatenate([v, jnp.zeros((1, pad, heads, DIM), v.dtype)], axis=1)
        uncorrected = dense_partial(q, k_pad, v_pad, scale)[0]
        got = jax.jit(tile_padded_attention)(q, k, v).astype(jnp.float32)
        rel = lambda a, ref=ref: float(jnp.max(jnp.abs(a - ref)) / jnp.max(jnp.abs(ref)))
        out[f"keys_{lk}"] = {"padded_keys": pad, "fa3_rel_err": rel(got), "uncorrected_rel_err": rel(uncorrected)}
    return out


def main():
    if "--check" in sys.argv:
        emit("bench_attention_check", {"device": jax.devices()[0].device_kind, "jax": jax.__version__,
                                       "padding_check": padding_check()})
        return
    if "--profile" in sys.argv:
        emit("bench_attention_profile", {"device": jax.devices()[0].device_kind, "jax": jax.__version__,
                                         "profile": profile()})
        return
    if "--variants" in sys.argv:
        emit("bench_attention_variants", {"device": jax.devices()[0].device_kind, "jax": jax.__version__,
                                          "variants": [forward_variants(32760), forward_variants(14040, 14080)],
                                          "gradient": fa3_gradient_check()})
        return
    from jax._src.cudnn import fused_attention_stablehlo as fa
    res = {"device": jax.devices()[0].device_kind, "jax": jax.__version__,
           "check_source": inspect.getsource(fa.check_is_flash_attention)[-1500:]}
    shapes = [(32760, 257), (32760, 512), (32760, 32760), (14040, 257), (14040, 14040), (32768, 256),
              (32768, 32768), (32760, 65520)]
    res["grad_accepts"] = {f"{lq}x{lk}": accepts(lq, lk) for lq, lk in shapes}
    res["padding"] = [padded_vs_plain(n) for n in (32760, 14040)]
    emit("bench_attention", res)


if __name__ == "__main__":
    main()
