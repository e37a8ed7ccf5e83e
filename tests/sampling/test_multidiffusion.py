"""Temporal multidiffusion layout (spec/wan.md §4.3) and the blended step against a per-frame brute force."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from omnijax.sampling.multidiffusion import TemporalWindows, merge_windows, split_windows, windowed_step

EXPECTED = {
    21: [(0, 21)],
    22: [(0, 21), (1, 22)],
    30: [(0, 21), (9, 30)],
    50: [(0, 21), (17, 38), (29, 50)],
    10: [(0, 10)],
}
LEFT = [0.2, 0.4, 0.6, 0.8]


@pytest.mark.parametrize("length", sorted(EXPECTED))
def test_window_bounds(length):
    win = TemporalWindows(length)
    assert list(win.bounds) == EXPECTED[length]
    assert win.active == (len(EXPECTED[length]) > 1)


@pytest.mark.parametrize("length", [21, 22, 30, 50])
def test_window_weights(length):
    win = TemporalWindows(length)
    w = win.weights()
    for (b, e), row in zip(EXPECTED[length], w):
        expected = np.ones(21)
        if b > 0:
            expected[:4] = LEFT
        if e < length:
            expected[-4:] = LEFT[::-1]
        np.testing.assert_allclose(row, expected, atol=1e-7)


def test_bad_layouts():
    with pytest.raises(ValueError, match="overlap"):
        TemporalWindows(30, window=4, overlap=4)
    with pytest.raises(ValueError, match="length"):
        TemporalWindows(0)
    with pytest.raises(ValueError, match="time_axis"):
        TemporalWindows(30, time_axis=0)
    with pytest.raises(ValueError, match="frames on axis"):
        split_windows(jnp.zeros((1, 29, 2)), TemporalWindows(30))


def _brute_force_blend(per_window, bounds, length):
    """Per frame: weighted average over the windows that hold it, weights written from the spec text."""
    out = np.zeros((per_window[0].shape[0], length) + per_window[0].shape[2:])
    for t in range(length):
        num, den = 0.0, 0.0
        for (b, e), x in zip(bounds, per_window):
            if not b <= t < e:
                continue
            j = t - b
            w = 1.0
            if b > 0 and j < 4:
                w = LEFT[j]
            if e < length and j >= 21 - 4:
                w = LEFT[20 - j]
            num = num + w * x[:, j].astype(np.float64)
            den += w
        out[:, t] = num / den
    return out


@pytest.mark.parametrize("length", [22, 30, 50])
def test_split_merge_equals_brute_force(length):
    win = TemporalWindows(length)
    rng = np.random.default_rng(length)
    per_window = [rng.standard_normal((2, 21, 3, 2)).astype(np.float32) for _ in win.bounds]
    stacked = jnp.concatenate([jnp.asarray(x) for x in per_window], axis=0)
    merged = jax.jit(merge_windows, static_argnums=1)(stacked, win)
    np.testing.assert_allclose(merged, _brute_force_blend(per_window, EXPECTED[length], length), rtol=1e-6, atol=1e-6)
    # Splitting takes plain slices, window-major along the batch axis.
    x = rng.standard_normal((2, length, 3, 2)).astype(np.float32)
    parts = np.split(np.asarray(split_windows(jnp.asarray(x), win)), len(win.bounds), axis=0)
    for (b, e), part in zip(EXPECTED[length], parts):
        np.testing.assert_array_equal(part, x[:, b:e])


@pytest.mark.parametrize("length", [22, 50])
def test_windowed_step_equals_brute_force(length):
    """A time-mixing velocity (depends on which frames share a window) stepped per window, then blended."""
    win = TemporalWindows(length)
    rng = np.random.default_rng(0)
    mix = rng.standard_normal((21, 21)).astype(np.float32) / 5
    x = rng.standard_normal((2, length, 2, 3)).astype(np.float32)
    sigma, sigma_next = 0.9, 0.7

    def velocity(state, s):
        return jnp.einsum("tu,buhc->bthc", mix, state) * (1 + s)

    out = jax.jit(lambda s: windowed_step(velocity, s, sigma, sigma_next, win))(jnp.asarray(x))
    stepped = []
    for b, e in EXPECTED[length]:
        xw = x[:, b:e].astype(np.float64)
        stepped.append(xw + (sigma_next - sigma) * np.einsum("tu,buhc->bthc", mix, xw) * (1 + sigma))
    np.testing.assert_allclose(out, _brute_force_blend(stepped, EXPECTED[length], length), rtol=1e-5, atol=1e-5)


def test_other_time_axis_and_inactive():
    win = TemporalWindows(30, time_axis=2)
    x = jnp.asarray(np.random.default_rng(1).standard_normal((1, 3, 30)), jnp.float32)
    np.testing.assert_allclose(merge_windows(split_windows(x, win), win), x, rtol=1e-6)  # blend of equal copies
    # T <= W: a plain Euler step.
    out = windowed_step(lambda s, sig: jnp.ones_like(s), jnp.zeros((1, 10, 2)), 1.0, 0.25, TemporalWindows(10))
    np.testing.assert_allclose(out, -0.75 * np.ones((1, 10, 2)))
