"""Dense layer with separate storage (param_dtype) and compute (dtype) types.

Axis letters: I input features, O output features. The kernel is stored [I, O] (torch's [O, I] transposed).
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx
from jax import lax

from omnijax.layers.init import torch_default


def matmul_last(x, w, dtype):
    """x [..., I] @ w [I, O] in `dtype` (f32 accumulation asked for when dtype is f32).

    lax.dot_general rather than jnp.einsum: the same contraction without einsum's per-call path search and
    wrapper (~1 ms of tracing each); the 1.3B decompose sampler traces ~1,800 of them, and its trace (5.0 -> 3.8-4.2 s
    on a busy 2-core CPU) is paid by every process before the compilation cache is even asked.
    """
    return lax.dot_general(x.astype(dtype), w.astype(dtype), (((x.ndim - 1,), (0,)), ((), ())),
                           preferred_element_type=jnp.float32 if jnp.dtype(dtype) == jnp.float32 else None)


class Linear(nnx.Module):
    def __init__(self, in_features: int, out_features: int, *, use_bias: bool = True, dtype=jnp.float32,
                 param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.in_features, self.out_features = in_features, out_features
        self.dtype = dtype
        self.kernel = nnx.Param(torch_default(rngs.params(), (in_features, out_features), in_features, param_dtype))
        self.bias = nnx.Param(jnp.zeros((out_features,), param_dtype)) if use_bias else None

    def __call__(self, x, lora=None):
        """x [..., I] -> [..., O]. `lora` (a module mapping x to a [..., O] delta, e.g. omnijax.layers.lora.LoRA)
        adds its low-rank delta to these tokens; the frozen kernel is never merged with it."""
        y = matmul_last(x, self.kernel[...], self.dtype)
        if self.bias is not None:
            y = y + self.bias[...].astype(y.dtype)
        if lora is not None:
            y = y + lora(x).astype(y.dtype)
        return y.astype(self.dtype)
