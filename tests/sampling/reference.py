"""A plain Python / numpy reference of the dual-expert sampler, for tests only (slow: one call per window).

Written straight from the spec (shared/spec/wan.md §4.1, §4.3; easyomnimatte.md §4) and deliberately shares no
code with the jitted sampler: it picks the expert per step from tau, walks the windows one at a time with
batch B, and blends frame by frame.

Axis letters: B batch, T latent frames, W window length.
"""

from __future__ import annotations

import jax
import numpy as np


def reference_windows(length: int, window: int, overlap: int) -> list[tuple[int, int]]:
    """Window bounds by the spec's loop: e = min(b + W, T); short windows re-anchored; next b = e - s."""
    out, b = [], 0
    while True:
        e = min(b + window, length)
        if e - b < window:
            b = max(0, e - window)
        out.append((b, e))
        if e == length:
            return out
        b = e - overlap


def reference_weight(j: int, b: int, e: int, length: int, overlap: int) -> float:
    """Blend weight of local frame j of window [b, e): ramps (k / (s + 1)) on the overlapping ends."""
    w = 1.0
    if b > 0 and j < overlap:
        w = (j + 1) / (overlap + 1)
    if e < length and j >= (e - b) - overlap:
        w = ((e - b) - j) / (overlap + 1)
    return w


def _euler(x, v, sigma, sigma_next):
    dt = np.float32(sigma_next) - np.float32(sigma)
    return (x.astype(np.float32) + dt * np.asarray(v, np.float32)).astype(x.dtype)


def reference_sample(effect_fn, quality_fn, z_init, sigmas, tau, *, window: int | None = None, overlap: int = 4,
                     time_axis: int = 1):
    """Python loop over steps (and windows) calling the same experts as the jitted sampler.

    Args:
        effect_fn, quality_fn: (state, sigma) -> velocity pytrees.
        z_init: pytree of arrays [B, ..T.., ...].
        sigmas: [N + 1] sigma table.
        tau: the switch threshold: the Effect Expert runs the steps with sigma > tau.
        window: latent window length W for multidiffusion, or None for none.
        overlap: s, frames shared by neighbouring windows.
        time_axis: axis of T.

    Returns:
        The final state as numpy arrays.
    """
    sigmas = np.asarray(sigmas, np.float32)
    leaves, treedef = jax.tree.flatten(z_init)
    x = [np.asarray(leaf) for leaf in leaves]
    length = x[0].shape[time_axis]
    bounds = reference_windows(length, window, overlap) if window is not None and length > window else None

    def call(fn, xs, sigma):
        v = fn(jax.tree.unflatten(treedef, xs), np.float32(sigma))
        return [np.asarray(leaf) for leaf in jax.tree.leaves(v)]

    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        fn = effect_fn if sigma > tau else quality_fn
        if bounds is None:
            x = [_euler(a, v, sigma, sigma_next) for a, v in zip(x, call(fn, x, sigma))]
            continue
        num = [np.zeros(a.shape, np.float64) for a in x]
        den = np.zeros(length, np.float64)
        for b, e in bounds:
            xw = [np.take(a, np.arange(b, e), axis=time_axis) for a in x]
            stepped = [_euler(a, v, sigma, sigma_next) for a, v in zip(xw, call(fn, xw, sigma))]
            for t in range(b, e):
                w = reference_weight(t - b, b, e, length, overlap)
                den[t] += w
                for acc, s in zip(num, stepped):
                    dst = [slice(None)] * acc.ndim
                    dst[time_axis] = t
                    src = [slice(None)] * acc.ndim
                    src[time_axis] = t - b
                    acc[tuple(dst)] += w * s[tuple(src)].astype(np.float64)
        for k, a in enumerate(x):
            shape = [1] * a.ndim
            shape[time_axis] = length
            x[k] = (num[k] / den.reshape(shape)).astype(a.dtype)
    return jax.tree.unflatten(treedef, x)
