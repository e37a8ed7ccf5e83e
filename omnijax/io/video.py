"""Video and frame-folder I/O on numpy + PyAV: streaming readers, atomic writers.

Axis letters: F frames, H height, W width, C channels (3 = RGB, 4 = RGBA). Frames are uint8 [H, W, C],
channels-last, top row first.

Sources a reader accepts:
- a video file PyAV's bundled ffmpeg can demux (mp4, mov, webm, mkv, avi, ...);
- a folder of still frames (png / jpg / jpeg / webp / bmp), ordered by natural sort of the file names so that
  `frame_2.png` comes before `frame_10.png`; every frame must have the same size;
- a single still image (treated as a one-frame clip).

Writers:
- `write_video`: H.264 (libx264, preset veryfast, crf 18) mp4 in yuv420p, which needs even sizes; an odd height or
  width is padded by repeating the last row/column (so the file plays everywhere) and the padding is reported in
  the return value;
- `write_frames`: a PNG sequence, RGB or RGBA (zlib level 1, frames encoded on a thread pool);
- `write_rgba_video`: RGBA layers with alpha, as VP9 WebM (`yuva420p`, libvpx-vp9, realtime deadline, cpu-used 8,
  row-mt) or ProRes 4444 (.mov, `yuva444p10le`). Both round-trip alpha in PyAV's ffmpeg; VP9 keeps alpha in a side
  channel that ffmpeg's native vp9 decoder drops, so the reader decodes .webm alpha with libvpx-vp9 explicitly.
  A keyframe every 24 frames: each run of 24 frames is encoded by its own encoder, several runs at once, and the
  packets are muxed in frame order into one stream. One libvpx encoder uses only a few cores at 480x832 (its
  threads split a frame into tiles and rows): 81 random RGBA frames at 480x832 on 16 cores of an H200 host took
  3.38 s with one encoder, 1.40 s in runs of 24 on 4 encoders of 4 threads, 0.95 s in runs of 12 on 8 (files
  0.5 % / 1.5 % larger; 2026-11-29, docs/benchmarks.md). The extra keyframes cost more on smooth layers, whose
  other frames are cheap: a smooth synthetic 81-frame 480x832 layer grows from 305 to 394 kB (same error);
  `keyframe_every=None` keeps one keyframe. A keyframe every 1.5 s (at Wan's 16 fps) also makes seeking fast.
Encoder speed (20 frames 384x640, one busy CPU core, 2026-11-29): x264 medium 2.55 s -> veryfast 0.64 s; VP9
good/cpu-used 4 3.42 s -> realtime/cpu-used 8 0.63 s (mean error 2.1 -> 2.3 levels, files 1.4x larger); PNG
zlib level 6 (ffmpeg's default) 2.38 s -> level 1 0.57 s (files 3% larger). PyAV releases the GIL while
encoding, so callers may write several files at once from threads.
Every writer writes a temporary file (or folder) beside the target and renames it into place, so a reader
never sees a half-written file.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import fractions
import os
import re
from collections.abc import Iterable, Iterator

import av
import numpy as np

from omnijax.io.atomic import atomic_path

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
RGBA_CODECS = {".webm": ("libvpx-vp9", "yuva420p"), ".mov": ("prores_ks", "yuva444p10le")}


class VideoError(ValueError):
    """A video, image or frame folder is missing, unreadable, or the request does not fit it."""


@dataclasses.dataclass(frozen=True)
class VideoInfo:
    """What `probe` learns about a clip without decoding all of it.

    Attributes:
      path: the file or folder.
      width, height: frame size in pixels.
      num_frames: frame count (for containers that do not store it, counted by demuxing packets).
      fps: frames per second (frame folders report `default_fps`, 24 unless given).
      codec: decoder name, or "frames" for a folder of stills.
      has_alpha: whether the stream carries an alpha plane.
    """

    path: str
    width: int
    height: int
    num_frames: int
    fps: float
    codec: str
    has_alpha: bool


def _natural_key(name: str):
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", name)]


def list_frames(folder: str) -> list[str]:
    """Image files of a frame folder in natural order. Raises VideoError when there are none."""
    names = [n for n in os.listdir(folder) if n.lower().endswith(IMAGE_SUFFIXES) and not n.startswith(".")]
    if not names:
        raise VideoError(f"{folder}: folder holds no frames ({', '.join(IMAGE_SUFFIXES)})")
    return [os.path.join(folder, n) for n in sorted(names, key=_natural_key)]


def _check_exists(path: str) -> None:
    if not os.path.exists(path):
        raise VideoError(f"{path}: no such file or folder")


def _open(path: str):
    try:
        return av.open(path)
    except (av.FFmpegError, OSError) as e:
        raise VideoError(f"{path}: not a readable video or image ({e})") from e


def _read_image(path: str, alpha: bool) -> np.ndarray:
    with _open(path) as c:
        try:
            frame = next(c.decode(video=0))
        except (StopIteration, av.FFmpegError) as e:
            raise VideoError(f"{path}: image could not be decoded") from e
        return frame.to_ndarray(format="rgba" if alpha else "rgb24")


def _pix_has_alpha(name: str | None) -> bool:
    return bool(name) and (name.startswith(("yuva", "gbrap", "ya")) or any(k in name for k in ("rgba", "bgra", "argb",
                                                                                              "abgr")))


def probe(path: str, *, default_fps: float = 24.0) -> VideoInfo:
    """Size, frame count, fps and codec of a video file, frame folder or image.

    Raises:
      VideoError: missing path, unreadable file, or a container without a video stream.
    """
    _check_exists(path)
    if os.path.isdir(path):
        files = list_frames(path)
        first = _read_image(files[0], alpha=True)
        has_alpha = bool((first[..., 3] < 255).any())
        return VideoInfo(path, first.shape[1], first.shape[0], len(files), float(default_fps), "frames", has_alpha)
    with _open(path) as c:
        if not c.streams.video:
            raise VideoError(f"{path}: no video stream")
        s = c.streams.video[0]
        fps = float(s.average_rate or s.guessed_rate or default_fps)
        n = s.frames
        if not n:
            # WebM/MKV store no frame count: count packets (cheap, nothing is decoded).
            n = sum(1 for p in c.demux(s) if p.size)
        pix = s.codec_context.pix_fmt or (s.format.name if s.format else None)
        codec = s.codec_context.name
        # VP9 alpha lives in a side channel that the stream's pix_fmt does not show; the container tags it.
        has_alpha = _pix_has_alpha(pix) or s.metadata.get("alpha_mode", s.metadata.get("ALPHA_MODE")) == "1"
        return VideoInfo(path, s.width, s.height, int(n), fps, codec, bool(has_alpha))


def iter_frames(path: str, *, alpha: bool = False, max_frames: int | None = None,
                start: int = 0) -> Iterator[np.ndarray]:
    """Stream the frames of a clip one at a time (never holds the whole clip).

    Args:
      path: video file, frame folder or image.
      alpha: return RGBA ([H, W, 4]; opaque where the source has no alpha) instead of RGB ([H, W, 3]).
      max_frames: stop after this many frames.
      start: skip this many frames first (frame folders skip without reading; videos decode and drop).

    Yields:
      uint8 [H, W, 3 or 4] frames.
    """
    _check_exists(path)
    if max_frames is not None and max_frames <= 0:
        return
    fmt = "rgba" if alpha else "rgb24"
    if os.path.isdir(path):
        files = list_frames(path)[start:]
        files = files[:max_frames] if max_frames is not None else files
        shape = None
        for f in files:
            img = _read_image(f, alpha)
            if shape is not None and img.shape != shape:
                raise VideoError(f"{f}: frame size {img.shape[:2]} differs from the first frame's {shape[:2]}")
            shape = img.shape
            yield img
        return
    count = 0
    with _open(path) as c:
        if not c.streams.video:
            raise VideoError(f"{path}: no video stream")
        s = c.streams.video[0]
        try:
            if alpha and s.codec_context.name == "vp9":
                frames = _decode_vp9_alpha(c, s)
            else:
                s.thread_type = "AUTO"
                frames = c.decode(s)
            for i, frame in enumerate(frames):
                if i < start:
                    continue
                yield frame.to_ndarray(format=fmt)
                count += 1
                if max_frames is not None and count >= max_frames:
                    return
        except av.FFmpegError as e:
            raise VideoError(f"{path}: decoding failed after {count} frames ({e})") from e
    if count == 0:
        raise VideoError(f"{path}: no frames could be decoded" + (f" after skipping {start}" if start else ""))


def _decode_vp9_alpha(container, stream):
    # ffmpeg's native vp9 decoder ignores the alpha side data; libvpx-vp9 decodes it into yuva420p.
    ctx = av.CodecContext.create("libvpx-vp9", "r")
    for packet in container.demux(stream):
        yield from ctx.decode(packet if packet.size else None)


def read_video(path: str, *, max_frames: int | None = None, alpha: bool = False) -> tuple[np.ndarray, float]:
    """Read a whole clip into memory.

    Returns:
      (frames uint8 [F, H, W, 3] (or 4 with `alpha`), fps). Frame folders report 24 fps.
    """
    info = probe(path)
    frames = list(iter_frames(path, alpha=alpha, max_frames=max_frames))
    if not frames:
        raise VideoError(f"{path}: no frames")
    expected = info.num_frames if max_frames is None else min(info.num_frames, max_frames)
    if len(frames) < expected:
        # The container promised more than could be decoded: the file is cut short or damaged. Say so here,
        # before a caller compares frame counts and blames whatever else it was given (e.g. the masks).
        raise VideoError(f"{path}: only {len(frames)} of its {info.num_frames} frames could be decoded "
                         "(the file is truncated or damaged)")
    return np.stack(frames), info.fps


def read_mask(path: str, *, max_frames: int | None = None, threshold: int | None = 128) -> np.ndarray:
    """Read a mask clip (video, frame folder or image) as [F, H, W] uint8.

    The first colour channel is used (masks stored as grey video have R = G = B up to compression noise);
    an image folder whose frames carry a non-trivial alpha plane uses the alpha instead.

    Args:
      threshold: grey level at or above which a pixel is "in" (result in {0, 1}); None returns the raw grey
        level 0..255 (e.g. for soft alpha mattes such as VideoMatte240K `pha/`).
    """
    use_alpha = os.path.isdir(path) and probe(path).has_alpha
    planes = [f[..., 3] if use_alpha else f[..., 0]
              for f in iter_frames(path, alpha=use_alpha, max_frames=max_frames)]
    if not planes:
        raise VideoError(f"{path}: no mask frames")
    m = np.stack(planes)
    return m if threshold is None else (m >= threshold).astype(np.uint8)


# ----------------------------------------------------------------------------------------------- writers


def to_uint8(frame) -> np.ndarray:
    """uint8 as is; float in [0, 1] (the data pipeline's convention) -> round(255 x), clipped to 0..255."""
    a = np.asarray(frame)
    if a.dtype == np.uint8:
        return a
    if np.issubdtype(a.dtype, np.floating):
        t = np.multiply(a, 255.0, dtype=np.float32)  # one temporary, rounded and clipped in place
        np.rint(t, out=t)
        np.clip(t, 0, 255, out=t)
        return t.astype(np.uint8)
    raise VideoError(f"frames must be uint8 or float in [0, 1], got {a.dtype}")


def to_unit_float(frame) -> np.ndarray:
    """float32 in [0, 1]: uint8 / 255, floats cast (the inverse of `to_uint8` up to its rounding)."""
    a = np.asarray(frame)
    return a.astype(np.float32) / 255.0 if a.dtype == np.uint8 else a.astype(np.float32)


def _frames(frames: np.ndarray | Iterable, channels: tuple[int, ...]) -> Iterator[np.ndarray]:
    for i, f in enumerate(frames):
        f = to_uint8(f)
        if f.ndim == 2 and 1 in channels:
            f = f[..., None]
        if f.ndim != 3 or f.shape[-1] not in channels:
            raise VideoError(f"frame {i}: expected [H, W, C] with C in {channels}, got shape {f.shape}")
        yield f


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity, e.g. under taskset), else the machine's count."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        return os.cpu_count() or 1


def _sized(frames: Iterable, channels: tuple[int, ...], even: bool) -> Iterator[np.ndarray]:
    """uint8 [H, W, C] frames of one size (odd sizes padded by repeating the last row/column when `even`)."""
    size = None
    for n, f in enumerate(_frames(frames, channels)):
        h, w = f.shape[:2]
        if even and (h % 2 or w % 2):
            f = np.pad(f, ((0, h % 2), (0, w % 2), (0, 0)), mode="edge")
        if size is None:
            size = f.shape[:2]
        elif f.shape[:2] != size:
            raise VideoError(f"frame {n}: size {f.shape[:2]} differs from the first frame's {size}")
        yield np.repeat(f, 3, axis=-1) if f.shape[-1] == 1 else f


def _container(tmp: str, path: str):
    suffix = os.path.splitext(path)[1].lower()
    return av.open(tmp, "w", format={".mov": "mov", ".webm": "webm", ".mp4": "mp4", ".mkv": "matroska"}.get(suffix))


def _stream(c, codec: str, pix_fmt: str, fps: float, size: tuple[int, int], options: dict[str, str]):
    s = c.add_stream(codec, rate=fractions.Fraction(fps).limit_denominator(1001))
    s.width, s.height, s.pix_fmt = size[1], size[0], pix_fmt
    s.options = dict(options)
    return s


def _encode(path: str, frames: Iterable, fps: float, codec: str, pix_fmt: str, in_fmt: str,
            options: dict[str, str], even: bool, channels: tuple[int, ...]) -> tuple[int, int, int]:
    n, s = 0, None
    with atomic_path(path) as tmp, _container(tmp, path) as c:
        for f in _sized(frames, channels, even):
            if s is None:
                size = f.shape[:2]
                s = _stream(c, codec, pix_fmt, fps, size, options)
            for p in s.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format=in_fmt)):
                c.mux(p)
            n += 1
        if s is None:
            raise VideoError(f"{path}: no frames to write")
        for p in s.encode():
            c.mux(p)
    return n, size[0], size[1]


def _encode_chunked(path: str, frames: Iterable, fps: float, codec: str, pix_fmt: str, in_fmt: str,
                    options: dict[str, str], chunk: int, workers: int) -> tuple[int, int, int]:
    """`_encode` with every run of `chunk` frames encoded by its own encoder (so each run starts on a keyframe),
    up to `workers` runs at once, their packets muxed in frame order into one stream. An encoder's own threads
    parallelise within a frame only as far as its tiles and rows allow (VP9 at 480x832: a few cores); runs of
    frames are independent, so they fill the rest. Memory: up to 2 x workers runs waiting to be muxed (frames and
    packets) plus the run being filled."""
    rate = fractions.Fraction(fps).limit_denominator(1001)
    threads = max(1, usable_cpus() // workers)

    def encode(start: int, run: list[np.ndarray]) -> list:
        ctx = av.CodecContext.create(codec, "w")
        ctx.width, ctx.height, ctx.pix_fmt = run[0].shape[1], run[0].shape[0], pix_fmt
        ctx.time_base, ctx.framerate, ctx.thread_count = 1 / rate, rate, threads
        ctx.options = dict(options)
        packets = []
        for i, f in enumerate(run):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format=in_fmt)
            frame.pts = start + i
            packets += ctx.encode(frame)
        return packets + ctx.encode(None)

    n, s, run, pending = 0, None, [], []
    with atomic_path(path) as tmp, _container(tmp, path) as c, \
            concurrent.futures.ThreadPoolExecutor(workers) as pool:

        def mux(keep: int) -> None:  # mux the finished runs in order until at most `keep` are pending
            while len(pending) > keep:
                for p in pending.pop(0).result():
                    p.stream = s
                    c.mux(p)

        try:
            for f in _sized(frames, (4,), even=True):
                if s is None:
                    size = f.shape[:2]
                    s = _stream(c, codec, pix_fmt, fps, size, options)
                run.append(f)
                n += 1
                if len(run) == chunk:
                    pending.append(pool.submit(encode, n - chunk, run))
                    run = []
                    mux(2 * workers)
            if s is None:
                raise VideoError(f"{path}: no frames to write")
            if run:
                pending.append(pool.submit(encode, n - len(run), run))
            mux(0)
        except BaseException:
            for p in pending:
                p.cancel()
            raise
    return n, size[0], size[1]


def write_video(path: str, frames: np.ndarray | Iterable, fps: float, *, crf: int = 18,
                preset: str = "veryfast") -> tuple[int, int, int]:
    """Write RGB frames as H.264 mp4 (yuv420p), atomically.

    Args:
      path: target file (.mp4 or .mov or .mkv).
      frames: uint8 [F, H, W, 3] (or float in [0, 1]; grey [F, H, W] is repeated to RGB) or an iterable of frames.
      fps: frame rate.
      crf: x264 quality (0 = lossless in luma, 18 = visually lossless).
      preset: x264 speed preset; veryfast is 4x faster than medium at the same crf (module doc).

    Returns:
      (frames written, height, width) of the file; odd sizes come back padded to even.
    """
    return _encode(path, frames, fps, "libx264", "yuv420p", "rgb24", {"crf": str(crf), "preset": preset},
                   even=True, channels=(1, 3))


def write_rgba_video(path: str, frames: np.ndarray | Iterable, fps: float, *, fast: bool = True,
                     keyframe_every: int | None = 24, workers: int | None = None) -> tuple[int, int, int]:
    """Write RGBA frames to a video with alpha, atomically.

    `.webm` -> VP9 `yuva420p` (small, plays in browsers; colour is 4:2:0, alpha full resolution, lossy);
    `.mov` -> ProRes 4444 `yuva444p10le` (large, near lossless, the editing-software choice).
    Odd sizes are padded to even for both (VP9 4:2:0 needs it; ProRes keeps the padding harmless).

    Args:
      frames: uint8 [F, H, W, 4] (or float in [0, 1]) or an iterable of [H, W, 4] frames.
      fast: VP9 at libvpx's realtime deadline, cpu-used 8 (5x faster); False: good deadline, cpu-used 4.
      keyframe_every: a keyframe every this many frames, each run of frames encoded by its own encoder on a
        thread pool (module doc: one VP9 encoder uses few of many cores); None: one encoder, one keyframe.
      workers: runs encoded at once (default: a quarter of the usable CPUs, 1 to 8), each encoder given
        usable CPUs / workers threads; unused with one encoder.

    Returns:
      (frames written, height, width).
    """
    suffix = os.path.splitext(path)[1].lower()
    if suffix not in RGBA_CODECS:
        raise VideoError(f"{path}: RGBA video needs a .webm (VP9) or .mov (ProRes 4444) name")
    if keyframe_every is not None and keyframe_every < 1:
        raise VideoError(f"keyframe_every must be >= 1 frame or None, got {keyframe_every}")
    if workers is not None and workers < 1:
        raise VideoError(f"workers must be >= 1, got {workers}")
    codec, pix = RGBA_CODECS[suffix]
    # libvpx's default (good, cpu-used 0..1) takes seconds per frame; good/4 keeps the quality near it;
    # realtime/8 is 5x faster again for a slightly larger file (measurements in the module doc).
    speed = {"deadline": "realtime", "cpu-used": "8"} if fast else {"deadline": "good", "cpu-used": "4"}
    opts = {"profile": "4444"} if codec == "prores_ks" else {"crf": "15", "b": "0", "row-mt": "1", **speed}
    if keyframe_every is None:
        return _encode(path, frames, fps, codec, pix, "rgba", opts, even=True, channels=(4,))
    workers = workers or min(8, max(1, usable_cpus() // 4))
    return _encode_chunked(path, frames, fps, codec, pix, "rgba", opts, keyframe_every, workers)


PNG_LEVEL = 1  # zlib level: 4x faster than ffmpeg's default for 3% larger files (module doc)


def _png_bytes(f: np.ndarray, level: int = PNG_LEVEL) -> bytes:
    fmt = {1: "gray", 3: "rgb24", 4: "rgba"}[f.shape[-1]]
    ctx = av.CodecContext.create("png", "w")
    ctx.width, ctx.height, ctx.pix_fmt = f.shape[1], f.shape[0], fmt
    ctx.options = {"compression_level": str(level)}
    img = f[..., 0] if fmt == "gray" else f
    packets = ctx.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(img), format=fmt))
    packets += ctx.encode(None)
    return b"".join(bytes(p) for p in packets)


def write_image(path: str, image) -> None:
    """Write one PNG (grey [H, W], RGB or RGBA; uint8 or float in [0, 1]) atomically."""
    (f,) = list(_frames([image], (1, 3, 4)))
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        fh.write(_png_bytes(f))


def write_frames(folder: str, frames: np.ndarray | Iterable, *, pattern: str = "{:05d}.png",
                 overwrite: bool = True, workers: int | None = None) -> int:
    """Write a PNG sequence (RGB, RGBA or grey), atomically: into a temporary folder renamed into place.

    Args:
      folder: target folder; an existing one is replaced when `overwrite`, else VideoError.
      frames: uint8 or float [F, H, W], [F, H, W, 3] or [F, H, W, 4], or an iterable of frames.
      pattern: file name pattern taking the frame index.
      workers: threads encoding frames at once (default: the usable CPUs, at most 8; 1 encodes in this thread).
        At most 2 x workers frames are in flight, so an iterable source is still streamed.

    Returns:
      the number of frames written.
    """
    folder = os.path.abspath(folder)
    if os.path.exists(folder) and not overwrite:
        raise VideoError(f"{folder}: exists (pass overwrite=True to replace it)")
    workers = workers or min(8, usable_cpus())
    n = 0
    with atomic_path(folder, directory=True) as tmp:

        def write(i, f):
            with open(os.path.join(tmp, pattern.format(i)), "wb") as fh:
                fh.write(_png_bytes(f))

        with concurrent.futures.ThreadPoolExecutor(workers) as pool:
            pending = []
            for i, f in enumerate(_frames(frames, (1, 3, 4))):
                pending.append(pool.submit(write, i, f))
                n += 1
                if len(pending) >= 2 * workers:
                    pending.pop(0).result()
            for p in pending:
                p.result()
        if n == 0:
            raise VideoError(f"{folder}: no frames to write")
    return n
