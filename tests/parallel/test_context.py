"""Context-parallel attention (Ulysses all-to-all and ring) against plain single-device attention."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from omnijax import sharding as S
from omnijax.layers.attention import attention
from omnijax.models.wan.dit import WanDiT
from omnijax.models.wan.variants import variant
from omnijax.parallel.context import ContextParallelError, context_attention, context_attention_fn
from tests.attention_ref import dense_attention


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _qkv(shape, seed=0):
    rng = np.random.default_rng(seed)
    return tuple(rng.standard_normal(shape, np.float32) for _ in range(3))


@pytest.mark.parametrize("method, mesh_cfg, heads", [
    ("ulysses", {"data": 2, "context": 4}, 8),
    ("ring", {"data": 2, "context": 4}, 2),  # 2 heads cannot be split 4 ways: only the ring works
    ("ring", {"context": 8}, 3),
    ("ulysses", {"context": 2, "tensor": 2, "fsdp": 2}, 4),  # heads over tensor, then over context
])
@pytest.mark.parametrize("keys", [48, 96])  # S = L, and S = 2L (the branch model's type-B alpha queries)
def test_context_attention_matches_dense(method, mesh_cfg, heads, keys):
    mesh = S.make_mesh(mesh_cfg)
    q = _qkv((2, 48, heads, 16))[0]
    _, k, v = _qkv((2, keys, heads, 16), seed=3)
    out = jax.jit(lambda q, k, v: context_attention(q, k, v, mesh=mesh, method=method))(q, k, v)
    assert out.shape == q.shape
    assert rel_err(np.asarray(out), dense_attention(q, k, v)) <= 1e-5


@pytest.mark.parametrize("method", ["ulysses", "ring"])
def test_context_attention_gradients(method):
    mesh = S.make_mesh({"data": 2, "context": 4})
    q, k, v = _qkv((2, 32, 4, 8), seed=1)
    w = np.random.default_rng(9).standard_normal(q.shape, np.float32)

    def loss(attn):
        return lambda q, k, v: jnp.sum(attn(q, k, v) * w)

    got = jax.jit(jax.grad(loss(lambda *a: context_attention(*a, mesh=mesh, method=method)), argnums=(0, 1, 2)))(
        q, k, v)
    want = jax.grad(loss(lambda *a: attention(*a, backend="xla")), argnums=(0, 1, 2))(q, k, v)
    for g, r in zip(got, want):
        assert rel_err(np.asarray(g), np.asarray(r)) <= 1e-5


def test_context_attention_errors():
    mesh = S.make_mesh({"data": 2, "context": 4})
    q, k, v = _qkv((2, 30, 2, 8))
    with pytest.raises(ContextParallelError, match="query length 30 does not divide"):
        context_attention(q, k, v, mesh=mesh)
    q, k, v = _qkv((2, 32, 2, 8))
    with pytest.raises(ContextParallelError, match="ulysses needs the 2 local heads"):
        context_attention(q, k, v, mesh=mesh, method="ulysses")
    with pytest.raises(ContextParallelError, match="key length 18 does not divide"):
        context_attention(q, k[:, :18], v[:, :18], mesh=mesh)
    with pytest.raises(ContextParallelError, match="must share B, N and K"):
        context_attention(q, k[:, :, :1], v[:, :, :1], mesh=mesh)


@pytest.mark.parametrize("method, num_heads", [("ring", 2), ("ulysses", 4)])
def test_wan_dit_forward_with_context_parallel_attention(method, num_heads):
    """A tiny WanDiT forward whose self-attention runs split over context=4 equals the plain forward."""
    cfg = variant("tiny-inp", num_heads=num_heads, num_layers=1)
    mesh = S.make_mesh({"data": 2, "context": 4})
    rng = np.random.default_rng(3)
    b, t, h, w = 2, 2, 8, 4  # 2 x 4 x 2 = 16 tokens: 4 per device
    latents = rng.standard_normal((b, t, h, w, cfg.out_dim), np.float32)
    y = rng.standard_normal((b, t, h, w, cfg.in_dim - cfg.out_dim), np.float32)
    ctx = rng.standard_normal((b, 8, cfg.text_dim), np.float32)
    clip = rng.standard_normal((b, 257, cfg.image_dim), np.float32)
    ts = np.array([250.0, 750.0], np.float32)
    model = nnx.jit(lambda: WanDiT(cfg, dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(0)))()

    def forward(m, attn_fn):
        x, rope, grid = m.embed(latents, y)
        e, e0, text, image = m.condition(ts, ctx, clip)
        x = m.run_blocks(x, e0, text, image, rope, attn_fn=attn_fn, backend="xla")
        return m.unpatchify(m.head(x, e), grid)

    ref = nnx.jit(lambda m: m(latents, ts, ctx, clip, y, attention_backend="xla"))(model)
    with jax.set_mesh(mesh):
        out = nnx.jit(lambda m: forward(m, context_attention_fn(mesh, method=method, backend="xla")))(model)
    assert rel_err(np.asarray(out), np.asarray(ref)) <= 1e-5
