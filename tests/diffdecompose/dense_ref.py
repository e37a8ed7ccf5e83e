"""A dense per-token Flux forward written from the Flux formulas (BFL flux/model.py, spec §1), for tests.

Every token carries its own modulation vector and its own LoRA switch (a 0/1 factor on the adapter's delta),
so mixed timesteps and per-segment LoRA need no slicing: the reference the segment-aware FluxDiT (static
slices, gated adapters) must agree with. Only the model's parameters are read; none of its code runs.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np


def _module(root, path: str):
    m = root
    for part in path.split("."):
        m = m[int(part)] if part.isdigit() else getattr(m, part)
    return m


def _emb(t, dim=256):
    half = dim // 2
    freqs = jnp.exp(-math.log(10000.0) * jnp.arange(half, dtype=jnp.float32) / half)
    args = 1000.0 * t[:, None] * freqs[None]
    return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


def _ln(x, eps=1e-6):
    mu = x.mean(-1, keepdims=True)
    return (x - mu) / jnp.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + eps)


def _rms(x, scale, eps=1e-6):
    return x / jnp.sqrt((x ** 2).mean(-1, keepdims=True) + eps) * scale


def _rope(x, ids, axes_dim, theta):
    """x [B, J, N, K], ids [J, 3]: rotate adjacent pairs by pos_a * theta^(-2i/d_a), axis by axis."""
    ang = jnp.concatenate([ids[:, a:a + 1] * theta ** (-jnp.arange(0, d, 2, dtype=jnp.float32) / d)
                           for a, d in enumerate(axes_dim)], axis=-1)  # [J, K/2]
    c, s = jnp.cos(ang)[None, :, None], jnp.sin(ang)[None, :, None]
    x0, x1 = x[..., 0::2], x[..., 1::2]
    return jnp.stack([x0 * c - x1 * s, x0 * s + x1 * c], axis=-1).reshape(x.shape)


def _attn(q, k, v):
    logits = jnp.einsum("bqnk,bjnk->bnqj", q, k) / math.sqrt(q.shape[-1])
    return jnp.einsum("bnqj,bjnk->bqnk", jax.nn.softmax(logits, -1), v)


def dense_flux(dit, lora, segments, txt, y, txt_t, txt_g=None):
    """Velocities of every segment.

    segments: list of dict(img [B, L, C], ids [L, 3], t [B], g [B] or None, lora bool).
    Returns the list of [B, L, C] outputs (f32).
    """
    cfg = dit.config
    ads = {} if lora is None else lora.adapters()
    d, heads = cfg.hidden_size, cfg.num_heads
    gelu = lambda x: jax.nn.gelu(x, approximate=True)

    def lin(path, x, mask=None):
        m = _module(dit, path)
        out = x @ m.kernel[...] + (0.0 if m.bias is None else m.bias[...])
        if mask is not None and path in ads:
            a = ads[path]
            out = out + mask[..., None] * (x @ a.lora_a[...] @ a.lora_b[...]) * (a.alpha / a.rank)
        return out

    def vec(t, g):
        e = lambda p, x: lin(p + ".out_layer", jax.nn.silu(lin(p + ".in_layer", x)))
        v = e("time_in", _emb(t)) + e("vector_in", y)
        return v + e("guidance_in", _emb(g)) if cfg.guidance_embed else v

    b, s = txt.shape[:2]
    lens = [sg["img"].shape[1] for sg in segments]
    seg_of = np.repeat(np.arange(len(segments)), lens)
    vecs = jnp.stack([vec(sg["t"], sg.get("g")) for sg in segments])  # [G, B, D]
    v_img = jnp.transpose(vecs[seg_of], (1, 0, 2))  # [B, L, D]
    m_img = jnp.asarray([float(segments[g]["lora"]) for g in seg_of])  # [L]
    v_txt = vec(txt_t, txt_g)  # [B, D]
    ids = jnp.concatenate([jnp.zeros((s, 3))] + [jnp.asarray(sg["ids"], jnp.float32) for sg in segments])
    chunks = lambda m, n: [m[..., i * d:(i + 1) * d] for i in range(n)]
    heads_of = lambda x: x.reshape(*x.shape[:2], 3, heads, -1)
    rope = lambda x: _rope(x, ids, cfg.axes_dim, cfg.theta)

    img = lin("img_in", jnp.concatenate([sg["img"] for sg in segments], axis=1))
    tx = lin("txt_in", txt)
    for i in range(cfg.depth):
        p = f"double_blocks.{i}."
        i1, i2, i3, i4, i5, i6 = chunks(lin(p + "img_mod.lin", jax.nn.silu(v_img), m_img), 6)
        t1, t2, t3, t4, t5, t6 = (c[:, None] for c in chunks(lin(p + "txt_mod.lin", jax.nn.silu(v_txt)), 6))
        qi = heads_of(lin(p + "img_attn.qkv", _ln(img) * (1 + i2) + i1, m_img))
        qt = heads_of(lin(p + "txt_attn.qkv", _ln(tx) * (1 + t2) + t1))
        norm = lambda x, which, where, p=p: _rms(x, _module(dit, p + where + ".norm." + which).scale[...])
        q = jnp.concatenate([norm(qt[:, :, 0], "query_norm", "txt_attn"), norm(qi[:, :, 0], "query_norm", "img_attn")],
                            1)
        k = jnp.concatenate([norm(qt[:, :, 1], "key_norm", "txt_attn"), norm(qi[:, :, 1], "key_norm", "img_attn")], 1)
        v = jnp.concatenate([qt[:, :, 2], qi[:, :, 2]], 1)
        o = _attn(rope(q), rope(k), v).reshape(b, -1, d)
        img = img + i3 * lin(p + "img_attn.proj", o[:, s:], m_img)
        hid = gelu(lin(p + "img_mlp.linear_1", _ln(img) * (1 + i5) + i4, m_img))
        img = img + i6 * lin(p + "img_mlp.linear_2", hid, m_img)
        tx = tx + t3 * lin(p + "txt_attn.proj", o[:, :s])
        tx = tx + t6 * lin(p + "txt_mlp.linear_2", gelu(lin(p + "txt_mlp.linear_1", _ln(tx) * (1 + t5) + t4)))
    x = jnp.concatenate([tx, img], axis=1)
    v_all = jnp.concatenate([jnp.broadcast_to(v_txt[:, None], (b, s, d)), v_img], axis=1)
    m_all = jnp.concatenate([jnp.zeros((s,)), m_img])
    for i in range(cfg.depth_single_blocks):
        p = f"single_blocks.{i}."
        sh, sc, gate = chunks(lin(p + "modulation.lin", jax.nn.silu(v_all), m_all), 3)
        y1 = lin(p + "linear1", _ln(x) * (1 + sc) + sh, m_all)
        qkv = heads_of(y1[..., :3 * d])
        q = _rms(qkv[:, :, 0], _module(dit, p + "norm.query_norm").scale[...])
        k = _rms(qkv[:, :, 1], _module(dit, p + "norm.key_norm").scale[...])
        o = _attn(rope(q), rope(k), qkv[:, :, 2]).reshape(b, -1, d)
        x = x + gate * lin(p + "linear2", jnp.concatenate([o, gelu(y1[..., 3 * d:])], -1), m_all)
    sh, sc = chunks(lin("final_layer.adaLN_modulation.lin", jax.nn.silu(v_img)), 2)
    out = lin("final_layer.linear", _ln(x[:, s:]) * (1 + sc) + sh)
    bounds = np.cumsum([0] + lens)
    return [out[:, a:e] for a, e in zip(bounds[:-1], bounds[1:])]
