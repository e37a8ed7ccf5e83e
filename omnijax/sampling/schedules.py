"""Flow-matching sigma schedules of Wan2.1 / Casper (shared/spec/wan.md §4.1).

Interpolation x_sigma = (1 - sigma) * x0 + sigma * eps; sigma = 1 is noise, sigma = 0 is data; the DiT is fed
t = 1000 * sigma. The tables reproduce diffusers' FlowMatchEulerDiscreteScheduler with
num_train_timesteps=1000, shift=5, no dynamic shifting, bit for bit: the training table is computed in float32
(as the scheduler's torch code does), the inference table in float64 from the float32 end points and cast to
float32 at the end (as its numpy code does). The inference table is shifted a second time, so its last
non-zero sigma is S(S(0.001)) = 0.02441, not 0.00498.

Also the training-time sampler of table indices: uniform over the table, optionally stratified across data
parallel ranks the way VideoX-Fun's `--uniform_sampling` does (spec §4.4).

Axis letters: B batch, I table entries (1000), N inference steps.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

NUM_TRAIN_TIMESTEPS = 1000
DEFAULT_SHIFT = 5.0


def shift_sigmas(s, shift: float = DEFAULT_SHIFT):
    """The time shift S(s) = shift * s / (1 + (shift - 1) * s); keeps the dtype of `s` (numpy or jax)."""
    return shift * s / (1 + (shift - 1) * s)


def _check_shift(shift: float) -> None:
    if not shift > 0:
        raise ValueError(f"shift must be > 0, got {shift}")


def train_sigmas(shift: float = DEFAULT_SHIFT, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> np.ndarray:
    """The training sigma table: sigma_i = S((I - i) / I) for i = 0..I-1, float32 [I], decreasing.

    sigma_0 = 1 and sigma_{I-1} = S(1/I) (0.0049801 for I = 1000, shift 5).
    """
    _check_shift(shift)
    if num_train_timesteps < 2:
        raise ValueError(f"num_train_timesteps must be >= 2, got {num_train_timesteps}")
    # float32 throughout, operation by operation, because the scheduler builds this table in torch float32.
    t = np.linspace(1, num_train_timesteps, num_train_timesteps, dtype=np.float32)[::-1]
    s = t / np.float32(num_train_timesteps)
    return shift_sigmas(s, np.float32(shift)).astype(np.float32)


def train_timesteps(shift: float = DEFAULT_SHIFT, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> np.ndarray:
    """The DiT timesteps of the training table, 1000 * sigma_i, float32 [I]."""
    return train_sigmas(shift, num_train_timesteps) * np.float32(num_train_timesteps)


def inference_sigmas(num_steps: int, shift: float = DEFAULT_SHIFT,
                     num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> np.ndarray:
    """The sigmas of an N-step sampling run, float32 [N + 1], from 1.0 down to the appended final 0.

    N points are spaced linearly between the training table's end points (sigma_max = 1, sigma_min = S(1/I)) and
    then shifted again, so the low end is shifted twice. N = 4 gives 1.0, 0.90971, 0.71732, 0.02441, 0.
    """
    if isinstance(num_steps, bool) or not isinstance(num_steps, (int, np.integer)) or num_steps < 1:
        raise ValueError(f"num_steps must be a positive int, got {num_steps!r}")
    table = train_sigmas(shift, num_train_timesteps)
    # The end points are float32 values promoted to Python floats; the spacing and second shift run in float64.
    sigma_max, sigma_min = float(table[0]), float(table[-1])
    t = np.linspace(sigma_max * num_train_timesteps, sigma_min * num_train_timesteps, int(num_steps))
    sigmas = shift_sigmas(t / num_train_timesteps, float(shift)).astype(np.float32)
    return np.concatenate([sigmas, np.zeros(1, np.float32)])


def inference_timesteps(num_steps: int, shift: float = DEFAULT_SHIFT,
                        num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> np.ndarray:
    """The DiT timesteps of an N-step run, 1000 * sigma (float32 [N], without the final sigma = 0)."""
    return inference_sigmas(num_steps, shift, num_train_timesteps)[:-1] * np.float32(num_train_timesteps)


def num_strata(num_ranks: int, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> int:
    """How many strata the table is cut into for `num_ranks` data-parallel ranks.

    The largest divisor G of num_ranks that also divides the table length (VideoX-Fun's rule): 4 ranks -> 4,
    16 ranks -> 8 (1000 is not divisible by 16), 3 ranks -> 1. Ranks r // (num_ranks / G) share stratum.
    """
    if num_ranks < 1:
        raise ValueError(f"num_ranks must be >= 1, got {num_ranks}")
    return max(g for g in range(1, num_ranks + 1) if num_ranks % g == 0 and num_train_timesteps % g == 0)


def sample_train_indices(key: jax.Array, batch_size: int, *, num_ranks: int = 1,
                         num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> jax.Array:
    """Draws training-table indices, int32 [B], uniform over {0..I-1} overall.

    With num_ranks > 1 the global batch is read as num_ranks contiguous per-rank chunks (the layout of a batch
    sharded along a data mesh axis), and rank r draws only from its stratum
    [g * I / G, (g + 1) * I / G) with g = r // (num_ranks / G), G = num_strata(num_ranks). This lowers the variance
    of the per-step loss across the schedule without changing its expectation (spec/wan.md §8 item 11).

    Args:
        key: PRNG key.
        batch_size: B, the global batch; must be divisible by num_ranks.
        num_ranks: number of data-parallel ranks (1 = plain i.i.d. uniform sampling).
        num_train_timesteps: I, the table length.

    Returns:
        int32 [B] indices into `train_sigmas()`; look up sigma with `train_sigmas()[idx]`.
    """
    if batch_size < 1 or batch_size % num_ranks:
        raise ValueError(f"batch_size ({batch_size}) must be a positive multiple of num_ranks ({num_ranks})")
    groups = num_strata(num_ranks, num_train_timesteps)
    width = num_train_timesteps // groups
    ranks_per_group = num_ranks // groups
    rank = np.repeat(np.arange(num_ranks), batch_size // num_ranks)  # [B], static
    low = jnp.asarray((rank // ranks_per_group) * width, jnp.int32)
    return low + jax.random.randint(key, (batch_size,), 0, width, dtype=jnp.int32)


def switch_index(sigmas, tau):
    """The number of steps run by the Effect Expert: steps i with sigmas[i] > tau (eq. 7 of the paper).

    Works on numpy values (returns an int) and on traced jax values (returns an int32 scalar), so tau can be a
    runtime argument of a jitted sampler. `sigmas` is the [N + 1] table; its last entry is not a step.
    """
    if isinstance(sigmas, np.ndarray) and not isinstance(tau, jax.Array):
        return int(np.sum(sigmas[:-1] > tau))
    return jnp.sum(jnp.asarray(sigmas)[:-1] > tau).astype(jnp.int32)
