"""The independent attention reference for tests: softmax(q k^T / sqrt(K)) v in float64 numpy."""

from __future__ import annotations

import numpy as np


def dense_attention(q, k, v, mask=None):
    """q [B, L, N, K], k/v [B, S, N, K]; mask [L, S] bool (True = may attend) or None. Returns [B, L, N, K] f64."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    logits = np.einsum("blnk,bsnk->bnls", q, k) / np.sqrt(q.shape[-1])
    if mask is not None:
        logits = np.where(mask[None, None], logits, -np.inf)
    w = np.exp(logits - logits.max(-1, keepdims=True))
    w /= w.sum(-1, keepdims=True)
    return np.einsum("bnls,bsnk->blnk", w, v)
