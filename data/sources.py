"""Clip sources for the compositor: VideoMatte240K-style foregrounds and folders of background videos.

Axis letters: F frames, H height, W width. Every source returns float32 in [0, 1]; foregrounds as
(colour [F, h, w, 3], alpha [F, h, w]), backgrounds as colour [F, h, w, 3], where h×w is the clip's own size
reduced by an integer box filter towards the requested H×W (so a 4K clip never sits in memory at full size; the
compositor does the exact resize). Clip `index` picks clip `index mod len` and a start frame drawn from
(seed, index), so a source is a pure function of its arguments. Clips shorter than F are extended ping-pong.

The built-in `data.procedural.ProceduralSource` has the same two methods and needs no files.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import numpy as np

from omnijax.io.video import IMAGE_SUFFIXES, VideoError, iter_frames, probe

VIDEO_SUFFIXES = (".mp4", ".mov", ".webm", ".mkv", ".avi", ".m4v")


def _is_clip(path: str) -> bool:
    if os.path.isfile(path):
        return path.lower().endswith(VIDEO_SUFFIXES)
    return os.path.isdir(path) and any(n.lower().endswith(IMAGE_SUFFIXES) for n in os.listdir(path))


def _stem(name: str) -> str:
    base = os.path.basename(name)
    return os.path.splitext(base)[0] if base.lower().endswith(VIDEO_SUFFIXES) else base


def find_clips(root: str) -> list[str]:
    """Video files and frame folders under `root` (recursive), sorted. A frame folder is one holding images."""
    if not os.path.isdir(root):
        raise VideoError(f"{root}: no such folder")
    clips = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        if any(n.lower().endswith(IMAGE_SUFFIXES) for n in filenames):
            clips.append(dirpath)
            dirnames[:] = []  # a frame folder's subfolders are not separate clips
            continue
        clips += [os.path.join(dirpath, n) for n in sorted(filenames) if n.lower().endswith(VIDEO_SUFFIXES)]
    return sorted(clips)


def _reduce(frame: np.ndarray, n: int) -> np.ndarray:
    f = frame.astype(np.float32) * np.float32(1 / 255)
    if n <= 1:
        return f
    h, w = f.shape[0] // n * n, f.shape[1] // n * n
    return f[:h, :w].reshape(h // n, n, w // n, n, *f.shape[2:]).mean(axis=(1, 3))


def _factor(hw: tuple[int, int], height: int, width: int) -> int:
    """Largest integer box factor that keeps the clip at least as large as its cover-resize to height×width."""
    k = max(height / hw[0], width / hw[1])
    return max(1, int(1.0 / k))


def _pingpong(frames: list[np.ndarray], n: int) -> list[np.ndarray]:
    if not frames:
        raise VideoError("clip has no frames")
    cycle = frames + frames[-2:0:-1] if len(frames) > 1 else frames
    return [cycle[i % len(cycle)] for i in range(n)]


def load_segment(path: str, start: int, num_frames: int, height: int, width: int, *,
                 alpha_plane: bool = False) -> np.ndarray:
    """Read `num_frames` frames from `start` (ping-pong past the end), box-reduced towards height×width.

    Returns:
      float32 [F, h, w, 3], or [F, h, w] grey (first channel) with `alpha_plane`.
    """
    info = probe(path)
    n = _factor((info.height, info.width), height, width)
    frames = [_reduce(f[..., 0] if alpha_plane else f, n)
              for f in iter_frames(path, start=start, max_frames=num_frames)]
    if not frames:  # start past a short clip's end: take it from the beginning
        frames = [_reduce(f[..., 0] if alpha_plane else f, n) for f in iter_frames(path, max_frames=num_frames)]
    return np.stack(_pingpong(frames, num_frames))


class _ClipSource:
    def __init__(self, seed: int):
        self.seed = int(seed)

    def _start(self, index: int, length: int, num_frames: int, tag: int) -> int:
        rng = np.random.default_rng([self.seed, int(index), tag])
        return int(rng.integers(0, max(length - num_frames, 0) + 1))


class VideoMatteSource(_ClipSource):
    """Foregrounds in the VideoMatte240K layout: `root/fgr/NAME` colour and `root/pha/NAME` alpha.

    NAME may be a video (`0000.mp4`) or a frame folder (`0000/00000.jpg`); the two sides are matched by name
    without extension. If `root` has no `fgr/` but `root/split/fgr` exists, that is used (`split="train"`).

    Raises:
      VideoError: missing folders, or no matched pairs.
    """

    def __init__(self, root: str, *, split: str = "train", seed: int = 0):
        super().__init__(seed)
        if not os.path.isdir(os.path.join(root, "fgr")) and os.path.isdir(os.path.join(root, split, "fgr")):
            root = os.path.join(root, split)
        fgr, pha = os.path.join(root, "fgr"), os.path.join(root, "pha")
        for d in (fgr, pha):
            if not os.path.isdir(d):
                raise VideoError(f"{root}: VideoMatte layout needs '{os.path.basename(d)}/' (fgr/ and pha/ clips)")
        fg = {_stem(n): os.path.join(fgr, n) for n in os.listdir(fgr) if _is_clip(os.path.join(fgr, n))}
        ph = {_stem(n): os.path.join(pha, n) for n in os.listdir(pha) if _is_clip(os.path.join(pha, n))}
        names = sorted(set(fg) & set(ph))
        if not names:
            raise VideoError(f"{root}: no clip name appears in both fgr/ and pha/")
        self.root = root
        self.pairs = [(fg[n], ph[n]) for n in names]
        self.unmatched = sorted(set(fg) ^ set(ph))

    def __len__(self) -> int:
        return len(self.pairs)

    def foreground(self, index: int, num_frames: int, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
        fgr, pha = self.pairs[index % len(self.pairs)]
        n = min(probe(fgr).num_frames, probe(pha).num_frames)
        start = self._start(index, n, num_frames, 1)
        rgb = load_segment(fgr, start, num_frames, height, width)
        alpha = load_segment(pha, start, num_frames, height, width, alpha_plane=True)
        if rgb.shape[:3] != alpha.shape:
            raise VideoError(f"{fgr} and {pha}: sizes differ ({rgb.shape[1:3]} vs {alpha.shape[1:]})")
        return rgb, alpha


class VideoFolderSource(_ClipSource):
    """Backgrounds: every video file or frame folder under `root` (recursive)."""

    def __init__(self, root: str, *, seed: int = 0):
        super().__init__(seed)
        self.clips = find_clips(root)
        if not self.clips:
            raise VideoError(f"{root}: no videos ({', '.join(VIDEO_SUFFIXES)}) or frame folders found")

    def __len__(self) -> int:
        return len(self.clips)

    def __iter__(self) -> Iterator[str]:
        return iter(self.clips)

    def background(self, index: int, num_frames: int, height: int, width: int) -> np.ndarray:
        path = self.clips[index % len(self.clips)]
        start = self._start(index, probe(path).num_frames, num_frames, 2)
        return load_segment(path, start, num_frames, height, width)
