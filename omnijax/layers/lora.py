"""Low-rank adapters (LoRA) kept apart from the frozen weights they adapt.

Axis letters: I input features, O output features, R rank.

An adapter computes the delta (alpha / R) * B(A x) with A [I, R] and B [R, O] stored as `nnx.LoRAParam`, so
`nnx.state(model, nnx.LoRAParam)` is exactly the trainable set (optimizer `wrt=nnx.LoRAParam`, LoRA-only
checkpoints, sharding rules), while the frozen base stays plain `nnx.Param`. The delta is never merged into
the base kernel: the branch model applies it to one token set only, which a merged weight cannot do.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from omnijax.layers.init import uniform
from omnijax.layers.linear import matmul_last


class LoRA(nnx.Module):
    """One adapter: `__call__(x [..., I]) -> delta [..., O]` in `dtype`."""

    def __init__(self, in_features: int, out_features: int, *, rank: int, alpha: float, dtype=jnp.float32,
                 param_dtype=jnp.float32, rngs: nnx.Rngs | None):
        """rngs None: abstract parameters (jax.ShapeDtypeStruct, as under nnx.eval_shape, without tracing an init)
        for a caller that fills them next, e.g. from a file; an unfilled adapter cannot run."""
        if rank <= 0:
            raise ValueError(f"LoRA rank must be positive, got {rank}")
        self.in_features, self.out_features = in_features, out_features
        self.rank, self.alpha = int(rank), float(alpha)
        self.dtype = dtype
        if rngs is None:
            self.lora_a = nnx.LoRAParam(jax.ShapeDtypeStruct((in_features, rank), param_dtype))
            self.lora_b = nnx.LoRAParam(jax.ShapeDtypeStruct((rank, out_features), param_dtype))
            return
        # Kaiming-uniform with a = sqrt(5) over fan_in = I (torch's Linear default and PEFT's lora_A init):
        # gain sqrt(2 / (1 + a^2)) = sqrt(1/3), bound = gain * sqrt(3 / fan_in) = 1 / sqrt(I).
        bound = math.sqrt(1.0 / 3.0) * math.sqrt(3.0 / in_features)
        self.lora_a = nnx.LoRAParam(uniform(rngs.params(), (in_features, rank), param_dtype, -bound, bound))
        # B = 0 makes a fresh adapter the identity of the frozen model.
        self.lora_b = nnx.LoRAParam(jnp.zeros((rank, out_features), param_dtype))

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def __call__(self, x):
        h = matmul_last(x, self.lora_a[...], self.dtype).astype(self.dtype)
        y = matmul_last(h, self.lora_b[...], self.dtype)
        return (y * self.scale).astype(self.dtype)


def lora_param_count(in_features: int, out_features: int, rank: int) -> int:
    """Closed form: A has I*R entries, B has R*O."""
    return rank * (in_features + out_features)


# A gated adapter whose runs cover at least this share of the axis computes its delta on every token and zeroes it
# outside the runs (one select, fused into the add) instead of slicing the runs out and padding the delta back:
# the slices and pads, and their transposes in the backward pass, are memory passes over the whole activation.
# Measured on the DiffDecompose training step (docs/benchmarks.md, issue 18).
MASK_COVERAGE = 0.5


class TokenGated:
    """An adapter applied to some token ranges only: the delta is the adapter's on `runs` and zero elsewhere.

    A plain callable with the adapter's interface, so `Linear(x, lora=TokenGated(...))` adapts a static subset of
    tokens (Flux segments whose LoRA switch is on) through the same `lora=` argument as the branch model.
    Two exact ways (same values and gradients): `masked=True` runs the adapter on every token and selects zero
    outside the runs; False runs it on the runs' slices only and pads the result; None (default) masks when the
    runs cover at least MASK_COVERAGE of the axis.
    """

    def __init__(self, adapter: LoRA, runs, *, axis: int = -2, masked: bool | None = None):
        self.adapter, self.runs, self.axis, self.masked = adapter, tuple(runs), axis, masked

    def __call__(self, x):
        axis = self.axis % x.ndim
        length = x.shape[axis]
        masked = self.masked
        if masked is None:
            masked = sum(b - a for a, b in self.runs) >= MASK_COVERAGE * length
        if masked:
            keep = np.zeros(length, bool)
            for a, b in self.runs:
                keep[a:b] = True
            shape = [1] * x.ndim
            shape[axis] = length
            delta = self.adapter(x)
            return jnp.where(keep.reshape(shape), delta, jnp.zeros((), delta.dtype))
        pieces, pos = [], 0
        zeros = lambda n: jnp.zeros((*x.shape[:axis], n, *x.shape[axis + 1:-1], self.adapter.out_features),
                                    self.adapter.dtype)
        for a, b in self.runs:
            if a > pos:
                pieces.append(zeros(a - pos))
            pieces.append(self.adapter(jax.lax.slice_in_dim(x, a, b, axis=axis)))
            pos = b
        if pos < length:
            pieces.append(zeros(length - pos))
        return jnp.concatenate(pieces, axis=axis)


def gated(adapter: LoRA | None, runs, length: int, *, axis: int = -2):
    """The `lora=` argument that applies `adapter` to the token ranges `runs` of a length-`length` axis: None when
    there is no adapter or no run, the adapter itself when the runs cover everything, else a TokenGated."""
    runs = tuple((a, b) for a, b in runs if b > a)
    if adapter is None or not runs:
        return None
    if runs == ((0, length),):
        return adapter
    return TokenGated(adapter, runs, axis=axis)


def merge_runs(ranges, switches) -> tuple[tuple[int, int], ...]:
    """Contiguous (start, end) runs covering the ranges whose switch is on (adjacent ranges merged)."""
    runs: list[list[int]] = []
    for (a, b), on in zip(ranges, switches):
        if not on or b <= a:
            continue
        if runs and runs[-1][1] == a:
            runs[-1][1] = b
        else:
            runs.append([a, b])
    return tuple((a, b) for a, b in runs)
