"""Branch-token model invariants (spec easyomnimatte.md §2): the frozen base is the reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from omnijax.omnimatte.branch import EasyOmnimatte, remat_blocks
from omnijax.omnimatte.experts import ExpertConfig, effect_expert
from tests.omnimatte.helpers import base_run, experts, inputs, randomize_lora_b, run, tiny_base
from tests.torch_refs import rel_err


@pytest.fixture(scope="module")
def setup():
    base = tiny_base()
    eff, qual = experts(base)
    return base, eff, qual, inputs()


def test_fresh_adapters_equal_the_base_model(setup):
    base, eff, qual, d = setup
    ref_bg, ref_alpha = base_run(base, d, d["z_bg"]), base_run(base, d, d["z_alpha"])
    for model in (eff, qual):
        v_bg, v_alpha = run(model, d)
        assert v_bg.shape == v_alpha.shape == d["z_bg"].shape
        assert rel_err(v_bg, ref_bg) <= 1e-5, model.expert.name
    assert rel_err(run(qual, d)[1], ref_alpha) <= 1e-5
    # Under B the alpha set also sees the background keys, so it must differ from the base on X_A alone.
    assert rel_err(run(eff, d)[1], ref_alpha) > 1e-3


@pytest.mark.parametrize("which", ["effect", "quality"])
def test_perturbations_respect_the_mask(setup, which):
    base, eff, qual, d = setup
    model = EasyOmnimatte(base, (eff if which == "effect" else qual).expert, rngs=nnx.Rngs(5))
    randomize_lora_b(model)
    v_bg, v_alpha = run(model, d)
    d_alpha = dict(d, z_alpha=d["z_alpha"] + jax.random.normal(jax.random.key(9), d["z_alpha"].shape))
    v_bg2, v_alpha2 = run(model, d_alpha)
    assert rel_err(v_bg2, v_bg) <= 1e-6 and rel_err(v_alpha2, v_alpha) > 1e-2
    # The background half is the frozen base on its own tokens, even with trained (non-zero) adapters.
    assert rel_err(v_bg, base_run(base, d, d["z_bg"])) <= 1e-5
    d_bg = dict(d, z_bg=d["z_bg"] + jax.random.normal(jax.random.key(8), d["z_bg"].shape))
    v_bg3, v_alpha3 = run(model, d_bg)
    assert rel_err(v_bg3, v_bg) > 1e-2
    if which == "effect":  # mask B: alpha queries see the background keys
        assert rel_err(v_alpha3, v_alpha) > 1e-3
    else:  # mask C: isolated
        assert rel_err(v_alpha3, v_alpha) <= 1e-6


def test_mask_a_couples_both_ways(setup):
    base, eff, _, d = setup
    model = EasyOmnimatte(base, ExpertConfig("ablation", 4, 4.0, (2,), "A"), rngs=nnx.Rngs(6))
    randomize_lora_b(model)
    v_bg, _ = run(model, d)
    d_alpha = dict(d, z_alpha=d["z_alpha"] + 1.0)
    assert rel_err(run(model, d_alpha)[0], v_bg) > 1e-3


def test_train_forward_values_and_alpha_only_quality_step(setup):
    base, eff, qual, d = setup
    for model in (eff, qual):
        _, v_alpha = run(model, d)
        none, v_train = run(model, d, train=True)
        assert none is None and rel_err(v_train, v_alpha) <= 1e-6
    # Quality Expert: the alpha set alone (no background latent at all).
    _, v_alone = qual(None, d["z_alpha"], d["timesteps"], d["context"], d["clip_features"], d["y"], train=True)
    assert rel_err(v_alone, run(qual, d)[1]) <= 1e-6
    with pytest.raises(ValueError, match="background"):
        eff(None, d["z_alpha"], d["timesteps"], d["context"], d["clip_features"], d["y"], train=True)


def _loss_fn(d, target, **kw):
    def loss(model, z_bg, z_alpha):
        _, v = model(z_bg, z_alpha, d["timesteps"], d["context"], d["clip_features"], d["y"], train=True, **kw)
        return jnp.sum(v * target)
    return loss


@pytest.mark.parametrize("which", ["effect", "quality"])
def test_gradients_only_where_lora_lives(which):
    base = tiny_base(num_layers=2)
    eff, qual = experts(base, targets=("self_attn.q", "self_attn.o", "cross_attn.k", "ffn.linear_2"))
    model = eff if which == "effect" else qual
    randomize_lora_b(model)
    d = inputs(1)
    target = jax.random.normal(jax.random.key(4), d["z_alpha"].shape)
    loss = _loss_fn(d, target)
    # Trainable set: LoRA only; the frozen base is absent from the gradient state.
    grads = nnx.grad(loss, argnums=nnx.DiffState(0, nnx.LoRAParam))(model, d["z_bg"], d["z_alpha"])
    flat = {".".join(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(grads)}
    assert flat and all(k.startswith("lora.blocks.") for k in flat)
    adapted = {int(k.split(".")[2]) for k in flat}
    assert adapted == set(model.expert.blocks)
    for k, g in flat.items():
        assert np.abs(g).max() > 0, k
    # The same gradient from a jitted step over the split (LoRA, frozen) state, every block or only the first
    # adapted one rematerialised.
    graphdef, lora, rest = nnx.split(model, nnx.LoRAParam, ...)
    for remat in (True, 1):
        remat_loss = _loss_fn(d, target, remat=remat)
        pure = lambda lora, rest, f=remat_loss: f(nnx.merge(graphdef, lora, rest), d["z_bg"], d["z_alpha"])
        remat_grads = jax.jit(jax.grad(pure))(lora, rest)
        for p, v in nnx.to_flat_state(remat_grads):
            assert rel_err(v.get_value(), flat[".".join(map(str, p))]) <= 1e-5, (remat, p)
    # Differentiating w.r.t. every Param and the inputs exposes the stop_gradients: nothing upstream of the
    # first adapted block and nothing on the background path gets a gradient.
    all_grads, g_bg, g_alpha = nnx.grad(loss, argnums=(0, 1, 2))(model, d["z_bg"], d["z_alpha"])
    first = model.expert.blocks[0]
    for p, v in nnx.to_flat_state(all_grads):
        key = ".".join(map(str, p))
        upstream = key.startswith("base.patch_embedding") or (
            key.startswith("base.blocks.") and int(p[2]) < first)
        if upstream:
            assert np.abs(np.asarray(v.get_value())).max() == 0, key
    assert np.abs(np.asarray(g_bg)).max() == 0
    if first > 0:
        assert np.abs(np.asarray(g_alpha)).max() == 0


def test_lora_parameter_counts_at_full_size():
    from omnijax.models.wan.variants import variant
    from omnijax.omnimatte.branch import BranchLoRA
    from omnijax.omnimatte.experts import quality_expert

    cfg = variant("1.3b-inp")
    for expert, blocks, rank in ((effect_expert(30), 10, 128), (quality_expert(30), 30, 64)):
        abstract = nnx.eval_shape(lambda e=expert: BranchLoRA(cfg, e, rngs=nnx.Rngs(1)))
        n = sum(int(np.prod(v.get_value().shape)) for _, v in nnx.to_flat_state(nnx.state(abstract, nnx.LoRAParam)))
        assert n == blocks * 4 * rank * (cfg.dim + cfg.dim)  # q, k, v, o: A [D, r] + B [r, D]
    assert effect_expert(30).blocks == tuple(range(20, 30)) and effect_expert(40).blocks[0] == 27


def test_bad_expert_configs():
    with pytest.raises(ValueError, match="mask"):
        ExpertConfig("x", 4, 4.0, (0,), "D")
    with pytest.raises(ValueError, match="targets"):
        ExpertConfig("x", 4, 4.0, (0,), "B", ("self_attn.qq",))
    with pytest.raises(ValueError, match="does not exist"):
        EasyOmnimatte(tiny_base(), ExpertConfig("x", 4, 4.0, (7,), "B"), rngs=nnx.Rngs(0))
    assert ExpertConfig.from_dict(effect_expert(30).to_dict()) == effect_expert(30)


def _count_dots(jaxpr) -> int:
    n = 0
    for eqn in jaxpr.eqns:
        n += eqn.primitive.name == "dot_general"
        for v in eqn.params.values():  # sub-jaxprs of pjit, custom_vjp, checkpoint, ...
            inner = getattr(v, "jaxpr", v)
            if hasattr(inner, "eqns"):
                n += _count_dots(inner)
    return n


def test_backward_skips_blocks_before_the_first_adapted_one():
    """An extra frozen block in front of the Effect Expert's adapted block adds forward matmuls only."""
    d = inputs(2)
    target = jnp.ones(d["z_alpha"].shape)
    counts = {}
    for layers in (2, 3):
        model = EasyOmnimatte(tiny_base(num_layers=layers), effect_expert(layers, 1, rank=4, alpha=4.0),
                              rngs=nnx.Rngs(0))
        graphdef, lora, rest = nnx.split(model, nnx.LoRAParam, ...)
        loss = _loss_fn(d, target)
        pure = lambda lora, rest, g=graphdef, f=loss: f(nnx.merge(g, lora, rest), d["z_bg"], d["z_alpha"])
        fwd = _count_dots(jax.make_jaxpr(pure)(lora, rest).jaxpr)
        bwd = _count_dots(jax.make_jaxpr(jax.grad(pure))(lora, rest).jaxpr)
        counts[layers] = (fwd, bwd)
    (f2, g2), (f3, g3) = counts[2], counts[3]
    assert f3 > f2 and g3 - g2 == f3 - f2  # no backward matmul for the extra frozen block
    assert g2 > f2  # the adapted block does have a backward pass


def test_remat_blocks_counts_from_the_first_adapted_block():
    assert list(remat_blocks(True, 20, 30)) == list(range(20, 30))
    assert list(remat_blocks(-1, 0, 30)) == list(range(30))
    assert list(remat_blocks(False, 0, 30)) == []
    assert list(remat_blocks(0, 5, 30)) == []
    assert list(remat_blocks(12, 0, 30)) == list(range(12))
    assert list(remat_blocks(12, 25, 30)) == list(range(25, 30))
    with pytest.raises(ValueError, match="remat must be"):
        remat_blocks(-2, 0, 30)
