"""Wan 3D RoPE against an independent complex-number reference (shared/spec/wan.md §1.4)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from omnijax.layers.rope import apply_rope, rope_cos_sin, wan_axis_pairs, wan_rope_angles, wan_rope_cos_sin


def complex_reference(x, grid, theta=10000.0):
    """x [B, L, N, K]: multiply adjacent pairs by exp(i * pos * theta^(-2j/D_a)) per axis, via complex128."""
    k = x.shape[-1]
    c = k // 2
    parts = [c - 2 * (c // 3), c // 3, c // 3]
    tables = []
    for pairs in parts:
        d = 2 * pairs
        freqs = theta ** (-np.arange(0, d, 2) / d)
        tables.append(np.exp(1j * np.outer(np.arange(1024), freqs)))  # [1024, pairs]
    f, h, w = grid
    rows = []
    for ff in range(f):
        for hh in range(h):
            for ww in range(w):
                rows.append(np.concatenate([tables[0][ff], tables[1][hh], tables[2][ww]]))
    rot = np.stack(rows)  # [L, c]
    xc = x[..., 0::2] + 1j * x[..., 1::2]
    out = xc * rot[None, :, None, :]
    res = np.empty_like(x)
    res[..., 0::2] = out.real
    res[..., 1::2] = out.imag
    return res


def test_split_is_22_21_21():
    assert wan_axis_pairs(128) == (22, 21, 21)


@pytest.mark.parametrize("grid,head_dim", [((3, 4, 5), 128), ((2, 3, 7), 32), ((5, 1, 2), 64)])
def test_rope_matches_complex_reference(grid, head_dim):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, int(np.prod(grid)), 3, head_dim)).astype(np.float32)
    cos, sin = rope_cos_sin(wan_rope_angles(grid, head_dim))
    got = np.asarray(apply_rope(jnp.asarray(x), cos, sin))
    np.testing.assert_allclose(got, complex_reference(x.astype(np.float64), grid), rtol=1e-5, atol=1e-5)


def test_rope_against_diffusers_tables():
    torch = pytest.importorskip("torch")
    from diffusers.models.transformers.transformer_wan import WanRotaryPosEmbed

    grid = (3, 4, 6)
    rope = WanRotaryPosEmbed(attention_head_dim=128, patch_size=(1, 2, 2), max_seq_len=1024)
    cos_t, sin_t = rope(torch.zeros(1, 16, grid[0], grid[1] * 2, grid[2] * 2))
    cos, sin = wan_rope_cos_sin(grid, 128)
    np.testing.assert_allclose(np.asarray(cos), cos_t[0, :, 0, 0::2].numpy(), atol=1e-6)
    np.testing.assert_allclose(np.asarray(sin), sin_t[0, :, 0, 1::2].numpy(), atol=1e-6)


@pytest.mark.parametrize("grid,head_dim", [((3, 4, 5), 128), ((2, 3, 7), 32), ((21, 6, 10), 128)])
def test_device_built_tables_equal_the_host_tables(grid, head_dim):
    want_cos, want_sin = rope_cos_sin(wan_rope_angles(grid, head_dim))
    cos, sin = jax.jit(lambda: wan_rope_cos_sin(grid, head_dim))()
    np.testing.assert_array_equal(np.asarray(cos), np.asarray(want_cos))
    np.testing.assert_array_equal(np.asarray(sin), np.asarray(want_sin))


def test_tables_are_not_baked_into_programs():
    # 81x480x832: two [32760, 64] f32 tables would be 2 x 8.4 MB of constants in every program using them.
    text = jax.jit(lambda: wan_rope_cos_sin((21, 30, 52), 128)).lower().as_text()
    assert len(text) < 200_000, len(text)
