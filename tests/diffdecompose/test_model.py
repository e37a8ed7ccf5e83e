"""In-Context Decomposition on the tiny FluxDiT: LPEC ids, segment timesteps, and the two-layer flow-matching
loss against a dense per-token Flux written in tests/diffdecompose/dense_ref.py."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from omnijax.diffdecompose.model import DiffDecomposer, ICDSettings, decompose_loss, layer_ids
from omnijax.models.flux.dit import FluxDiT, Segment
from omnijax.models.flux.lora import FluxLoRA, lora_spec
from omnijax.models.flux.variants import variant
from tests.diffdecompose.dense_ref import dense_flux

H, W, Z = 4, 6, 4  # latent grid (packed 2 x 3 = 6 tokens per layer), 4 channels -> 16 packed features


def _model(settings=None, seed=0, guidance=True):
    settings = settings or ICDSettings()
    cfg = variant("tiny" if guidance else "tiny-schnell", depth=1, depth_single_blocks=1)
    dit = FluxDiT(cfg, dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(seed))
    lora = FluxLoRA(cfg, lora_spec(cfg, 4, 8.0), rngs=nnx.Rngs(seed + 1))
    # A fresh adapter is the identity (B = 0); random B makes the LoRA switches visible in the outputs.
    for i, ad in enumerate(lora.adapters().values()):
        ad.lora_b[...] = 0.2 * jax.random.normal(jax.random.key(100 + i), ad.lora_b.shape)
    return DiffDecomposer(dit, lora, settings)


@nnx.jit(static_argnames="grid")
def _fwd(m, zc, xf, xb, t, txt, y, g, grid):
    return m(zc, xf, xb, t, txt, y, g, grid=grid)


def _batch(b=2, seed=0):
    k = jax.random.split(jax.random.key(seed), 5)
    return dict(z_composite=jax.random.normal(k[0], (b, H, W, Z)), z_foreground=jax.random.normal(k[1], (b, H, W, Z)),
                z_background=jax.random.normal(k[2], (b, H, W, Z)), txt=jax.random.normal(k[3], (b, 5, 32)),
                y=jax.random.normal(k[4], (b, 24)))


def _pack(x):
    """[B, h, w, Z] -> [B, (h/2)(w/2), 4Z], feature z*4 + 2*dy + dx (BFL's rearrange), written with numpy."""
    x = np.asarray(x)
    b, h, w, z = x.shape
    out = np.zeros((b, h // 2, w // 2, z, 2, 2), x.dtype)
    for dy in range(2):
        for dx in range(2):
            out[..., dy, dx] = x[:, dy::2, dx::2, :]
    return jnp.asarray(out.reshape(b, (h // 2) * (w // 2), 4 * z))


def _grid_ids(h2, w2, axis0=0.0, dc=0.0):
    r, c = np.meshgrid(np.arange(h2), np.arange(w2), indexing="ij")
    return np.stack([np.full(r.size, axis0), r.ravel(), c.ravel() + dc], -1).astype(np.float32)


@pytest.mark.parametrize("scheme", ["panel", "axis0"])
def test_lpec_background_clones_composite_ids_foreground_differs(scheme):
    ids_z, ids_x, ids_y = (np.asarray(a[0]) for a in layer_ids(H, W, scheme))
    np.testing.assert_array_equal(ids_z, _grid_ids(H // 2, W // 2))
    np.testing.assert_array_equal(ids_y, ids_z)
    assert not np.any(np.all(ids_x == ids_z, axis=-1)), "no foreground token may share a composite position"
    want = _grid_ids(H // 2, W // 2, dc=W // 2) if scheme == "panel" else _grid_ids(H // 2, W // 2, axis0=1.0)
    np.testing.assert_array_equal(ids_x, want)


def test_swapping_layers_without_ids_changes_the_output():
    m, bt = _model(), _batch()
    zc, a, b_ = (_pack(bt[k]) for k in ("z_composite", "z_foreground", "z_background"))
    t = jnp.asarray([0.3, 0.8])
    fg1, bg1 = _fwd(m, zc, a, b_, t, bt["txt"], bt["y"], 2.0, (H, W))
    fg2, bg2 = _fwd(m, zc, b_, a, t, bt["txt"], bt["y"], 2.0, (H, W))
    # LPEC breaks the symmetry: the swapped contents do not just swap the outputs.
    assert float(jnp.max(jnp.abs(fg2 - bg1))) > 1e-3 and float(jnp.max(jnp.abs(bg2 - fg1))) > 1e-3
    # Control: with cloned ids for both noisy layers they would be exchangeable (so the check above can fail).
    ids = layer_ids(H, W)[0]
    z0, tt, g = jnp.zeros(2), t, jnp.full(2, 2.0)
    run = nnx.jit(lambda m, x, y: m.dit.forward_segments(
        [Segment(zc, ids, z0, g), Segment(x, ids, tt, g), Segment(y, ids, tt, g)], bt["txt"],
        jnp.zeros((5, 3)), bt["y"], txt_timesteps=tt, lora=m.lora))
    _, p1, q1 = run(m, a, b_)
    _, p2, q2 = run(m, b_, a)
    np.testing.assert_allclose(p2, q1, atol=1e-5)
    np.testing.assert_allclose(q2, p1, atol=1e-5)


def _reference_segments(m, zc, xf, xb, t, g):
    s = m.settings
    ids_x = _grid_ids(H // 2, W // 2, dc=W // 2) if s.fg_ids == "panel" else _grid_ids(H // 2, W // 2, axis0=1.0)
    b = zc.shape[0]
    return [dict(img=zc, ids=_grid_ids(H // 2, W // 2), t=jnp.zeros(b), g=jnp.full(b, s.composite_guidance),
                 lora=s.lora_on[0]),
            dict(img=xf, ids=ids_x, t=t, g=g, lora=s.lora_on[1]),
            dict(img=xb, ids=_grid_ids(H // 2, W // 2), t=t, g=g, lora=s.lora_on[2])]


@pytest.mark.parametrize("settings", [ICDSettings(), ICDSettings("axis0", (True, False, True), 1.5)])
def test_forward_matches_dense_per_token_flux(settings):
    m, bt = _model(settings), _batch()
    zc, xf, xb = (_pack(bt[k]) for k in ("z_composite", "z_foreground", "z_background"))
    t, g = jnp.asarray([0.25, 0.9]), jnp.asarray([3.0, 3.0])
    got = _fwd(m, zc, xf, xb, t, bt["txt"], bt["y"], g, (H, W))
    _, ref_fg, ref_bg = dense_flux(m.dit, m.lora, _reference_segments(m, zc, xf, xb, t, g), bt["txt"], bt["y"], t, g)
    np.testing.assert_allclose(got[0], ref_fg, atol=2e-4, rtol=1e-4)
    np.testing.assert_allclose(got[1], ref_bg, atol=2e-4, rtol=1e-4)


def test_composite_is_clean_at_timestep_zero(monkeypatch):
    m, bt = _model(), _batch()
    seen = {}
    orig = m.dit.forward_segments

    def spy(segments, *a, **k):
        seen["segs"] = segments
        return orig(segments, *a, **k)

    monkeypatch.setattr(m.dit, "forward_segments", spy)
    decompose_loss(m, bt, jax.random.key(3))
    z, x, y = seen["segs"]
    np.testing.assert_array_equal(z.img, _pack(bt["z_composite"]))  # no noise at all
    np.testing.assert_array_equal(z.timesteps, np.zeros(2))
    t = np.asarray(x.timesteps)
    assert np.all((t > 0) & (t < 1)) and np.array_equal(t, np.asarray(y.timesteps))
    for seg, key in ((x, "z_foreground"), (y, "z_background")):  # both layers noisy, neither equals its data
        assert float(jnp.min(jnp.abs(seg.img - _pack(bt[key])))) >= 0 and not np.allclose(seg.img, _pack(bt[key]))


@pytest.mark.parametrize("guidance", [True, False])
def test_loss_matches_dense_reference(guidance):
    m, bt = _model(ICDSettings(lora_on=(True, True, False)), guidance=guidance), _batch()
    rng = jax.random.key(7)
    loss, aux = nnx.jit(lambda m, b, r: decompose_loss(m, b, r, guidance=1.0, weights=(1.0, 3.0)))(m, bt, rng)
    # The draws the loss makes from rng: t ~ sigmoid(N(0, 1)), then independent noise per layer.
    k_t, k_fg, k_bg = jax.random.split(rng, 3)
    t = jax.nn.sigmoid(jax.random.normal(k_t, (2,)))
    e_fg = jax.random.normal(k_fg, bt["z_foreground"].shape)
    e_bg = jax.random.normal(k_bg, bt["z_background"].shape)
    tt = t[:, None, None, None]
    xt_fg = (1 - tt) * bt["z_foreground"] + tt * e_fg
    xt_bg = (1 - tt) * bt["z_background"] + tt * e_bg
    g = jnp.ones(2) if guidance else None
    segs = _reference_segments(m, _pack(bt["z_composite"]), _pack(xt_fg), _pack(xt_bg), t, g)
    if not guidance:
        for s in segs:
            s["g"] = None
    _, v_fg, v_bg = dense_flux(m.dit, m.lora, segs, bt["txt"], bt["y"], t, g)
    l_fg = np.mean((np.asarray(v_fg) - np.asarray(_pack(e_fg - bt["z_foreground"]))) ** 2)
    l_bg = np.mean((np.asarray(v_bg) - np.asarray(_pack(e_bg - bt["z_background"]))) ** 2)
    np.testing.assert_allclose(aux["loss_fg"], l_fg, rtol=1e-4)
    np.testing.assert_allclose(aux["loss_bg"], l_bg, rtol=1e-4)
    np.testing.assert_allclose(loss, (l_fg + 3 * l_bg) / 4, rtol=1e-4)
    # Each layer's target is its own: swapping the targets gives a different number.
    swapped = np.mean((np.asarray(v_fg) - np.asarray(_pack(e_bg - bt["z_background"]))) ** 2)
    assert abs(swapped - l_fg) > 1e-3


def test_settings_errors():
    with pytest.raises(ValueError, match="fg_ids"):
        ICDSettings(fg_ids="diagonal")
    with pytest.raises(ValueError, match="lora_on"):
        ICDSettings(lora_on=(True, True))
    m, bt = _model(), _batch()
    with pytest.raises(ValueError, match="must all be"):
        m(_pack(bt["z_composite"]), _pack(bt["z_foreground"])[:, :4], _pack(bt["z_background"]), 0.5, bt["txt"],
          bt["y"], 1.0, grid=(H, W))
