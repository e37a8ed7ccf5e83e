"""Training from a latent cache (config.input.latent_cache): no VAE encoder in the loop, and the same model
inputs as the pixel path."""

import os

import jax
import numpy as np
import pytest

from configs import effect_expert
from data.latent_cache import LATENT_KEYS, LOGVAR_KEYS, LatentSource, cache_latents, posterior_encoder
from data.pipeline import fit_to_latent
from omnijax.models.wan import vae as vae_lib
from omnijax.omnimatte.decompose import jit_module_fn
from omnijax.omnimatte.masks import latent_mask, removal_mask
from omnijax.omnimatte.training import PIXEL_KEYS
from tasks import SetupError
from tasks import omnimatte as task
from tasks.trainer import train
from tests.launch.runlocal import logged_losses, runlocal_config
from tests.torch_refs import rel_err


def test_train_from_latent_cache_never_runs_the_encoder(tmp_path, monkeypatch):
    cache = str(tmp_path / "cache")
    config = runlocal_config(effect_expert, total_steps=2, ckpt_steps=2, **{"evals.preview_steps": 100,
                                                                    "input.latent_cache": cache})
    _, vae, _ = task.build_models(config)
    calls = []
    encoder_call = vae_lib.Encoder.__call__

    def counting(self, *args, **kw):
        calls.append(1)
        return encoder_call(self, *args, **kw)

    monkeypatch.setattr(vae_lib.Encoder, "__call__", counting)
    # The tiny VAE's posterior, stored as float16 (the default); 3 samples for batches of 1.
    assert cache_latents(task.pixel_source(config, seed=1), posterior_encoder(vae), cache, indices=range(3)) == 3
    assert calls  # the wrapper does see the encoder run
    assert LatentSource(cache).has_logvar

    def refuse(self, *args, **kw):
        raise AssertionError("the VAE encoder ran in the latent-cache training loop")

    monkeypatch.setattr(vae_lib.Encoder, "__call__", refuse)
    out = str(tmp_path / "run")
    train(config, out)
    losses = logged_losses(out)
    assert sorted(losses) == [1, 2] and np.isfinite(list(losses.values())).all()
    assert os.path.isfile(os.path.join(out, "lora_effect_omnijax.safetensors"))

    # A mean-only cache cannot give the default posterior samples: the error says what to do.
    mean_only = str(tmp_path / "means")
    monkeypatch.setattr(vae_lib.Encoder, "__call__", encoder_call)
    cache_latents(task.pixel_source(config, seed=1), posterior_encoder(vae, mean_only=True), mean_only,
                  indices=[0])
    with pytest.raises(SetupError, match="vae_sample=False"):
        task.make_input(runlocal_config(effect_expert, **{"input.latent_cache": mean_only}), seed=0)
    with pytest.raises(SetupError, match="input.frames/height/width"):
        task.make_input(runlocal_config(effect_expert, **{"input.latent_cache": cache, "input.frames": 5}), seed=0)
    with pytest.raises(SetupError, match="cache_latents.py"):
        task.make_input(runlocal_config(effect_expert, **{"input.latent_cache": str(tmp_path / "none")}), seed=0)


def test_cache_batch_equals_pixel_batch(tmp_path):
    """The same clips through both input paths give the same x0 latents, condition y and CLIP frame."""
    config = runlocal_config(effect_expert)
    _, vae, _ = task.build_models(config)
    source = task.pixel_source(config, seed=3)
    idx = [0, 1]
    cache = str(tmp_path / "cache")
    cache_latents(source, posterior_encoder(vae), cache, indices=idx, batch_size=2, dtype=np.float32)
    samples = [fit_to_latent(source[i]) for i in idx]
    pixels = {k: np.stack([s[k] for s in samples]) for k in PIXEL_KEYS}
    stored = LatentSource(cache)
    cached = {k: np.stack([stored[i][k] for i in idx]) for k in LATENT_KEYS + LOGVAR_KEYS + ("mask", "first_frame")}

    arrays_p, first_p = task.host_inputs(pixels)
    arrays_c, first_c = task.host_inputs(cached)
    np.testing.assert_array_equal(first_c, first_p)
    key = jax.random.key(5)
    out = {}
    for sample in (False, True):
        p = task.make_prepare(vae, cached=False, sample=sample)(arrays_p, key)
        c = task.make_prepare(None, cached=True, sample=sample)(arrays_c, key)
        for k in ("x0_alpha", "x0_bg", "y"):
            assert p[k].shape == c[k].shape and rel_err(c[k], p[k]) <= 1e-5, (sample, k, rel_err(c[k], p[k]))
        out[sample] = c
    assert rel_err(out[True]["x0_alpha"], out[False]["x0_alpha"]) > 1e-3  # sampling really adds noise

    # Independently assembled from the VAE's own encode (keys split in LATENTS order: background, alpha, video)
    # and the mask functions: the cache's sampled batch is what the reference's .sample() training sees.
    k_bg, _, k_video = jax.random.split(key, 3)
    encode = jit_module_fn(vae, lambda vae, x, k: vae.encode(x * 2.0 - 1.0, sample_key=k))  # eager is slow
    bg, video = encode(pixels["background"], k_bg), encode(pixels["video"], k_video)
    mask = latent_mask(jax.vmap(removal_mask)(pixels["mask"]))
    assert rel_err(out[True]["x0_bg"], bg) <= 1e-5
    assert rel_err(out[True]["y"][..., 4:], video) <= 1e-5
    np.testing.assert_allclose(np.asarray(out[True]["y"][..., :4]), np.asarray(mask), atol=1e-6)
    assert 0.0 < float(np.mean(np.asarray(mask) < 0.5)) < 1.0  # the clips do have a removal region
