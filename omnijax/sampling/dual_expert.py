"""The jitted dual-expert flow-match sampler (shared/spec/easyomnimatte.md §4, paper eq. 7).

Steps i = 0..N-1 run from sigmas[i] to sigmas[i+1]. The Effect Expert predicts the velocity while
sigmas[i] > tau, the Quality Expert while sigmas[i] <= tau. The sigma table decreases, so the Effect Expert
owns the first k = #{i : sigmas[i] > tau} steps (`schedules.switch_index`) and the Quality Expert the rest.

Why two loops with a *traced* switch index (`lax.fori_loop(0, k, effect)` then `lax.fori_loop(k, N, quality)`):
- tau and the seed are runtime values, so changing them never retraces or recompiles; only the shapes (and N,
  the length of the sigma table) enter the compiled program.
- Each step runs exactly one expert: the loop bodies each hold one expert, so there is no per-step branch and
  nothing is computed and thrown away (a `jnp.where` between both experts would double the cost of every step;
  a `lax.cond` inside one scan would work too, but adds a predicate per step and puts both experts in one
  body). Static-length `lax.scan` loops per phase would recompile for every new k.
- The price: loops with runtime trip counts are while loops, which are not reverse-differentiable. Sampling
  needs no gradients (training differentiates single steps).

The state is any pytree (e.g. {"background", "alpha"} or a tuple); several objects go along the batch axis.
Temporal multidiffusion (`multidiffusion.TemporalWindows`) plugs into every step.

Axis letters: B batch, T latent frames, N steps.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from omnijax.sampling.multidiffusion import TemporalWindows, windowed_step

# (state, sigma) -> velocity with the state's structure and shapes; sigma is a float32 scalar (the DiT's
# timestep is 1000 * sigma).
Expert = Callable


def _check_sigmas(sigmas) -> int:
    if jnp.ndim(sigmas) != 1 or jnp.shape(sigmas)[0] < 2:
        raise ValueError(f"sigmas must be a 1-D table of N + 1 >= 2 entries (ending in 0), got shape "
                         f"{jnp.shape(sigmas)}")
    return jnp.shape(sigmas)[0] - 1


def sample(effect_fn: Expert, quality_fn: Expert, z_init, sigmas, switch_index, *,
           windows: TemporalWindows | None = None):
    """Runs the dual-expert Euler sampler; traceable, so it can sit inside the caller's jit.

    Args:
        effect_fn: Effect Expert, (state, sigma) -> velocity; runs steps [0, switch_index).
        quality_fn: Quality Expert, (state, sigma) -> velocity; runs steps [switch_index, N).
        z_init: pytree of initial latents (noise at sigmas[0] = 1), e.g. leaves [B, T, H, W, C].
        sigmas: [N + 1] decreasing sigma table ending in 0 (`schedules.inference_sigmas`); numpy or traced.
        switch_index: int or traced int32 scalar k in [0, N] (`schedules.switch_index(sigmas, tau)`); a traced
            value outside [0, N] is clipped.
        windows: optional static temporal-multidiffusion layout; when active the experts receive the windows
            stacked along the batch axis ([n*B, W, ...], see `multidiffusion.split_windows`).

    Returns:
        The final state, same structure, shapes and dtypes as `z_init`.
    """
    n = _check_sigmas(sigmas)
    if isinstance(switch_index, (int, np.integer)) and not 0 <= switch_index <= n:
        raise ValueError(f"switch_index must be in [0, {n}], got {switch_index}")
    sigmas = jnp.asarray(sigmas, jnp.float32)
    k = jnp.clip(jnp.asarray(switch_index, jnp.int32), 0, n)

    def body(expert):
        def step(i, state):
            return windowed_step(expert, state, sigmas[i], sigmas[i + 1], windows)
        return step

    state = jax.lax.fori_loop(0, k, body(effect_fn), z_init)
    return jax.lax.fori_loop(k, n, body(quality_fn), state)


def make_sampler(effect_fn: Callable, quality_fn: Callable, *, donate_state: bool = False) -> Callable:
    """A jitted sampler for experts that take their inputs (weights, conditioning) as an explicit argument.

    The experts are (state, sigma, cond) -> velocity. `cond` is any pytree (model state, condition latents, text
    context, ...) passed as a traced argument, so large arrays are not baked into the program as constants.

    Returns:
        run(z_init, sigmas, switch_index, cond=None, windows=None) -> final state. `windows` is static (one
        compilation per layout); z_init, sigmas, switch_index and cond are traced: a new seed (new z_init
        values) or a new tau (new switch index) reuses the compiled program. With active windows, window the
        conditioning yourself (`split_windows`, `repeat_for_windows`) before the call.
    """

    def run(z_init, sigmas, switch_index, cond, windows):
        return sample(functools.partial(_with_cond, effect_fn, cond), functools.partial(_with_cond, quality_fn, cond),
                      z_init, sigmas, switch_index, windows=windows)

    jitted = jax.jit(run, static_argnames=("windows",), donate_argnums=(0,) if donate_state else ())

    @functools.wraps(run)
    def call(z_init, sigmas, switch_index, cond=None, windows=None):
        # Fixed dtypes for the schedule arguments: a Python int (weakly typed) and an int32 array would
        # otherwise be two different signatures and compile twice.
        return jitted(z_init, _as(sigmas, np.float32), _as(switch_index, np.int32), cond, windows=windows)

    def lower(z_init, sigmas, switch_index, cond=None, windows=None):
        """The program `call` runs for these arguments, lowered; its `.compile()` leaves the program in jit's caches,
        where the call then finds it."""
        return jitted.lower(z_init, _as(sigmas, np.float32), _as(switch_index, np.int32), cond, windows=windows)

    call.jitted = jitted  # exposes the compile cache (e.g. `_cache_size()`) to tests
    call.lower = lower
    return call


def _as(x, dtype):
    """x as a device array of `dtype`: host values cast on the host and copied (a cast on the device would be one
    more program for a new process to compile or load)."""
    if isinstance(x, jax.Array):  # (a weakly typed array would be another signature: made strong)
        return x if x.dtype == dtype and not x.weak_type else jnp.asarray(x, dtype)
    return jax.device_put(np.asarray(x, dtype))


def _with_cond(expert, cond, state, sigma):
    return expert(state, sigma, cond)
