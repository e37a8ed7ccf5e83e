"""Contact sheets that let a person look at a decomposition (decompose CLI, training previews).

Axis letters: K objects, F frames, H/W pixels.
"""

from __future__ import annotations

import numpy as np


def checkerboard(h: int, w: int, cell: int = 16) -> np.ndarray:
    """[H, W, 3] grey checkerboard, the usual backdrop for showing transparency."""
    yy, xx = np.mgrid[:h, :w]
    return np.where(((yy // cell + xx // cell) % 2)[..., None] == 0, 0.8, 0.55).astype(np.float32) * np.ones(3)


def layer_sheet(video, alphas, foregrounds, background, n_frames: int = 4, tile_width: int = 256) -> np.ndarray:
    """uint8 labelled sheet: rows input, per object its alpha and its foreground over a checkerboard, background;
    columns `n_frames` evenly spaced frames; tiles scaled down to at most `tile_width` pixels wide.

    Args:
      video: [F, H, W, 3], background [F, H, W, 3], alphas [K, F, H, W] and foregrounds [K, F, H, W, 3]: each
        uint8 or float in [0, 1] (only the chosen frames are read).
    """
    from PIL import Image

    from omnijax.diffdecompose.preview import labelled_sheet
    from omnijax.io.video import to_uint8, to_unit_float

    f, h, w, _ = video.shape
    scale = min(1.0, tile_width / w)
    th, tw = max(1, round(h * scale)), max(1, round(w * scale))
    idx = np.linspace(0, f - 1, min(n_frames, f)).round().astype(int)

    def tile(x):
        x8 = to_uint8(x)
        if (th, tw) != (h, w):
            x8 = np.asarray(Image.fromarray(x8).resize((tw, th), Image.BILINEAR, reducing_gap=2.0))
        return x8.astype(np.float32) / 255.0

    # Labels fit the tile (about 6 pixels a character): "object 0 alpha, frame 3" on wide tiles, "alpha0 f3" on
    # narrow ones (a training preview at the tiny sizes).
    if tw >= 128:
        label = lambda what, short, i: f"{what}, frame {i}"
    else:
        label = lambda what, short, i: f"{short} f{i}"
    board = checkerboard(h, w)

    def over(alpha, fg):  # the layer over the checkerboard (uint8 or float layers, composited in float)
        alpha = to_unit_float(alpha)[..., None]
        return alpha * to_unit_float(fg) + (1 - alpha) * board

    rows = [[(label("input", "input", i), tile(video[i])) for i in idx]]
    for k, (a, fg) in enumerate(zip(alphas, foregrounds)):
        rows.append([(label(f"object {k} alpha", f"alpha{k}", i), tile(np.repeat(a[i][..., None], 3, -1)))
                     for i in idx])
        rows.append([(label(f"object {k} layer", f"layer{k}", i), tile(over(a[i], fg[i])))
                     for i in idx])
    rows.append([(label("background", "bg", i), tile(background[i])) for i in idx])
    return labelled_sheet(rows)
