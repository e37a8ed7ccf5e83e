"""Exact attention through a whole-key-tile kernel (omnijax/layers/tile_attention.py), on the CPU.

The Hopper FA3 kernel cannot run here; a dense stand-in with the same contract (float16 in and out, scaled q,
key count a multiple of the tile, natural-log lse) checks the padding and its correction against the float64
closed form. On the GPU, benchmarks/bench_attention.py --variants compares the real kernel with cuDNN and --check
with an f32 reference where the correction is large.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from omnijax.layers.attention import AttentionBackendError, attention, kernel_with_cudnn_gradient, resolve_backend
from omnijax.layers.tile_attention import tile_padded_attention, with_reference_gradient
from tests.attention_ref import dense_attention

BLOCK = 8
Q_TILE = 128  # tile_padded_attention's default block_q: the rows the FA3 kernel takes per program


def tile_kernel(q16, k16, v16):
    """Dense softmax with the FA3 kernel's contract; refuses key or query counts that are not whole tiles."""
    assert q16.dtype == k16.dtype == v16.dtype == jnp.float16
    assert k16.shape[1] % BLOCK == 0, k16.shape
    assert q16.shape[1] % Q_TILE == 0, q16.shape
    s = jnp.einsum("blnk,bsnk->blns", q16.astype(jnp.float32), k16.astype(jnp.float32))
    lse = jax.nn.logsumexp(s, axis=-1)
    out = jnp.einsum("blns,bsnk->blnk", jnp.exp(s - lse[..., None]), v16.astype(jnp.float32))
    return out.astype(jnp.float16), lse


def _qkv(lq, lk, seed=0, k_dim=16):
    ks = jax.random.split(jax.random.key(seed), 3)
    return tuple(jax.random.normal(kk, (2, n, 3, k_dim)) for kk, n in zip(ks, (lq, lk, lk)))


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.max(np.abs(a - b)) / np.max(np.abs(b))


@pytest.mark.parametrize("lq,lk", [(9, 13), (12, 16), (5, 3), (11, 17)])
def test_tile_padded_attention_matches_closed_form(lq, lk):
    q, k, v = _qkv(lq, lk)
    out = tile_padded_attention(q, k, v, kernel=tile_kernel, block_kv=BLOCK)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert _rel(out, dense_attention(q, k, v)) < 2e-3  # float16 rounding of q, k, v and the output


def test_correction_when_the_copied_key_dominates():
    # The padding copies the last key; make it every query's best match, so the padded keys carry most of the
    # padded softmax mass (the correction divides by close to 1 / (P + 1)).
    q, k, v = _qkv(6, 9, seed=3)
    k = k.at[:, -1].set(3.0 * q.mean(axis=1))
    want = dense_attention(q, k, v)
    assert _rel(tile_padded_attention(q, k, v, kernel=tile_kernel, block_kv=BLOCK), want) < 2e-3


@pytest.mark.parametrize("magnitude", [1e30, 1e6, 1e-7, 1e-30])
def test_values_outside_float16_range(magnitude):
    # float16 overflows above 65504 and goes subnormal below 6e-5; v is rescaled by a power of two first.
    q, k, v = _qkv(7, 10, seed=4)
    v = v * magnitude
    out = tile_padded_attention(q, k, v, kernel=tile_kernel, block_kv=BLOCK)
    assert np.all(np.isfinite(np.asarray(out)))
    assert _rel(out, dense_attention(q, k, v)) < 2e-3


def test_heads_of_very_different_magnitude():
    # v is rescaled per batch element and head: a head 1e9 times smaller than another keeps its precision.
    q, k, v = _qkv(7, 10, seed=5)
    v = v * jnp.asarray([1e4, 1e-5, 1.0])[None, None, :, None]
    out = np.asarray(tile_padded_attention(q, k, v, kernel=tile_kernel, block_kv=BLOCK), np.float64)
    want = dense_attention(q, k, v)
    for head in range(3):
        assert _rel(out[:, :, head], want[:, :, head]) < 2e-3, head


def test_scale_argument():
    q, k, v = _qkv(4, 5, seed=6)
    out = tile_padded_attention(q, k, v, kernel=tile_kernel, block_kv=BLOCK, scale=0.5)
    want = dense_attention(q * 0.5 * np.sqrt(16), k, v)  # the reference scales by 1/sqrt(K)
    assert _rel(out, want) < 2e-3


def test_with_reference_gradient_takes_value_and_gradient_from_different_functions():
    fast = lambda q, k, v: q * k * v + 1.0  # distinguishable value
    reference = lambda q, k, v: q * k * v
    f = with_reference_gradient(fast, reference)
    x = jnp.arange(1.0, 4.0)
    np.testing.assert_allclose(np.asarray(f(x, x, x)), np.asarray(x ** 3 + 1.0))
    np.testing.assert_allclose(np.asarray(jax.grad(lambda a: jnp.sum(f(a, x, x)))(x)), np.asarray(x * x))


def test_inputs_not_differentiated_take_the_fast_value_inside_grad():
    # A frozen stream inside a training step (the background set under stop_gradient) runs the fast kernel.
    f = with_reference_gradient(lambda q, k, v: q * k * v + 1.0, lambda q, k, v: q * k * v)
    x = jnp.arange(1.0, 4.0)
    g = jax.grad(lambda a: jnp.sum(a * f(jax.lax.stop_gradient(a), x, x)))(jnp.full(3, 2.0))
    np.testing.assert_allclose(np.asarray(g), np.asarray(2.0 * x * x + 1.0))  # reference's value: 2 x^2


def test_kernel_attention_gradients_are_the_references():
    q, k, v = _qkv(9, 13, seed=7)
    kernel = lambda q, k, v, scale: tile_padded_attention(q, k, v, kernel=tile_kernel, block_kv=BLOCK, scale=scale)
    fn = lambda q, k, v: kernel_with_cudnn_gradient(q, k, v, scale=None, kernel_attention=kernel,
                                                    reference_implementation="xla")
    assert _rel(jax.jit(fn)(q, k, v), dense_attention(q, k, v)) < 2e-3
    w = jax.random.normal(jax.random.key(8), q.shape)
    loss = lambda f: (lambda q, k, v: jnp.sum(f(q, k, v) * w))
    got = jax.jit(jax.grad(loss(fn), argnums=(0, 1, 2)))(q, k, v)
    want = jax.grad(loss(lambda *a: jax.nn.dot_product_attention(*a, implementation="xla")), argnums=(0, 1, 2))(
        q, k, v)
    for a, b in zip(got, want):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)


def test_fa3_backend_refused_off_hopper():
    q, k, v = _qkv(4, 4)
    with pytest.raises(AttentionBackendError, match="'fa3' needs a GPU"):
        attention(q.astype(jnp.bfloat16), k.astype(jnp.bfloat16), v.astype(jnp.bfloat16), backend="fa3")
    assert resolve_backend("auto", jnp.bfloat16) == "xla"


def _fake_hopper(monkeypatch, devices=1):
    import omnijax.layers.attention as att

    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(jax, "device_count", lambda: devices)
    monkeypatch.setattr(att, "fa3_supported", lambda: True)
    calls = []
    monkeypatch.setattr(att, "kernel_with_cudnn_gradient", lambda q, k, v, **kw: calls.append("fa3") or q)
    monkeypatch.setattr(att, "padded_attention", lambda q, k, v, **kw: calls.append(kw["implementation"]) or q)
    return calls


@pytest.mark.parametrize("keys,heads,head_dim,want", [
    (32760, 2, 128, "fa3"), (65520, 2, 64, "fa3"),
    (14040, 2, 128, "cudnn"),  # measured slower there
    (257, 2, 128, "cudnn"),  # cross-attention
    (32760, 2, 80, "cudnn"),  # CLIP's head width: the kernel's tiles do not fit
])
def test_auto_on_one_hopper_gpu_routes_by_shape(monkeypatch, keys, heads, head_dim, want):
    calls = _fake_hopper(monkeypatch)
    q = jnp.zeros((1, 8, 2, head_dim), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((1, keys, heads, head_dim), jnp.bfloat16)
    jax.eval_shape(lambda k, v: attention(q, k, v), kv, kv)
    assert calls == [want]


def test_auto_keeps_cudnn_with_several_devices_or_grouped_heads(monkeypatch):
    calls = _fake_hopper(monkeypatch, devices=2)
    assert resolve_backend("auto", jnp.bfloat16) == "cudnn"
    calls = _fake_hopper(monkeypatch, devices=1)
    assert resolve_backend("auto", jnp.bfloat16) == "fa3"
    q = jnp.zeros((1, 8, 4, 128), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((1, 32760, 2, 128), jnp.bfloat16)
    jax.eval_shape(lambda k, v: attention(q, k, v), kv, kv)
    assert calls == ["cudnn"]
