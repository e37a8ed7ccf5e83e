"""Block analysis on a synthetic-dataset sample: eq. 3-4 vs the pixel-level equations on the explicit softmax map;
token grouping in closed form; the stage split."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from converters import registry
from data.composite import CompositeConfig
from data.latent_cache import to_uint8
from data.synthetic import SyntheticOmnimatte
from omnijax.layers.attention import attention
from omnijax.models.wan.umt5 import pad_text_context
from omnijax.omnimatte import analysis as an
from tests.omnimatte.helpers import tiny_base


@pytest.fixture(scope="module")
def conditioner(tmp_path_factory):
    """Tiny random umT5 + tokenizer + CLIP, the dims of the tiny-inp DiT (as the runlocal trainer uses them)."""
    umt5 = registry.load("umt5", "tiny", seed=2)[1]
    clip = registry.load("wan_clip", "tiny", seed=3)[1]
    return registry.conditioner(str(tmp_path_factory.mktemp("cond")), text_encoder=umt5, image_encoder=clip,
                                tokenizer="tiny")


def _captured_qk(base, z_t, t, context, clip, y):
    x, rope, _ = base.embed(z_t, y)
    _, e0, text, image = base.condition(t, context, clip)
    seen = []

    def hook(q, k, v):
        seen.append((np.asarray(q, np.float64), np.asarray(k, np.float64)))
        return attention(q, k, v, backend="xla")

    base.run_blocks(x, e0, text, image, rope, attn_fn=hook, backend="xla")
    return seen


def _pixel_tokens(num_frames, height, width):
    """Token index of every pixel [F*H*W]: latent frame 0 = pixel frame 0, latent t = frames 4t-3..4t; 16x16 px."""
    f = np.arange(num_frames)
    lat = np.where(f == 0, 0, (f - 1) // 4 + 1)
    gh, gw = height // 16, width // 16
    tok = (lat[:, None, None] * gh + (np.arange(height) // 16)[None, :, None]) * gw + (np.arange(width) // 16)
    return tok.reshape(-1)


def test_scores_equal_the_pixel_level_equations_on_a_dataset_sample(conditioner):
    base = tiny_base(num_layers=3)
    sample = SyntheticOmnimatte(CompositeConfig(num_frames=5, height=32, width=48), seed=0)[0]
    context, clip = an.conditioning(conditioner)(sample["video"])
    z_t, t, y, context, clip = an.model_inputs(base, sample, an.pool_encoder(), sigma=0.6, key=jax.random.key(0),
                                               context=context, clip=clip)
    effect = an.token_mask(sample["effect_mask"])
    # The sample's thin shadow fills no token: only partial fractions, which a 0.5 threshold would drop.
    assert 0 < float(effect.max()) < 0.5
    scores = np.asarray(an.block_scores(base, z_t, t, context, clip, y, effect[None], backend="xla"))[:, 0]
    weights = effect * an.token_pixels(*sample["effect_mask"].shape)
    c = np.asarray(an.contribution(jnp.asarray(scores), weights))

    # Brute force at pixel level: the full L x L softmax map W, each key token's weight spread evenly over its
    # pixels; eq. 3 sums it over M^e's pixels, eq. 4 sums S over M^e's pixels of all frames.
    tok = _pixel_tokens(*sample["effect_mask"].shape)
    e = sample["effect_mask"].reshape(-1).astype(np.float64)
    n_pix = np.bincount(tok)
    brute, num = [], []
    for q, k in _captured_qk(base, z_t, t, context, clip, y):
        logits = np.einsum("blnk,bsnk->bnls", q, k) / np.sqrt(q.shape[-1])
        w = np.exp(logits - logits.max(-1, keepdims=True))
        w_pix = w[..., tok] / n_pix[tok]  # [B, N, L, pixels]
        s = ((w_pix * e).sum(-1) / w_pix.sum(-1)).mean(axis=1)[0]  # eq. 3, mean over heads -> [L]
        brute.append(s)
        num.append((s[tok] * e).sum())
    np.testing.assert_allclose(scores, np.stack(brute), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(c, np.array(num) / np.sum(num), rtol=1e-5)


def test_token_mask_fractions_and_pixels():
    m = np.zeros((5, 16, 32), np.float32)
    m[0, :16, :16] = 1  # latent frame 0 (pixel frame 0 alone), token (0, 0): full
    m[1:5, :16, 16:] = 1  # latent frame 1, token (0, 1): full
    m[2, :8, :16] = 1  # half of one of its four frames, token (0, 0): 1/8
    tok = np.asarray(an.token_mask(m)).reshape(2, 1, 2)
    np.testing.assert_allclose(tok, [[[1, 0]], [[0.125, 1]]])
    np.testing.assert_array_equal(an.token_pixels(5, 16, 32), [256, 256, 1024, 1024])
    np.testing.assert_array_equal(an.token_mask(m, threshold=0.5), [1, 0, 0, 1])
    with pytest.raises(ValueError, match="4k"):
        an.token_mask(np.zeros((4, 16, 16)))


def test_stage_split_at_troughs():
    curve = [5, 4, 3, 4, 6, 7, 6, 2, 3, 3.5]  # troughs at 2 and 7
    out = an.split_stages(curve)
    assert out["troughs"] == [2, 7] and out["stages"] == [[0, 2], [2, 7], [7, 10]] and out["effect_expert_k"] == 3
    # Three local minima: the two deepest win.
    out = an.split_stages([3, 1, 3, 2.5, 3, 0.5, 4, 5, 6])
    assert out["troughs"] == [1, 5]
    mono = an.split_stages(np.arange(9.0))
    assert mono["method"].startswith("thirds") and mono["stages"] == [[0, 3], [3, 6], [6, 9]]


def test_the_training_conditioning_reaches_the_dit(conditioner, monkeypatch):
    """analyze() probes the DiT with the empty prompt's umT5 embedding and CLIP of frame 0 (quantised to uint8 as
    the trainer's batches hold it), built here from the conditioner directly; and the DiT's scores depend on it
    (zeros, the old probe, give other scores)."""
    base = tiny_base(num_layers=3)
    sample = SyntheticOmnimatte(CompositeConfig(num_frames=5, height=32, width=48), seed=0)[0]
    seen = []
    real = an.block_scores

    def spy(base, z_t, t, context, clip, y, indicator, **kw):
        out = real(base, z_t, t, context, clip, y, indicator, **kw)
        seen.append(dict(z_t=z_t, t=t, context=np.asarray(context), clip=np.asarray(clip), y=y, ind=indicator,
                         scores=np.asarray(out)))
        return out

    monkeypatch.setattr(an, "block_scores", spy)
    an.analyze(base, [sample], an.pool_encoder(), condition=an.conditioning(conditioner), sigma=0.6, backend="xla")
    (got,) = seen
    want_text = pad_text_context(conditioner.text([""]))
    want_clip = conditioner.image(to_uint8(sample["video"][:1]).astype(np.float32) / 127.5 - 1.0)
    np.testing.assert_array_equal(got["context"], want_text)
    np.testing.assert_allclose(got["clip"], want_clip, rtol=1e-6, atol=1e-6)
    assert np.abs(got["context"]).max() > 0 and np.abs(got["clip"]).max() > 0
    zeros = np.asarray(real(base, got["z_t"], got["t"], jnp.zeros_like(got["context"]), jnp.zeros_like(got["clip"]),
                            got["y"], got["ind"], backend="xla"))
    assert np.abs(zeros - got["scores"]).max() > 1e-4
