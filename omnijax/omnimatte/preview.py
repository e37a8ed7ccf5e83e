"""Contact sheets that let a person look at a decomposition (decompose CLI, training previews).

Axis letters: K objects, F frames, H/W pixels.
"""

from __future__ import annotations

import numpy as np


def checkerboard(h: int, w: int, cell: int = 16) -> np.ndarray:
    """[H, W, 3] grey checkerboard, the usual backdrop for showing transparency."""
    yy, xx = np.mgrid[:h, :w]
    return np.where(((yy // cell + xx // cell) % 2)[..., None] == 0, 0.8, 0.55).astype(np.float32) * np.ones(3)


def contact_sheet(video, alphas, foregrounds, background, n_frames: int = 4) -> np.ndarray:
    """uint8 [rows*H, n*W, 3]: the input, then per object its alpha and the foreground over a checkerboard, then
    the background, for `n_frames` evenly spaced frames.

    Args:
      video, background: [F, H, W, 3] in [0, 1]; alphas: [K, F, H, W]; foregrounds: [K, F, H, W, 3].
    """
    video = np.asarray(video, np.float32)
    f, h, w, _ = video.shape
    idx = np.linspace(0, f - 1, min(n_frames, f)).round().astype(int)
    board = checkerboard(h, w)
    rows = [video[idx]]
    for a, fg in zip(np.asarray(alphas), np.asarray(foregrounds)):
        a = a[idx][..., None]
        rows += [np.repeat(a, 3, -1), a * fg[idx] + (1 - a) * board]
    rows.append(np.asarray(background, np.float32)[idx])
    sheet = np.concatenate([np.concatenate(list(r), axis=1) for r in rows], axis=0)
    return (np.clip(sheet, 0, 1) * 255).round().astype(np.uint8)
