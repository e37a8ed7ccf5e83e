"""Contact sheet of AlphaBlend-style samples (DiffDecompose data), to check the six subtasks by eye.

    python launch/preview_layers.py --out sheet.png [--n 2] [--size 256] [--subtasks flare watermark ...]
        [--fg DIR --fg-alpha channel|luminance] [--bg DIR] [--seed 0]
    python launch/preview_layers.py --out sheet.png --logo ROOT/10khigh [--split val] [--size 256]

Rows are samples, `--n` per subtask (subtask name written on the composite). Columns: the composite, the
foreground layer image (what the model learns, `data.alphablend.foreground_layer`), the foreground colour over
a checkerboard by its alpha, the alpha, and the clean background. With `--logo` the rows are LOGO samples.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from data import alphablend as ab  # noqa: E402
from data.preview import labelled_page  # noqa: E402
from omnijax.io.video import VideoError, write_image  # noqa: E402
from omnijax.omnimatte.preview import checkerboard  # noqa: E402

COLUMNS = ("composite", "foreground layer", "fg over checker", "alpha", "background")


def sample_tiles(s: dict, name: str = "") -> list[np.ndarray]:
    """The five [H, W, 3] float tiles of one sample's row; `name` is written on the composite."""
    h, w = s["alpha"].shape
    a = s["alpha"][..., None]
    comp = s["composite"]
    if name:
        from PIL import Image, ImageDraw

        img = Image.fromarray(np.clip(np.rint(comp * 255), 0, 255).astype(np.uint8))
        d = ImageDraw.Draw(img)
        d.rectangle((0, 0, 6 * len(name) + 4, 12), fill="white")
        d.text((2, 0), name, fill="black")
        comp = np.asarray(img, np.float32) / 255
    return [comp, s["foreground"], a * s["fg_rgb"] + (1 - a) * checkerboard(h, w, cell=8), np.repeat(a, 3, -1),
            s["background"]]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="PNG to write")
    p.add_argument("--n", type=int, default=2, help="samples per subtask")
    p.add_argument("--size", type=int, default=256, help="square sample size (multiple of 16)")
    p.add_argument("--subtasks", nargs="+", default=list(ab.SUBTASKS), choices=ab.SUBTASKS)
    p.add_argument("--fg", default=None, help="folder of RGBA foreground images (default: procedural)")
    p.add_argument("--fg-alpha", default="channel", choices=("channel", "luminance"))
    p.add_argument("--bg", default=None, help="folder of RGB background images (default: procedural)")
    p.add_argument("--logo", default=None, help="a LOGO variant folder (e.g. ROOT/10khigh) instead of synthesis")
    p.add_argument("--split", default="val", choices=("train", "val"))
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    if a.n < 1:
        p.error("--n must be >= 1")

    try:
        if a.logo:
            from data.logo import LogoDataset

            ds = LogoDataset(a.logo, split=a.split, size=a.size)
            rows = [sample_tiles(ds[i], ds.names[i]) for i in range(min(a.n * 3, len(ds)))]
        else:
            if a.size % 16:
                p.error(f"--size must be a multiple of 16, got {a.size}")
            fg = ab.RGBAFolderSource(a.fg, alpha=a.fg_alpha) if a.fg else None
            bg = ab.ImageFolderSource(a.bg) if a.bg else None
            cfg = ab.AlphaBlendConfig(height=a.size, width=a.size, subtasks=tuple(a.subtasks))
            ds = ab.AlphaBlendDataset(cfg, foregrounds=fg, backgrounds=bg, seed=a.seed)
            k = len(a.subtasks)
            # Index j*k + s has subtask s: take the first n of each subtask, grouped by subtask.
            rows = [sample_tiles(ds[j * k + s], a.subtasks[s]) for s in range(k) for j in range(a.n)]
    except (VideoError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    write_image(a.out, labelled_page(rows, COLUMNS))
    print(f"wrote {a.out}: {len(rows)} samples of {a.size}x{a.size}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
