"""Optimizer construction from a config, checked against a hand-written AdamW step and closed-form schedules."""

import math

import jax.numpy as jnp
import numpy as np
import pytest

from omnijax.training.optim import make_optimizer, make_schedule


def test_warmup_cosine_schedule():
    sched = make_schedule(dict(lr=1.0, total_steps=12, schedule=dict(warmup_steps=2, decay_type="cosine",
                                                                       end_factor=0.1)))
    assert float(sched(0)) == 0.0 and float(sched(1)) == pytest.approx(0.5) and float(sched(2)) == pytest.approx(1.0)
    for step in (2, 5, 7, 12):
        frac = (step - 2) / 10
        want = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac))
        assert float(sched(step)) == pytest.approx(want, rel=1e-5)
    const = make_schedule(dict(lr=3e-4, schedule=dict(warmup_steps=0)))
    assert float(const(0)) == pytest.approx(3e-4) and float(const(10_000)) == pytest.approx(3e-4)


@pytest.mark.parametrize("bad, match", [
    (dict(schedule=dict(decay_type="linear")), "unknown schedule decay_type"),
    (dict(schedule=dict(decay_type="cosine", warmup_steps=5), total_steps=5), "total_steps > warmup_steps"),
    (dict(schedule=dict(warmup=5)), "unknown schedule fields"),
    (dict(optax=dict(beta1=0.9)), "unknown optax"),
])
def test_bad_config(bad, match):
    with pytest.raises(ValueError, match=match):
        make_optimizer(dict(lr=1e-3, **bad))
    with pytest.raises(ValueError, match="needs 'lr'"):
        make_optimizer({})


def _adamw_reference(p, g, lr, wd, b1, b2, eps, clip, steps):
    """torch.optim.AdamW's update rule written out in numpy (global-norm clip first)."""
    m = np.zeros_like(p)
    v = np.zeros_like(p)
    for t in range(1, steps + 1):
        norm = np.sqrt(sum(np.sum(x ** 2) for x in g))
        gc = [x * min(1.0, clip / norm) for x in g]
        for i in range(len(p)):
            m[i] = b1 * m[i] + (1 - b1) * gc[i]
            v[i] = b2 * v[i] + (1 - b2) * gc[i] ** 2
            mhat = m[i] / (1 - b1 ** t)
            vhat = v[i] / (1 - b2 ** t)
            p[i] = p[i] - lr * (mhat / (np.sqrt(vhat) + eps) + wd * p[i])
    return p


def test_adamw_with_clip_matches_reference():
    cfg = dict(lr=1e-2, wd=0.03, grad_clip_norm=0.5, optax=dict(b1=0.8, b2=0.95, eps=1e-6))
    tx, _ = make_optimizer(cfg)
    rng = np.random.default_rng(0)
    p0 = rng.standard_normal((2, 5)).astype(np.float64)
    g = [rng.standard_normal(5) * 3, rng.standard_normal(5) * 3]  # global norm > clip
    params = {"a": jnp.asarray(p0[0], jnp.float32), "b": jnp.asarray(p0[1], jnp.float32)}
    state = tx.init(params)
    grads = {"a": jnp.asarray(g[0], jnp.float32), "b": jnp.asarray(g[1], jnp.float32)}
    for _ in range(3):
        upd, state = tx.update(grads, state, params)
        params = {k: params[k] + upd[k] for k in params}
    want = _adamw_reference(p0.copy(), g, 1e-2, 0.03, 0.8, 0.95, 1e-6, 0.5, 3)
    np.testing.assert_allclose(np.asarray(params["a"]), want[0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(params["b"]), want[1], rtol=1e-5, atol=1e-6)
