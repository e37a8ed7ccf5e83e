"""A generic jitted, donated train step for NNX models trained through `nnx.Optimizer(..., wrt=...)`.

The step works on the functional NNX state of (model, optimizer): `state = step.split(model, optimizer)`,
then `state, metrics = step(state, batch, rng)` in the loop, and `model, optimizer = step.merge(state)` to
sample, evaluate or checkpoint. The state is donated, so XLA updates it in place (and passes the frozen base
through untouched): after a call, only the returned state is valid.

Only the variables selected by the optimizer's `wrt` filter (nnx.LoRAParam for adapters) get gradients; the
rest of the model is read, never written. A step whose loss or gradient norm is not finite, or whose update
would leave a non-finite adapter or optimizer-state value, leaves the trainable parameters and the optimizer
state (its step counter included) unchanged and says so in `metrics["finite"]`; the loop decides whether to
stop.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

LossFn = Callable[..., Any]  # (model, batch, rng) -> loss scalar, or (loss, aux dict) with has_aux


def _all_finite(tree) -> jax.Array:
    leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves])) if leaves else jnp.array(True)


class NonFiniteLossError(FloatingPointError):
    """Training produced a non-finite loss or gradient norm too many times in a row."""


class TrainStep:
    """Compiled update step. Build with `make_train_step`."""

    def __init__(self, model: nnx.Module, optimizer: nnx.Optimizer, loss_fn: LossFn, *, has_aux: bool = False,
                 donate: bool = True, skip_nonfinite: bool = True):
        self.graphdef, state = nnx.split((model, optimizer))
        self.loss_fn = loss_fn
        self.has_aux = has_aux
        self.skip_nonfinite = skip_nonfinite
        # Pin the state's placement on the way in and out: a step never re-shards it silently, and the
        # (committed) returned state hits the same executable as the (possibly uncommitted) initial one.
        self.state_shardings = jax.tree.map(lambda x: x.sharding, state)
        self._jitted = jax.jit(self._step, donate_argnums=(0,) if donate else (),
                               in_shardings=(self.state_shardings, None, None),
                               out_shardings=(self.state_shardings, None))

    # --- functional state <-> objects
    def split(self, model: nnx.Module, optimizer: nnx.Optimizer) -> nnx.State:
        return nnx.split((model, optimizer))[1]

    def merge(self, state: nnx.State) -> tuple[nnx.Module, nnx.Optimizer]:
        return nnx.merge(self.graphdef, state)

    # --- the step
    def _step(self, state, batch, rng):
        model, opt = nnx.merge(self.graphdef, state)
        wrt = opt.wrt

        def loss_of(m):
            out = self.loss_fn(m, batch, rng)
            return out if self.has_aux else (out, {})

        (loss, aux), grads = nnx.value_and_grad(loss_of, argnums=nnx.DiffState(0, wrt), has_aux=True)(model)
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        # nnx.state shares the Variable objects with the module, so snapshot the arrays themselves.
        snapshot = lambda: jax.tree.map(lambda x: x, (nnx.state(model, wrt), nnx.state(opt)))
        before = snapshot()
        opt.update(model, grads)
        # An update can overflow even from finite gradients (a huge lr): the new adapters and optimizer state
        # must be finite too, or the step is not kept and a checkpoint never holds them.
        finite = finite & _all_finite(snapshot())
        if self.skip_nonfinite:
            kept = jax.tree.map(lambda new, old: jnp.where(finite, new, old), snapshot(), before)
            nnx.update(model, kept[0])
            nnx.update(opt, kept[1])
        metrics = dict(aux, loss=loss, grad_norm=grad_norm, finite=finite)
        return nnx.split((model, opt))[1], metrics

    def __call__(self, state: nnx.State, batch, rng: jax.Array):
        """One update. Returns (new state, metrics dict of scalars: loss, grad_norm, finite, *aux)."""
        return self._jitted(state, batch, rng)

    def lower(self, state, batch, rng):
        return self._jitted.lower(state, batch, rng)

    def compile(self, state, batch, rng) -> jax.stages.Compiled:
        """Ahead-of-time compile for these shapes (the caller can log `compiled.memory_analysis()`)."""
        return self.lower(state, batch, rng).compile()


def make_train_step(model: nnx.Module, optimizer: nnx.Optimizer, loss_fn: LossFn, *, has_aux: bool = False,
                    donate: bool = True, skip_nonfinite: bool = True) -> tuple[TrainStep, nnx.State]:
    """Builds the jitted step and returns it with the initial state of (model, optimizer).

    Args:
      model: the module (already placed on the mesh); its frozen variables pass through unchanged.
      optimizer: nnx.Optimizer(model, tx, wrt=nnx.LoRAParam) (created under `jax.set_mesh`).
      loss_fn: loss_fn(model, batch, rng) -> scalar loss (or (loss, aux) when has_aux).
      donate: donate the state buffers (after a call only the returned state is valid).
      skip_nonfinite: keep the old trainable state and optimizer state when loss/grad norm is inf/nan.
    """
    step = TrainStep(model, optimizer, loss_fn, has_aux=has_aux, donate=donate, skip_nonfinite=skip_nonfinite)
    return step, step.split(model, optimizer)


class NonFiniteGuard:
    """Counts consecutive non-finite steps; raises NonFiniteLossError after `patience` of them.

    `first_bad_step` is the first step of the current non-finite run: the state those steps started from (the
    state after step first_bad_step - 1, unchanged since as the updates were skipped) gave non-finite results on
    `patience` batches in a row, so it is wrecked even when its values are finite (e.g. exploded by a huge lr),
    and no checkpoint from step first_bad_step - 1 on may be resumed from.
    """

    def __init__(self, patience: int = 3):
        self.patience = patience
        self.count = 0
        self.first_bad_step: int | None = None

    def __call__(self, step: int, metrics) -> bool:
        """Returns True if the step was finite; raises once `patience` non-finite steps come in a row."""
        if bool(metrics["finite"]):
            self.count, self.first_bad_step = 0, None
            return True
        if self.count == 0:
            self.first_bad_step = int(step)
        self.count += 1
        if self.count >= self.patience:
            raise NonFiniteLossError(f"step {step}: loss {float(metrics['loss'])}, grad norm "
                                     f"{float(metrics['grad_norm'])}: {self.count} non-finite steps in a row")
        return False
