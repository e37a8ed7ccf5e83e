"""Temporal multidiffusion: overlapping latent-frame windows blended by linear ramps (shared/spec/wan.md §4.3).

For latent length T > W (W = 21 latent frames = 81 video frames) the sampler runs the expert on windows [b, e):
b starts at 0, e = min(b + W, T); a short last window is re-anchored to b = max(0, e - W), so every window is
full size; the next start is b <- e - s (s = 4 is the overlap, the hop is W - s = 17). T = 50 gives [0,21),
[17,38), [29,50). Every window steps from the same pre-step latents; the stepped windows are blended per frame
with weight 1, except a left ramp (0.2, 0.4, 0.6, 0.8) on a window's first s frames when b > 0 and a right ramp
(0.8, 0.6, 0.4, 0.2) on its last s frames when e < T (ramp = linspace(0, 1, s + 2) without its end points).
Sum(w * x) and sum(w) are accumulated in float32, divided, and cast back.

Because every window is full size, the windows are stacked along the batch axis (window-major: window 0's B
items, then window 1's, ...) and the expert runs once per step on a batch of n * B. The layout is static
(Python ints) for a given T, so it lives inside a jitted sampler without retracing.

Axis letters: B batch, T latent frames, W window length, n windows; other axes are carried along.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from omnijax.sampling.euler import euler_step

DEFAULT_WINDOW = 21  # latent frames: (81 - 1) / 4 + 1
DEFAULT_OVERLAP = 4  # latent frames: the pipeline's "stride" 16 video frames / 4


def window_bounds(length: int, window: int = DEFAULT_WINDOW,
                  overlap: int = DEFAULT_OVERLAP) -> tuple[tuple[int, int], ...]:
    """The [b, e) windows for `length` latent frames; a single window [0, T) when T <= W.

    Raises:
        ValueError: on non-positive sizes or an overlap that is not smaller than the window (no progress).
    """
    if length < 1 or window < 1:
        raise ValueError(f"length and window must be >= 1, got length={length}, window={window}")
    if not 0 <= overlap < window:
        raise ValueError(f"overlap must be in [0, window), got overlap={overlap}, window={window}")
    bounds = []
    b = 0
    while True:
        e = min(b + window, length)
        b = max(0, e - window)  # re-anchor a short last window to the end
        bounds.append((b, e))
        if e == length:
            return tuple(bounds)
        b = e - overlap


def window_weights(bounds, length: int, overlap: int = DEFAULT_OVERLAP) -> np.ndarray:
    """Per-window blend weights, float32 [n, W]: 1, with the left/right ramps of the module docstring.

    The right ramp is written after the left one, so it wins where the two would meet (only when W < 2s).
    """
    ramp = np.linspace(0.0, 1.0, overlap + 2)[1:-1].astype(np.float32)
    weights = []
    for b, e in bounds:
        w = np.ones(e - b, np.float32)
        if overlap and b > 0:
            w[:overlap] = ramp
        if overlap and e < length:
            w[len(w) - overlap:] = ramp[::-1]
        weights.append(w)
    return np.stack(weights)


@dataclasses.dataclass(frozen=True)
class TemporalWindows:
    """A static window layout for one latent length (hashable, so it can be a static jit argument).

    Attributes:
        length: T, latent frames.
        window: W, latent frames per window.
        overlap: s, latent frames shared by neighbouring windows.
        time_axis: the axis of T in every state leaf (1 for channels-last [B, T, H, W, C]).
    """

    length: int
    window: int = DEFAULT_WINDOW
    overlap: int = DEFAULT_OVERLAP
    time_axis: int = 1

    def __post_init__(self):
        if self.time_axis < 1:
            raise ValueError(f"time_axis must be >= 1 (axis 0 is the batch axis the windows are stacked along), "
                             f"got {self.time_axis}")
        window_bounds(self.length, self.window, self.overlap)  # validates

    @property
    def bounds(self) -> tuple[tuple[int, int], ...]:
        return window_bounds(self.length, self.window, self.overlap)

    @property
    def num_windows(self) -> int:
        return len(self.bounds)

    @property
    def active(self) -> bool:
        """False when a single window covers T (T <= W): sampling is then plain, unwindowed."""
        return self.num_windows > 1

    def weights(self) -> np.ndarray:
        """Float32 [n, W] blend weights."""
        return window_weights(self.bounds, self.length, self.overlap)

    def _check(self, x) -> None:
        if x.ndim <= self.time_axis or x.shape[self.time_axis] != self.length:
            raise ValueError(f"expected {self.length} frames on axis {self.time_axis}, got shape {x.shape}")


def split_windows(tree, windows: TemporalWindows):
    """Cuts every leaf [B, ..T.., ...] into its windows, stacked window-major along the batch axis: [n*B, ..W.., ...].

    Callers apply this once, outside the step loop, to temporal conditioning (the inpainting condition y) so
    that it lines up with the windowed state their expert receives.
    """
    ax = windows.time_axis

    def split(x):
        windows._check(x)
        return jnp.concatenate([jax.lax.slice_in_dim(x, b, e, axis=ax) for b, e in windows.bounds], axis=0)

    return jax.tree.map(split, tree)


def repeat_for_windows(tree, windows: TemporalWindows):
    """Repeats every leaf n times along the batch axis (window-major), for conditioning without a time axis
    (text context [B, L, D], CLIP features) that must accompany a windowed state."""
    return jax.tree.map(lambda x: jnp.concatenate([x] * windows.num_windows, axis=0), tree)


def merge_windows(tree, windows: TemporalWindows):
    """Blends windowed leaves [n*B, ..W.., ...] back to [B, ..T.., ...]: sum(w*x) / sum(w) in float32, cast back."""
    ax = windows.time_axis
    weights = windows.weights()  # [n, W]
    total = np.zeros(windows.length, np.float32)
    for (b, e), w in zip(windows.bounds, weights):
        total[b:e] += w

    def merge(x):
        n = windows.num_windows
        if x.shape[0] % n or x.shape[ax] != windows.window:
            raise ValueError(f"expected {n} windows of {windows.window} frames stacked on axis 0, got {x.shape}")
        batch = x.shape[0] // n
        shape = [1] * x.ndim
        shape[ax] = -1
        out_shape = list(x.shape)
        out_shape[0], out_shape[ax] = batch, windows.length
        acc = jnp.zeros(out_shape, jnp.float32)
        for i, ((b, e), w) in enumerate(zip(windows.bounds, weights)):
            xi = jax.lax.slice_in_dim(x, i * batch, (i + 1) * batch, axis=0).astype(jnp.float32)
            index = [slice(None)] * x.ndim
            index[ax] = slice(b, e)
            acc = acc.at[tuple(index)].add(xi * w.reshape(shape))
        return (acc / total.reshape(shape)).astype(x.dtype)

    return jax.tree.map(merge, tree)


def windowed_step(velocity_fn: Callable, state, sigma, sigma_next, windows: TemporalWindows | None):
    """One multidiffusion Euler step: every window steps from the same latents, then the windows are blended.

    Args:
        velocity_fn: (state, sigma) -> velocity; with active windows it receives the windowed state [n*B, W, ...]
            (see `split_windows`) and must return velocities of that shape.
        state: pytree of [B, T, ...] leaves.
        sigma: scalar, current sigma.
        sigma_next: scalar, next sigma.
        windows: the static layout, or None / an inactive layout for a plain Euler step.

    Returns:
        The stepped state, leaves in their input dtypes. Each window's step is cast to the state dtype before
        blending, as the reference pipeline does.
    """
    if windows is None or not windows.active:
        return euler_step(state, velocity_fn(state, sigma), sigma, sigma_next)
    x = split_windows(state, windows)
    return merge_windows(euler_step(x, velocity_fn(x, sigma), sigma, sigma_next), windows)
