"""Building models fast: random initialisers and the RNG streams the builders draw from.

`jax.random.uniform` compiles a program per new shape (about 0.8 s each on a 2-core CPU), which made a model
with many distinct shapes (the VAE: 33) take 20 s to build. Concrete keys are therefore turned into a numpy
generator on the host; under abstract tracing (nnx.eval_shape, jit) the jax sampler is used, which only traces.

`InitRngs` is `nnx.Rngs` for building a module, above all abstractly (every converted checkpoint is restored into
an `nnx.eval_shape` build). flax's stream advances its counter with `count[...] += 1`; under tracing, that
indexed update reads `.sharding` of the traced counter, and JAX answers with an AttributeError whose message walks
the whole trace so far, once per parameter: quadratic in the model's size. The 1.3B Wan DiT's abstract build took
2.3-3.5 s on a 2-core CPU (jax 0.10.2, flax 0.12.8; profiled, 77 % of it building those messages) and takes
0.4-0.8 s with `InitRngs`. It draws the same keys (fold_in(key, count), then count + 1): a model built with it has
the same weights as with `nnx.Rngs` (tests/layers/test_init.py).
"""

from __future__ import annotations

import jax
import numpy as np
from flax import nnx


class _InitStream(nnx.RngStream):
    def __call__(self) -> jax.Array:
        key = jax.random.fold_in(self.key.get_value(), self.count.get_value())
        self.count.set_value(self.count.get_value() + 1)  # a plain replace: no indexed update, no .sharding read
        return key


class InitRngs(nnx.Rngs):
    """`nnx.Rngs` (same arguments, same keys) whose streams advance cheaply under tracing; for building modules."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        for tag, stream in list(vars(self).items()):
            if isinstance(stream, nnx.RngStream):
                setattr(self, tag, _InitStream(stream.key.get_value(), tag=tag))


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
