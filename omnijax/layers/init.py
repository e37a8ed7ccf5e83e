"""Random initialisers that do not compile one XLA program per parameter shape.

`jax.random.uniform` compiles a program per new shape (about 0.8 s each on a 2-core CPU), which made a model
with many distinct shapes (the VAE: 33) take 20 s to build. Concrete keys are therefore turned into a numpy
generator on the host; under abstract tracing (nnx.eval_shape, jit) the jax sampler is used, which only traces.
"""

from __future__ import annotations

import jax
import numpy as np


def uniform(key: jax.Array, shape, dtype, low: float, high: float):
    """U(low, high) of `shape` in `dtype`, reproducible from `key`."""
    if isinstance(key, jax.core.Tracer):
        return jax.random.uniform(key, shape, dtype, low, high)
    data = np.asarray(jax.random.key_data(key)).ravel().astype(np.uint64)
    rng = np.random.default_rng([int(x) for x in data])
    return jax.numpy.asarray(rng.uniform(low, high, size=shape).astype(np.float32), dtype)


def torch_default(key: jax.Array, shape, fan_in: int, dtype):
    """torch's default Linear/Conv init, kaiming-uniform(a=sqrt(5)) == U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / fan_in ** 0.5
    return uniform(key, shape, dtype, -bound, bound)
