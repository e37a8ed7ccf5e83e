"""The key-split attention of benchmarks/bench_attention.py (an aligned part and a remainder, merged by their
log-sum-exps) against plain softmax attention over all keys (jax.nn.dot_product_attention, XLA), on the CPU."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks.bench_attention import dense_partial, split_key_attention


@pytest.mark.parametrize("block", [8, 16, 48, 53, 64])
def test_split_keys_equal_plain_attention(block):
    ks = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(ks[0], (2, 37, 3, 16)) * 2.0  # large logits: a wrong merge weight shows
    k = jax.random.normal(ks[1], (2, 53, 3, 16)) * 2.0
    v = jax.random.normal(ks[2], (2, 53, 3, 16))
    want = jax.nn.dot_product_attention(q, k, v, implementation="xla")
    got = split_key_attention(q, k, v, aligned=dense_partial, block=block)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)


def test_dense_partial_lse_is_the_log_sum_exp():
    ks = jax.random.split(jax.random.key(1), 3)
    q, k, v = (jax.random.normal(kk, (1, 5, 2, 8)) for kk in ks)
    _, lse = dense_partial(q, k, v, 0.5)
    logits = jnp.einsum("blhd,bshd->blhs", q, k) * 0.5
    np.testing.assert_allclose(np.asarray(lse), np.asarray(jax.nn.logsumexp(logits, axis=-1)), rtol=1e-6)
