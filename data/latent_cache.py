"""Cache composites as VAE latents, and serve the cache as a random-access source for the grain pipeline.

Axis letters: B batch, F frames (4k + 1), H/W pixels, T = (F − 1)/4 + 1 latent frames, h/w = H/8, W/8, C = 16.

The encoder is any callable `encode(video)` with video float32 [B, F, H, W, 3] in [-1, 1] that returns either
normalised latents [B, T, h, w, 16] (e.g. the Wan VAE's posterior mean, `WanVAE.encode`) or the posterior as a
pair (normalised mean, logvar), each [B, T, h, w, 16] (`WanVAE.posterior`); it is passed in, so this module does
not depend on the VAE code. Per sample the cache encodes the composite video, the clean background and the
ground-truth alpha as a grey video (α repeated to 3 channels, mapped to [-1, 1], spec §2) in one encoder call of
batch 3·B, and writes `{index:08d}.npz` with:
  z_video, z_background, z_alpha   [T, h, w, 16] (float16 by default, or float32): what the encoder returned,
                                   or the posterior mean when it returned a pair
  logvar_video, logvar_background, logvar_alpha
                                   [T, h, w, 16], same dtype, only when the encoder returned a pair; with them a
                                   trainer can draw a fresh posterior sample every step, as from pixels
  mask, effect_mask                [F, H, W] uint8 0/1 (pixel masks: the condition is built from them)
  first_frame                      [H, W, 3] uint8 (the CLIP image)
  params                           float32 vector, names in meta.json
meta.json holds {"param_names", "latent_dtype", "logvar": bool}. Files are written atomically and existing ones
are skipped, so a preempted job resumes where it stopped.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence

import numpy as np

from data.pipeline import fit_to_latent
from omnijax.io.atomic import atomic_path, atomic_write

Encoder = Callable[[np.ndarray], np.ndarray]
LATENT_KEYS = ("z_video", "z_background", "z_alpha")
LOGVAR_KEYS = ("logvar_video", "logvar_background", "logvar_alpha")  # paired with LATENT_KEYS in order


def to_uint8(image: np.ndarray) -> np.ndarray:
    """float pixels in [0, 1] -> uint8 (round to nearest): how the cache stores the CLIP frame."""
    return np.clip(np.rint(np.asarray(image, np.float32) * 255), 0, 255).astype(np.uint8)


def _write_npz(path: str, arrays: dict) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez_compressed(f, **arrays)


def _write_json(path: str, obj) -> None:
    atomic_write(path, json.dumps(obj, indent=1))


def sample_path(out_dir: str, index: int) -> str:
    return os.path.join(out_dir, f"{index:08d}.npz")


def cache_latents(source, encode: Encoder, out_dir: str, *, indices: Sequence[int] | None = None,
                  batch_size: int = 1, dtype=np.float16, progress: bool = False) -> int:
    """Encode samples of `source` and write them under `out_dir`.

    Args:
      source: random-access composites (`SyntheticOmnimatte`, `TfdsOmnimatte`), float32 samples in [0, 1].
      encode: video [B, F, H, W, 3] in [-1, 1] -> latents [B, T, H/8, W/8, 16], or a (mean, logvar) pair of them
        (then both are stored, see the module docstring).
      indices: which samples (default all); split them across hosts for a parallel job.
      batch_size: samples per encoder call (the call sees 3·batch_size videos).
      dtype: storage dtype of the latents.

    Returns:
      the number of samples written (existing files are skipped and not counted).
    """
    os.makedirs(out_dir, exist_ok=True)
    indices = list(range(len(source))) if indices is None else [int(i) for i in indices]
    todo = [i for i in indices if not os.path.exists(sample_path(out_dir, i))]
    it = range(0, len(todo), batch_size)
    if progress:
        from tqdm import tqdm

        it = tqdm(it, desc="cache latents", unit="batch")
    names, written = None, 0
    for start in it:
        chunk = todo[start:start + batch_size]
        samples = [fit_to_latent(source[i]) for i in chunk]
        grey = lambda a: np.repeat(a[..., None], 3, -1)
        videos = [s["video"] for s in samples] + [s["background"] for s in samples] + [grey(s["alpha"])
                                                                                         for s in samples]
        x = np.stack(videos).astype(np.float32) * 2.0 - 1.0
        out = encode(x)
        z, logvar = (np.asarray(out[0]), np.asarray(out[1])) if isinstance(out, tuple) else (np.asarray(out), None)
        nb = len(chunk)
        f, h, w = x.shape[1:4]
        want = (3 * nb, (f - 1) // 4 + 1, h // 8, w // 8)
        if z.ndim != 5 or z.shape[:4] != want:
            raise ValueError(f"encoder returned {z.shape}; expected {want} + (channels,) for input {x.shape}")
        if logvar is not None and logvar.shape != z.shape:
            raise ValueError(f"encoder returned a mean {z.shape} and a logvar {logvar.shape} of different shapes")
        for j, (i, s) in enumerate(zip(chunk, samples)):
            names = sorted(s["params"]) if names is None else names
            arrays = {key: z[k * nb + j].astype(dtype) for k, key in enumerate(LATENT_KEYS)}
            if logvar is not None:
                arrays.update({key: logvar[k * nb + j].astype(dtype) for k, key in enumerate(LOGVAR_KEYS)})
            _write_npz(sample_path(out_dir, i), {
                **arrays,
                "mask": (s["mask"] > 0.5).astype(np.uint8), "effect_mask": (s["effect_mask"] > 0.5).astype(np.uint8),
                "first_frame": to_uint8(s["video"][0]),
                "params": np.array([s["params"][k] for k in names], np.float32),
            })
            written += 1
    meta_path = os.path.join(out_dir, "meta.json")
    if names is not None and not os.path.exists(meta_path):
        _write_json(meta_path, {"param_names": names, "latent_dtype": np.dtype(dtype).name,
                                "logvar": logvar is not None})
    return written


class LatentSource:
    """Random-access reader of a latent cache (for `data.pipeline.make_pipeline`).

    Samples are dicts: z_video, z_background, z_alpha as float32 [T, h, w, 16] (and logvar_video,
    logvar_background, logvar_alpha when the cache holds them: `has_logvar`); mask, effect_mask float32
    [F, H, W]; first_frame uint8 [H, W, 3]; params dict (when meta.json names them).

    Raises:
      FileNotFoundError: no cached samples in `root`.
    """

    def __init__(self, root: str):
        self.root = root
        if not os.path.isdir(root):
            raise FileNotFoundError(f"{root}: no latent cache folder")
        self.files = sorted(os.path.join(root, n) for n in os.listdir(root) if n.endswith(".npz")
                            and not n.startswith("."))
        if not self.files:
            raise FileNotFoundError(f"{root}: no cached samples (*.npz)")
        meta = os.path.join(root, "meta.json")
        self.param_names = None
        if os.path.exists(meta):
            with open(meta) as f:
                self.param_names = json.load(f)["param_names"]
        with np.load(self.files[0]) as z:
            self.has_logvar = all(k in z.files for k in LOGVAR_KEYS)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> dict:
        with np.load(self.files[int(index)]) as z:
            out = {k: z[k].astype(np.float32) for k in LATENT_KEYS + (LOGVAR_KEYS if self.has_logvar else ())}
            out.update(mask=z["mask"].astype(np.float32), effect_mask=z["effect_mask"].astype(np.float32),
                       first_frame=z["first_frame"])
            if self.param_names is not None:
                out["params"] = {k: float(v) for k, v in zip(self.param_names, z["params"])}
        return out


def standin_encoder(video: np.ndarray, channels: int = 16) -> np.ndarray:
    """A VAE-shaped stand-in (NOT a VAE): causal 4×8×8 mean-pool, then a fixed 3 -> `channels` projection.

    Latent frame 0 pools pixel frame 0 alone and latent frame t ≥ 1 pools frames 4t−3..4t, like the Wan VAE's
    temporal grouping. Meant for tests and smoke runs of the cache and the latent pipeline.
    """
    b, f, h, w, c = video.shape
    if (f - 1) % 4 or h % 8 or w % 8:
        raise ValueError(f"need F = 4k+1 and H, W multiples of 8, got {video.shape}")
    sp = video.reshape(b, f, h // 8, 8, w // 8, 8, c).mean(axis=(3, 5))
    first = sp[:, :1]
    rest = sp[:, 1:].reshape(b, (f - 1) // 4, 4, h // 8, w // 8, c).mean(axis=2)
    pooled = np.concatenate([first, rest], 1)
    proj = np.cos(np.arange(c)[:, None] * (np.arange(channels)[None, :] + 1.0))  # fixed, full-rank for c=3
    return (pooled @ proj).astype(np.float32)


def posterior_encoder(vae, *, mean_only: bool = False):
    """Jitted host encoder of a WanVAE for `cache_latents`: video -> (normalised mean, logvar), or the mean alone."""
    import jax

    from omnijax.omnimatte.decompose import jit_module_fn

    def posterior(vae, x):
        mean, logvar = vae.posterior(x.astype(vae.dtype))
        return mean if mean_only else (mean, logvar)

    fn = jit_module_fn(vae, posterior)
    return lambda x: jax.device_get(fn(x))
