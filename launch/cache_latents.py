"""Encode synthetic omnimatte composites to VAE latents once, so training reads latents instead of pixels.

    python launch/cache_latents.py --out DIR --vae PATH [--source procedural | --source tfds NAME/CONFIG
        --data-dir D | --source videomatte DIR] [--bg DIR] [--num 1000] [--frames 81 --height 480 --width 832]
        [--batch 1] [--shard I/N]
    python launch/cache_latents.py --out DIR --standin ...      # smoke run with the VAE-shaped stand-in

Samples already in DIR are skipped, so a stopped job resumes. `--shard I/N` caches every N-th sample from I,
for one process of a multi-host job. The VAE comes from `converters.load_wan_vae(PATH)` (or an omnijax checkpoint
folder written by launch/convert.py); it takes video [B, F, H, W, 3] in [-1, 1].

What is stored: the VAE posterior of every clip, i.e. the normalised mean AND the log-variance
(`WanVAE.posterior`), so the trainer can draw a fresh `.sample()` every step as the reference trains
(`config.input.vae_sample=True`, the default). `--mean-only` halves the latent storage by dropping the
log-variance; such a cache trains on the posterior mean and needs `--config.input.vae_sample=False`.
Train from the cache with `python launch/train.py ... --config.input.latent_cache=DIR` (docs/training.md).
"""

from __future__ import annotations

import argparse
import sys

from data.composite import CompositeConfig
from data.latent_cache import cache_latents, posterior_encoder, standin_encoder
from data.pipeline import TfdsOmnimatte, latent_friendly
from data.sources import VideoFolderSource, VideoMatteSource
from data.synthetic import SyntheticOmnimatte


def vae_encoder(path: str, *, mean_only: bool = False):
    """`posterior_encoder` of the Wan VAE at `path` (converted omnijax checkpoint or original files), in bf16."""
    from converters import registry

    _, vae = registry.load("wan_vae", path, dtype="bf16", progress=True)
    return posterior_encoder(vae, mean_only=mean_only)


def build_source(a, parser):
    if a.source[0] == "tfds":
        if len(a.source) != 2:
            parser.error("--source tfds needs NAME/CONFIG, e.g. omnimatte_synth/small")
        import tensorflow_datasets as tfds

        import data.tfds_omnimatte  # noqa: F401  (registers the builder)

        return TfdsOmnimatte(tfds.data_source(a.source[1], split=a.split, data_dir=a.data_dir))
    f, h, w = latent_friendly(a.frames, a.height, a.width)
    cfg = CompositeConfig(num_frames=f, height=h, width=w)
    fg = None
    if a.source[0] == "videomatte":
        if len(a.source) != 2:
            parser.error("--source videomatte needs DIR")
        fg = VideoMatteSource(a.source[1], seed=a.seed)
    elif a.source != ["procedural"]:
        parser.error(f"unknown --source {a.source}")
    bg = VideoFolderSource(a.bg, seed=a.seed) if a.bg else None
    return SyntheticOmnimatte(cfg, foregrounds=fg, backgrounds=bg, seed=a.seed, length=a.num)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--vae", help="Wan VAE checkpoint (file or folder)")
    p.add_argument("--standin", action="store_true", help="use the pooling stand-in encoder (smoke runs only)")
    p.add_argument("--source", nargs="+", default=["procedural"])
    p.add_argument("--bg", default=None)
    p.add_argument("--data-dir", default=None, help="TFDS data_dir for --source tfds")
    p.add_argument("--split", default="train")
    p.add_argument("--num", type=int, default=1000, help="samples to generate (synthetic sources)")
    p.add_argument("--frames", type=int, default=81)
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--width", type=int, default=832)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--shard", default="0/1", help="I/N: this process caches samples I, I+N, ...")
    p.add_argument("--float32", action="store_true", help="store latents as float32 (default float16)")
    p.add_argument("--mean-only", action="store_true",
                   help="store the posterior mean only, not its log-variance (train with input.vae_sample=False)")
    a = p.parse_args(argv)
    if bool(a.vae) == bool(a.standin):
        p.error("give exactly one of --vae PATH or --standin")
    i, n = (int(t) for t in a.shard.split("/"))
    source = build_source(a, p)
    encode = standin_encoder if a.standin else vae_encoder(a.vae, mean_only=a.mean_only)
    import numpy as np

    written = cache_latents(source, encode, a.out, indices=range(i, len(source), n), batch_size=a.batch,
                            dtype=np.float32 if a.float32 else np.float16, progress=True)
    print(f"wrote {written} samples to {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
