"""Contact sheet of synthetic omnimatte samples, to check the data by eye.

    python launch/preview_data.py --out sheet.png [--source procedural|videomatte DIR --bg DIR] [--n 4]
        [--frames 17 --height 256 --width 448 --seed 0]

Rows are samples. Columns: three frames of the composite video (first, middle, last), then at the middle
frame the coarse mask, the ground-truth alpha (object + shadow), the effect mask, the clean background and
the foreground layer over a checkerboard (so the black, semi-transparent shadow shows).
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

from data.composite import CompositeConfig
from data.sources import VideoFolderSource, VideoMatteSource
from data.synthetic import SyntheticOmnimatte
from omnijax.io.video import write_image

COLUMNS = ("video first", "video mid", "video last", "mask", "alpha", "effect mask", "background", "foreground")


def _checker(h: int, w: int, cell: int = 8) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w]
    return np.where(((y // cell) + (x // cell)) % 2 == 0, 0.8, 0.6).astype(np.float32)[..., None]


def sample_tiles(s: dict) -> list[np.ndarray]:
    """The eight [H, W, 3] float tiles of one sample's row."""
    v = s["video"]
    f, h, w = v.shape[:3]
    m = f // 2
    grey = lambda a: np.repeat(a[m][..., None], 3, -1)
    a = s["alpha"][m][..., None]
    fg_over = a * s["foreground"][m] + (1 - a) * _checker(h, w)
    return [v[0], v[m], v[-1], grey(s["mask"]), grey(s["alpha"]), grey(s["effect_mask"]), s["background"][m],
            fg_over]


def contact_sheet(samples: list[dict], gap: int = 4) -> np.ndarray:
    """Rows of tiles on a white page. Returns uint8 [rows*(H+gap)+gap, cols*(W+gap)+gap, 3]."""
    return tile_page([sample_tiles(s) for s in samples], gap)


def tile_page(rows: list[list[np.ndarray]], gap: int = 4) -> np.ndarray:
    """Rows of equally sized float [H, W, 3] tiles on a white page, as uint8."""
    h, w = rows[0][0].shape[:2]
    page = np.ones((len(rows) * (h + gap) + gap, max(map(len, rows)) * (w + gap) + gap, 3), np.float32)
    for r, tiles in enumerate(rows):
        for c, t in enumerate(tiles):
            y, x = gap + r * (h + gap), gap + c * (w + gap)
            page[y:y + h, x:x + w] = t
    return np.clip(np.rint(page * 255), 0, 255).astype(np.uint8)


def _label(page: np.ndarray, tile_w: int, gap: int = 4, columns=COLUMNS) -> np.ndarray:
    """Prepend a header row with the column names (Pillow's built-in font)."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (page.shape[1], 16), "white")
    d = ImageDraw.Draw(img)
    for c, name in enumerate(columns):
        d.text((gap + c * (tile_w + gap) + 2, 2), name, fill="black")
    return np.concatenate([np.asarray(img), page], 0)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="PNG to write")
    p.add_argument("--source", nargs="+", default=["procedural"],
                   help="'procedural' or 'videomatte DIR' (DIR holds fgr/ and pha/)")
    p.add_argument("--bg", default=None, help="folder of background videos (default: procedural backgrounds)")
    p.add_argument("--n", type=int, default=4, help="samples (rows)")
    p.add_argument("--frames", type=int, default=17)
    p.add_argument("--height", type=int, default=192)
    p.add_argument("--width", type=int, default=336)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)

    fg = None
    if a.source[0] == "videomatte":
        if len(a.source) != 2:
            p.error("--source videomatte needs the dataset folder: --source videomatte DIR")
        fg = VideoMatteSource(a.source[1], seed=a.seed)
    elif a.source != ["procedural"]:
        p.error(f"unknown --source {a.source}")
    bg = VideoFolderSource(a.bg, seed=a.seed) if a.bg else None
    cfg = CompositeConfig(num_frames=a.frames, height=a.height, width=a.width)
    ds = SyntheticOmnimatte(cfg, foregrounds=fg, backgrounds=bg, seed=a.seed)
    samples = [ds[i] for i in range(a.n)]
    write_image(a.out, _label(contact_sheet(samples), a.width))
    print(f"wrote {a.out}: {a.n} samples of {a.frames}x{a.height}x{a.width}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
