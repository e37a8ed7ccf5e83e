"""omnijax.omnimatte.preview.layer_sheet: the decompose CLI's and the trainer's labelled sheet of the layers."""

import numpy as np

from omnijax.omnimatte.preview import layer_sheet


def test_preview_is_labelled_and_small():
    rng = np.random.default_rng(0)
    f, h, w, k = 9, 480, 832, 2
    video, bg = rng.random((f, h, w, 3)), rng.random((f, h, w, 3))
    alphas, fgs = rng.random((k, f, h, w)), rng.random((k, f, h, w, 3))
    sheet = layer_sheet(video, alphas, fgs, bg)
    tile_h = round(h * 256 / w)  # 148
    rows, cols = 2 + 2 * k, 4
    assert sheet.shape == (rows * (tile_h + 14 + 4) + 4, cols * (256 + 4) + 4, 3)
    # Each row's label band (white page, black text) holds text.
    for r in range(rows):
        band = sheet[4 + r * (tile_h + 18): 4 + r * (tile_h + 18) + 14, 4:256]
        assert (band < 128).any(), r


def test_labels_fit_narrow_tiles(monkeypatch):
    """labelled_sheet cuts a label to tile width / 6 characters: at a tiny preview's 64-pixel tiles every label
    must fit whole (the wide form, "object 0 alpha, frame 3", would be cut to "object 0 a")."""
    from omnijax.diffdecompose import preview as dd_preview

    seen = []
    real = dd_preview.labelled_sheet
    monkeypatch.setattr(dd_preview, "labelled_sheet", lambda rows: seen.extend(rows) or real(rows))
    rng = np.random.default_rng(0)
    f, h, w, k = 5, 32, 64, 2
    layer_sheet(rng.random((f, h, w, 3)), rng.random((k, f, h, w)), rng.random((k, f, h, w, 3)),
                rng.random((f, h, w, 3)))
    labels = [label for row in seen for label, _ in row]
    assert len(labels) == (2 + 2 * k) * 4 and len(set(labels)) == len(labels)
    assert all(len(label) <= w // 6 for label in labels), labels


def test_uint8_layers_give_the_float_layers_sheet():
    """The CLI passes uint8 layers (converted on the device): the sheet is the one of the same values as floats
    (the layer over the checkerboard composited in float, not in wrapping uint8 arithmetic)."""
    rng = np.random.default_rng(1)
    f, h, w, k = 5, 32, 64, 2
    layers = [rng.integers(0, 256, s, dtype=np.uint8) for s in ((f, h, w, 3), (k, f, h, w), (k, f, h, w, 3),
                                                                 (f, h, w, 3))]
    as_float = [x.astype(np.float32) / 255.0 for x in layers]
    np.testing.assert_array_equal(layer_sheet(*layers), layer_sheet(*as_float))
