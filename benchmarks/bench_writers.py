"""The decompose CLI's writers on one clip of random layers (the encoders' worst case, and what the random-weight
models of bench_decompose_cli.py give): the RGBA WebM with one encoder and in runs of frames on parallel encoders,
one H.264 file, and every file of a clip at once (omnijax.omnimatte.outputs.write_outputs) with and without runs.
--content example takes the layers of the repository's example clip instead (data/example_clip.py: smooth shapes,
shadows and a textured background, as a trained model's layers are).

  python benchmarks/bench_writers.py                 # 81 frames at 480x832 (CPU only; pin cores with taskset)
  python benchmarks/bench_writers.py --frames 9 --height 48 --width 64   # quick dry run
  python benchmarks/bench_writers.py --dtypes-only   # every file of a clip from float32 or from uint8 layers
  python benchmarks/bench_writers.py --dtypes-only --content example   # the same for smooth layers
Prints seconds (and file sizes) as it goes and writes $OUT/bench_writers.json when $OUT is set.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

import omnijax.omnimatte.outputs as outputs  # noqa: E402
from benchmarks.common import emit  # noqa: E402
from omnijax.io.video import usable_cpus, write_rgba_video, write_video  # noqa: E402

RUNS = [(None, None), (24, 4), (16, 6), (12, 8), (27, 3), (24, 2), (24, 8)]  # (keyframe_every, workers)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--frames", type=int, default=81)
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--width", type=int, default=832)
    p.add_argument("--dtypes-only", action="store_true",
                   help="only write_outputs from float32 against uint8 layers (the CLI's), alternating")
    p.add_argument("--content", choices=["random", "example"], default="random",
                   help="random layers, or the example clip's (one object: its video, background, alpha, foreground)")
    a = p.parse_args(argv)
    rng = np.random.default_rng(0)
    shape = (a.frames, a.height, a.width)
    if a.content == "example":
        from data.example_clip import make_example

        clip = make_example(a.frames, a.height, a.width)
        video, background, alpha = clip["video"], clip["background"], clip["alphas"][:1]
        fg = video[None]
    else:
        fg, alpha = rng.random((1, *shape, 3), dtype=np.float32), rng.random((1, *shape), dtype=np.float32)
        background, video = rng.random((*shape, 3), dtype=np.float32), rng.random((*shape, 3), dtype=np.float32)
    rgba = np.concatenate([np.rint(fg[0] * 255), np.rint(alpha[0][..., None] * 255)], -1).astype(np.uint8)
    res = {"frames": a.frames, "size": [a.height, a.width], "content": a.content, "cpus": usable_cpus(), "webm": {}}
    with tempfile.TemporaryDirectory() as d:
        if a.dtypes_only:
            as8 = [np.rint(x * 255).astype(np.uint8) for x in (background, alpha, fg)]
            for rep in range(3):
                for name, (b, al, f) in (("float32", (background, alpha, fg)), ("uint8", as8)):
                    t = time.perf_counter()
                    files = outputs.write_outputs(tempfile.mkdtemp(dir=d), video, b, al, f, 16)
                    res.setdefault(f"write_outputs {name}", []).append(
                        {"s": round(time.perf_counter() - t, 3), "files_s": files})
                    print(name, rep, res[f"write_outputs {name}"][-1], flush=True)
            emit("bench_writers", res)
            return
        for every, workers in RUNS:
            t = time.perf_counter()
            write_rgba_video(f"{d}/a.webm", rgba, 16, keyframe_every=every, workers=workers)
            res["webm"][f"keyframe_every={every} workers={workers}"] = {
                "s": round(time.perf_counter() - t, 3), "bytes": os.path.getsize(f"{d}/a.webm")}
            print(every, workers, res["webm"][f"keyframe_every={every} workers={workers}"], flush=True)
        t = time.perf_counter()
        write_video(f"{d}/b.mp4", background, 16)
        res["mp4_s"] = round(time.perf_counter() - t, 3)
        real = outputs.write_rgba_video
        try:
            for every in (None, 24, 16):
                outputs.write_rgba_video = functools.partial(real, keyframe_every=every)
                for rep in range(2):
                    t = time.perf_counter()
                    files = outputs.write_outputs(tempfile.mkdtemp(dir=d), video, background, alpha, fg, 16)
                    res[f"write_outputs keyframe_every={every} #{rep}"] = {
                        "s": round(time.perf_counter() - t, 3), "files_s": files}
                    print(every, rep, res[f"write_outputs keyframe_every={every} #{rep}"], flush=True)
        finally:
            outputs.write_rgba_video = real
    emit("bench_writers", res)


if __name__ == "__main__":
    main()
