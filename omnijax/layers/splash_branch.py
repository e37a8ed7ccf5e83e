"""The branch masks of omnijax.layers.branch_attention on TPU: one splash-attention call over the padded sets.

Its kernel takes one example [N, L, K], does not scale the logits, and needs sequence lengths divisible by the
block size; each set is padded to a multiple of the block and padded keys are masked by the same in-kernel mask
function (never materialised). Imported only when the "splash" backend runs.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm


class _BranchSplashMask(sm._ComputableMask):
    """Splash mask computed inside the kernel from its mask function (never materialised).

    Shape (S*P, S*P) for S sets of P padded tokens, ordered [X_B pad ; X_A pad] when S = 2.
    """

    def __init__(self, valid: int, padded: int, mask: str, sets: int = 2):
        self.valid, self.padded, self.mask, self.sets = valid, padded, mask, sets
        super().__init__((sets * padded, sets * padded), _mask_function(valid, padded, mask))

    def __eq__(self, other):
        return isinstance(other, _BranchSplashMask) and self._key() == other._key()

    def __hash__(self):
        return hash((type(self), self._key()))

    def _key(self):
        return self.valid, self.padded, self.mask, self.sets


@functools.lru_cache(maxsize=64)
def _mask_function(valid: int, padded: int, mask: str):
    # Cached so the same (static, hashed) function object is reused and the kernel is not recompiled.
    def fn(q_ids, kv_ids):
        kv_alpha = kv_ids >= padded
        kv_ok = (kv_ids - kv_alpha * padded) < valid  # padded keys of either set are never attended
        if mask == "A":
            return kv_ok
        q_alpha = q_ids >= padded
        if mask == "B":
            return kv_ok & (q_alpha | (kv_ids < padded))
        return kv_ok & (q_alpha == kv_alpha)
    return fn


@functools.lru_cache(maxsize=16)
def _splash_kernel(valid: int, padded: int, mask: str, sets: int, heads: int, block: int, interpret: bool):
    multi = sm.MultiHeadMask([_BranchSplashMask(valid, padded, mask, sets)] * heads)
    sizes = sk.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                          block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
    return sk.make_splash_mha(multi, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret)


def _splash_block(length: int) -> tuple[int, int]:
    block = 512 if length >= 2048 else 128  # the kernel wants multiples of 128 lanes
    return block, -(-length // block) * block


def _splash_sets(sets, *, mask: str, interpret: bool):
    """sets: list of (q, k, v) [B, L, N, K], concatenated on tokens after padding each to the block size."""
    q0 = sets[0][0]
    length, heads, dim = q0.shape[1], q0.shape[2], q0.shape[3]
    block, padded = _splash_block(length)
    pad = lambda a: jnp.pad(a, ((0, 0), (0, padded - length), (0, 0), (0, 0)))
    cat = lambda i: jnp.concatenate([pad(s[i]) for s in sets], axis=1)
    q = cat(0) * jnp.asarray(dim ** -0.5, q0.dtype)  # splash does not scale the logits
    kernel = _splash_kernel(length, padded, mask, len(sets), heads, block, interpret)
    to_nsk = lambda a: jnp.swapaxes(a, 1, 2)  # the kernel runs one example [N, S, K]
    out = jnp.swapaxes(jax.vmap(kernel)(to_nsk(q), to_nsk(cat(1)), to_nsk(cat(2))), 1, 2)
    return [out[:, i * padded:i * padded + length] for i in range(len(sets))]


def splash_branch(q_b, k_b, v_b, q_a, k_a, v_a, *, mask: str, interpret: bool):
    o_b, o_a = _splash_sets([(q_b, k_b, v_b), (q_a, k_a, v_a)], mask=mask, interpret=interpret)
    return o_b, o_a


def splash_full(q, k, v, *, interpret: bool):
    return _splash_sets([(q, k, v)], mask="A", interpret=interpret)[0]
