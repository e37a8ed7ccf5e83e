"""grain input pipeline: per-process sharding, shuffling, latent-friendly shapes, batching, checkpointable state.

Axis letters: B batch, F frames, H height, W width, T latent frames, h/w latent grid, C channels.
A pipeline serves one of three random-access sources, all giving dicts of numpy arrays per sample:
- `SyntheticOmnimatte` (composites generated on the fly, procedural or from video folders);
- `TfdsOmnimatte` (a prepared `data.tfds_omnimatte` dataset, decoded to float32);
- `data.latent_cache.LatentSource` (cached VAE latents);
- image sources for DiffDecompose, `data.alphablend.AlphaBlendDataset` and `data.logo.LogoDataset` (composite,
  foreground, background [B, H, W, 3], subtask [B]; H, W already multiples of 16, so `fit` leaves them alone).
Pixel samples are cropped to a latent-friendly shape (F = 4k + 1 frames, H and W multiples of 16) and come out
float32 in [0, 1], channels-last: video/background/foreground [B, F, H, W, 3], alpha/mask/effect_mask [B, F, H, W];
`params` becomes a dict of [B] arrays. Latent samples pass through unchanged.

Determinism: the order depends only on (seed, epoch, shard) and each sample only on its index, so two runs with
the same seed give identical batches; `iterator.get_state()` / `set_state()` resume mid-epoch exactly (store
the state in the training checkpoint).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import grain
import numpy as np

PIXEL_KEYS = ("video", "background", "foreground", "alpha", "mask", "effect_mask")


def latent_friendly(num_frames: int, height: int, width: int) -> tuple[int, int, int]:
    """Largest (4k + 1, 16·m, 16·n) that fits in (num_frames, height, width).

    Raises:
      ValueError: the clip is smaller than 1×16×16.
    """
    f, h, w = (num_frames - 1) // 4 * 4 + 1, height // 16 * 16, width // 16 * 16
    if num_frames < 1 or h < 16 or w < 16:
        raise ValueError(f"clip {num_frames}x{height}x{width} is smaller than one latent (1x16x16)")
    return f, h, w


def fit_to_latent(sample: dict) -> dict:
    """Crop pixel fields to `latent_friendly` size: the first 4k+1 frames, a centred spatial crop."""
    if "video" not in sample:
        return sample
    f0, h0, w0 = sample["video"].shape[:3]
    f, h, w = latent_friendly(f0, h0, w0)
    if (f, h, w) == (f0, h0, w0):
        return sample
    y, x = (h0 - h) // 2, (w0 - w) // 2
    out = dict(sample)
    for k in PIXEL_KEYS:
        if k in out:
            out[k] = out[k][:f, y:y + h, x:x + w]
    return out


class TfdsOmnimatte:
    """A prepared `omnimatte_synth` split as a random-access source of float32 samples.

    Args:
      data_source: `builder.as_data_source(split)` or `tfds.data_source(name, split=...)`.
    """

    def __init__(self, data_source):
        self.source = data_source

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> dict:
        from data.tfds_omnimatte import decode  # tfds import is slow; only pay for it when used

        return decode(self.source[int(index)])


@dataclasses.dataclass(frozen=True)
class _Prepare:
    """Per-sample map: select keys, crop to latent-friendly shape, params dict -> float32 scalars."""

    keys: tuple[str, ...] | None
    fit: bool

    def __call__(self, sample: dict) -> dict:
        if self.keys is not None:
            missing = [k for k in self.keys if k not in sample]
            if missing:
                raise KeyError(f"sample lacks {missing}; it has {sorted(sample)}")
            sample = {k: sample[k] for k in self.keys}
        if self.fit:
            sample = fit_to_latent(sample)
        if isinstance(sample.get("params"), dict):
            sample = dict(sample, params={k: np.float32(v) for k, v in sample["params"].items()})
        return sample


def make_pipeline(source, *, batch_size: int, seed: int = 0, shuffle: bool = True, num_epochs: int | None = None,
                  keys: Sequence[str] | None = None, fit: bool = True, shard: tuple[int, int] | None = None,
                  drop_remainder: bool = True, num_threads: int = 0, num_workers: int = 0,
                  prefetch: int = 4) -> grain.IterDataset:
    """Build the grain pipeline over a random-access source.

    Args:
      source: `__len__` + `__getitem__(i) -> dict of numpy arrays` (see module docstring).
      batch_size: per-process batch size.
      seed: shuffle seed (the order of every epoch follows from it).
      shuffle: shuffle within this process's shard, reshuffled each epoch.
      num_epochs: passes over the shard; None repeats forever.
      keys: fields to keep (default all); dropping unused pixel fields saves host memory and transfer.
      fit: crop pixel samples to 4k+1 frames and multiples of 16.
      shard: (index, count) of this process; default (jax.process_index(), jax.process_count()). Shards are
        the strided slices source[index::count], disjoint and covering the source.
      drop_remainder: drop a final partial batch (keeps shapes static for jit).
      num_threads: reader threads that build samples ahead (0 = in the consumer's thread).
      num_workers: worker processes (grain multiprocessing prefetch); needs absl flags parsed when > 0.
      prefetch: samples the reader threads build ahead (when num_threads > 0).

    Returns:
      a grain IterDataset; `iter(ds)` gives a checkpointable iterator of batches (dicts with leading axis B).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if shard is None:
        import jax

        shard = (jax.process_index(), jax.process_count())
    index, count = shard
    if not 0 <= index < count:
        raise ValueError(f"bad shard {shard}: need 0 <= index < count")
    ds = grain.MapDataset.source(source)[index::count]
    if len(ds) < batch_size and drop_remainder:
        raise ValueError(f"shard {index}/{count} has {len(ds)} samples, fewer than one batch of {batch_size}")
    if shuffle:
        ds = ds.shuffle(seed=seed)
    if num_epochs != 1:
        ds = ds.repeat(num_epochs)
    ds = ds.map(_Prepare(tuple(keys) if keys is not None else None, fit))
    ds = ds.batch(batch_size, drop_remainder=drop_remainder)
    # grain's default read options run 16 threads 500 samples ahead: far too much memory for 81-frame clips
    # generated on the fly, so the read-ahead is always explicit.
    read = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch if num_threads else 0)
    it_ds = ds.to_iter_dataset(read)
    if num_workers > 0:
        it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
    return it_ds
