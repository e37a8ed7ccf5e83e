"""Sampling: flow-match schedules, the Euler step, the dual-expert sampler and temporal multidiffusion."""

from omnijax.sampling.dual_expert import make_sampler, sample
from omnijax.sampling.euler import euler_step, noise_like
from omnijax.sampling.multidiffusion import (
    TemporalWindows,
    merge_windows,
    repeat_for_windows,
    split_windows,
    window_bounds,
    window_weights,
    windowed_step,
)
from omnijax.sampling.schedules import (
    inference_sigmas,
    inference_timesteps,
    num_strata,
    sample_train_indices,
    shift_sigmas,
    switch_index,
    train_sigmas,
    train_timesteps,
)

__all__ = [
    "TemporalWindows", "euler_step", "inference_sigmas", "inference_timesteps", "make_sampler", "merge_windows",
    "noise_like", "num_strata", "repeat_for_windows", "sample", "sample_train_indices", "shift_sigmas",
    "split_windows", "switch_index", "train_sigmas", "train_timesteps", "window_bounds", "window_weights",
    "windowed_step",
]
