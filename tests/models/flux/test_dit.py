"""FluxDiT against diffusers' FluxTransformer2DModel (tiny, random, f32) and full-size shapes via eval_shape."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from converters import load_flux_dit
from omnijax.models.flux import FluxDiT, variant
from omnijax.params import count_params
from tests.models.flux.refs import diffusers_flux, image_ids, inputs, torch_forward
from tests.torch_refs import rel_err, to_numpy_state


def _call(model, x, guidance=True):
    fn = jax.jit(lambda m, x: m(x["img"], x["img_ids"], x["txt"], x["txt_ids"], x["timesteps"], x["y"],
                                x["guidance"] if guidance else None))
    return np.asarray(fn(model, x))


@pytest.mark.parametrize("guidance", [True, False], ids=["dev", "schnell"])
@pytest.mark.parametrize("grid,text", [((3, 5), 7), ((4, 2), 12)])
def test_parity_with_diffusers(guidance, grid, text):
    ref = diffusers_flux(guidance)
    _, model = load_flux_dit(to_numpy_state(ref), variant("tiny" if guidance else "tiny-schnell"),
                             dtype=jnp.float32, param_dtype=jnp.float32)
    x = inputs(h=grid[0], w=grid[1], s=text)
    x["img_ids"] = image_ids(*grid, axis0=1.0, dc=3.0)  # every RoPE axis sees non-zero positions
    want = torch_forward(ref, x, guidance)
    got = _call(model, x, guidance)
    assert got.shape == want.shape
    assert rel_err(got, want) <= 1e-5, rel_err(got, want)


def test_schnell_ignores_guidance_and_dev_requires_it():
    x = inputs()
    schnell = FluxDiT(variant("tiny-schnell"), dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
    np.testing.assert_array_equal(_call(schnell, x, True), _call(schnell, x, False))
    dev = FluxDiT(variant("tiny"), dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="guidance"):
        _call(dev, x, False)


def test_bad_inputs_raise_named_errors():
    model = FluxDiT(variant("tiny"), dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
    x = inputs()
    with pytest.raises(ValueError, match="img must be"):
        _call(model, {**x, "img": x["img"][..., :8]})
    with pytest.raises(ValueError, match="txt must be"):
        _call(model, {**x, "txt": x["txt"][..., :8]})
    with pytest.raises(ValueError, match="pooled"):
        _call(model, {**x, "y": x["y"][:, :5]})
    with pytest.raises(ValueError, match="position ids cover"):
        _call(model, {**x, "img_ids": x["img_ids"][:4]})


@pytest.mark.parametrize("name,want", [("dev", 11_901_408_320), ("schnell", 11_891_178_560)])
def test_full_size_param_count(name, want):
    """Spec §1.1 counts (from BFL's key list); the output shape and dtype of a 1024² call, without allocating."""
    abstract = nnx.eval_shape(lambda: FluxDiT(variant(name), rngs=nnx.Rngs(0)))
    assert count_params(abstract) == want
    out = nnx.eval_shape(lambda m: m(jnp.zeros((1, 4096, 64)), jnp.zeros((1, 4096, 3)), jnp.zeros((1, 512, 4096)),
                                     jnp.zeros((1, 512, 3)), jnp.zeros((1,)), jnp.zeros((1, 768)), jnp.ones((1,))),
                         abstract)
    assert out.shape == (1, 4096, 64) and out.dtype == jnp.bfloat16
