"""Dual-expert sampler wiring against hand-written expectations: stub experts record every call (which expert,
at which sigma), return known velocities, and the sigma table comes from the closed form of spec wan.md §4.1
computed here (not from omnijax.sampling.schedules).

  S(s) = 5 s / (1 + 4 s);  inference: N points linearly from 1000 * S(1) to 1000 * S(1/1000), divided by 1000,
  shifted again, then 0 appended;  the DiT's timestep is 1000 * sigma;  steps with sigma > tau belong to the
  Effect Expert, the rest to the Quality Expert (paper eq. 7).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from omnijax.sampling import inference_sigmas, inference_timesteps, make_sampler, sample, switch_index, train_sigmas

SHIFT = 5.0  # the base model's scheduler (Wan2.1 / Casper); 3 is a different model's default


def shift(s, k=SHIFT):
    return k * s / (1 + (k - 1) * s)


def hand_sigmas(n):
    hi, lo = shift(1.0), shift(1 / 1000)
    return np.append(shift(np.linspace(1000 * hi, 1000 * lo, n) / 1000), 0.0)


V_EFFECT, V_QUALITY = 1.0, -3.0  # constant velocities, so the final state is a hand sum over the steps


def recording_experts(log):
    """(effect, quality) stubs: each call appends (name, sigma) in execution order and returns a constant
    velocity of the state's shape."""

    def stub(name, v):
        def expert(state, sigma, *_):
            jax.debug.callback(lambda s: log.append((name, float(s))), sigma, ordered=True)
            return jax.tree.map(lambda x: jnp.full_like(x, v), state)
        return expert

    return stub("effect", V_EFFECT), stub("quality", V_QUALITY)


def expected_calls(n, tau):
    sig = hand_sigmas(n)
    return [("effect" if s > tau else "quality", s) for s in sig[:-1]]


def expected_final(z, n, tau):
    """Euler x <- x + (sigma_next - sigma) * v with each step's expert's constant velocity."""
    sig = hand_sigmas(n)
    step = sum((sig[i + 1] - sig[i]) * (V_EFFECT if sig[i] > tau else V_QUALITY) for i in range(n))
    return jax.tree.map(lambda x: np.asarray(x, np.float64) + step, z)


def _check(log, z, out, n, tau):
    want = expected_calls(n, tau)
    assert [name for name, _ in log] == [name for name, _ in want], (n, tau)
    np.testing.assert_allclose([s for _, s in log], [s for _, s in want], rtol=2e-6, atol=1e-7)
    ref = expected_final(z, n, tau)
    for k in z:
        np.testing.assert_allclose(np.asarray(out[k], np.float64), ref[k], rtol=0, atol=2e-6)


Z = {"background": jnp.linspace(-1, 1, 2 * 3 * 2 * 2 * 4, dtype=jnp.float32).reshape(2, 3, 2, 2, 4),
     "alpha": jnp.zeros((2, 3, 2, 2, 4), jnp.float32)}


@pytest.mark.parametrize("n,tau", [(4, 0.5), (2, 0.5), (4, 0.0), (4, 1.0), (8, 0.8), (4, 0.95)])
def test_experts_called_in_order_with_the_table_sigmas(n, tau):
    log = []
    effect, quality = recording_experts(log)
    sigmas = inference_sigmas(n)  # the default shift
    out = sample(effect, quality, Z, sigmas, switch_index(sigmas, tau))
    jax.effects_barrier()
    _check(log, Z, out, n, tau)


def test_jitted_sampler_with_traced_tau():
    """make_sampler (jit; sigma table, switch index and conditioning traced) calls the same sequence."""
    log = []
    effect, quality = recording_experts(log)
    run = make_sampler(effect, quality)
    for tau in (0.5, 0.95, 0.0):
        log.clear()
        sigmas = inference_sigmas(4)
        out = run(Z, sigmas, switch_index(sigmas, jnp.float32(tau)), jnp.float32(0.0))
        jax.effects_barrier()
        _check(log, Z, out, 4, tau)


def test_tau_equal_to_a_sigma_is_the_quality_experts_step():
    """sigma > tau strictly: with tau exactly sigma_2, step 2 runs the Quality Expert."""
    sigmas = inference_sigmas(4)
    tau = float(sigmas[2])
    log = []
    effect, quality = recording_experts(log)
    sample(effect, quality, Z, sigmas, switch_index(sigmas, tau))
    jax.effects_barrier()
    assert [name for name, _ in log] == ["effect", "effect", "quality", "quality"]


def test_sigma_tables_and_timesteps_by_the_closed_form():
    for n in (1, 2, 4, 50):
        np.testing.assert_allclose(inference_sigmas(n), hand_sigmas(n), rtol=2e-6, atol=1e-7)
        # The DiT's timesteps are 1000 * sigma (0..1000), not sigma.
        np.testing.assert_allclose(inference_timesteps(n), 1000.0 * hand_sigmas(n)[:-1], rtol=2e-6)
    np.testing.assert_allclose(hand_sigmas(4), [1.0, 0.90971, 0.71732, 0.02441, 0.0], atol=5e-6)  # spec §4.1
    i = np.arange(1000)
    np.testing.assert_allclose(train_sigmas(), shift((1000 - i) / 1000), rtol=2e-6)
