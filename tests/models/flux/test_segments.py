"""The segment-aware forward: one segment is plain Flux; per-segment timesteps equal a dense per-token reference;
LoRA switches act on their segments only."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from omnijax.models.flux import FluxDiT, FluxLoRA, Segment, lora_spec, variant
from omnijax.params import flat_params
from tests.models.flux.refs import image_ids, inputs
from tests.torch_refs import rel_err


@pytest.fixture(scope="module")
def model():
    return FluxDiT(variant("tiny"), dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(3))


def _plain(model, x, lora=None):
    return np.asarray(model(x["img"], x["img_ids"], x["txt"], x["txt_ids"], x["timesteps"], x["y"], x["guidance"],
                            lora=lora))


def _segments(model, x, cuts, ts, ids, lora_on, lora=None, text_lora=False):
    bounds = list(zip([0, *cuts], [*cuts, x["img"].shape[1]]))
    segs = [Segment(x["img"][:, a:b], ids[a:b], t, x["guidance"], lora=on)
            for (a, b), t, on in zip(bounds, ts, lora_on)]
    out = model.forward_segments(segs, x["txt"], x["txt_ids"], x["y"], txt_timesteps=ts[0], text_lora=text_lora,
                                 lora=lora)
    return np.concatenate([np.asarray(o) for o in out], axis=1)


def test_one_and_two_segments_with_one_timestep_equal_plain_flux(model):
    x = inputs()
    want = _plain(model, x)
    one = _segments(model, x, [], [x["timesteps"]], x["img_ids"], [True])
    two = _segments(model, x, [6], [x["timesteps"]] * 2, x["img_ids"], [True, True])
    np.testing.assert_allclose(one, want, rtol=0, atol=0)
    assert rel_err(two, want) <= 1e-6


# ------------------------------------------------------------------------------------------------ dense reference
# Flux with a modulation vector per token, written from spec §1 on the flat parameters (no model code).

def _dense_reference(p, cfg, x, t_tok, g_tok, ids):
    d, n = cfg.hidden_size, cfg.num_heads
    lin = lambda h, name: h @ p[f"{name}.kernel"] + p[f"{name}.bias"]
    silu, gelu = jax.nn.silu, lambda a: jax.nn.gelu(a, approximate=True)

    def emb(t):  # [B, J] -> [B, J, 256]: cos then sin of 1000 t * 10000^(-k/128)
        f = np.exp(-np.log(10000.0) * np.arange(128) / 128)
        a = 1000.0 * t[..., None] * f
        return jnp.concatenate([jnp.cos(a), jnp.sin(a)], -1)

    mlp_emb = lambda h, name: lin(silu(lin(h, f"{name}.in_layer")), f"{name}.out_layer")
    vec = mlp_emb(emb(t_tok), "time_in") + mlp_emb(emb(g_tok), "guidance_in") + mlp_emb(x["y"], "vector_in")[:, None]
    ln = lambda h: (h - h.mean(-1, keepdims=True)) / jnp.sqrt(h.var(-1, keepdims=True) + 1e-6)
    rms = lambda h, name: h / jnp.sqrt((h * h).mean(-1, keepdims=True) + 1e-6) * p[f"{name}.scale"]
    freqs = np.concatenate([10000.0 ** (-np.arange(0, a, 2) / a) for a in cfg.axes_dim])
    axis = np.repeat(np.arange(3), [a // 2 for a in cfg.axes_dim])
    ang = ids[:, axis] * freqs  # [J, P]
    cos, sin = np.cos(ang)[None, :, None], np.sin(ang)[None, :, None]

    def rope(h):  # [B, J, N, K], adjacent pairs
        e, o = h[..., 0::2], h[..., 1::2]
        return jnp.stack([e * cos - o * sin, e * sin + o * cos], -1).reshape(h.shape)

    def attn(q, k, v):
        w = jax.nn.softmax(jnp.einsum("bqnk,bsnk->bnqs", rope(q), rope(k)) / np.sqrt(d // n), -1)
        return jnp.einsum("bnqs,bsnk->bqnk", w, v).reshape(*q.shape[:2], d)

    def heads(y, norm):
        y = y.reshape(*y.shape[:2], 3, n, -1)
        return rms(y[:, :, 0], f"{norm}.query_norm"), rms(y[:, :, 1], f"{norm}.key_norm"), y[:, :, 2]

    s = x["txt"].shape[1]
    txt, img = lin(x["txt"], "txt_in"), lin(x["img"], "img_in")
    for i in range(cfg.depth):
        b = f"double_blocks.{i}"
        mi = jnp.split(lin(silu(vec[:, s:]), f"{b}.img_mod.lin"), 6, -1)
        mt = jnp.split(lin(silu(vec[:, :s]), f"{b}.txt_mod.lin"), 6, -1)
        qi, ki, vi = heads(lin(ln(img) * (1 + mi[1]) + mi[0], f"{b}.img_attn.qkv"), f"{b}.img_attn.norm")
        qt, kt, vt = heads(lin(ln(txt) * (1 + mt[1]) + mt[0], f"{b}.txt_attn.qkv"), f"{b}.txt_attn.norm")
        cat = lambda a, c: jnp.concatenate([a, c], 1)
        o = attn(cat(qt, qi), cat(kt, ki), cat(vt, vi))
        img = img + mi[2] * lin(o[:, s:], f"{b}.img_attn.proj")
        img = img + mi[5] * lin(gelu(lin(ln(img) * (1 + mi[4]) + mi[3], f"{b}.img_mlp.linear_1")),
                                f"{b}.img_mlp.linear_2")
        txt = txt + mt[2] * lin(o[:, :s], f"{b}.txt_attn.proj")
        txt = txt + mt[5] * lin(gelu(lin(ln(txt) * (1 + mt[4]) + mt[3], f"{b}.txt_mlp.linear_1")),
                                f"{b}.txt_mlp.linear_2")
    h = jnp.concatenate([txt, img], 1)
    for i in range(cfg.depth_single_blocks):
        b = f"single_blocks.{i}"
        shift, scale, gate = jnp.split(lin(silu(vec), f"{b}.modulation.lin"), 3, -1)
        y = lin(ln(h) * (1 + scale) + shift, f"{b}.linear1")
        q, k, v = heads(y[..., :3 * d], f"{b}.norm")
        h = h + gate * lin(jnp.concatenate([attn(q, k, v), gelu(y[..., 3 * d:])], -1), f"{b}.linear2")
    shift, scale = jnp.split(lin(silu(vec[:, s:]), "final_layer.adaLN_modulation.lin"), 2, -1)
    return lin(ln(h[:, s:]) * (1 + scale) + shift, "final_layer.linear")


def test_two_timesteps_equal_dense_per_token_modulation(model):
    x = inputs(h=3, w=4)
    n, s = x["img"].shape[1], x["txt"].shape[1]
    ids = np.concatenate([image_ids(2, 4, axis0=1.0), image_ids(1, 4, dc=4.0)])  # segments with their own ids
    t_cond, t_noisy = np.zeros(2, np.float32), x["timesteps"]  # OminiControl-style: condition at t = 0
    got = _segments(model, x, [8], [t_noisy, t_cond], ids, [False, False])
    t_tok = np.concatenate([np.repeat(t_noisy[:, None], s + 8, 1), np.repeat(t_cond[:, None], n - 8, 1)], 1)
    g_tok = np.repeat(x["guidance"][:, None], s + n, 1)
    p = {k: np.asarray(v.get_value()) for k, v in flat_params(model).items()}
    with jax.default_matmul_precision("highest"):
        want = np.asarray(_dense_reference(p, model.config, x, t_tok, g_tok, np.concatenate([x["txt_ids"], ids])))
    assert rel_err(got, want) <= 1e-5, rel_err(got, want)
    same = _segments(model, x, [8], [t_noisy, t_noisy], ids, [False, False])
    assert rel_err(same, want) > 1e-3  # the second segment's timestep matters


# ------------------------------------------------------------------------------------------------------- LoRA

def _randomize_lora(lora, seed=0):
    r = np.random.default_rng(seed)
    for ad in lora.adapters().values():
        ad.lora_b.set_value(jnp.asarray(r.standard_normal(ad.lora_b.get_value().shape) * 0.3, jnp.float32))
    return lora


def test_lora_everywhere_equals_merged_weights(model):
    """All tokens on: the low-rank path equals the base model with W + (alpha/r) A B merged in."""
    cfg = model.config
    spec = lora_spec(cfg, 3, 6.0, targets=("img_in", "img_attn.qkv", "txt_mlp.linear_2", "img_mod.lin", "linear1",
                                            "modulation.lin"))
    lora = _randomize_lora(FluxLoRA(cfg, spec, rngs=nnx.Rngs(1)))
    x = inputs()
    got = _plain(model, x, lora)
    merged = nnx.clone(model)
    params = flat_params(merged)
    for path, ad in lora.adapters().items():
        kernel = params[f"{path}.kernel"]
        kernel.set_value(kernel.get_value() + ad.scale * ad.lora_a.get_value() @ ad.lora_b.get_value())
    want = _plain(merged, x)
    assert rel_err(got, want) <= 1e-5, rel_err(got, want)
    assert rel_err(want, _plain(model, x)) > 1e-2  # the adapters are not trivially zero


def test_lora_switch_acts_only_on_its_segments(model):
    """LoRA on the last single block's linear2 only: nothing attends after it, so a switched-off segment keeps
    the base output exactly, and a switched-on one equals the merged-weight model on that segment."""
    cfg = model.config
    last = cfg.depth_single_blocks - 1
    lora = _randomize_lora(FluxLoRA(cfg, lora_spec(cfg, 4, targets=("linear2",), single_blocks=[last]),
                                    rngs=nnx.Rngs(2)))
    x = inputs()
    ts = [x["timesteps"]] * 2
    base = _segments(model, x, [6], ts, x["img_ids"], [True, True])
    merged = nnx.clone(model)
    k = flat_params(merged)[f"single_blocks.{last}.linear2.kernel"]
    ad = lora.adapters()[f"single_blocks.{last}.linear2"]
    k.set_value(k.get_value() + ad.scale * ad.lora_a.get_value() @ ad.lora_b.get_value())
    full = _segments(merged, x, [6], ts, x["img_ids"], [True, True])
    got = _segments(model, x, [6], ts, x["img_ids"], [False, True], lora=lora)
    np.testing.assert_allclose(got[:, :6], base[:, :6], rtol=1e-6, atol=1e-6)
    assert rel_err(got[:, 6:], full[:, 6:]) <= 1e-5
    assert rel_err(got[:, 6:], base[:, 6:]) > 1e-2
    off = _segments(model, x, [6], ts, x["img_ids"], [False, False], lora=lora)
    np.testing.assert_allclose(off, base, rtol=1e-6, atol=1e-6)


def test_segment_order_does_not_matter():
    """Attention is permutation-equivariant and RoPE reads only ids (spec §0.3): listing the segments in the other
    order (each with its tokens, ids, timestep and LoRA switch) swaps their outputs and changes nothing else."""
    cfg = variant("tiny", depth=1, depth_single_blocks=1)
    model = FluxDiT(cfg, dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(5))
    lora = _randomize_lora(FluxLoRA(cfg, lora_spec(cfg, 2, targets=("img_attn.qkv", "linear1")), rngs=nnx.Rngs(4)))
    x = inputs(h=3, w=4)
    ids = np.concatenate([image_ids(1, 4, dc=4.0), image_ids(2, 4, axis0=1.0)])
    a = [Segment(x["img"][:, :4], ids[:4], x["timesteps"], x["guidance"], lora=True),
         Segment(x["img"][:, 4:], ids[4:], np.zeros(2, np.float32), x["guidance"], lora=False)]
    run = lambda segs: model.forward_segments(segs, x["txt"], x["txt_ids"], x["y"], txt_timesteps=x["timesteps"],
                                              lora=lora)
    fwd, rev = run(a), run(a[::-1])
    np.testing.assert_allclose(fwd[0], rev[1], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(fwd[1], rev[0], rtol=1e-5, atol=1e-5)
