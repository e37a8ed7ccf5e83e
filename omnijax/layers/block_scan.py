"""Run a stack of transformer blocks as `lax.scan` loops: one traced block per run of identical blocks.

`run_blocks(step, items, carry)` computes `carry = step(item, carry)` for each item in order (an item is a block,
or a tuple such as (block, its adapters or None)). Consecutive items of one structure (equal NNX graphdefs: same
module types, shapes and static settings) are stacked along a new leading axis and run as one `lax.scan`, so
JAX traces, lowers and XLA compiles that block once per run instead of once per block.

Why: a decomposition sampler holds two 30-block experts; unrolled, its first call in every process traced
~16,000 inner calls (3.3 s on a 2-core CPU, 0.6 s scanned) before the persistent compilation cache could even be
asked (docs/benchmarks.md, issue 19); scanned, its cold compile on an H200 took 11.6 s instead of 47.9 s. The math
is the same block applied to the same values, so scanned and unrolled results agree to float rounding
(tests/layers/test_block_scan.py).

The price: the scanned blocks' arrays are stacked inside the compiled program (a copy of those blocks' weights).
On an H200 the scanned 1.3B sampler was no slower (2.458 vs 2.502 s for 2 steps) and the decompose CLI's peak
memory did not rise (14.1 GB), docs/benchmarks.md. Used for inference; training steps keep the unrolled blocks
(per-block remat, stop_gradient boundaries).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx


def block_runs(items: Sequence[Any]) -> list[tuple[int, int]]:
    """[(start, end)] of maximal runs of consecutive items with one NNX graphdef (structure)."""
    return _runs([nnx.split(item)[0] for item in items])


def _runs(graphdefs: Sequence[Any]) -> list[tuple[int, int]]:
    runs: list[tuple[int, int]] = []
    for i, graphdef in enumerate(graphdefs):
        if runs and graphdef == graphdefs[i - 1]:
            runs[-1] = (runs[-1][0], i + 1)
        else:
            runs.append((i, i + 1))
    return runs


def run_blocks(step: Callable[[Any, Any], Any], items: Sequence[Any], carry, *, scan: bool = True):
    """carry = step(items[i], carry) for i = 0..n-1; runs of identical items as lax.scan loops (see module doc).

    Args:
      step: (item, carry) -> new carry with the carry's structure, shapes and dtypes.
      items: the blocks (NNX modules, or pytrees of modules and None).
      carry: any pytree of arrays (None leaves are kept).
      scan: False runs every item in a Python loop (the unrolled reference).
    """
    if not scan:
        for item in items:
            carry = step(item, carry)
        return carry
    # Each item split once (splitting walks the item's whole graph: a third of the sampler's trace when every block
    # was split twice, once to find the runs and once to stack them).
    graphdefs, states = zip(*(nnx.split(item) for item in items)) if items else ((), ())
    for start, end in _runs(graphdefs):
        if end - start == 1:
            carry = step(items[start], carry)
            continue
        stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *states[start:end])

        def body(c, state, graphdef=graphdefs[start]):
            return step(nnx.merge(graphdef, state), c), None

        carry, _ = jax.lax.scan(body, carry, stacked)
    return carry
