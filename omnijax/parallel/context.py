"""Context-parallel (sequence-parallel) self-attention over the mesh's "context" axis.

Axis letters: B batch, L query tokens, S key tokens (S = L for self-attention), N heads, K head dim,
c the size of the context axis.

A long token sequence (the doubled branch sequence of EasyOmnimatte: 65k tokens at 81x480x832) is split
over c devices on L. Attention needs every key for every query, so one of two exchanges runs inside
`shard_map`:

  ulysses: all-to-all from sequence shards to head shards, [B, L/c, N, K] -> [B, L, N/c, K], full local
           attention through omnijax.layers.attention (the fused cuDNN kernel on GPU), and back. Four
           all-to-alls per call (q, k, v in, the output back); needs N divisible by c.
  ring:    k/v blocks travel around the ring (c-1 ppermutes) while each device folds them into an online
           softmax (f32 running max and sum) for its own query block. Any head count; plain XLA math per
           block (it needs the softmax statistics, which the fused kernel does not return).

`context_attention_fn(mesh)` returns a drop-in `attn_fn(q, k, v)` for WanDiT's self-attention hook; it
takes global (jit-level) arrays and returns the same result as plain attention.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import partial

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from omnijax.layers.attention import attention

F32 = jnp.float32
METHODS = ("auto", "ulysses", "ring")


class ContextParallelError(ValueError):
    """The sequence, heads or batch cannot be split over the mesh as asked."""


def _ulysses_local(q, k, v, *, axis: str, backend: str, scale: float | None):
    """Per-device body: q/k/v [B, L/c, N, K] -> [B, L/c, N, K]."""
    # split_axis=2 hands each peer a slice of heads; concat_axis=1 gathers the whole sequence for them.
    to_heads = partial(jax.lax.all_to_all, axis_name=axis, split_axis=2, concat_axis=1, tiled=True)
    out = attention(to_heads(q), to_heads(k), to_heads(v), backend=backend, scale=scale)
    return jax.lax.all_to_all(out, axis, split_axis=1, concat_axis=2, tiled=True)


def _ring_local(q, k, v, *, axis: str, size: int, scale: float | None):
    """Per-device body of ring attention: q/k/v [B, L/c, N, K] -> [B, L/c, N, K].

    Unmasked attention does not care in which order the key blocks arrive, so each device starts with its
    own block and receives its left neighbour's at every step.
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    qs = q.astype(F32) * scale
    b, lq, n, _ = q.shape
    m = jnp.full((b, n, lq), -jnp.inf, F32)  # running max of the logits
    l = jnp.zeros((b, n, lq), F32)  # running sum of exp(logit - m)
    o = jnp.zeros((b, n, lq, v.shape[-1]), F32)  # running unnormalised output
    perm = [(i, (i + 1) % size) for i in range(size)]

    # Rematerialised so the backward pass keeps only the running (m, l, o) per block, not its
    # [L/c, L/c] probabilities: backward memory stays O(L/c) per device instead of O(L^2/c).
    @jax.checkpoint
    def fold(m, l, o, k, v):
        s = jnp.einsum("blnk,bsnk->bnls", qs, k.astype(F32))
        m_new = jnp.maximum(m, s.max(-1))
        p = jnp.exp(s - m_new[..., None])
        corr = jnp.exp(m - m_new)
        return m_new, l * corr + p.sum(-1), o * corr[..., None] + jnp.einsum("bnls,bsnk->bnlk", p, v.astype(F32))

    for step in range(size):
        m, l, o = fold(m, l, o, k, v)
        if step + 1 < size:
            k, v = jax.lax.ppermute((k, v), axis, perm)
    return (o / l[..., None]).transpose(0, 2, 1, 3).astype(q.dtype)


def _batch_axes(mesh: Mesh, batch: int, axes: Sequence[str]) -> tuple[str, ...]:
    """The prefix of `axes` (size > 1) whose product divides the batch; the batch stays whole on the rest."""
    keep, size = [], 1
    for a in axes:
        if mesh.shape[a] > 1 and batch % (size * mesh.shape[a]) == 0:
            keep.append(a)
            size *= mesh.shape[a]
    return tuple(keep)


def context_attention(q, k, v, *, mesh: Mesh, method: str = "auto", axis: str = "context",
                      batch_axes: Sequence[str] = ("data", "fsdp"), head_axis: str | None = "tensor",
                      backend: str = "auto", scale: float | None = None):
    """Self-attention with the token axis split over `axis`.

    Args:
      q: [B, L, N, K], k, v: [B, S, N, K] global arrays (S = L for self-attention; the branch model's type-B
        alpha queries see S = 2L keys).
      mesh: the device mesh (or the abstract mesh set by jax.set_mesh); `axis` of size c splits L and S.
      method: "ulysses", "ring", or "auto" (ulysses when the local heads divide by c, else ring).
      batch_axes: mesh axes the batch is split over (those not dividing B are left out).
      head_axis: mesh axis the heads are split over when its size is > 1 (tensor parallelism).
      backend: local attention backend for ulysses (see omnijax.layers.attention).
      scale: logit scale, default 1/sqrt(K).
    Returns:
      [B, L, N, K] in q's dtype.
    """
    if method not in METHODS:
        raise ContextParallelError(f"unknown context-parallel method {method!r}; choose one of {METHODS}")
    if not (q.shape[0] == k.shape[0] and q.shape[2:] == k.shape[2:] and k.shape[:3] == v.shape[:3]):
        raise ContextParallelError(f"context-parallel attention: q {q.shape}, k {k.shape}, v {v.shape} must share "
                                   f"B, N and K, and k/v their length S")
    b, seq, heads, _ = q.shape
    c = mesh.shape[axis]
    if c == 1:
        return attention(q, k, v, backend=backend, scale=scale)
    for name, n in (("query", seq), ("key", k.shape[1])):
        if n % c:
            raise ContextParallelError(f"{name} length {n} does not divide by the {axis!r} axis size {c}")
    hax = head_axis if head_axis is not None and mesh.shape.get(head_axis, 1) > 1 else None
    local_heads = heads // (mesh.shape[hax] if hax else 1)
    if hax and heads % mesh.shape[hax]:
        raise ContextParallelError(f"{heads} heads do not divide by the {hax!r} axis size {mesh.shape[hax]}")
    if method == "auto":
        method = "ulysses" if local_heads % c == 0 else "ring"
    if method == "ulysses" and local_heads % c:
        raise ContextParallelError(f"ulysses needs the {local_heads} local heads to divide by the {axis!r} axis "
                                   f"size {c}; use method='ring'")
    bax = _batch_axes(mesh, b, batch_axes)
    spec = P(bax or None, axis, hax, None)
    if method == "ulysses":
        body = partial(_ulysses_local, axis=axis, backend=backend, scale=scale)
    else:
        body = partial(_ring_local, axis=axis, size=c, scale=scale)
    fn = jax.shard_map(body, mesh=mesh, in_specs=(spec, spec, spec), out_specs=spec, check_vma=False)
    return fn(q, k, v)


def context_attention_fn(mesh: Mesh, **kwargs):
    """`attn_fn(q, k, v)` for WanDiT.run_blocks: context-parallel attention on `mesh` (kwargs as above)."""
    return partial(context_attention, mesh=mesh, **kwargs)
