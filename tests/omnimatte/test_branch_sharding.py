"""Activation sharding of the branch model: with a context axis the residual streams (and so whole blocks) are
split over tokens, and a sharded training step equals the single-device one."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from omnijax import sharding as S
from omnijax.omnimatte.branch import branch_block
from tests.omnimatte.helpers import experts, inputs, randomize_lora_b, tiny_base
from tests.torch_refs import rel_err

MESH = {"fsdp": 2, "context": 4}
# Batch 2 (over fsdp), 2 x 4 x 8 latents: 16 tokens per set, 4 per context shard.
SHAPE = dict(b=2, t=2, h=4, w=8)


def _loss(model, d, target):
    _, v = model(d["z_bg"], d["z_alpha"], d["timesteps"], d["context"], d["clip_features"], d["y"], train=True,
                 remat=True, attention_backend="xla")
    return jnp.mean(jnp.square(v - target))


def _loss_and_lora_grads(model, d, target):
    graphdef, lora, rest = nnx.split(model, nnx.LoRAParam, ...)
    f = jax.value_and_grad(lambda lora, rest, d, t: _loss(nnx.merge(graphdef, lora, rest), d, t))
    loss, grads = jax.jit(f)(lora, rest, d, target)
    return float(loss), {".".join(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(grads)}


@pytest.fixture(scope="module")
def setup():
    base = tiny_base(num_layers=2)
    eff, _ = experts(base, targets=("self_attn.q", "self_attn.v", "ffn.linear_1"))
    randomize_lora_b(eff)  # non-zero B: every adapter matrix gets a gradient
    d = inputs(0, **SHAPE)
    target = jax.random.normal(jax.random.key(7), d["z_alpha"].shape)
    return eff, d, target


def test_context_sharded_step_equals_single_device(setup):
    model, d, target = setup
    model.set_mesh(None)
    loss1, grads1 = _loss_and_lora_grads(model, d, target)  # no mesh: the constraints are no-ops
    mesh = S.make_mesh(MESH)
    with jax.set_mesh(mesh):
        S.shard_module(model, "fsdp", mesh, print_fn=None)
        model.set_mesh(mesh)
        loss8, grads8 = _loss_and_lora_grads(model, S.host_to_global(d, mesh), S.host_to_global(target, mesh))
    assert loss8 == pytest.approx(loss1, rel=1e-5)
    assert set(grads8) == set(grads1) and len(grads1) == 6  # q, v, linear_1 (a, b) of the one adapted block
    for k in grads1:
        assert np.abs(grads1[k]).max() > 0, k
        assert rel_err(grads8[k], grads1[k]) <= 1e-5, k


def test_branch_self_attention_runs_context_parallel(setup, monkeypatch):
    """Under a mesh with a context axis each block's self-attention calls go through omnijax.parallel.context
    (Ulysses or ring over the token shards) instead of leaving XLA to gather all keys."""
    from omnijax.parallel import context as cp

    model, d, target = setup
    calls = []
    real = cp.context_attention
    monkeypatch.setattr(cp, "context_attention", lambda q, k, v, **kw: calls.append((q.shape, k.shape)) or
                        real(q, k, v, **kw))
    model.set_mesh(None)
    _loss_and_lora_grads(model, d, target)
    assert calls == []  # no mesh: plain attention
    mesh = S.make_mesh(MESH)
    with jax.set_mesh(mesh):
        S.shard_module(model, "fsdp", mesh, print_fn=None)
        model.set_mesh(mesh)
        _loss_and_lora_grads(model, S.host_to_global(d, mesh), S.host_to_global(target, mesh))
    # Mask B, 2 blocks: bg over bg (16 keys) and alpha over [bg; alpha] (32 keys) in each block.
    assert sorted(calls) == sorted([((2, 16, 2, 32), (2, 16, 2, 32)), ((2, 16, 2, 32), (2, 32, 2, 32))] * 2), calls


def test_blocks_are_split_over_tokens(setup):
    model, d, _ = setup
    base = model.base
    mesh = S.make_mesh(MESH)
    with jax.set_mesh(mesh):
        S.shard_module(model, "fsdp", mesh, print_fn=None)
        model.set_mesh(mesh)
        d = S.host_to_global(d, mesh)
        graphdef, state = nnx.split(model)

        def first_block(state, d):  # one block, fed by the raw embedding (no constraint before it)
            base = nnx.merge(graphdef, state).base
            x_a, rope, _ = base.embed(d["z_alpha"], d["y"])
            x_b = base.embed(d["z_bg"], d["y"])[0]
            _, e0, text, image = base.condition(d["timesteps"], d["context"], d["clip_features"])
            return branch_block(base.blocks[0], None, x_b, x_a, e0, text, image, rope, mask="B", backend="xla",
                                freeze_background=False, mesh=mesh)

        x_b, x_a = jax.jit(first_block)(state, d)
        want = NamedSharding(mesh, P("fsdp", "context", None))
        for x in (x_b, x_a):
            assert x.shape == (2, 16, 64) and x.sharding.is_equivalent_to(want, 3), x.sharding

        # The whole forward, compiled per device: the FFN's first matmul ([tokens, D] x [D, F]) sees the
        # local 1 example x 16/4 tokens, not all 16 tokens (what it sees without the constraints).
        def forward(state, d):
            m = nnx.merge(graphdef, state)
            return m(d["z_bg"], d["z_alpha"], d["timesteps"], d["context"], d["clip_features"], d["y"], train=True,
                     attention_backend="xla")[1]

        hlo = jax.jit(forward).lower(state, d).compile().as_text()
    ffn = base.config.ffn_dim
    dots = re.findall(r"f32\[([\d,]+)\]\{[\d,]+\} dot\(", hlo)
    ffn_dots = [s for s in dots if s.endswith(f",{ffn}")]
    assert ffn_dots and set(ffn_dots) == {f"4,{ffn}"}, dots
