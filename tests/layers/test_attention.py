"""The attention dispatch: backend resolution and the odd-length padding used for cuDNN's training kernel."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from omnijax.layers.attention import AttentionBackendError, attention, padded_attention, resolve_backend
from tests.attention_ref import dense_attention


def _qkv(lq, lk, seed=0):
    ks = jax.random.split(jax.random.key(seed), 3)
    return (jax.random.normal(ks[0], (2, lq, 3, 16)), jax.random.normal(ks[1], (2, lk, 3, 16)),
            jax.random.normal(ks[2], (2, lk, 3, 16)))


@pytest.mark.parametrize("lq,lk", [(9, 13), (10, 257), (7, 8), (12, 6)])
def test_padded_attention_matches_closed_form(lq, lk):
    q, k, v = _qkv(lq, lk)
    out = padded_attention(q, k, v, implementation="xla")
    assert out.shape == q.shape
    np.testing.assert_allclose(np.asarray(out), dense_attention(q, k, v), atol=2e-6)


def test_padded_attention_gradients_match_unpadded():
    # The padded keys must get no weight: the gradients w.r.t. the real q, k, v equal those of plain attention.
    q, k, v = _qkv(9, 13, seed=1)
    w = jax.random.normal(jax.random.key(5), q.shape)
    loss = lambda f: (lambda q, k, v: jnp.sum(f(q, k, v) * w))
    g_pad = jax.grad(loss(lambda *a: padded_attention(*a, implementation="xla")), argnums=(0, 1, 2))(q, k, v)
    g_ref = jax.grad(loss(lambda *a: jax.nn.dot_product_attention(*a, implementation="xla")),
                     argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(g_pad, g_ref):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)


def test_attention_on_cpu_uses_xla_and_refuses_cudnn():
    q, k, v = _qkv(6, 5)
    np.testing.assert_allclose(np.asarray(attention(q, k, v)), dense_attention(q, k, v), atol=2e-6)
    assert resolve_backend("auto", jnp.bfloat16) == "xla"
    with pytest.raises(AttentionBackendError, match="needs a GPU"):
        attention(q, k, v, backend="cudnn")
    with pytest.raises(ValueError, match="unknown attention backend"):
        resolve_backend("flash", jnp.float32)
