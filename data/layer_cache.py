"""Cache layer-decomposition samples (DiffDecompose) as VAE latents, and serve the cache to the grain pipeline.

Axis letters: H/W pixels, h/w latent size, Z latent channels.

`encode(images)` is any callable taking float32 [N, H, W, 3] in [-1, 1] and returning latents [N, h, w, Z] (e.g.
the Flux VAE's scaled posterior mean, `FluxVAE.encode`); it is passed in, so this module does not depend on the VAE.
Per sample, the composite, foreground and background go through one encoder call of batch 3, and
`{index:08d}.npz` holds z_composite, z_foreground, z_background [h, w, Z] (float16 by default, or float32) and
`subtask` (int32). meta.json records the image size, latent shape and dtype. Files are written atomically and
existing ones skipped, so a preempted job resumes where it stopped.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence

import numpy as np

from omnijax.io.atomic import atomic_path, atomic_write

IMAGES = ("composite", "foreground", "background")
LATENTS = tuple(f"z_{k}" for k in IMAGES)


def sample_path(out_dir: str, index: int) -> str:
    return os.path.join(out_dir, f"{index:08d}.npz")


def cache_layer_latents(source, encode: Callable[[np.ndarray], np.ndarray], out_dir: str, *,
                        indices: Sequence[int] | None = None, dtype=np.float16, progress=None) -> int:
    """Encodes source[i] for i in `indices` (default all) into `out_dir`; returns how many files were written."""
    os.makedirs(out_dir, exist_ok=True)
    indices = range(len(source)) if indices is None else indices
    written, meta = 0, None
    for i in indices:
        path = sample_path(out_dir, int(i))
        if os.path.exists(path):
            continue
        s = source[int(i)]
        images = np.stack([np.asarray(s[k], np.float32) for k in IMAGES]) * 2.0 - 1.0
        z = np.asarray(encode(images), np.float32)
        if z.ndim != 4 or z.shape[0] != 3:
            raise ValueError(f"the encoder returned {z.shape} for 3 images; expected [3, h, w, Z]")
        arrays = {k: z[j].astype(dtype) for j, k in enumerate(LATENTS)}
        arrays["subtask"] = np.asarray(s["subtask"], np.int32)
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            np.savez(f, **arrays)
        written += 1
        meta = dict(image_size=list(images.shape[1:3]), latent_shape=list(z.shape[1:]),
                    latent_dtype=np.dtype(dtype).name)
        if progress is not None:
            progress(1)
    if meta is not None:
        atomic_write(os.path.join(out_dir, "meta.json"), json.dumps(meta, indent=1))
    return written


class LayerLatentSource:
    """Random-access source over a cache folder: {z_composite, z_foreground, z_background [h, w, Z] f32,
    subtask int32}, in index order of the files present."""

    def __init__(self, root: str):
        if not os.path.isdir(root) or not os.path.isfile(os.path.join(root, "meta.json")):
            raise FileNotFoundError(f"{root} is not a layer latent cache (no meta.json)")
        with open(os.path.join(root, "meta.json")) as f:
            self.meta = json.load(f)
        self.files = sorted(os.path.join(root, n) for n in os.listdir(root) if n.endswith(".npz"))
        if not self.files:
            raise FileNotFoundError(f"{root} holds no cached samples")

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> dict:
        with np.load(self.files[int(index)]) as d:
            out = {k: np.asarray(d[k], np.float32) for k in LATENTS}
            out["subtask"] = np.asarray(d["subtask"], np.int32)
        return out
