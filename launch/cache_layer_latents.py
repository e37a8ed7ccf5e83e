"""Encode DiffDecompose training samples to Flux VAE latents once, so training never runs the VAE encoder.

  python launch/cache_layer_latents.py --config configs/diffdecompose.py --out /data/dd_latents --num 30000 \
      --config.model_init.vae=/ckpt/ae.safetensors
  python launch/train.py --config configs/diffdecompose.py --workdir runs/dd \
      --config.input.latent_cache=/data/dd_latents

The samples are those the training config generates (`tasks.diffdecompose.dataset`, seed `config.seed`, indices
0..num-1); the latents are the VAE posterior means (data/layer_cache.py). Existing files are kept, so a rerun
resumes; --shard i/n encodes every n-th index starting at i (one process per GPU).
"""

from __future__ import annotations

import sys

import jax
from absl import app, flags
from ml_collections import config_flags
from tqdm.auto import tqdm

from launch import common  # noqa: F401  (sets XLA flags first)

_CONFIG = config_flags.DEFINE_config_file("config", None, "the DiffDecompose training config", lock_config=True)
_OUT = flags.DEFINE_string("out", None, "cache folder")
_NUM = flags.DEFINE_integer("num", 1000, "samples to encode (indices 0..num-1)")
_SHARD = flags.DEFINE_string("shard", "0/1", "i/n: encode indices i, i+n, i+2n, ...")


def main(argv):
    del argv
    from flax import nnx

    from converters import registry
    from data.layer_cache import cache_layer_latents
    from tasks import SetupError
    from tasks.diffdecompose import dataset

    config = _CONFIG.value
    if config is None or not _OUT.value:
        raise app.UsageError("--config and --out are required")
    try:
        i, n = (int(x) for x in _SHARD.value.split("/"))
        assert 0 <= i < n
    except (ValueError, AssertionError):
        raise SystemExit(f"error: --shard must be i/n with 0 <= i < n, got {_SHARD.value!r}") from None
    try:
        source = dataset(config, seed=config.seed, length=_NUM.value)
        vae = registry.load("flux_vae", config.model_init.vae, dtype=config.model.dtype, seed=config.seed + 1)[1]
    except (SetupError, registry.ModelSourceError) as e:
        raise SystemExit(f"error: {e}") from None
    encode = nnx.jit(lambda vae, x: vae.encode(x))
    indices = range(i, _NUM.value, n)
    with tqdm(total=len(indices), desc="latents", unit="sample", file=sys.stderr) as bar:
        written = cache_layer_latents(source, lambda x: jax.device_get(encode(vae, x)), _OUT.value, indices=indices,
                                      progress=bar.update)
    print(f"wrote {written} samples to {_OUT.value} ({len(indices) - written} already there)")


if __name__ == "__main__":
    app.run(main)
