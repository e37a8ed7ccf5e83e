"""omnijax.layers.init.InitRngs draws exactly nnx.Rngs' keys (flax's own class is the reference), so models built
with it, concretely or abstractly, are the models nnx.Rngs builds."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from omnijax.layers.init import InitRngs
from omnijax.models.wan.dit import WanDiT
from omnijax.models.wan.variants import variant


def _keys(rngs, n=3):
    return [np.asarray(jax.random.key_data(f())) for _ in range(n) for f in (rngs.default, rngs.params, rngs.dropout)]


def test_streams_draw_the_keys_of_nnx_rngs():
    want = _keys(nnx.Rngs(3, params=5))
    got = _keys(InitRngs(3, params=5))  # "dropout" falls back to "default" in both
    for w, g in zip(want, got, strict=True):
        np.testing.assert_array_equal(g, w)
    a, b = nnx.Rngs(jax.random.key(7)), InitRngs(jax.random.key(7))
    np.testing.assert_array_equal(jax.random.key_data(b()), jax.random.key_data(a()))


def test_a_model_built_with_it_equals_the_nnx_rngs_model():
    make = lambda r: WanDiT(variant("tiny-inp"), dtype=jnp.float32, param_dtype=jnp.float32, rngs=r(0))
    want, got = nnx.state(make(nnx.Rngs), nnx.Param), nnx.state(make(InitRngs), nnx.Param)
    flat_w, flat_g = nnx.to_flat_state(want), nnx.to_flat_state(got)
    assert [p for p, _ in flat_w] == [p for p, _ in flat_g]
    for (path, w), (_, g) in zip(flat_w, flat_g):
        np.testing.assert_array_equal(np.asarray(g.get_value()), np.asarray(w.get_value()), err_msg=str(path))
    # Abstractly (what every checkpoint restore builds): the same structure, shapes and dtypes.
    abs_w, abs_g = nnx.eval_shape(lambda: make(nnx.Rngs)), nnx.eval_shape(lambda: make(InitRngs))
    assert str(nnx.graphdef(abs_g)) == str(nnx.graphdef(abs_w))  # (GraphDef == compares identities)
    shapes = lambda m: [(p, v.get_value().shape, v.get_value().dtype) for p, v in nnx.to_flat_state(nnx.state(m))]
    assert shapes(abs_g) == shapes(abs_w)
