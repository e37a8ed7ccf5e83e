"""Self-attention over two token sets [X_B ; X_A] with the EasyOmnimatte masks, without a 2N x 2N mask.

Axis letters: B batch, L tokens per set, N heads, K head dim.

The sequence is the background set X_B followed by the alpha set X_A (same length L). Mask types
(shared/spec/easyomnimatte.md §2, paper fig. 6):
  "A": full attention over all 2L tokens (ablation only);
  "B": X_B queries see X_B; X_A queries see X_B and X_A (Effect Expert);
  "C": each set sees only itself (Quality Expert).
On GPU/CPU the masks are fused-attention calls on the halves: type B is attn(q_B, k_B, v_B) plus
attn(q_A, [k_B; k_A], [v_B; v_A]) (3 L^2 instead of 4 L^2), type C two calls of L^2. On TPU ("splash") the
same masks are one splash-attention call over 2L tokens with a block-sparse mask computed inside the kernel,
whose fully masked blocks are skipped (omnijax/layers/splash_branch.py).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from omnijax.layers.attention import attention, resolve_backend

MASK_TYPES = ("A", "B", "C")


def _check(mask: str):
    if mask not in MASK_TYPES:
        raise ValueError(f"unknown branch mask type {mask!r}; choose one of {MASK_TYPES}")


def alpha_sees_background(mask: str) -> bool:
    """Whether alpha queries attend to background keys (masks A, B): then the alpha output needs X_B."""
    _check(mask)
    return mask != "C"


def background_sees_alpha(mask: str) -> bool:
    """Whether background queries attend to alpha keys (mask A only): otherwise X_B depends on nothing of X_A."""
    _check(mask)
    return mask == "A"


def dense_branch_mask(length: int, mask: str) -> np.ndarray:
    """The [2L, 2L] boolean mask (True = may attend) that the structured calls implement. For references only."""
    _check(mask)
    q_alpha = np.arange(2 * length)[:, None] >= length
    kv_alpha = np.arange(2 * length)[None, :] >= length
    if mask == "A":
        return np.ones((2 * length, 2 * length), bool)
    if mask == "B":
        return q_alpha | ~kv_alpha
    return q_alpha == kv_alpha


def branch_attention(q_b, k_b, v_b, q_a, k_a, v_a, *, mask: str, backend: str = "auto",
                     freeze_background: bool = False, splash_interpret: bool = False, context_mesh=None,
                     context_method: str = "auto"):
    """Attention of the two sets under a branch mask.

    Args:
      q_b, k_b, v_b: background set, each [B, L, N, K]. q_b may be None under mask "C" when only the alpha
        output is needed (a Quality Expert training step runs X_A alone).
      q_a, k_a, v_a: alpha set, each [B, L, N, K].
      mask: "A", "B" or "C".
      backend: "auto" | "cudnn" | "fa3" | "xla" | "splash" (see omnijax.layers.attention).
      freeze_background: put the background keys/values seen by alpha queries under stop_gradient (training:
        X_B depends on nothing trainable, so no backward work flows into it).
      splash_interpret: run the splash kernel in Pallas interpret mode (CPU tests of the TPU path).
      context_mesh: a mesh whose "context" axis (size > 1) splits the tokens: the calls then go through
        omnijax.parallel.context (Ulysses / ring by `context_method`). None: plain fused attention. The choice is
        the caller's (the model's, fixed when it is built), never read from an enclosing `jax.set_mesh`.
    Returns:
      (o_b, o_a), each [B, L, N, K]; o_b is None when q_b is None.
    """
    _check(mask)
    if q_b is None and mask != "C":
        raise ValueError(f"mask {mask!r} couples the two sets: the background tokens are required")
    impl = "splash" if backend == "splash" and splash_interpret else resolve_backend(backend, q_a.dtype)
    if freeze_background and q_b is not None:
        k_b_seen, v_b_seen = jax.lax.stop_gradient(k_b), jax.lax.stop_gradient(v_b)
    else:
        k_b_seen, v_b_seen = k_b, v_b
    if impl == "splash":
        # Imported here: the Pallas TPU modules take ~0.15 s to import, which every GPU process would pay.
        from omnijax.layers.splash_branch import splash_branch, splash_full

        if q_b is None:  # only the alpha set: plain full attention of X_A
            return None, splash_full(q_a, k_a, v_a, interpret=splash_interpret)
        return splash_branch(q_b, k_b_seen, v_b_seen, q_a, k_a, v_a, mask=mask, interpret=splash_interpret)
    attn = _attention_fn(impl, context_mesh, context_method)
    if mask == "C":
        o_b = None if q_b is None else attn(q_b, k_b, v_b)
        return o_b, attn(q_a, k_a, v_a)
    if mask == "B":
        k_all = jnp.concatenate([k_b_seen, k_a], axis=1)
        v_all = jnp.concatenate([v_b_seen, v_a], axis=1)
        return attn(q_b, k_b, v_b), attn(q_a, k_all, v_all)
    # "A": one call with all 2L queries over all 2L keys (ablation; X_B depends on X_A here, so nothing is frozen).
    cat = lambda a, b: jnp.concatenate([a, b], axis=1)
    out = attn(cat(q_b, q_a), cat(k_b, k_a), cat(v_b, v_a))
    return out[:, :q_b.shape[1]], out[:, q_b.shape[1]:]


def _attention_fn(impl: str, context_mesh, context_method: str):
    """Plain fused attention, or context-parallel attention when `context_mesh` has a "context" axis of size > 1."""
    if context_mesh is not None and dict(context_mesh.shape).get("context", 1) > 1:
        from omnijax.parallel.context import context_attention

        return functools.partial(context_attention, mesh=context_mesh, backend=impl, method=context_method)
    return functools.partial(attention, backend=impl)
