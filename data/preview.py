"""Contact sheets of training samples, to check the data by eye (launch/preview_data.py, launch/preview_layers.py).

`data_sheet` (synthetic omnimatte samples): rows are samples. Columns: three frames of the composite video
(first, middle, last), then at the middle frame the coarse mask, the ground-truth alpha (object + shadow), the
effect mask, the clean background and the foreground layer over a checkerboard (so the black, semi-transparent
shadow shows); a header row names the columns. `labelled_page` lays out any rows of tiles the same way.
"""

from __future__ import annotations

import numpy as np

from omnijax.omnimatte.preview import checkerboard

COLUMNS = ("video first", "video mid", "video last", "mask", "alpha", "effect mask", "background", "foreground")


def sample_tiles(s: dict) -> list[np.ndarray]:
    """The eight [H, W, 3] float tiles of one sample's row."""
    v = s["video"]
    f, h, w = v.shape[:3]
    m = f // 2
    grey = lambda a: np.repeat(a[m][..., None], 3, -1)
    a = s["alpha"][m][..., None]
    fg_over = a * s["foreground"][m] + (1 - a) * checkerboard(h, w, cell=8)
    return [v[0], v[m], v[-1], grey(s["mask"]), grey(s["alpha"]), grey(s["effect_mask"]), s["background"][m],
            fg_over]


def tile_page(rows: list[list[np.ndarray]], gap: int = 4) -> np.ndarray:
    """Rows of equally sized float [H, W, 3] tiles on a white page, as uint8."""
    h, w = rows[0][0].shape[:2]
    page = np.ones((len(rows) * (h + gap) + gap, max(map(len, rows)) * (w + gap) + gap, 3), np.float32)
    for r, tiles in enumerate(rows):
        for c, t in enumerate(tiles):
            y, x = gap + r * (h + gap), gap + c * (w + gap)
            page[y:y + h, x:x + w] = t
    return np.clip(np.rint(page * 255), 0, 255).astype(np.uint8)


def labelled_page(rows: list[list[np.ndarray]], columns, gap: int = 4) -> np.ndarray:
    """`tile_page` under a 16-pixel header row naming the columns (Pillow's built-in font), uint8."""
    from PIL import Image, ImageDraw

    page = tile_page(rows, gap)
    tile_w = rows[0][0].shape[1]
    img = Image.new("RGB", (page.shape[1], 16), "white")
    d = ImageDraw.Draw(img)
    for c, name in enumerate(columns):
        d.text((gap + c * (tile_w + gap) + 2, 2), name, fill="black")
    return np.concatenate([np.asarray(img), page], 0)


def data_sheet(samples: list[dict], gap: int = 4) -> np.ndarray:
    """uint8 [16 + rows*(H+gap)+gap, cols*(W+gap)+gap, 3]: one row of `sample_tiles` per sample under the header."""
    return labelled_page([sample_tiles(s) for s in samples], COLUMNS, gap)
