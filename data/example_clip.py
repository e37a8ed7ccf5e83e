"""An example clip the repository makes itself: two objects with shadows over a moving background, each with
its coarse mask, plus the ground truth. Tests, demos and the decompose CLI use it without any download.

  python -m data.example_clip --out examples/two_objects            # 21 frames, 128x224, about 2 s on a CPU
  python launch/decompose.py --video examples/two_objects/input_video.mp4 \
      --masks examples/two_objects/mask_00.mp4 examples/two_objects/mask_01.mp4 --out layers/ --model tiny

Layout of --out (the layout of the public Casper / gen-omnimatte example clips, plus ground truth):
  input_video.mp4                  the composite video (h264)
  mask_00.mp4, mask_01.mp4         coarse object masks, 0 / 255, objects only (no shadows), as SAM2 would give
  prompt.json                      {"bg": ""} (the paper uses no prompt)
  gt/background/00000.png ...      the clean background (lossless PNG frames)
  gt/alpha_00/, gt/alpha_01/       each object's true matte: object plus its shadow (grey PNG frames)

The clip is a pure function of (frames, height, width, seed). Object k is a procedural shape (data.procedural)
in the left (k = 0) or right (k = 1) half of the frame, composited with a pseudo-shadow by data.composite under
one shared camera motion; object 1 goes over the composite of object 0, so
  V = a1 F1 + (1 - a1) (a0 F0 + (1 - a0) B)   (paper eq. 2 applied twice; the halves keep the layers apart).

Axis letters: K objects, F frames, H height, W width.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

from data.composite import PARAM_NAMES, CompositeConfig, composite
from data.procedural import ProceduralSource

NUM_OBJECTS = 2


def _params(k: int) -> dict[str, float]:
    """Fixed composite parameters for object k: a gentle shared pan, no static jitter, a clear shadow."""
    p = dict(pad=0.15, pad_left=0.5, pad_top=0.5,
             a_shift=0.04, a_rotation=0.0, a_scale=1.0, a_shear=0.0,
             b_shift=-0.04, b_rotation=2.0, b_scale=1.02, b_shear=0.0,
             fg_scale=0.9, fg_rotation=0.0, fg_shift_x=0.0, fg_shift_y=-0.08,
             shadow=1.0, shadow_compress=0.25, shadow_shear=40.0, shadow_side=1.0 if k == 0 else -1.0,
             shadow_opacity=0.6, shadow_blur=0.006)
    assert set(p) == set(PARAM_NAMES)
    return p


def make_example(frames: int = 21, height: int = 128, width: int = 224, seed: int = 0) -> dict[str, np.ndarray]:
    """The clip as arrays (float32 in [0, 1]).

    Returns:
      dict with video [F, H, W, 3], background [F, H, W, 3], alphas [K, F, H, W] (object and shadow),
      masks [K, F, H, W] in {0, 1} (object only).
    """
    if frames < 1 or height < 32 or width < 32 or width % 2:
        raise ValueError(f"example clip size {frames}x{height}x{width}: need >= 1 frame, >= 32x32, even width")
    src = ProceduralSource(seed, max_shapes=1)
    background = src.background(0, frames, height, width)
    cfg = CompositeConfig(num_frames=frames, height=height, width=width)
    video, alphas, masks = background, [], []
    half = width // 2
    for k in range(NUM_OBJECTS):
        rgb, alpha = src.foreground(k + 1, frames, height, half)
        fg_rgb = np.zeros((frames, height, width, 3), np.float32)
        fg_alpha = np.zeros((frames, height, width), np.float32)
        fg_rgb[:, :, k * half:(k + 1) * half], fg_alpha[:, :, k * half:(k + 1) * half] = rgb, alpha
        out = composite(fg_rgb, fg_alpha, video, _params(k), cfg)
        video = out["video"]
        alphas.append(out["alpha"])
        masks.append(out["mask"])
    return dict(video=video, background=background, alphas=np.stack(alphas), masks=np.stack(masks))


def write_example(out: str, frames: int = 21, height: int = 128, width: int = 224, seed: int = 0,
                  fps: float = 12.0) -> str:
    """Writes the clip to folder `out` (layout in the module doc), atomically; replaces an existing folder."""
    from omnijax.io.atomic import atomic_path
    from omnijax.io.video import write_frames, write_video

    clip = make_example(frames, height, width, seed)
    to8 = lambda x: np.clip(np.rint(x * 255.0), 0, 255).astype(np.uint8)
    with atomic_path(out, directory=True) as tmp:
        write_video(os.path.join(tmp, "input_video.mp4"), to8(clip["video"]), fps)
        for k in range(NUM_OBJECTS):
            write_video(os.path.join(tmp, f"mask_{k:02d}.mp4"), np.repeat(to8(clip["masks"][k])[..., None], 3, -1),
                        fps)
            write_frames(os.path.join(tmp, "gt", f"alpha_{k:02d}"), to8(clip["alphas"][k]))
        write_frames(os.path.join(tmp, "gt", "background"), to8(clip["background"]))
        with open(os.path.join(tmp, "prompt.json"), "w") as f:
            json.dump({"bg": ""}, f)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="output folder (replaced if it exists)")
    p.add_argument("--frames", type=int, default=21)
    p.add_argument("--height", type=int, default=128)
    p.add_argument("--width", type=int, default=224)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fps", type=float, default=12.0)
    args = p.parse_args(argv)
    try:
        out = write_example(args.out, args.frames, args.height, args.width, args.seed, args.fps)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}: {args.frames} frames {args.height}x{args.width}, {NUM_OBJECTS} objects with shadows")
    return 0


if __name__ == "__main__":
    sys.exit(main())
