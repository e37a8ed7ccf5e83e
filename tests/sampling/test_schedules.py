"""Sigma tables against diffusers' FlowMatchEulerDiscreteScheduler (built here) and the spec's printed values."""

import jax
import numpy as np
import pytest
from diffusers import FlowMatchEulerDiscreteScheduler

from omnijax.sampling import schedules


def _scheduler():
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=5.0, use_dynamic_shifting=False)


def test_train_table_equals_diffusers():
    ref = _scheduler()
    np.testing.assert_array_equal(schedules.train_sigmas(), ref.sigmas.numpy())
    np.testing.assert_array_equal(schedules.train_timesteps(), ref.timesteps.numpy())
    table = schedules.train_sigmas()
    assert table.shape == (1000,) and table.dtype == np.float32
    # Closed form: S(0.001) = 0.005 / 1.004.
    np.testing.assert_allclose(table[-1], 0.005 / 1.004, rtol=1e-6)


@pytest.mark.parametrize("n", [1, 2, 4, 50, 1000])
def test_inference_table_equals_diffusers(n):
    ref = _scheduler()
    ref.set_timesteps(n, mu=1.0)  # the pipeline passes mu=1; ignored without dynamic shifting
    sig = schedules.inference_sigmas(n)
    assert sig.shape == (n + 1,) and sig.dtype == np.float32 and sig[-1] == 0
    np.testing.assert_array_equal(sig, ref.sigmas.numpy())
    np.testing.assert_array_equal(schedules.inference_timesteps(n), ref.timesteps.numpy())


def test_inference_table_spec_values():
    np.testing.assert_allclose(schedules.inference_sigmas(4), [1.0, 0.90971, 0.71732, 0.02441, 0.0], atol=5e-6)
    np.testing.assert_allclose(schedules.inference_sigmas(2), [1.0, 0.02441, 0.0], atol=5e-6)
    s50 = schedules.inference_sigmas(50)
    np.testing.assert_allclose(s50[:5], [1.0, 0.99587, 0.99160, 0.98719, 0.98263], atol=5e-6)
    np.testing.assert_allclose(s50[-4:], [0.19280, 0.11482, 0.02441, 0.0], atol=5e-6)


def test_bad_step_count():
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="num_steps"):
            schedules.inference_sigmas(bad)


def test_switch_index():
    s4 = schedules.inference_sigmas(4)  # 1.0, 0.90971, 0.71732, 0.02441
    taus = (0.0, 0.02, 0.5, float(s4[2]), 0.8, 0.95, 1.0)  # tau equal to a sigma: that step is the Quality Expert's
    expected = [4, 4, 3, 2, 2, 1, 0]
    assert [schedules.switch_index(s4, t) for t in taus] == expected
    traced = jax.jit(schedules.switch_index)
    assert [int(traced(s4, np.float32(t))) for t in taus] == expected


def test_num_strata_rule():
    # Largest divisor of the rank count that divides 1000.
    assert [schedules.num_strata(r) for r in (1, 2, 3, 4, 8, 16, 6)] == [1, 2, 1, 4, 8, 8, 2]


def test_train_indices_uniform():
    idx = np.asarray(schedules.sample_train_indices(jax.random.key(0), 200_000))
    assert idx.min() >= 0 and idx.max() <= 999
    counts = np.bincount(idx // 100, minlength=10)  # expect 20000 per decile, std ~ 134
    assert np.all(np.abs(counts - 20_000) < 1_000), counts


@pytest.mark.parametrize("ranks,bounds", [(4, [(0, 250), (250, 500), (500, 750), (750, 1000)]),
                                          (16, [(125 * (r // 2), 125 * (r // 2 + 1)) for r in range(16)]),
                                          (3, [(0, 1000)] * 3)])
def test_train_indices_stratified(ranks, bounds):
    per_rank = 2000
    idx = np.asarray(schedules.sample_train_indices(jax.random.key(1), ranks * per_rank, num_ranks=ranks))
    for r, (lo, hi) in enumerate(bounds):
        chunk = idx[r * per_rank:(r + 1) * per_rank]
        assert chunk.min() >= lo and chunk.max() < hi, (r, chunk.min(), chunk.max())
        # Fills its stratum: both ends are reached within a few percent.
        assert chunk.min() < lo + 0.05 * (hi - lo) and chunk.max() >= hi - 0.05 * (hi - lo)


def test_train_indices_bad_batch():
    with pytest.raises(ValueError, match="multiple of num_ranks"):
        schedules.sample_train_indices(jax.random.key(0), 6, num_ranks=4)
