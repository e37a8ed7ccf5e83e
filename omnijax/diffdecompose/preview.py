"""Labelled preview sheets of decompositions (trainer previews and launch/decompose_image.py)."""

from __future__ import annotations

import numpy as np

LABEL_H = 14


def labelled_sheet(rows: list[list[tuple[str, np.ndarray]]], gap: int = 4) -> np.ndarray:
    """Rows of (label, float [H, W, 3] image in [0, 1]) tiles on a white page, each tile with its label above
    it (Pillow's built-in font). Returns uint8 [rows*(H+14+gap)+gap, cols*(W+gap)+gap, 3]."""
    from PIL import Image, ImageDraw

    h, w = rows[0][0][1].shape[:2]
    cols = max(map(len, rows))
    page = np.full((len(rows) * (h + LABEL_H + gap) + gap, cols * (w + gap) + gap, 3), 255, np.uint8)
    img = Image.fromarray(page)
    draw = ImageDraw.Draw(img)
    for r, tiles in enumerate(rows):
        for c, (label, tile) in enumerate(tiles):
            y, x = gap + r * (h + LABEL_H + gap), gap + c * (w + gap)
            draw.text((x + 1, y + 1), label[: max(1, w // 6)], fill="black")
            img.paste(Image.fromarray(np.clip(np.rint(np.asarray(tile)[..., :3] * 255), 0, 255).astype(np.uint8)),
                      (x, y + LABEL_H))
    return np.asarray(img)
