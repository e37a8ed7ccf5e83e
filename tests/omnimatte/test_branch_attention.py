"""Structured branch attention vs a dense-masked reference over the 2L sequence."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from omnijax.layers.branch_attention import branch_attention, dense_branch_mask
from tests.attention_ref import dense_attention
from tests.torch_refs import rel_err


def _qkv(length, seed=0, b=2, n=2, k=16):
    keys = jax.random.split(jax.random.key(seed), 6)
    return [jax.random.normal(key, (b, length, n, k)) for key in keys]


def _dense_reference(qb, kb, vb, qa, ka, va, mask):
    """Softmax over the full [2L, 2L] logits with the mask as -inf, in float64 numpy."""
    q, k, v = (np.concatenate([np.asarray(a, np.float64), np.asarray(c, np.float64)], 1)
               for a, c in ((qb, qa), (kb, ka), (vb, va)))
    out = dense_attention(q, k, v, dense_branch_mask(qb.shape[1], mask))
    return out[:, :qb.shape[1]], out[:, qb.shape[1]:]


@pytest.mark.parametrize("mask", ["A", "B", "C"])
def test_structured_equals_dense_masked(mask):
    args = _qkv(23)
    o_b, o_a = branch_attention(*args, mask=mask, backend="xla")
    r_b, r_a = _dense_reference(*args, mask)
    assert rel_err(o_b, r_b) <= 1e-5 and rel_err(o_a, r_a) <= 1e-5


def test_mask_patterns():
    m = dense_branch_mask(3, "B")
    assert m[:3, :3].all() and not m[:3, 3:].any() and m[3:].all()
    c = dense_branch_mask(3, "C")
    assert c[:3, :3].all() and c[3:, 3:].all() and not c[:3, 3:].any() and not c[3:, :3].any()
    with pytest.raises(ValueError, match="mask"):
        dense_branch_mask(3, "Z")


def test_alpha_alone_under_c_and_coupled_masks_need_background():
    args = _qkv(9, seed=1)
    _, o_a = branch_attention(None, None, None, *args[3:], mask="C", backend="xla")
    assert rel_err(o_a, _dense_reference(*args, "C")[1]) <= 1e-5
    with pytest.raises(ValueError, match="background"):
        branch_attention(None, None, None, *args[3:], mask="B", backend="xla")


def test_freeze_background_stops_only_the_background_gradient():
    args = _qkv(7, seed=2)

    def loss(kb, ka):
        _, o_a = branch_attention(args[0], kb, args[2], args[3], ka, args[5], mask="B", backend="xla",
                                  freeze_background=True)
        return jnp.sum(o_a ** 2)

    g_kb, g_ka = jax.grad(loss, argnums=(0, 1))(args[1], args[4])
    assert np.abs(np.asarray(g_kb)).max() == 0 and np.abs(np.asarray(g_ka)).max() > 0


def test_splash_block_mask_interpret_mode_type_b():
    """The TPU splash path (one call over 2L with an in-kernel block mask, padded sets) in Pallas interpret mode."""
    args = _qkv(40, seed=3, b=1)
    o_b, o_a = branch_attention(*args, mask="B", backend="splash", splash_interpret=True)
    r_b, r_a = _dense_reference(*args, "B")
    assert rel_err(o_b, r_b) <= 1e-5 and rel_err(o_a, r_a) <= 1e-5
