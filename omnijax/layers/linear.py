"""Dense layer with separate storage (param_dtype) and compute (dtype) types.

Axis letters: I input features, O output features. The kernel is stored [I, O] (torch's [O, I] transposed).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


class Linear(nnx.Module):
    def __init__(self, in_features: int, out_features: int, *, use_bias: bool = True, dtype=jnp.float32,
                 param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.in_features, self.out_features = in_features, out_features
        self.dtype = dtype
        # torch.nn.Linear's default init (kaiming-uniform a=sqrt(5) == U(-1/sqrt(I), 1/sqrt(I))).
        bound = 1.0 / in_features ** 0.5
        self.kernel = nnx.Param(jax.random.uniform(rngs.params(), (in_features, out_features), param_dtype,
                                                   -bound, bound))
        self.bias = nnx.Param(jnp.zeros((out_features,), param_dtype)) if use_bias else None

    def __call__(self, x, lora=None):
        """x [..., I] -> [..., O]. `lora` (a module mapping x to a [..., O] delta, e.g. omnijax.layers.lora.LoRA)
        adds its low-rank delta to these tokens; the frozen kernel is never merged with it."""
        y = jnp.einsum("...i,io->...o", x.astype(self.dtype), self.kernel[...].astype(self.dtype),
                       preferred_element_type=jnp.float32 if self.dtype == jnp.float32 else None)
        if self.bias is not None:
            y = y + self.bias[...].astype(y.dtype)
        if lora is not None:
            y = y + lora(x).astype(y.dtype)
        return y.astype(self.dtype)
