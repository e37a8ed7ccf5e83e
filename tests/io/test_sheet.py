"""Preview sheets get row names and a title, and shrink to a screen's width (#14)."""

import numpy as np

from omnijax.io.sheet import MAX_WIDTH, add_title, label_rows


def _dark(region):
    return int((region.min(-1) < 100).sum())


def test_label_rows_names_every_row_and_fits_the_width():
    rows, h, w = 4, 480, 4 * 832  # four full-size frames per row
    sheet = np.full((rows * h, w, 3), 200, np.uint8)
    out = label_rows(sheet, ["input", "alpha 0", "layer 0", "background"])
    assert out.shape[1] <= MAX_WIDTH and out.dtype == np.uint8
    margin = out.shape[1] - round(w * (MAX_WIDTH - 110) / w)
    assert margin == 110
    scale = (out.shape[1] - margin) / w
    assert abs(out.shape[0] - rows * h * scale) <= 1  # the aspect ratio is kept
    row_h = out.shape[0] / rows
    for r in range(rows):  # text in the margin beside each row
        assert _dark(out[int(r * row_h):int((r + 1) * row_h), :margin]) > 10, r
    assert _dark(out[:, margin:]) == 0  # the picture itself is untouched (grey 200 stays light)
    small = label_rows(np.full((2 * 32, 128, 3), 200, np.uint8), ["a", "b"])
    assert small.shape == (64, 128 + 110, 3)  # a small sheet is not blown up


def test_add_title_puts_a_strip_with_text_on_top():
    image = np.full((40, 300, 3), 200, np.uint8)
    out = add_title(image, "step 4/4   loss 2.62363")
    assert out.shape == (58, 300, 3)
    assert (out[18:] == image).all() and _dark(out[:18]) > 20
