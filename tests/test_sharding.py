"""Mesh construction, partition-rule matching and its errors, LoRA placement, activation constraints."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from omnijax import sharding as S
from omnijax.models.wan.dit import WanDiT
from omnijax.models.wan.variants import variant
from tests.training.lora_model import TinyLoRANet


def _abstract_dit(name, mesh, **overrides):
    with jax.set_mesh(mesh):
        return nnx.eval_shape(lambda: WanDiT(variant(name, **overrides), rngs=nnx.Rngs(0)))


def test_mesh_from_config():
    mesh = S.make_mesh({"data": 2, "fsdp": -1})
    assert mesh.axis_names == S.MESH_AXES
    assert dict(mesh.shape) == {"data": 2, "fsdp": 4, "context": 1, "tensor": 1}
    assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)
    assert dict(S.make_mesh().shape)["fsdp"] == 8
    assert S.mesh_shape({"context": 4, "tensor": 2}, 8) == {"data": 1, "fsdp": 1, "context": 4, "tensor": 2}


@pytest.mark.parametrize("config, match", [
    ({"data": -1, "fsdp": -1}, "only one mesh axis"),
    ({"data": 3, "fsdp": -1}, "do not divide"),
    ({"data": 2, "fsdp": 2}, "has 4 slots but there are 8"),
    ({"model": 8}, "unknown mesh axes"),
    ({"data": 0, "fsdp": -1}, "positive"),
])
def test_mesh_errors(config, match):
    with pytest.raises(S.ShardingError, match=match):
        S.make_mesh(config)


def test_first_match_wins_and_wan_fsdp_rules():
    mesh = S.make_mesh({"data": 2, "fsdp": 4})
    shapes = S.state_shapes(_abstract_dit("tiny-inp", mesh))
    placed = S.resolve(shapes, "fsdp", mesh)
    assert set(placed) == set(shapes)
    # Independent expectations per parameter kind (not read back from the rule table).
    for path, p in placed.items():
        leaf = path.rsplit(".", 1)[-1]
        if leaf in ("bias", "scale") or leaf == "modulation":
            assert p.spec == P(), path
        elif path == "patch_embedding.kernel":
            assert p.spec == P(None, None, None, None, "fsdp")
        else:
            assert leaf == "kernel" and p.spec == P("fsdp", None), path
    # An earlier, more specific rule takes precedence over the later generic one.
    rules = [(r"blocks\.1\.ffn\.linear_1\.kernel$", P(None, "fsdp"))] + list(S.RULE_SETS["fsdp"])
    placed = S.resolve(shapes, rules, mesh)
    assert placed["blocks.1.ffn.linear_1.kernel"].spec == P(None, "fsdp")
    assert placed["blocks.0.ffn.linear_1.kernel"].spec == P("fsdp", None)
    assert placed["blocks.1.ffn.linear_1.kernel"].rule == rules[0][0]


def test_unmatched_param_is_an_error_naming_it():
    mesh = S.make_mesh({"fsdp": 8})
    shapes = {"blocks.0.self_attn.q.kernel": (64, 64), "head.modulation": (1, 2, 64)}
    with pytest.raises(S.ShardingError, match=r"head\.modulation \(1, 2, 64\): matches no sharding rule"):
        S.resolve(shapes, [(r"kernel$", P("fsdp"))], mesh)


def test_non_dividing_spec_is_an_error_naming_param_and_spec():
    mesh = S.make_mesh({"fsdp": 8})
    shapes = {"patch_embedding.kernel": (1, 2, 2, 36, 64), "ok.kernel": (64, 64)}
    rules = [(r"kernel$", P(None, None, None, "fsdp")), (".*", P())]
    with pytest.raises(S.ShardingError) as e:
        S.resolve(shapes, rules, mesh)
    msg = str(e.value)
    assert "patch_embedding.kernel (1, 2, 2, 36, 64): spec P(None, None, None, 'fsdp')" in msg
    assert "does not divide dim 36 by mesh axes fsdp of size 8" in msg
    # Every problem is listed at once: the 2-d kernel cannot take a 4-entry spec.
    assert "ok.kernel (64, 64)" in msg and "more entries than the array has dims" in msg


def test_bad_rules_are_rejected():
    with pytest.raises(S.ShardingError, match="unknown mesh axis 'model'"):
        S.get_rules([(".*", P("model"))])
    with pytest.raises(S.ShardingError, match="unknown sharding rule set"):
        S.get_rules("zero3")
    with pytest.raises(S.ShardingError, match="bad regex"):
        S.get_rules([("(", P())])


def test_lora_follows_host_kernel():
    mesh = S.make_mesh({"data": 2, "fsdp": 4})
    rules = [(r"fc1\.kernel$", P("fsdp", None)), (r"fc2\.kernel$", P(None, "fsdp")), (".*", P())]
    with jax.set_mesh(mesh):
        model = nnx.eval_shape(lambda: TinyLoRANet(dim=16, hidden=32, rank=4, rngs=nnx.Rngs(0)))
    placed = S.resolve(S.state_shapes(model), rules, mesh)
    assert placed["fc1.lora.lora_a"].spec == P("fsdp", None)  # [I, r]: I like the kernel's I
    assert placed["fc1.lora.lora_b"].spec == P(None, None)
    assert placed["fc2.lora.lora_a"].spec == P(None, None)
    assert placed["fc2.lora.lora_b"].spec == P(None, "fsdp")  # [r, O]: O like the kernel's O
    assert placed["fc2.lora.lora_b"].rule == "lora of fc2.kernel"
    # Layer-stacked adapters ([layers, I, r]) keep the host's leading axes.
    stacked = {"blocks.q.kernel": (4, 16, 32), "blocks.q.lora_a": (4, 16, 2), "blocks.q.lora_b": (4, 2, 32)}
    placed = S.resolve(stacked, [(r"kernel$", P(None, "fsdp", "tensor")), (".*", P())], mesh)
    assert placed["blocks.q.lora_a"].spec == P(None, "fsdp", None)
    assert placed["blocks.q.lora_b"].spec == P(None, None, "tensor")


def test_shard_module_places_arrays_and_prints_table():
    mesh = S.make_mesh({"data": 2, "fsdp": 4})
    lines = []
    with jax.set_mesh(mesh):
        model = TinyLoRANet(rngs=nnx.Rngs(0))
        before = np.asarray(model.fc1.kernel[...])
        S.shard_module(model, [(r"kernel$", P("fsdp", None)), (".*", P())], mesh, print_fn=lines.append)
    kernel = model.fc1.kernel[...]
    assert kernel.sharding.spec == P("fsdp", None)
    assert kernel.addressable_shards[0].data.shape == (4, 32)
    np.testing.assert_array_equal(np.asarray(kernel), before)
    assert S.variable_spec(model.fc1.lora.lora_a) == P("fsdp", None)
    table = lines[0].splitlines()
    assert table[0].split() == ["param", "shape", "rule", "spec"]
    assert any(r.startswith("fc1.lora.lora_a") and "lora of fc1.kernel" in r for r in table)


@pytest.mark.parametrize("name, rules, mesh_cfg", [
    ("1.3b-inp", "fsdp", {"fsdp": 8}),
    ("14b-inp", "fsdp", {"fsdp": 8}),
    ("1.3b-inp", "fsdp_tp", {"fsdp": 4, "tensor": 2}),
    ("14b-inp", "fsdp_tp", {"fsdp": 2, "tensor": 4}),
])
def test_rule_sets_divide_full_size_models(name, rules, mesh_cfg):
    mesh = S.make_mesh(mesh_cfg)
    # Full widths decide divisibility; two blocks keep the abstract build fast (blocks are identical).
    sh = S.param_shardings(_abstract_dit(name, mesh, num_layers=2), rules, mesh, print_fn=None)
    sharded = [k for k, s in sh.items() if any(a is not None for a in s.spec)]
    assert len(sharded) > len(sh) // 3


def test_fsdp_tp_forward_matches_replicated():
    cfg = variant("tiny", num_layers=1)
    mesh = S.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    x = jax.random.normal(jax.random.key(1), (2, 1, 4, 4, cfg.in_dim))
    t = jnp.array([100.0, 900.0])
    ctx = jax.random.normal(jax.random.key(2), (2, 8, cfg.text_dim))
    # Built and run under jit: eager op-by-op dispatch of the init and forward is far slower on CPU.
    model = nnx.jit(lambda: WanDiT(cfg, dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(0)))()
    forward = nnx.jit(lambda m, *a: m(*a))
    ref = forward(model, x, t, ctx)
    with jax.set_mesh(mesh):
        S.shard_module(model, "fsdp_tp", mesh, print_fn=None)
        assert model.blocks[0].self_attn.o.kernel[...].sharding.spec == P("tensor", "fsdp")
        out = forward(model, x, t, ctx)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=1e-5, atol=1e-5)


def test_constrain_logical_names():
    mesh = S.make_mesh({"data": 2, "fsdp": 2, "context": 2})
    assert S.logical_spec("batch", "tokens", "embed") == P(("data", "fsdp"), "context", None)
    with pytest.raises(S.ShardingError, match="unknown logical axis"):
        S.logical_spec("batch", "pixels")
    x = jnp.arange(4 * 6 * 3, dtype=jnp.float32).reshape(4, 6, 3)
    assert S.constrain(x, "batch", "tokens", "embed") is x  # no mesh: no-op

    @jax.jit
    def f(x):
        return S.constrain(x * 2, "batch", "tokens", "embed")

    with jax.set_mesh(mesh):
        y = f(x)
        # Batch 2 only divides by data (2), not data x fsdp (4): fsdp is dropped for that dim.
        y1 = jax.jit(lambda x: S.constrain(x, "batch", "tokens", None))(jnp.ones((2, 6, 3)))
    assert y.sharding.is_equivalent_to(NamedSharding(mesh, P(("data", "fsdp"), "context", None)), 3)
    assert y1.sharding.is_equivalent_to(NamedSharding(mesh, P("data", "context", None)), 3)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(x) * 2)


def test_init_sharded_equals_eager_init_and_is_placed():
    mesh = S.make_mesh({"data": 2, "fsdp": 4})
    rules = [(r"kernel$", P("fsdp", None)), (".*", P())]
    make = lambda: TinyLoRANet(dim=16, hidden=32, rank=4, rngs=nnx.Rngs(3))
    model, sh = S.init_sharded(make, rules, mesh, print_fn=None)
    eager = make()
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        key = ".".join(map(str, path))
        value = var.get_value()
        assert value.sharding.is_equivalent_to(sh[key], value.ndim), key
        assert S.variable_spec(var) == sh[key].spec
    for (pa, a), (pb, b) in zip(nnx.to_flat_state(nnx.state(model, nnx.Param)),
                                nnx.to_flat_state(nnx.state(eager, nnx.Param))):
        assert pa == pb
        np.testing.assert_allclose(np.asarray(a.get_value()), np.asarray(b.get_value()), rtol=1e-6, atol=1e-7)
    assert model.fc2.lora.lora_b[...].sharding.spec == P(None, None)
    assert model.fc1.lora.lora_a[...].addressable_shards[0].data.shape == (4, 4)
    # The abstract twin carries concrete NamedShardings (what orbax needs to restore into shards).
    abstract, _ = S.abstract_sharded(make, rules, mesh, print_fn=None)
    sds = abstract.fc1.kernel.get_value()
    assert isinstance(sds, jax.ShapeDtypeStruct) and sds.sharding == sh["fc1.kernel"]
