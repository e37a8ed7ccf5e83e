"""cuDNN fused attention on the shapes the Wan DiT and the experts use: which (query, key) lengths its training
(gradient) path accepts, and whether padding the token count to a multiple of 128 (padded keys masked through
`key_value_seq_lengths`) is faster than the odd length.

  python benchmarks/bench_attention.py             # GPU, about a minute
  python benchmarks/bench_attention.py --variants  # GPU: exact formulations of the 32,760-token forward, timed
Prints one JSON object and writes it to $OUT/bench_attention.json when $OUT is set.
"""

from __future__ import annotations

import inspect
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from benchmarks.common import emit, time_jax  # noqa: E402

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
        "diag_pad_keys_unmasked(inexact)": lambda q, k, v: _attn(q, padq(k, up), padq(v, up)),
        "diag_pad_all_unmasked(inexact)": lambda q, k, v: _attn(padq(q, up), padq(k, up), padq(v, up))[:, :n],
    }
    ref = jax.jit(variants["plain"])(q, k, v).astype(jnp.float32)
    out = {"tokens": n, "padded_to": up}
    for name, fn in variants.items():
        f = jax.jit(fn)
        try:
            diff = float(jnp.max(jnp.abs(f(q, k, v).astype(jnp.float32) - ref)))
            out[name] = {"fwd_ms": round(time_jax(f, q, k, v, n=20) * 1e3, 3), "max_abs_diff_vs_plain": diff}
        except Exception as e:  # a kernel that rejects the shape
            out[name] = f"{type(e).__name__}: {str(e)[:200]}"
    return out


def main():
    if "--variants" in sys.argv:
        emit("bench_attention_variants", {"device": jax.devices()[0].device_kind, "jax": jax.__version__,
                                          "variants": [forward_variants(32760), forward_variants(14040, 14080)]})
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
