"""The files of one decomposed clip (launch/decompose.py's output folder, without report.json).

  background.mp4                 the clean background (H.264, preset veryfast, crf 18)
  object_K/rgba/00000.png ...    RGBA layer as a PNG sequence (zlib level 1)
  object_K/rgba.webm             RGBA layer as VP9 video with alpha (crf 15, realtime deadline, cpu-used 8, row-mt;
                                 a keyframe every 24 frames, the runs encoded in parallel)
  object_K/alpha.mp4             the alpha matte as a grey video
  preview.png                    omnijax.omnimatte.preview.layer_sheet at 4 frames
"""

from __future__ import annotations

import concurrent.futures
import os
import time

import numpy as np

from omnijax.io.video import to_uint8, usable_cpus, write_frames, write_image, write_rgba_video, write_video
from omnijax.omnimatte.preview import layer_sheet


def write_outputs(folder, video, background, alphas, foregrounds, fps, workers: int | None = None) -> dict:
    """Every output file of one clip into `folder`, the files encoded at once on a thread pool (PyAV releases
    the GIL while encoding, numpy while converting). Each writer converts its own frames to uint8 one at a time
    (omnijax.io.video's per-frame conversion): converting whole float clips up front ran serially in this thread
    and cost more than the encoding (80 frames at 480x832, two objects: ~12 s of ~18 s on 2 cores). Returns
    {file name relative to folder: seconds its writer took}; raises the first failure after all writers stopped.

    video: the input clip, uint8 or float in [0, 1] (only the preview reads it); the layers uint8 (the CLI's) or
    float in [0, 1]."""
    workers = workers or min(16, usable_cpus())

    def rgba(fg, a):  # uint8 RGBA frames, made as the encoder asks for them (3x faster than concatenating floats)
        for i in range(len(a)):
            f = np.empty((*a.shape[1:], 4), np.uint8)
            f[..., :3], f[..., 3] = to_uint8(fg[i]), to_uint8(a[i])
            yield f

    jobs = [(write_video, os.path.join(folder, "background.mp4"), background, fps)]
    for k, (a, fg) in enumerate(zip(alphas, foregrounds)):
        d = os.path.join(folder, f"object_{k}")
        os.makedirs(d)
        jobs += [(write_rgba_video, os.path.join(d, "rgba.webm"), rgba(fg, a), fps),
                 (write_video, os.path.join(d, "alpha.mp4"), a, fps),  # grey: repeated to RGB per frame
                 (lambda p, x: write_frames(p, x, workers=max(1, workers // 2)), os.path.join(d, "rgba"),
                  rgba(fg, a))]
    jobs.append((lambda p: write_image(p, layer_sheet(video, alphas, foregrounds, background)),
                 os.path.join(folder, "preview.png")))

    def timed(fn, path, *a):
        start = time.perf_counter()
        fn(path, *a)
        return time.perf_counter() - start

    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        futures = [pool.submit(timed, *job) for job in jobs]
        concurrent.futures.wait(futures)
    return {os.path.relpath(job[1], folder): round(fut.result(), 3) for job, fut in zip(jobs, futures)}
