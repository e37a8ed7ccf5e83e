"""WanDiT against diffusers' WanTransformer3DModel (tiny, random, f32) and full-size shapes via eval_shape."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from converters import load_wan_dit
from omnijax.models.wan import WanDiT, variant
from omnijax.params import count_params
from tests.torch_refs import diffusers_wan, randomize_, rel_err, to_numpy_state


def _inputs(i2v, b=2, t=3, h=6, w=10, text_dim=32, image_dim=32, lens=(7, 11), seed=0):
    rng = np.random.default_rng(seed)
    lat = rng.standard_normal((b, t, h, w, 16)).astype(np.float32)
    y = rng.standard_normal((b, t, h, w, 20)).astype(np.float32) if i2v else None
    ctx = np.zeros((b, max(lens), text_dim), np.float32)
    for i, n in enumerate(lens):  # shorter prompts: zero rows, as the pipeline pads
        ctx[i, :n] = rng.standard_normal((n, text_dim))
    clip = rng.standard_normal((b, 257, image_dim)).astype(np.float32) if i2v else None
    ts = np.array([937.5, 24.4][:b], np.float32)
    return lat, y, ctx, clip, ts


def _torch_forward(ref, lat, y, ctx, clip, ts):
    x = np.concatenate([lat, y], -1) if y is not None else lat
    ctx512 = np.zeros((ctx.shape[0], 512, ctx.shape[2]), np.float32)
    ctx512[:, :ctx.shape[1]] = ctx
    with torch.no_grad():
        out = ref(torch.from_numpy(x).permute(0, 4, 1, 2, 3), torch.from_numpy(ts), torch.from_numpy(ctx512),
                  encoder_hidden_states_image=None if clip is None else torch.from_numpy(clip)).sample
    return out.permute(0, 2, 3, 4, 1).numpy()


@pytest.mark.parametrize("i2v", [True, False])
@pytest.mark.parametrize("grid", [(3, 6, 10), (1, 4, 4)])
def test_parity_with_diffusers(i2v, grid):
    torch.manual_seed(0)
    ref = randomize_(diffusers_wan(i2v=i2v)).eval()
    cfg = variant("tiny-inp" if i2v else "tiny")
    _, model = load_wan_dit(to_numpy_state(ref), cfg, dtype=jnp.float32, param_dtype=jnp.float32)
    lat, y, ctx, clip, ts = _inputs(i2v, t=grid[0], h=grid[1], w=grid[2])
    want = _torch_forward(ref, lat, y, ctx, clip, ts)
    got = jax.jit(lambda m, *a: m(*a))(model, lat, ts, ctx, clip, y)
    assert got.shape == want.shape
    assert rel_err(got, want) <= 1e-5, rel_err(got, want)


def test_padded_text_rows_are_attended():
    """Zero-padding the context to 512 inside the model must equal passing it padded (reference semantics)."""
    cfg = variant("tiny")
    model = WanDiT(cfg, dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(1))
    lat, _, ctx, _, ts = _inputs(False)
    padded = np.zeros((2, 512, 32), np.float32)
    padded[:, :ctx.shape[1]] = ctx
    a, b = model(lat, ts, ctx), model(lat, ts, padded)
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
    c = model(lat, ts, ctx[:, :5])  # dropping real tokens changes the output
    assert rel_err(c, b) > 1e-3


def test_bad_inputs_raise_named_errors():
    model = WanDiT(variant("tiny-inp"), dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
    lat, y, ctx, clip, ts = _inputs(True)
    with pytest.raises(ValueError, match="clip_features"):
        model(lat, ts, ctx, None, y)
    with pytest.raises(ValueError, match="input channels"):
        model(lat, ts, ctx, clip, None)
    with pytest.raises(ValueError, match="not divisible by the patch"):
        model(lat[:, :, :5], ts, ctx, clip, y[:, :, :5])
    with pytest.raises(ValueError, match="features"):
        model(lat, ts, ctx[..., :8], clip, y)


@pytest.mark.parametrize("name", ["1.3b", "1.3b-inp", "14b", "14b-inp"])
def test_full_size_param_count_matches_diffusers(name):
    cfg = variant(name)
    abstract = nnx.eval_shape(lambda: WanDiT(cfg, rngs=nnx.Rngs(0)))
    ref = diffusers_wan(dim=cfg.dim, heads=cfg.num_heads, layers=cfg.num_layers, ffn=cfg.ffn_dim, text_dim=4096,
                        freq_dim=256, image_dim=1280, i2v=cfg.is_i2v, device="meta")
    want = sum(p.numel() for p in ref.parameters())
    assert count_params(abstract) == want
    out = nnx.eval_shape(lambda m: m(jnp.zeros((1, 21, 60, 104, 16)), jnp.zeros((1,)), jnp.zeros((1, 512, 4096)),
                                     jnp.zeros((1, 257, 1280)) if cfg.is_i2v else None,
                                     jnp.zeros((1, 21, 60, 104, 20)) if cfg.is_i2v else None), abstract)
    assert out.shape == (1, 21, 60, 104, 16) and out.dtype == jnp.bfloat16


def test_separately_built_models_have_equal_graphdefs():
    """Two builds of one config have equal graphdefs (what Decomposer.set_experts checks before reusing its
    compiled sampler): no per-build object (a fresh functools.partial compares by identity) among the static
    attributes."""
    cfg = variant("tiny-inp", num_layers=2)
    a, b = (nnx.eval_shape(lambda s=s: WanDiT(cfg, rngs=nnx.Rngs(s))) for s in (0, 1))
    assert nnx.split(a)[0] == nnx.split(b)[0]
