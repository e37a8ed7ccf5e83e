"""Scanned blocks (omnijax.layers.block_scan) against the unrolled Python loop they replace."""

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
from flax import nnx

from omnijax.layers.block_scan import block_runs, run_blocks
from omnijax.layers.linear import Linear
from tests.omnimatte.helpers import experts, inputs, randomize_lora_b, run, tiny_base
from tests.torch_refs import rel_err


class _Block(nnx.Module):
    def __init__(self, d, rngs, width=None):
        self.lin = Linear(d, width or d, rngs=rngs)

    def __call__(self, x):
        return jnp.tanh(self.lin(x))


def test_runs_group_consecutive_identical_structures():
    rngs = nnx.Rngs(0)
    a = [_Block(4, rngs) for _ in range(3)]
    lora = nnx.Dict({"x": _Block(4, rngs)})
    items = [(a[0], None), (a[1], None), (a[2], lora), (a[0], lora), (a[1], None)]
    assert block_runs(items) == [(0, 2), (2, 4), (4, 5)]
    assert block_runs([_Block(4, rngs), _Block(4, rngs, width=4), _Block(3, rngs, width=4)]) == [(0, 2), (2, 3)]


def test_scan_equals_loop_and_keeps_the_order():
    rngs = nnx.Rngs(0)
    blocks = [_Block(8, rngs) for _ in range(5)]
    x = jax.random.normal(jax.random.key(1), (3, 8))
    want = x
    for blk in blocks:  # the closed form: the blocks applied one after another
        want = jnp.tanh(want @ blk.lin.kernel[...] + blk.lin.bias[...])
    step = lambda blk, c: (blk(c[0]), c[1])
    got, none = jax.jit(lambda x: run_blocks(step, blocks, (x, None)))(x)
    assert none is None
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)
    # The blocks do not commute, so a scan in the wrong order would fail the check above.
    assert rel_err(run_blocks(step, blocks[::-1], (x, None))[0], want) > 1e-3


def _count_dots(jaxpr) -> int:
    n = 0
    for eqn in jaxpr.eqns:
        n += eqn.primitive.name == "dot_general"
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            n += _count_dots(sub)
    return n


def test_expert_inference_scanned_equals_unrolled_and_traces_one_block_per_run():
    base = tiny_base(num_layers=5)
    eff, qual = experts(base, k=2)  # effect: blocks 3-4 adapted -> runs [0, 3), [3, 5); quality: one run
    for m in (eff, qual):
        randomize_lora_b(m)
    d = inputs()
    for model in (eff, qual):
        want = run(model, d, scan=False)
        got = jax.jit(lambda model=model: run(model, d, scan=True))()
        for g, w in zip(got, want):
            assert rel_err(g, w) <= 1e-5, model.expert.name
    # Traced work: unrolled grows with the depth, scanned holds one block per run.
    dots = {}
    for layers in (5, 9):
        e, _ = experts(tiny_base(num_layers=layers), k=2)
        for scan in (True, False):
            dots[layers, scan] = _count_dots(jax.make_jaxpr(lambda e=e, scan=scan: run(e, d, scan=scan))().jaxpr)
    assert dots[5, True] == dots[9, True]
    assert dots[9, False] > dots[5, False] > dots[5, True]
