"""Flux's flow schedule against diffusers (FlowMatchEulerDiscreteScheduler + FluxPipeline's calculate_shift), and
the jitted sampler against a plain Python loop over the same model calls; no retrace for a new seed, guidance or
prompt."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from omnijax.models.flux import FluxDiT, variant
from omnijax.models.flux.vae import image_ids, text_ids
from omnijax.sampling import flow


def _diffusers_sigmas(num_steps, seq_len, dynamic=True):
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    if dynamic:  # FLUX.1-dev scheduler_config.json
        sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True,
                                                base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                                                max_image_seq_len=4096)
        mu = calculate_shift(seq_len, 256, 4096, 0.5, 1.15)
    else:  # FLUX.1-schnell
        sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False)
        mu = None
    sched.set_timesteps(sigmas=np.linspace(1.0, 1 / num_steps, num_steps), mu=mu)  # as FluxPipeline calls it
    return sched.sigmas.numpy()


@pytest.mark.parametrize("seq_len", [256, 1024, 2304, 4096, 6144, 77])
@pytest.mark.parametrize("num_steps", [1, 4, 28, 50])
def test_sigmas_equal_diffusers(seq_len, num_steps):
    got = flow.flux_sigmas(num_steps, seq_len)
    assert got.dtype == np.float32 and got.shape == (num_steps + 1,)
    np.testing.assert_array_equal(got, _diffusers_sigmas(num_steps, seq_len))


def test_schnell_sigmas_and_mu_table():
    np.testing.assert_array_equal(flow.flux_sigmas(4, shift=False), _diffusers_sigmas(4, None, dynamic=False))
    np.testing.assert_allclose(flow.flux_sigmas(4, shift=False), [1, 0.75, 0.5, 0.25, 0])
    # spec §3.2: mu(L) = 0.5 + 0.65 (L - 256) / 3840; t = 0.5 -> e^mu / (e^mu + 1).
    for length, mu in ((256, 0.5), (1024, 0.5 + 0.65 * 768 / 3840), (4096, 1.15)):
        assert flow.flux_mu(length) == pytest.approx(mu, abs=1e-12)
        assert flow.flux_sigmas(2, length)[1] == pytest.approx(np.exp(mu) / (np.exp(mu) + 1), rel=1e-6)
    with pytest.raises(ValueError, match="seq_len"):
        flow.flux_sigmas(4)
    with pytest.raises(ValueError, match="num_steps"):
        flow.flux_sigmas(0, 256)


@pytest.fixture(scope="module")
def dit():
    return FluxDiT(variant("tiny"), dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(0))


def _inputs(b=2, h=4, w=6, s=5, seed=0):
    r = np.random.default_rng(seed)
    return (image_ids(h, w, batch=b), jnp.asarray(r.standard_normal((b, s, 32)), jnp.float32), text_ids(s, batch=b),
            jnp.asarray(r.standard_normal((b, 24)), jnp.float32))


def test_jitted_sampler_equals_python_loop(dit):
    ids, txt, tids, y = _inputs()
    sigmas = flow.flux_sigmas(3, ids.shape[1])
    guidance = np.array([3.5, 1.5], np.float32)
    key = jax.random.key(7)
    got = np.asarray(flow.run_sampler(dit, key, ids, txt, tids, y, sigmas, guidance))
    x = np.asarray(jax.random.normal(key, (2, ids.shape[1], 16), jnp.float32))
    forward = nnx.jit(lambda m, *a: m(*a))  # one model call per Python step (jitted only to keep the test fast)
    for s, s_next in zip(sigmas[:-1], sigmas[1:]):
        v = np.asarray(forward(dit, jnp.asarray(x), ids, txt, tids, jnp.full((2,), s), y, jnp.asarray(guidance)))
        x = x + (np.float32(s_next) - np.float32(s)) * v
    np.testing.assert_allclose(got, x, rtol=1e-5, atol=1e-5)


def test_no_retrace_for_new_seed_guidance_or_prompt(dit):
    ids, txt, tids, y = _inputs()
    sigmas = flow.flux_sigmas(2, ids.shape[1])
    flow.run_sampler(dit, jax.random.key(0), ids, txt, tids, y, sigmas, 3.5)
    before = flow.trace_count()
    _, txt2, _, y2 = _inputs(seed=1)
    outs = [flow.run_sampler(dit, jax.random.key(1), ids, txt, tids, y, sigmas, 3.5),
            flow.run_sampler(dit, jax.random.key(1), ids, txt, tids, y, sigmas, np.array([1.0, 5.0])),
            flow.run_sampler(dit, jax.random.key(1), ids, txt2, tids, y2, sigmas, 3.5),
            flow.run_sampler(dit, jax.random.key(1), ids, txt, tids, y, flow.flux_sigmas(2, 4096), 3.5)]
    assert flow.trace_count() == before
    for a, b in zip(outs, outs[1:]):  # each change reached the result
        assert not np.allclose(np.asarray(a), np.asarray(b))
    with pytest.raises(ValueError, match="guidance strength"):
        flow.run_sampler(dit, jax.random.key(0), ids, txt, tids, y, sigmas, None)
