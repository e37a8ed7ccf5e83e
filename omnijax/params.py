"""Helpers between NNX modules and flat {"a.b.0.kernel": array} parameter dicts."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import jax
import numpy as np
from flax import nnx


def path_str(path) -> str:
    return ".".join(str(p) for p in path)


def flat_params(module_or_state, var_type=nnx.Param) -> dict[str, nnx.Variable]:
    """{dotted path: variable} for the module's (or state's) variables of `var_type`."""
    state = module_or_state if isinstance(module_or_state, nnx.State) else nnx.state(module_or_state, var_type)
    return {path_str(p): v for p, v in nnx.to_flat_state(state)}


def param_shapes(abstract_module) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """{path: (shape, dtype)} of the nnx.Param leaves of an (abstract or real) module."""
    return {k: (tuple(v.get_value().shape), np.dtype(v.get_value().dtype))
            for k, v in flat_params(abstract_module).items()}


def count_params(module) -> int:
    return sum(int(np.prod(s)) for s, _ in param_shapes(module).values())


def build_with_params(make: Callable[[], nnx.Module], params: Mapping[str, np.ndarray],
                      shardings: Mapping[str, jax.sharding.Sharding] | None = None) -> nnx.Module:
    """Builds `make()` abstractly (no allocation) and fills its nnx.Param leaves from `params`.

    Every parameter must be present. Non-Param variables (none in the DiT) keep their initial values.
    `shardings` places each array ({path: Sharding}); otherwise the default device is used.
    """
    abstract = nnx.eval_shape(make)
    graphdef, state = nnx.split(abstract)
    flat = nnx.to_flat_state(state)
    leaves = []
    for path, var in flat:
        key = path_str(path)
        if not isinstance(var, nnx.Param):
            raise TypeError(f"{key}: only nnx.Param variables can be filled from a checkpoint")
        if key not in params:
            raise KeyError(f"no value for parameter {key}")
        arr = params[key]
        dev = shardings.get(key) if shardings else None
        leaves.append((path, var.replace(jax.device_put(arr, dev))))
    return nnx.merge(graphdef, nnx.from_flat_state(leaves))
