"""Token-gated LoRA (omnijax.layers.lora.gated): the adapter's delta on the gated runs, zero elsewhere."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import omnijax.layers.lora as lora_module
from omnijax.layers.linear import Linear
from omnijax.layers.lora import LoRA, TokenGated, gated, merge_runs


def test_merge_runs_joins_adjacent_switched_on_ranges():
    ranges = [(0, 3), (3, 5), (5, 9), (9, 10)]
    assert merge_runs(ranges, [True, True, False, True]) == ((0, 5), (9, 10))
    assert merge_runs(ranges, [False] * 4) == ()


@pytest.mark.parametrize("coverage", [0.0, 1.01])  # every gate masked / every gate sliced
def test_gated_adapter_touches_only_its_runs(coverage, monkeypatch):
    monkeypatch.setattr(lora_module, "MASK_COVERAGE", coverage)
    ad = LoRA(6, 4, rank=2, alpha=3.0, rngs=nnx.Rngs(0))
    ad.lora_b.set_value(jnp.asarray(np.random.default_rng(0).standard_normal((2, 4)), jnp.float32))
    lin = Linear(6, 4, rngs=nnx.Rngs(1))
    x = jnp.asarray(np.random.default_rng(1).standard_normal((2, 10, 6)), jnp.float32)
    runs = ((1, 3), (6, 10))
    got = np.asarray(lin(x, gated(ad, runs, 10)))
    dense = np.asarray(x @ ad.lora_a.get_value() @ ad.lora_b.get_value() * 1.5)  # alpha / rank = 1.5
    mask = np.zeros((1, 10, 1))
    for a, b in runs:
        mask[:, a:b] = 1
    np.testing.assert_allclose(got, np.asarray(lin(x)) + mask * dense, rtol=1e-5, atol=1e-5)
    assert gated(ad, (), 10) is None and gated(ad, ((0, 10),), 10) is ad and gated(None, runs, 10) is None
    # Along another axis (Flux's modulation rows [G, B, D]).
    rows = np.asarray(TokenGated(ad, ((1, 2),), axis=0)(x))
    np.testing.assert_allclose(rows[1], dense[1], rtol=1e-5, atol=1e-6)
    assert not rows[0].any()


def test_masked_and_sliced_gates_have_the_same_gradients():
    """Both ways are exact: the adapter's and the input's gradients agree with a dense masked reference."""
    rng = np.random.default_rng(2)
    ad = LoRA(6, 4, rank=2, alpha=2.0, rngs=nnx.Rngs(0))
    ad.lora_b.set_value(jnp.asarray(rng.standard_normal((2, 4)), jnp.float32))
    x = jnp.asarray(rng.standard_normal((2, 10, 6)), jnp.float32)
    g = jnp.asarray(rng.standard_normal((2, 10, 4)), jnp.float32)
    runs = ((0, 3), (5, 9))
    mask = np.zeros((1, 10, 1), np.float32)
    for a, b in runs:
        mask[:, a:b] = 1

    graphdef, state = nnx.split(ad)
    loss = lambda out: jnp.sum(g * out)
    want = jax.grad(lambda a, b, x: loss(mask * (x @ a @ b)), argnums=(0, 1, 2))(  # scale alpha / rank = 1
        ad.lora_a.get_value(), ad.lora_b.get_value(), x)
    for masked in (True, False):
        gate = lambda st, x, masked=masked: loss(TokenGated(nnx.merge(graphdef, st), runs, masked=masked)(x))
        st, dx = jax.grad(gate, argnums=(0, 1))(state, x)
        got = (st["lora_a"].get_value(), st["lora_b"].get_value(), dx)
        for gv, ref in zip(got, want):
            np.testing.assert_allclose(np.asarray(gv), np.asarray(ref), rtol=1e-5, atol=1e-6)
