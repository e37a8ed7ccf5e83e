"""Labels on preview sheets, so a person can tell what a picture shows: row names in a left margin and a title strip
(e.g. the training step and loss), at a size an image viewer shows whole.

Axis letters: H/W pixels.
"""

from __future__ import annotations

import numpy as np

MAX_WIDTH = 1600  # pixels: a sheet wider than a screen is shrunk (four 832-wide frames would be 3328)
_MARGIN = 110  # pixels of the left label column
_STRIP = 18  # pixels of a title strip (Pillow's built-in font is 11 px high)


def _pil(image: np.ndarray):
    from PIL import Image

    return Image.fromarray(np.asarray(image, np.uint8))


def label_rows(sheet: np.ndarray, names: list[str], *, max_width: int = MAX_WIDTH) -> np.ndarray:
    """uint8 [H', W', 3]: `sheet` (uint8 [H, W, 3] of len(names) equally tall rows) shrunk to fit `max_width` with
    its label column, with each row's name written in a white margin on its left."""
    from PIL import Image, ImageDraw

    img = _pil(sheet)
    scale = min(1.0, (max_width - _MARGIN) / img.width)
    if scale < 1.0:
        img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))), Image.BILINEAR)
    page = Image.new("RGB", (img.width + _MARGIN, img.height), "white")
    page.paste(img, (_MARGIN, 0))
    draw = ImageDraw.Draw(page)
    row_h = img.height / max(len(names), 1)
    for r, name in enumerate(names):
        draw.text((4, int(r * row_h + row_h / 2) - 6), name[:18], fill="black")
    return np.asarray(page)


def add_title(image: np.ndarray, title: str) -> np.ndarray:
    """uint8 [H + strip, W, 3]: a white strip with `title` above `image`."""
    from PIL import Image, ImageDraw

    img = _pil(image)
    page = Image.new("RGB", (img.width, img.height + _STRIP), "white")
    page.paste(img, (0, _STRIP))
    ImageDraw.Draw(page).text((4, 3), title, fill="black")
    return np.asarray(page)


def title_file(path: str, title: str) -> None:
    """Rewrites the image at `path` (atomically) with a title strip on top."""
    from PIL import Image

    from omnijax.io.video import write_image

    with Image.open(path) as im:
        image = np.asarray(im.convert("RGB"))
    write_image(path, add_title(image, title))
