"""The base-pretraining task (tasks/inpaint.py, omnijax.omnimatte.training.inpaint_*): the masked region of its input
really is masked, and its loss regresses the flow-matching velocity toward the clean BACKGROUND's latent.

References: scipy's binary dilation for the removal regions, and a float64 reconstruction of the loss from the
inputs the model is actually called with (sigma from the timestep, the noise from x_t and the background latent)."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx
from scipy import ndimage

from omnijax.models.wan.dit import WanDiT
from omnijax.models.wan.vae import WanVAE, vae_variant
from omnijax.models.wan.variants import variant
from omnijax.omnimatte.masks import NEUTRAL, latent_mask
from omnijax.omnimatte.training import inpaint_inputs, inpaint_pixels
from tasks import inpaint

F, H, W = 5, 32, 32


def _batch():
    """Two samples: an object square (mask) with a semi-transparent shadow strip below it, outside the mask."""
    rng = np.random.default_rng(0)
    mask = np.zeros((2, F, H, W), np.float32)
    mask[:, :, 4:12, 10:18] = 1.0
    alpha = mask.copy()
    alpha[:, :, 22:26, 6:24] = 0.4  # the shadow: more than 5 px (the dilation's reach) below the object
    video = rng.uniform(size=(2, F, H, W, 3)).astype(np.float32)
    background = rng.uniform(size=(2, F, H, W, 3)).astype(np.float32)
    return dict(video=video, background=background, mask=mask, alpha=alpha)


def _dilated(region):  # 11 x 11 square, per frame, outside the frame counts as empty
    return np.stack([ndimage.binary_dilation(r, np.ones((11, 11), bool)) for r in region])


def test_masked_region_is_masked_and_unmasked_form_shows_the_video():
    b = _batch()
    m, video = inpaint_pixels({k: jnp.asarray(v) for k, v in b.items()}, jnp.array([True, False]))
    m, video = np.asarray(m), np.asarray(video)
    hole = _dilated((b["mask"][0] > 0) | (b["alpha"][0] > 0.1))  # object AND shadow
    obj = _dilated(b["mask"][1] > 0)  # the coarse object only, as the sampler's removal mask
    assert hole[:, 24, 15].all() and not obj[:, 24, 15].any()  # the shadow is in the first, not in the second
    np.testing.assert_array_equal(m[0], np.where(hole, 1.0, np.float32(NEUTRAL)))
    np.testing.assert_array_equal(m[1], np.where(obj, 1.0, np.float32(NEUTRAL)))
    full = b["video"] * 2.0 - 1.0
    np.testing.assert_array_equal(video[0][hole], -1.0)  # masked: nothing of the composite shows in the hole
    np.testing.assert_allclose(video[0][~hole], full[0][~hole], atol=1e-6)
    np.testing.assert_allclose(video[1], full[1], atol=1e-6)  # unmasked: the whole composite


def test_loss_target_is_the_background():
    vae = WanVAE(vae_variant("tiny"), dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(1))
    model = WanDiT(variant("tiny-inp"), dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(2))
    b = {k: jnp.asarray(v) for k, v in _batch().items()}
    batch = inpaint_inputs(vae, b, jax.random.key(3), masked_prob=0.5, sample=False)
    # The form each sample got (p = 0.5) is read back from y's mask channels; then y is checked against the
    # condition built here from that form.
    z_bg = np.asarray(vae.posterior(b["background"] * 2.0 - 1.0)[0], np.float64)
    np.testing.assert_allclose(np.asarray(batch["x0"]), z_bg, atol=1e-6)
    for masked in (np.array([True, False]), np.array([False, True]), np.array([True, True]), np.array([False] * 2)):
        m, video = inpaint_pixels(b, jnp.asarray(masked))
        if np.allclose(np.asarray(latent_mask(m)), np.asarray(batch["y"][..., :4])):
            np.testing.assert_allclose(np.asarray(batch["y"][..., 4:]), np.asarray(vae.posterior(video)[0]), atol=1e-6)
            break
    else:
        pytest.fail("y's mask channels match neither form of inpaint_pixels")

    rng = np.random.default_rng(4)
    batch["context"] = jnp.asarray(rng.normal(size=(2, 7, 32)), jnp.float32)
    batch["clip"] = jnp.asarray(rng.normal(size=(2, 257, 32)), jnp.float32)
    calls = []

    def recording(x_t, t, context, clip, y, **kw):
        calls.append((np.asarray(x_t, np.float64), np.asarray(t, np.float64)))
        return model(x_t, t, context, clip, y, attention_backend="xla")

    config = ml_collections.ConfigDict(dict(loss=dict(shift=5.0, max_abs_error=None),
                                            model=dict(remat=0, attention="xla")))
    got = float(inpaint.loss(recording, batch, jax.random.key(5), config=config))
    (x_t, t), = calls
    sigma = (t / 1000.0).reshape(-1, 1, 1, 1, 1)
    assert sigma.min() > 0.05  # the noise is recovered from x_t / sigma below
    noise = (x_t - (1.0 - sigma) * z_bg) / sigma
    pred = np.asarray(model(jnp.asarray(x_t, jnp.float32), jnp.asarray(t, jnp.float32), batch["context"],
                            batch["clip"], batch["y"], attention_backend="xla"), np.float64)
    want = np.mean((pred - (noise - z_bg)) ** 2)
    assert got == pytest.approx(want, rel=1e-3)
    # The noise recovered this way is a standard normal draw only if x0 really was the background latent.
    assert abs(noise.std() - 1.0) < 0.2 and abs(noise.mean()) < 0.2


def test_small_base_configs():
    from configs.effect_expert import get_config as effect
    from configs.inpaint_base import get_config as base
    from configs.quality_expert import get_config as quality

    for c in (effect("base=small"), quality("base=small"), base()):
        assert (c.model.variant, c.input.source, c.input.frames, c.input.height, c.input.width) == (
            "small-inp", "procedural", 17, 128, 128)
        assert dict(c.mesh) == dict(data=1, fsdp=1, context=1, tensor=1)
    assert base().task == "inpaint" and base().model_init.dit == "tiny"
    assert effect("base=small,frames=33").input.frames == 33 and effect().input.frames == 81
    cfg = variant("small-inp")
    assert (cfg.text_dim, cfg.image_dim, cfg.in_dim, cfg.head_dim) == (32, 32, 36, 64)
