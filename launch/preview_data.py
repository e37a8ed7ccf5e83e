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

from data.composite import CompositeConfig
from data.preview import data_sheet
from data.sources import VideoFolderSource, VideoMatteSource
from data.synthetic import SyntheticOmnimatte
from omnijax.io.video import write_image


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
    write_image(a.out, data_sheet(samples))
    print(f"wrote {a.out}: {a.n} samples of {a.frames}x{a.height}x{a.width}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
