"""The jitted dual-expert sampler against the plain Python reference loop, and its (non-)recompilation."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from omnijax.sampling import (
    TemporalWindows,
    inference_sigmas,
    make_sampler,
    noise_like,
    sample,
    switch_index,
)
from tests.sampling.reference import reference_sample

_RNG = np.random.default_rng(0)
MIX = jnp.asarray(_RNG.standard_normal((64, 64)) / 8, jnp.float32)  # time mixing, cut to the window length
MB = jnp.asarray(_RNG.standard_normal((4, 4)) / 2, jnp.float32)
MA = jnp.asarray(_RNG.standard_normal((3, 3)) / 2, jnp.float32)


def _time_mix(x, sign):
    t = x.shape[1]
    return jnp.einsum("tu,buhwc->bthwc", MIX[:t, :t] * sign, x.astype(jnp.float32))


def effect(state, sigma):
    """Couples the layers and mixes frames, so a wrong window, step or expert shows up in the result."""
    bg, al = state["background"].astype(jnp.float32), state["alpha"].astype(jnp.float32)
    v_bg = jnp.tanh(bg) @ MB * (1 + sigma) + _time_mix(bg, 1.0)
    v_al = al @ MA - sigma * bg[..., :3] + _time_mix(al, 1.0)
    return {"background": v_bg.astype(state["background"].dtype), "alpha": v_al.astype(state["alpha"].dtype)}


def quality(state, sigma):
    bg, al = state["background"].astype(jnp.float32), state["alpha"].astype(jnp.float32)
    v_bg = bg * sigma - 0.5 * bg @ MB.T
    v_al = jnp.sin(al) + 0.3 * al @ MA.T + _time_mix(al, -1.0) * sigma
    return {"background": v_bg.astype(state["background"].dtype), "alpha": v_al.astype(state["alpha"].dtype)}


# The reference loop calls jitted copies of the same experts: op-by-op dispatch would dominate the test time.
effect_jit, quality_jit = jax.jit(effect), jax.jit(quality)
# One jitted sampler for the tests that do not count traces: the sigma table and switch index are traced, so
# the cases with the same shapes share a compilation (keeps the suite fast).
RUN = make_sampler(lambda s, g, c: effect(s, g), lambda s, g, c: quality(s, g))


def _init(length, dtype=jnp.float32, batch=2, seed=0):
    shapes = {"background": jax.ShapeDtypeStruct((batch, length, 2, 3, 4), dtype),
              "alpha": jax.ShapeDtypeStruct((batch, length, 2, 3, 3), dtype)}
    return noise_like(jax.random.key(seed), shapes)


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / np.linalg.norm(b)


@pytest.mark.parametrize("steps,tau", [(4, 0.5), (4, 0.0), (4, 1.0), (2, 0.5), (50, 0.5), (50, 0.9)])
def test_matches_reference_loop(steps, tau):
    sigmas = inference_sigmas(steps)
    z = _init(5)
    out = RUN(z, sigmas, switch_index(sigmas, tau))
    ref = reference_sample(effect_jit, quality_jit, z, sigmas, tau)
    for key in ref:
        assert out[key].dtype == jnp.float32
        assert _rel(out[key], ref[key]) < 1e-5, key


def test_switch_matters():
    """The three tau regimes give three different results (effect only, quality only, mixed)."""
    sigmas = inference_sigmas(4)
    z = _init(5)
    outs = [np.asarray(RUN(z, sigmas, switch_index(sigmas, t))["alpha"]) for t in (0.0, 0.5, 1.0)]
    assert _rel(outs[0], outs[1]) > 1e-2 and _rel(outs[1], outs[2]) > 1e-2 and _rel(outs[0], outs[2]) > 1e-2


@pytest.mark.parametrize("length", [50])
def test_multidiffusion_matches_reference_loop(length):
    sigmas = inference_sigmas(4)
    z = _init(length, batch=2)
    win = TemporalWindows(length)
    out = RUN(z, sigmas, switch_index(sigmas, 0.5), windows=win)
    ref = reference_sample(effect_jit, quality_jit, z, sigmas, 0.5, window=21, overlap=4)
    for key in ref:
        assert _rel(out[key], ref[key]) < 1e-5, key
    # Without windows the time mixing sees all frames at once: a different answer, so the windows mattered.
    plain = RUN(z, sigmas, switch_index(sigmas, 0.5))
    assert _rel(plain["alpha"], ref["alpha"]) > 1e-3


def test_bf16_state_steps_in_f32():
    sigmas = inference_sigmas(4)
    z = _init(5, dtype=jnp.bfloat16)
    out = RUN(z, sigmas, switch_index(sigmas, 0.5))
    ref = reference_sample(effect_jit, quality_jit, jax.tree.map(lambda a: np.asarray(a).astype(ml_dtypes.bfloat16), z),
                           sigmas, 0.5)
    for key in ref:
        assert out[key].dtype == jnp.bfloat16
        a, b = np.asarray(out[key], np.float32), np.asarray(ref[key], np.float32)
        # One rounding per step (f32 update, then the cast): bit-equal to the reference up to rare ties.
        # Rounding the increment to bf16 first (as torch's bf16 * f32-scalar product does) leaves ~35 % unequal.
        assert (a == b).mean() > 0.98, (a == b).mean()
    # Close to an all-f32 run as well.
    f32 = RUN(jax.tree.map(lambda a: a.astype(jnp.float32), z), sigmas, switch_index(sigmas, 0.5))
    assert _rel(out["alpha"], f32["alpha"]) < 2e-2


def test_no_retrace_for_new_tau_or_seed():
    traces = {"effect": 0, "quality": 0}

    def counted(name, fn):
        def expert(state, sigma, cond):
            traces[name] += 1  # runs only while tracing
            return jax.tree.map(lambda v: v * cond, fn(state, sigma))
        return expert

    run = make_sampler(counted("effect", effect), counted("quality", quality))
    sigmas = inference_sigmas(4)
    cond = jnp.float32(0.9)
    results = {}
    for seed in (0, 1):
        for tau in (0.0, 0.5, 0.8, 1.0):
            k = switch_index(sigmas, jnp.float32(tau))
            results[seed, tau] = run(_init(5, seed=seed), sigmas, k, cond)
    run(_init(5, seed=3), sigmas, 3, cond)  # a Python int switch index is traced as well
    assert traces == {"effect": 1, "quality": 1}
    assert run.jitted._cache_size() == 1
    ref = reference_sample(lambda s, g: jax.tree.map(lambda v: v * cond, effect(s, g)),
                           lambda s, g: jax.tree.map(lambda v: v * cond, quality(s, g)), _init(5, seed=1), sigmas, 0.5)
    for key in ref:
        assert _rel(results[1, 0.5][key], ref[key]) < 1e-5
    # A new shape does compile again (the counter can count).
    run(_init(6), sigmas, 2, cond)
    assert traces == {"effect": 2, "quality": 2}


def test_seed_and_tau_inside_one_jit():
    sigmas = inference_sigmas(4)
    shapes = jax.eval_shape(lambda: _init(5))
    count = [0]

    @jax.jit
    def decompose(key, tau):
        count[0] += 1
        z = noise_like(key, shapes)
        return sample(effect, quality, z, sigmas, switch_index(sigmas, tau))

    a = decompose(jax.random.key(0), 0.5)
    b = decompose(jax.random.key(1), 0.5)
    c = decompose(jax.random.key(0), 0.95)
    assert count[0] == 1
    assert _rel(a["alpha"], b["alpha"]) > 1e-2 and _rel(a["alpha"], c["alpha"]) > 1e-2
    ref = reference_sample(effect_jit, quality_jit, noise_like(jax.random.key(0), shapes), sigmas, 0.95)
    assert _rel(c["alpha"], ref["alpha"]) < 1e-5


def test_bad_inputs():
    sigmas = inference_sigmas(4)
    with pytest.raises(ValueError, match="switch_index"):
        sample(effect, quality, _init(5), sigmas, 5)
    with pytest.raises(ValueError, match="sigmas"):
        sample(effect, quality, _init(5), sigmas[:1], 0)
    with pytest.raises(ValueError, match="velocity shape"):
        sample(lambda s, g: jax.tree.map(lambda v: v[:, :1], s), quality, _init(5), sigmas, 2)


def test_host_schedule_arguments_compile_only_the_sampler():
    """numpy sigmas and a numpy switch index are cast on the host: a new process compiles (or loads) the sampler's
    program and no cast programs beside it."""
    from omnijax.compile_cache import CompileClock

    run = make_sampler(lambda s, g, c: effect(s, g), lambda s, g, c: quality(s, g))
    z, sigmas = jax.block_until_ready(_init(5, seed=4)), inference_sigmas(3)  # float64 numpy
    k, weak = np.int64(switch_index(sigmas, 0.5)), jnp.asarray(1)  # weak: a weakly typed int32 array
    jax.clear_caches()  # a cast program compiled by an earlier test would otherwise go unseen
    clock = CompileClock().start()
    jax.block_until_ready(run(z, sigmas, k, None))
    assert clock.totals()["programs"] == 1, clock.programs()
    # A weakly typed switch index is cast (on the device) to the same signature: the sampler is not compiled again.
    sampler = clock.programs()["run"]
    jax.block_until_ready(run(z, sigmas, weak, None))
    assert clock.programs()["run"] == sampler and run.jitted._cache_size() == 1, clock.programs()
