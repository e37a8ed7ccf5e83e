"""The Decomposer's glue against hand-written expectations, with stub experts, a stub VAE and a stub conditioner.

What the stubs make visible:
- every DiT call is logged (which expert, the timesteps it got), so the timestep scale (1000 * sigma, not sigma),
  the shift of the sigma table (5) and the expert order (Effect while sigma > tau, then Quality) are compared
  with the closed form of spec wan.md §4.1 written here;
- each stub predicts the velocity that lands the Euler sampler exactly on x0 = "the removal region its pass was
  conditioned on" (read from the mask channel of y), and the stub VAE decodes a latent cell to its 8x8 pixels, so
  the returned background and alphas show which pass produced them and how far the removal mask was dilated.

Hand expectations (spec easyomnimatte.md §1-§4): with one object, one pass removing it; with K > 1 objects, pass
0 removes the union (it gives THE background) and pass k removes object k alone (it gives alpha_k). The removal
mask is the object dilated by an 11 x 11 square: an object filling latent cell (r, c) (pixels 8r..8r+7) grows to
pixels 8r-5..8r+12, which covers the centre pixels (8y+3, 8y+4) the latent mask reads of cells r-1..r+1: a 3 x 3
block of cells, i.e. a 24 x 24 pixel square. Without dilation it stays one cell.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from omnijax.omnimatte.decompose import Decomposer, SamplerSettings

F, H, W = 5, 64, 64  # 2 latent frames of 8 x 8 cells
CELLS = ((1, 1), (1, 6), (6, 3))  # latent cell of each object; their dilated 3 x 3 blocks do not touch


def hand_sigmas(n, shift=5.0):
    s = lambda x: shift * x / (1 + (shift - 1) * x)  # noqa: E731
    return np.append(s(np.linspace(1000 * s(1.0), 1000 * s(1 / 1000), n) / 1000), 0.0)


class _Base(nnx.Module):
    dtype = jnp.float32


class StubExpert(nnx.Module):
    """Logs (label, timesteps) per call; velocity (z - x0) / sigma with x0 = 2 r - 1, r = the removal region of
    the pass read from y's first mask channel (keep = 1 - m: 0 where removed, 128/255 on the neutral rest)."""

    def __init__(self, label, log):
        self.label, self.base, self._log = label, _Base(), log

    def __call__(self, z_bg, z_alpha, t, context, clip, y, *, attention_backend="auto", scan=True):
        label = self.label
        jax.debug.callback(lambda t: self._log.append((label, np.asarray(t))), t, ordered=True)
        removed = 1.0 - jnp.round(y[..., :1] * 255.0 / 128.0)  # 1 removed, 0 kept
        x0 = jnp.broadcast_to(2.0 * removed - 1.0, z_alpha.shape)
        sigma = (t / 1000.0)[:, None, None, None, None]
        return (z_bg - x0) / sigma, (z_alpha - x0) / sigma


class StubVAE(nnx.Module):
    """encode: zeros [1, T, h, w, 16]; decode: latent cell -> its 8 x 8 pixels, latent frame 0 -> pixel frame 0,
    latent frame t -> pixel frames 4t-3..4t (the Wan VAE's grouping), channels 0..2 -> RGB."""

    def encode(self, video, frames_per_step=1):
        b, f, hh, ww, _ = video.shape
        return jnp.zeros((b, (f - 1) // 4 + 1, hh // 8, ww // 8, 16), jnp.float32)

    def decode(self, z, frames_per_step=1):
        z = z[..., :3]
        z = jnp.concatenate([z[:, :1], jnp.repeat(z[:, 1:], 4, axis=1)], axis=1)
        return jnp.repeat(jnp.repeat(z, 8, axis=2), 8, axis=3)


class StubConditioner:
    def __init__(self):
        self.texts, self.images = [], []

    def text(self, prompts):
        self.texts.append(list(prompts))
        return [np.zeros((3, 8), np.float32)]

    def image(self, frames):
        self.images.append(np.asarray(frames))
        return np.zeros((len(frames), 257, 8), np.float32)


def object_masks(k):
    m = np.zeros((k, F, H, W), np.float32)
    for i, (r, c) in enumerate(CELLS[:k]):
        m[i, :, 8 * r:8 * r + 8, 8 * c:8 * c + 8] = 1.0
    return m


def square(cells, grow=1):
    """Hand expectation: 1 on the pixels of the (2 grow + 1)^2 latent cells around each of `cells`, [F, H, W]."""
    out = np.zeros((F, H, W), np.float32)
    for r, c in cells:
        out[:, 8 * max(r - grow, 0):8 * (r + grow + 1), 8 * max(c - grow, 0):8 * (c + grow + 1)] = 1.0
    return out


def decompose(k, settings):
    log = []
    cond = StubConditioner()
    dec = Decomposer(StubExpert("effect", log), StubExpert("quality", log), StubVAE(), cond,
                     attention_backend="xla")
    video = np.random.default_rng(0).uniform(size=(F, H, W, 3)).astype(np.float32)
    background, alphas = dec(video, object_masks(k), settings)
    jax.effects_barrier()
    return log, cond, video, background, alphas


@pytest.mark.parametrize("steps,tau", [(4, 0.5), (2, 0.5), (4, 0.8)])
def test_timesteps_shift_and_expert_order(steps, tau):
    log, cond, video, _, _ = decompose(2, SamplerSettings(steps=steps, tau=tau))
    sig = hand_sigmas(steps)[:-1]
    assert [label for label, _ in log] == ["effect" if s > tau else "quality" for s in sig]
    for (_, t), s in zip(log, sig):
        assert t.shape == (3,)  # K = 2: three passes in one batch
        np.testing.assert_allclose(t, 1000.0 * s, rtol=1e-5)
    # The hand table: 4 steps are 1, 0.90971, 0.71732, 0.02441 (spec wan.md §4.1): three Effect steps at tau 0.5.
    if steps == 4 and tau == 0.5:
        assert [label for label, _ in log] == ["effect"] * 3 + ["quality"]
    # Conditioning: the empty prompt and CLIP of frame 0 in [-1, 1].
    assert cond.texts == [[""]]
    np.testing.assert_allclose(cond.images[0], video[:1] * 2.0 - 1.0, rtol=1e-6)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_pass_to_layer_mapping_and_dilation(k):
    _, _, _, background, alphas = decompose(k, SamplerSettings(steps=2))
    assert background.shape == (F, H, W, 3) and alphas.shape == (k, F, H, W)
    # Background = pass 0 = the union of all objects removed (one object: that object).
    want_bg = square(CELLS[:k])
    for ch in range(3):
        np.testing.assert_allclose(background[..., ch], want_bg, atol=1e-4)
    # Alpha k = the pass that removed object k alone.
    for i in range(k):
        np.testing.assert_allclose(alphas[i], square(CELLS[i:i + 1]), atol=1e-4, err_msg=f"object {i} of {k}")


def test_dilation_setting_reaches_the_mask():
    """dilation=1 (no dilation) keeps each object to its own cell: the default 11 is what grows it to 3 x 3."""
    _, _, _, _, alphas = decompose(1, SamplerSettings(steps=2, dilation=1))
    np.testing.assert_allclose(alphas[0], square(CELLS[:1], grow=0), atol=1e-4)
    assert SamplerSettings().dilation == 11
