"""The jitted, donated LoRA train step: sharded == single device, frozen base untouched, non-finite skip."""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from omnijax import sharding as S
from omnijax.params import flat_params
from omnijax.training.step import NonFiniteGuard, NonFiniteLossError, make_train_step
from tests.training.lora_model import build, make_batch, regression_loss

STEPS = 3


def _run(mesh):
    """Three steps; returns (losses, grad norms, trained LoRA values, frozen base values before/after)."""
    rng = jax.random.key(5)
    ctx = jax.set_mesh(mesh) if mesh is not None else _null()
    with ctx:
        model, opt = build(mesh)
        base_before = {k: np.asarray(v.get_value()) for k, v in flat_params(model).items()
                       if not isinstance(v, nnx.LoRAParam)}
        step, state = make_train_step(model, opt, regression_loss)
        losses, norms = [], []
        compiles = _CompileLog()
        for i in range(STEPS):
            batch = make_batch(i)
            if mesh is not None:
                batch = S.host_to_global(batch, mesh)
            with compiles:
                state, metrics = step(state, batch, jax.random.fold_in(rng, i))
            losses.append(float(metrics["loss"]))
            norms.append(float(metrics["grad_norm"]))
            assert bool(metrics["finite"])
        assert compiles.count("jit(_step)") == 1, compiles  # the returned state never triggers a recompile
        model, opt = step.merge(state)
        lora = {k: np.asarray(v.get_value()) for k, v in flat_params(model, nnx.LoRAParam).items()}
        base_after = {k: np.asarray(v.get_value()) for k, v in flat_params(model).items()
                      if not isinstance(v, nnx.LoRAParam)}
        assert int(opt.step[...]) == STEPS
        if mesh is not None:  # the state kept its placement through the steps
            assert model.fc1.kernel[...].sharding.spec == jax.sharding.PartitionSpec("fsdp", None)
            assert opt.opt_state[1][0].mu["fc1"]["lora"]["lora_a"][...].sharding.spec[0] == "fsdp"
    return np.array(losses), np.array(norms), lora, base_before, base_after


class _CompileLog(logging.Handler):
    """Collects jax's "Compiling <name> ..." log lines while active."""

    def __init__(self):
        super().__init__()
        self.lines = []

    def emit(self, record):
        msg = record.getMessage()
        if msg.startswith("Compiling "):
            self.lines.append(msg.split(" with ")[0])

    def count(self, name):
        return sum(name in line for line in self.lines)

    def __repr__(self):
        return repr(self.lines)

    def __enter__(self):
        self._ctx = jax.log_compiles(True)
        self._ctx.__enter__()
        logging.getLogger("jax").addHandler(self)
        return self

    def __exit__(self, *exc):
        logging.getLogger("jax").removeHandler(self)
        self._ctx.__exit__(*exc)
        return False


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


@pytest.fixture(scope="module")
def single():
    return _run(None)


def test_sharded_step_equals_single_device(single):
    mesh = S.make_mesh({"data": 2, "fsdp": 4})
    losses, norms, lora, _, _ = _run(mesh)
    np.testing.assert_allclose(losses, single[0], rtol=1e-5)
    np.testing.assert_allclose(norms, single[1], rtol=1e-5)
    assert set(lora) == set(single[2]) == {"fc1.lora.lora_a", "fc1.lora.lora_b", "fc2.lora.lora_a", "fc2.lora.lora_b"}
    for k in lora:
        np.testing.assert_allclose(lora[k], single[2][k], rtol=1e-5, atol=1e-6)


def test_only_lora_changes(single):
    losses, _, lora, base_before, base_after = single
    assert losses[-1] < losses[0] or not np.allclose(losses, losses[0])
    assert set(base_before) == {"fc1.kernel", "fc1.bias", "fc2.kernel", "fc2.bias", "scale"}
    for k in base_before:
        assert base_after[k].tobytes() == base_before[k].tobytes(), f"frozen {k} changed"
    # Every adapter moved away from its initial value.
    model0, _ = build(None)
    for k, v in flat_params(model0, nnx.LoRAParam).items():
        assert not np.allclose(np.asarray(v.get_value()), lora[k]), k


def test_non_finite_step_is_skipped():
    model, opt = build(None)

    def loss_fn(m, batch, rng):
        loss = regression_loss(m, batch, rng)
        return jnp.where(batch["poison"], jnp.nan, loss)

    step, state = make_train_step(model, opt, loss_fn)
    good = dict(make_batch(0), poison=jnp.array(False))
    bad = dict(make_batch(1), poison=jnp.array(True))
    state, m = step(state, good, jax.random.key(0))
    before = jax.tree.map(np.asarray, state)
    state, m = step(state, bad, jax.random.key(1))
    assert not bool(m["finite"]) and np.isnan(float(m["loss"]))
    after = jax.tree.map(np.asarray, state)
    for a, b in zip(jax.tree.leaves(after), jax.tree.leaves(before)):
        assert a.tobytes() == b.tobytes()
    _, opt = step.merge(state)
    assert int(opt.step[...]) == 1

    guard = NonFiniteGuard(patience=2)
    assert guard(1, {"finite": True, "loss": 0.1, "grad_norm": 1.0})
    assert not guard(2, m)
    with pytest.raises(NonFiniteLossError, match="step 3: loss nan"):
        guard(3, m)


def test_donated_state_is_consumed():
    model, opt = build(None)
    step, state = make_train_step(model, opt, regression_loss)
    old_leaf = jax.tree.leaves(state)[0]
    state, _ = step(state, make_batch(0), jax.random.key(0))
    assert old_leaf.is_deleted()


def test_update_that_overflows_is_not_kept():
    """Finite loss and gradient norm, but lr 1e39 (inf in f32) makes the new adapters non-finite: the step is
    reported non-finite and the state is the one before it, so no checkpoint can hold the overflow (#14)."""
    import optax

    model, _ = build(None)
    opt = nnx.Optimizer(model, optax.sgd(1e39), wrt=nnx.LoRAParam)
    step, state = make_train_step(model, opt, regression_loss)
    before = jax.tree.map(np.asarray, state)
    state, m = step(state, make_batch(0), jax.random.key(0))
    assert np.isfinite(float(m["loss"])) and np.isfinite(float(m["grad_norm"])) and float(m["grad_norm"]) > 0
    assert not bool(m["finite"])
    for a, b in zip(jax.tree.leaves(jax.tree.map(np.asarray, state)), jax.tree.leaves(before)):
        assert a.tobytes() == b.tobytes()
