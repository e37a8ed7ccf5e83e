"""Flow-matching loss, noising and the shifted sigma table against closed-form numbers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from omnijax.training import loss as L


def test_sigma_table_closed_form():
    table = L.training_sigmas()
    assert table.shape == (1000,)
    assert table[0] == 1.0
    # wan.md §4.1: sigma_min = S(0.001) = 0.0049801 with S(s) = 5s / (1 + 4s).
    assert abs(table[-1] - 0.0049801) < 1e-7
    s = 0.5
    assert abs(table[500] - 5 * s / (1 + 4 * s)) < 1e-12  # i = 500 -> s = 0.5 -> 2.5 / 3
    assert np.all(np.diff(table) < 0)
    np.testing.assert_allclose(L.training_sigmas(10, shift=1.0), np.arange(10, 0, -1) / 10)


def test_sample_sigmas_come_from_the_table():
    table = L.training_sigmas().astype(np.float32)
    sig = np.asarray(L.sample_sigmas(jax.random.key(0), 4096))
    assert np.isin(sig, table).all()
    # Uniform over indices: about half the draws take the upper 500 entries (sigma >= S(0.501)).
    assert 0.45 < np.mean(sig >= table[499]) < 0.55
    strat = np.asarray(L.sample_sigmas(jax.random.key(1), 4, stratified=True))
    idx = [int(np.nonzero(table == s)[0][0]) for s in strat]
    assert [i // 250 for i in idx] == [0, 1, 2, 3]


def test_loss_closed_form_with_outliers():
    pred = np.array([[0.0, 1.0], [2.0, 100.0]], np.float32)
    target = np.array([[1.0, 1.0], [0.0, -1.0]], np.float32)
    # Errors -1, 0, 2, 101: the last exceeds 50 and contributes 0, but the mean still divides by 4.
    assert float(L.flow_matching_loss(jnp.asarray(pred), jnp.asarray(target))) == pytest.approx((1 + 0 + 4) / 4)
    assert float(L.flow_matching_loss(jnp.asarray(pred), jnp.asarray(target), max_abs_error=None)) == pytest.approx(
        (1 + 0 + 4 + 101 ** 2) / 4)
    assert float(L.flow_matching_loss(jnp.asarray(pred), jnp.asarray(target), max_abs_error=1.5)) == pytest.approx(
        1 / 4)
    w = np.array([[2.0], [0.5]], np.float32)
    assert float(L.flow_matching_loss(jnp.asarray(pred), jnp.asarray(target), weights=w)) == pytest.approx(
        (2 * 1 + 0.5 * 4) / 4)
    # bf16 inputs are compared in f32.
    out = L.flow_matching_loss(jnp.asarray(pred, jnp.bfloat16), jnp.asarray(target, jnp.bfloat16))
    assert out.dtype == jnp.float32
    with pytest.raises(ValueError, match="differ in shape"):
        L.flow_matching_loss(jnp.zeros((2, 3)), jnp.zeros((3, 2)))


def test_noising_and_target():
    rng = np.random.default_rng(0)
    x0 = rng.standard_normal((3, 2, 4, 4, 16)).astype(np.float32)
    eps = rng.standard_normal(x0.shape).astype(np.float32)
    sigma = np.array([0.0, 0.3, 1.0], np.float32)
    xt = np.asarray(L.noisy_latents(jnp.asarray(x0), jnp.asarray(eps), jnp.asarray(sigma)))
    np.testing.assert_allclose(xt[0], x0[0], rtol=1e-6)
    np.testing.assert_allclose(xt[2], eps[2], rtol=1e-6)
    np.testing.assert_allclose(xt[1], 0.7 * x0[1] + 0.3 * eps[1], rtol=1e-5, atol=1e-6)
    inputs = L.flow_matching_inputs(jax.random.key(0), jnp.asarray(x0))
    np.testing.assert_allclose(np.asarray(inputs["target"]), np.asarray(inputs["noise"]) - x0, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(inputs["timesteps"]), 1000 * np.asarray(inputs["sigma"]), rtol=1e-6)
    s = np.asarray(inputs["sigma"]).reshape(-1, 1, 1, 1, 1)
    np.testing.assert_allclose(np.asarray(inputs["x_t"]), (1 - s) * x0 + s * np.asarray(inputs["noise"]),
                               rtol=1e-5, atol=1e-6)
    # The exact velocity eps - x0 (computed here in numpy) gives zero loss; the clean latent does not.
    velocity = jnp.asarray(np.asarray(inputs["noise"]) - x0)
    assert float(L.flow_matching_loss(velocity, inputs["target"])) < 1e-12
    assert float(L.flow_matching_loss(jnp.asarray(x0), inputs["target"])) > 0.5
