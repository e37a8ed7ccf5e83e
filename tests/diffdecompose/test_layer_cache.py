"""The DiffDecompose latent cache: files hold the encoder's output for each sample's three images, a rerun skips
them, and the task's batch from the cache equals its batch from pixels (same VAE, same prompt rows)."""

import jax
import numpy as np
import pytest

from configs import diffdecompose
from data.alphablend import AlphaBlendConfig, AlphaBlendDataset
from data.layer_cache import LayerLatentSource, cache_layer_latents


def _pool_encoder(images):
    """A closed-form stand-in: 8x8 mean pool, 3 channels -> 4 (the mean of the three appended)."""
    n, h, w, _ = images.shape
    x = images.reshape(n, h // 8, 8, w // 8, 8, 3).mean((2, 4))
    return np.concatenate([x, x.mean(-1, keepdims=True)], -1)


def test_cache_holds_each_images_latents_and_resumes(tmp_path):
    ds = AlphaBlendDataset(AlphaBlendConfig(height=32, width=48), seed=3, length=4)
    out = str(tmp_path / "c")
    assert cache_layer_latents(ds, _pool_encoder, out, indices=[0, 2], dtype=np.float32) == 2
    assert cache_layer_latents(ds, _pool_encoder, out, indices=[0, 2, 3], dtype=np.float32) == 1  # 0, 2 kept
    src = LayerLatentSource(out)
    assert len(src) == 3 and src.meta["image_size"] == [32, 48] and src.meta["latent_shape"] == [4, 6, 4]
    for j, i in enumerate([0, 2, 3]):
        s = ds[i]
        for k in ("composite", "foreground", "background"):
            np.testing.assert_allclose(src[j][f"z_{k}"], _pool_encoder(s[k][None] * 2 - 1)[0], atol=1e-6)
        assert src[j]["subtask"] == s["subtask"]
    with pytest.raises(FileNotFoundError, match="meta.json"):
        LayerLatentSource(str(tmp_path))


def test_task_batch_from_cache_equals_batch_from_pixels(tmp_path):
    from flax import nnx

    from omnijax import sharding
    from tasks import diffdecompose as task

    config = diffdecompose.get_config("runlocal")
    config.input.conditioning_cache = str(tmp_path / "cond")
    mesh = sharding.make_mesh(dict(config.mesh), devices=jax.devices()[:1])
    with jax.set_mesh(mesh):
        models = task.build(config, mesh)
        ds = task.dataset(config, seed=config.seed, length=2)
        vae = models.frozen["vae"]
        encode = nnx.jit(lambda v, x: v.encode(x))
        cache = str(tmp_path / "lat")
        cache_layer_latents(ds, lambda x: jax.device_get(encode(vae, x)), cache, dtype=np.float32)
        config.input.latent_cache = cache
        cached = task.make_batch(models, config, mesh)(next(iter(task.input_pipeline(config, seed=0))), None)
        idx = int(np.argmax([np.array_equal(ds[i]["subtask"], cached["subtask"][0]) for i in range(2)]))
        config.input.latent_cache = ""
        host = {k: np.asarray(ds[idx][k])[None] for k in task.BATCH_KEYS}
        pixels = task.make_batch(models, config, mesh)(host, jax.random.key(0))
    for k in ("z_composite", "z_foreground", "z_background"):
        np.testing.assert_allclose(cached[k], pixels[k], atol=1e-5)
    np.testing.assert_array_equal(cached["txt"], pixels["txt"])
    np.testing.assert_array_equal(cached["y"], pixels["y"])
