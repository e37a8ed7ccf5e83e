"""FluxDiT under the "flux" rule set on 8 fake CPU devices (fsdp 4 x tensor 2) equals one device."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from omnijax import sharding as S
from omnijax.models.flux import FluxDiT, FluxLoRA, lora_spec, variant
from tests.models.flux.refs import inputs
from tests.torch_refs import rel_err


def test_sharded_forward_equals_single_device():
    cfg = variant("tiny", depth=1, depth_single_blocks=1)  # one block of each kind keeps the compiles short
    model = FluxDiT(cfg, dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
    lora = FluxLoRA(cfg, lora_spec(cfg, 4, targets=("img_attn.qkv", "linear1", "linear2")), rngs=nnx.Rngs(1))
    for ad in lora.adapters().values():  # B = 0 at init; make the adapters do something
        ad.lora_b.set_value(jnp.full(ad.lora_b.get_value().shape, 0.05, jnp.float32))
    x = inputs(b=4)
    x["guidance"] = np.full(4, 3.5, np.float32)
    x["timesteps"] = np.linspace(0.1, 0.9, 4).astype(np.float32)
    fwd = jax.jit(lambda m, l, x: m(x["img"], x["img_ids"], x["txt"], x["txt_ids"], x["timesteps"], x["y"],
                                    x["guidance"], lora=l))
    want = np.asarray(fwd(model, lora, x))

    mesh = S.make_mesh({"fsdp": 4, "tensor": 2})
    lines = []
    with jax.set_mesh(mesh):
        S.shard_module(model, "flux", mesh, print_fn=lines.append)
        S.shard_module(lora, "flux", mesh, print_fn=None)
        got = np.asarray(fwd(model, lora, x))
    table = lines[0]
    assert "double_blocks.0.img_attn.qkv.kernel" in table and "('fsdp', 'tensor')" in table
    assert model.single_blocks[0].linear2.kernel.get_value().sharding.spec == jax.sharding.PartitionSpec(
        "tensor", "fsdp")
    assert len(model.double_blocks[0].img_mlp.linear_1.kernel.get_value().sharding.device_set) == 8
    assert rel_err(got, want) <= 1e-5, rel_err(got, want)


def test_flux_rules_place_every_full_size_param():
    """The full dev model resolves on an fsdp 8 mesh and an fsdp 4 x tensor 2 mesh (no allocation)."""
    abstract = nnx.eval_shape(lambda: FluxDiT(variant("dev"), rngs=nnx.Rngs(0)))
    for shape in ({"fsdp": 8}, {"fsdp": 4, "tensor": 2}):
        placements = S.resolve(S.state_shapes(abstract), "flux", S.make_mesh(shape))
        assert placements["single_blocks.37.linear1.kernel"].rule.startswith("single_blocks")
