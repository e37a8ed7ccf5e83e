"""Decompose a video into layers: per object an RGBA layer (the object with its shadows and reflections) and
one clean background.

  python launch/decompose.py --video clip.mp4 --masks obj0.mp4 obj1.mp4 --out layers/ \
      --dit /ckpt/omnijax/casper_1.3b --effect-lora effect.safetensors --quality-lora quality.safetensors \
      --vae /ckpt/Wan2.1_VAE.pth --umt5 /ckpt/umt5.pth --tokenizer /ckpt/google/umt5-xxl --clip /ckpt/clip.pth
  python launch/decompose.py --video clip.mp4 --masks obj0/ --out layers/ --model tiny   # random tiny models
  python launch/decompose.py --video a.mp4 --masks a0.mp4 --out la/ --video b.mp4 --masks b0/ b1/ --out lb/ ...
  python launch/decompose.py --manifest clips.json ...   # [{"video": ..., "masks": [...], "out": ...}, ...]

Videos and masks may be video files or frame folders. The work is omnijax.omnimatte.decompose.decompose_video
(any size: processed at --height, width rounded to a multiple of 16, outputs at the input size; any frame count:
padded to 4k+1 by ping-pong, outputs trimmed back; masks binarised at 240 and dilated 11x11 as Casper); this file
checks, parses arguments, reads, writes and reports. Model flags take what converters.registry.load takes (a
converted folder, the original files); --model tiny uses random tiny models.

Several clips (repeated --video/--masks/--out, or --manifest, whose relative paths are relative to the manifest's
folder) run in one process: the models are loaded and compiled once; the main thread reads and dispatches the
clips one after the other (omnijax.omnimatte.decompose.start_decompose) while a writer thread takes each clip's
result and writes its files, so the device goes from one clip to the next without waiting for the host (at most
IN_FLIGHT clips dispatched and not yet taken; each holds its layers at the input size on the device until then,
as uint8: 0.23 GB at 81x480x832 with one object, 0.91 GB as float32; a batch peaked 0.5 GB above one clip with
float layers); a clip that fails is reported and the others go on; the exit code is non-zero if any clip failed;
an interrupt (Ctrl-C) writes no clip that was not yet written. In report.json a clip's first stage is timed from
the previous clip's result, and its "total" (from its read to its files) overlaps the previous and next clips' work.

Safety: every argument and file is checked before a model is built (a failing check is one line, exit code 2).
--out must be a new or empty folder, or an earlier output of this tool (it holds our report.json) replaced only
with --overwrite; `--out .` or a folder holding the current one is refused. Everything is written to a temporary
folder beside --out and renamed into place at the end; if that last rename fails, the results stay in the
temporary folder and the error names it. Limits: the processing size keeps the input's aspect ratio, which must
lie within MAX_ASPECT:1 either way (a 2048x64 clip at 480 height would be 15360x480).

Compilation: JAX's persistent compilation cache is on ($XDG_CACHE_HOME/omnijax/jax or ~/.cache/omnijax/jax;
--compile-cache DIR moves it, --no-compile-cache turns it off), so a second run of the same shapes skips most
compiling (omnijax/compile_cache.py).

Output layout in --out:
  background.mp4                 the clean background (H.264, preset veryfast, crf 18)
  object_K/rgba/00000.png ...    RGBA layer as a PNG sequence (zlib level 1)
  object_K/rgba.webm             RGBA layer as VP9 video with alpha (crf 15, realtime deadline, cpu-used 8, row-mt;
                                 a keyframe every 24 frames, the runs encoded in parallel)
  object_K/alpha.mp4             the alpha matte as a grey video
  report.json                    recomposition PSNR per object, stage timings (the device stages are dispatched
                                 without waiting, so each is the time from the previous stage's result to its
                                 own: omnijax.omnimatte.decompose.StageClock; and each file's writer), start-up
                                 (imports and checks, the backend's start), JAX's tracing / lowering / compiling
                                 or cache loading so far in the process (jax_compile_s; by program, the costliest
                                 12: jax_compile_by_program_s), the programs this clip's dispatch compiled or
                                 loaded (programs_compiled_at_dispatch), settings
  preview.png                    labelled sheet: input, per object alpha and foreground over a checkerboard,
                                 background, at 4 frames; tiles at most 256 pixels wide
Every file but report.json is written by omnijax/omnimatte/outputs.py.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import json
import os
import shutil
import sys
import tempfile
import threading
import time
import traceback

T_START = time.perf_counter()  # (about) when this process began: report.json's start-up split counts from here

import numpy as np  # noqa: E402

from launch import common  # noqa: F401,E402  (sets XLA flags first)

TOOL = "omnijax launch/decompose.py"  # written into report.json: how a folder is recognised as our output
TINY_HEIGHT = 64
COMPILE_CLOCK = None  # omnijax.compile_cache.CompileClock of this process, started by run()
MAX_ASPECT = 4.0
MODEL_FLAGS = (("dit", "wan_dit"), ("vae", "wan_vae"), ("umt5", "umt5"), ("clip", "wan_clip"))
MASK_THRESHOLD = 240  # omnijax.omnimatte.masks.BINARY_THRESHOLD
IN_FLIGHT = 2  # clips of a batch dispatched and not yet taken back (the device runs one while the next waits)


class InputError(ValueError):
    """Bad user input: printed as one line, exit code 2."""


def warn(msg: str) -> None:
    print(f"warning: {msg}", file=sys.stderr)


@dataclasses.dataclass
class Clip:
    video: str
    masks: list[str]
    out: str


# ----------------------------------------------------------------------------------------------- checks


def check_settings(args) -> None:
    if args.steps < 1:
        raise InputError(f"--steps {args.steps}: need at least 1 sampler step")
    if not 0.0 <= args.tau <= 1.0:
        raise InputError(f"--tau {args.tau}: must lie in [0, 1] (the sigma at which the Quality Expert takes over)")
    if args.height is not None and not 16 <= args.height <= 2048:
        raise InputError(f"--height {args.height}: must lie in [16, 2048]")
    if args.max_frames is not None and args.max_frames < 1:
        raise InputError(f"--max-frames {args.max_frames}: need at least 1")
    if args.attention not in ("auto", "cudnn", "fa3", "xla"):
        raise InputError(f"--attention {args.attention}: choose auto, cudnn, fa3 or xla")


def _readable(path: str) -> bool:
    return os.access(path, os.R_OK | (os.X_OK if os.path.isdir(path) else 0))


def check_models(args) -> None:
    """Weights named, present and readable: before any video is read or model built."""
    if args.model == "tiny":
        return
    names = [n for n, _ in MODEL_FLAGS] + ["effect_lora", "quality_lora", "tokenizer"]
    flag = lambda n: f"--{n.replace('_', '-')}"
    missing = [flag(n) for n in names if not getattr(args, n)]
    if missing:
        raise InputError(f"missing {', '.join(missing)} (or use --model tiny)")
    for n in names:
        path = getattr(args, n)
        if not os.path.exists(path):
            raise InputError(f"{flag(n)} {path}: no such file or folder")
        if not _readable(path):
            raise InputError(f"{flag(n)} {path}: not readable")


def is_earlier_output(folder: str) -> bool:
    """Whether `folder` holds a report.json written by this tool."""
    try:
        with open(os.path.join(folder, "report.json")) as f:
            report = json.load(f)
    except (OSError, ValueError):
        return False
    # Outputs written before the "tool" key existed carry these two keys, which no other tool writes together.
    return isinstance(report, dict) and (report.get("tool") == TOOL or {"recomposition_psnr_db",
                                                                      "processing_frames"} <= set(report))


def _inside(path: str, folder: str) -> bool:
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def check_out(out: str, overwrite: bool, inputs: list[str]) -> str:
    """The absolute output folder, after refusing every way of losing files (module doc)."""
    path = os.path.abspath(out)
    if _inside(os.getcwd(), path):
        raise InputError(f"--out {out}: is the current folder or holds it; name a new folder")
    if os.path.exists(path) and not os.path.isdir(path):
        raise InputError(f"--out {out}: is a file, not a folder")
    if os.path.isdir(path) and os.listdir(path):
        if not is_earlier_output(path):
            raise InputError(f"--out {out}: folder is not empty and is not an earlier output of this tool (no "
                             "report.json of ours); nothing was touched, name a new or empty folder")
        if not overwrite:
            raise InputError(f"--out {out}: holds an earlier decomposition; pass --overwrite to replace it")
        for p in inputs:
            if _inside(p, path):
                raise InputError(f"--out {out}: holds the input {p}, which replacing it would delete")
    ancestor = os.path.dirname(path)
    while not os.path.exists(ancestor):
        ancestor = os.path.dirname(ancestor)
    if not os.path.isdir(ancestor):
        raise InputError(f"--out {out}: {ancestor} is a file, not a folder")
    try:  # a real write (os.access answers yes to root on any mode)
        fd, probe_path = tempfile.mkstemp(prefix=".decompose-write-check-", dir=ancestor)
        os.close(fd)
        os.remove(probe_path)
    except OSError as e:
        raise InputError(f"--out {out}: cannot write in {ancestor} ({e.strerror or e})") from e
    return path


def check_clip(clip: Clip, height: int, max_frames: int | None) -> None:
    """Sizes and frame counts from the headers (nothing decoded); duplicate masks warned about."""
    from omnijax.io.video import VideoError, probe

    try:
        v = probe(clip.video)
        ms = [probe(m) for m in clip.masks]
    except (VideoError, OSError) as e:
        raise InputError(str(e)) from e
    from omnijax.omnimatte.decompose import processing_size

    ph, pw = processing_size(v.height, v.width, height)
    if max(pw / ph, ph / pw) > MAX_ASPECT:
        raise InputError(f"video {clip.video} is {v.width}x{v.height}: at height {height} it would be processed at "
                         f"{pw}x{ph}; the aspect ratio limit is {MAX_ASPECT:g}:1 either way")
    for p, m in zip(clip.masks, ms):
        if (m.height, m.width) != (v.height, v.width):
            raise InputError(f"mask {p} is {m.width}x{m.height}, the video is {v.width}x{v.height}")
    real = [os.path.realpath(m) for m in clip.masks]
    for i, r in enumerate(real):
        if r in real[:i]:
            warn(f"mask {clip.masks[i]} is given twice: its two layers will be identical")


def read_inputs(video_path: str, mask_paths: list[str], max_frames: int | None):
    """(video uint8 [F, H, W, 3], masks uint8 [K, F, H, W], fps), with every mismatch named."""
    from omnijax.io.video import VideoError, read_mask, read_video

    try:
        video, fps = read_video(video_path, max_frames=max_frames)
        masks = [read_mask(p, max_frames=max_frames, threshold=None) for p in mask_paths]
    except (VideoError, OSError) as e:
        raise InputError(str(e)) from e
    n = video.shape[0]
    counts = [m.shape[0] for m in masks]
    if all(c > n for c in counts) and len(set(counts)) == 1:
        raise InputError(f"video {video_path} has {n} frames but its masks have {counts[0]}: the video is shorter "
                         "than its masks (cut short?)")
    for p, m in zip(mask_paths, masks):
        if m.shape[0] != n:
            raise InputError(f"mask {p} has {m.shape[0]} frames, the video {video_path} has {n}")
        if m.shape[1:] != video.shape[1:3]:
            raise InputError(f"mask {p} is {m.shape[2]}x{m.shape[1]}, the video is {video.shape[2]}x{video.shape[1]}")
    binary = [m >= MASK_THRESHOLD for m in masks]
    for p, b in zip(mask_paths, binary):
        if not b.any():
            raise InputError(f"mask {p} is empty (no pixel >= {MASK_THRESHOLD} in any frame)")
        if b.all():
            warn(f"mask {p} covers every pixel of every frame: no background is visible to recover")
    for i in range(len(binary)):
        for j in range(i):
            if np.array_equal(binary[i], binary[j]) and os.path.realpath(mask_paths[i]) != os.path.realpath(
                    mask_paths[j]):
                warn(f"masks {mask_paths[j]} and {mask_paths[i]} are the same: their layers will be identical")
    return video, np.stack(masks), fps


# ----------------------------------------------------------------------------------------------- models


def _umt5_sources(args):
    """The identity the embedding cache remembers umT5 by (omnijax.conditioning.text_alias_path)."""
    from omnijax.conditioning import umt5_sources

    if args.model == "tiny":
        return ["tiny", args.seed + 2]  # build_decomposer's seed of the umT5 row
    return umt5_sources(args.umt5, args.tokenizer, args.dtype)


def cached_text_id(args) -> str | None:
    """The umT5 identity when both it and the prompt's embedding are already cached, else None."""
    from omnijax import conditioning

    return conditioning.cached_text_id(args.cache, _umt5_sources(args), args.prompt) if args.cache else None


def build_decomposer(args):
    from flax import nnx

    from converters import registry
    from omnijax.conditioning import remember_text_id
    from omnijax.omnimatte.branch import EasyOmnimatte
    from omnijax.omnimatte.decompose import Decomposer
    from omnijax.omnimatte.experts import EXPERT_KINDS
    from omnijax.omnimatte.lora_io import expert_with_lora

    tiny = args.model == "tiny"
    dtype = "f32" if tiny else args.dtype
    text_id = cached_text_id(args)
    split = {}

    def load(i, name, kind):
        s = time.perf_counter()
        model = registry.load(kind, "tiny" if tiny else getattr(args, name), dtype=dtype, seed=args.seed + i,
                              progress=True)[1]
        split[name] = round(time.perf_counter() - s, 3)
        return model

    # One after another: loading them on threads was slower on the H200 host (7.1-7.6 s against 5.6 s; the
    # abstract builds are Python and share the GIL), docs/benchmarks.md.
    models = {name: None if (name == "umt5" and text_id) else load(i, name, kind)
              for i, (name, kind) in enumerate(MODEL_FLAGS)}
    cond = registry.conditioner(args.cache, text_encoder=models["umt5"], image_encoder=models["clip"],
                                tokenizer=None if text_id else "tiny" if tiny else args.tokenizer)
    if text_id:
        cond.text_id = text_id
    elif args.cache:
        cond.text([args.prompt])  # computed and cached now, so that the next run can skip umT5
        remember_text_id(args.cache, _umt5_sources(args), cond.text_id)
        cond.text_encoder = models["umt5"] = None  # not needed again in this process: free it
    experts = []
    for i, name in enumerate(("effect", "quality")):
        kind = EXPERT_KINDS[name]
        s = time.perf_counter()
        if tiny:
            expert = kind.config(models["dit"].config.num_layers, rank=4, alpha=4.0)
            experts.append(EasyOmnimatte(models["dit"], expert, rngs=nnx.Rngs(i + 1)))
        else:
            experts.append(expert_with_lora(models["dit"], getattr(args, f"{name}_lora"), mask=kind.mask, name=name))
        split[f"{name}_lora"] = round(time.perf_counter() - s, 3)
    decomposer = Decomposer(*experts, models["vae"], cond, attention_backend=args.attention)
    decomposer.umt5_loaded = not text_id
    decomposer.load_split_s = split  # seconds per model and LoRA file
    return decomposer


# ----------------------------------------------------------------------------------------------- writing


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def publish(out: str, write) -> None:
    """Runs write(staging_folder) and renames the staging folder to `out` (module doc). A failure while writing
    removes the half-written folder; a failure of the final move keeps the finished one and names it."""
    parent, name = os.path.split(out)
    os.makedirs(parent, exist_ok=True)
    stage = tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=parent)
    os.chmod(stage, 0o777 & ~_umask())  # mkdtemp makes 0700; the results are the user's usual files
    try:
        write(stage)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    try:
        if os.path.isdir(out) and os.listdir(out):
            if not is_earlier_output(out):  # something else appeared there during the run
                raise InputError(f"{out} was filled by something else during the run")
            old = tempfile.mkdtemp(prefix=f".{name}.old-", dir=parent)
            os.replace(out, os.path.join(old, name))
            os.replace(stage, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            if os.path.isdir(out):
                os.rmdir(out)
            os.replace(stage, out)
    except (OSError, InputError) as e:
        raise InputError(f"could not move the results to {out} ({e}); they are kept in {stage}") from e


# ----------------------------------------------------------------------------------------------- driver


def clips_from_args(args, parser) -> list[Clip]:
    if args.manifest:
        if args.video or args.masks or args.out:
            raise InputError("--manifest replaces --video/--masks/--out; give one or the other")
        try:
            with open(args.manifest) as f:
                entries = json.load(f)
        except (OSError, ValueError) as e:
            raise InputError(f"--manifest {args.manifest}: unreadable ({e})") from e
        base = os.path.dirname(os.path.abspath(args.manifest))
        at = lambda p: os.path.join(base, os.path.expanduser(p))
        clips = []
        for i, e in enumerate(entries if isinstance(entries, list) else [None]):
            masks = e.get("masks") if isinstance(e, dict) else None
            if not (isinstance(e, dict) and isinstance(e.get("video"), str) and isinstance(e.get("out"), str)
                    and isinstance(masks, list) and masks and all(isinstance(m, str) for m in masks)):
                raise InputError(f"--manifest {args.manifest}: entry {i} is not "
                                 '{"video": path, "masks": [path, ...], "out": folder}')
            clips.append(Clip(at(e["video"]), [at(m) for m in e["masks"]], at(e["out"])))
        if not clips:
            raise InputError(f"--manifest {args.manifest}: lists no clips")
        return clips
    if not (args.video and args.masks and args.out):
        parser.error("give --video, --masks and --out (or --manifest)")
    if not len(args.video) == len(args.masks) == len(args.out):
        raise InputError(f"{len(args.video)} --video, {len(args.masks)} --masks and {len(args.out)} --out: give one "
                         "--masks and one --out per --video")
    return [Clip(v, m, o) for v, m, o in zip(args.video, args.masks, args.out)]


def peak_memory_gb() -> float | None:
    """The device's peak memory in use since the process started (None where the backend does not say, CPU)."""
    import jax

    stats = jax.devices()[0].memory_stats() or {}
    return None if "peak_bytes_in_use" not in stats else round(stats["peak_bytes_in_use"] / 2**30, 2)


class StageTimings(dict):
    """A timings dict that also notes the device's peak memory so far whenever a stage's time is recorded, i.e.
    when the stage's result is ready (decompose_video's StageClock). Later stages are dispatched by then and may
    already hold memory, so a stage's figure is an upper bound on the peak up to it; the last is the clip's."""

    def __init__(self):
        super().__init__()
        self.peak_gb = {}

    def __setitem__(self, stage, seconds):
        super().__setitem__(stage, seconds)
        self.peak_gb[stage] = peak_memory_gb()


def start_clip(clip: Clip, decomposer, args, height: int, shared: dict, inputs=None, after=None):
    """Reads one clip (or waits for its read-ahead) and dispatches its decomposition without waiting for it.
    Returns a function that waits for the result and returns the function writing its files into a folder
    (which returns the report).

    inputs: a future of `read_inputs`' result for this clip (read ahead on a thread while the models loaded or the
      previous clip ran; "read" is then the time spent waiting for it); None reads the clip here.
    after: the previous clip's pending result (omnijax.omnimatte.decompose.start_decompose), still running."""
    import jax

    from omnijax.omnimatte.decompose import SamplerSettings, start_decompose
    from omnijax.omnimatte.outputs import write_outputs

    t0 = time.perf_counter()
    timings = StageTimings()
    video8, masks8, fps = (inputs.result() if inputs is not None
                           else read_inputs(clip.video, clip.masks, args.max_frames))
    n, h, w, _ = video8.shape
    timings["read"] = time.perf_counter() - t0
    settings = SamplerSettings(steps=args.steps, tau=args.tau, seed=args.seed)
    compiled_before = COMPILE_CLOCK.totals()["programs"]
    pending = start_decompose(decomposer, video8, masks8, settings, height=height, prompt=args.prompt,
                              timings=timings, after=after, uint8=True)  # the files' values, made on the device
    compiled = COMPILE_CLOCK.totals()["programs"] - compiled_before  # compiled or loaded from the cache

    def finish():
        layers = pending.result()

        def write(folder):
            s = time.perf_counter()
            files_s = write_outputs(folder, video8, layers.background, layers.alphas, layers.foregrounds, fps)
            timings["write"] = time.perf_counter() - s
            timings["total"] = time.perf_counter() - t0
            report = dict(
                tool=TOOL, video=os.path.abspath(clip.video), masks=[os.path.abspath(m) for m in clip.masks],
                frames=n, size=[h, w], fps=fps, processing_size=list(layers.processing_size),
                processing_frames=layers.processing_frames,
                settings=dict(steps=args.steps, tau=args.tau, seed=args.seed, model=args.model, prompt=args.prompt),
                recomposition_psnr_db=layers.psnr, timings_s={k: round(v, 3) for k, v in timings.items()},
                write_files_s=files_s, peak_memory_gb_after_stage=timings.peak_gb, **shared,
                since_start_s=round(time.perf_counter() - T_START, 3), jax_compile_s=COMPILE_CLOCK.totals(),
                programs_compiled_at_dispatch=compiled, jax_compile_by_program_s=COMPILE_CLOCK.programs(top=12),
                load_split_s=getattr(decomposer, "load_split_s", None),
                umt5_loaded=getattr(decomposer, "umt5_loaded", None), device=str(jax.devices()[0].device_kind))
            with open(os.path.join(folder, "report.json"), "w") as f:
                json.dump(report, f, indent=1)
            return report

        return write

    finish.pending = pending
    return finish


def run(args, clips: list[Clip]) -> tuple[list, list]:
    """Checks everything, loads the models once, decomposes each clip and writes it while the next one runs.
    Returns (done [(clip, report)], failed [(clip, message, exit code)])."""
    from omnijax import compile_cache

    check_settings(args)
    check_models(args)
    try:
        cache_dir = None if args.no_compile_cache else compile_cache.enable(args.compile_cache or "default")
    except OSError as e:
        raise InputError(f"--compile-cache {args.compile_cache or compile_cache.default_dir()}: {e}") from e
    global COMPILE_CLOCK
    COMPILE_CLOCK = COMPILE_CLOCK or compile_cache.CompileClock().start()
    height = args.height or (TINY_HEIGHT if args.model == "tiny" else 480)
    failed, ready, outs = [], [], set()
    for clip in clips:
        try:
            clip.out = check_out(clip.out, args.overwrite, [clip.video, *clip.masks])
            if clip.out in outs:
                raise InputError(f"--out {clip.out}: given for two clips")
            outs.add(clip.out)
            check_clip(clip, height, args.max_frames)
            ready.append(clip)
        except InputError as e:
            failed.append((clip, str(e), 2))
    if not ready:
        return [], failed
    # One clip is read ahead on its own thread (PyAV and numpy release the GIL): the first while the models load,
    # each next one while the previous clip runs on the device. At most one clip waits in memory.
    reader = concurrent.futures.ThreadPoolExecutor(1)
    try:
        done = _load_and_run(args, ready, failed, height, cache_dir,
                             lambda c: reader.submit(read_inputs, c.video, c.masks, args.max_frames))
    except BaseException:
        reader.shutdown(wait=False, cancel_futures=True)  # report the error now, not after a read in progress
        raise
    reader.shutdown()
    return done, failed


def _load_and_run(args, ready: list[Clip], failed: list, height: int, cache_dir, read_ahead) -> list:
    """Loads the models, then decomposes each clip (read ahead by `read_ahead(clip)` -> future) and writes it while
    the next one runs. Appends failures to `failed`; returns [(clip, report)] of the clips written."""
    from tqdm.auto import tqdm

    done = []
    ahead = read_ahead(ready[0])
    bar = tqdm(total=1 + 2 * len(ready), desc="decompose", unit="stage", file=sys.stderr)
    bar.set_postfix_str("load models")
    import jax

    s = time.perf_counter()
    jax.devices()  # the backend's start-up (CUDA, the XLA client) on its own, not inside the first model's load
    startup = dict(to_run=round(s - T_START, 3), backend=round(time.perf_counter() - s, 3))
    s = time.perf_counter()
    decomposer = build_decomposer(args)
    # Later clips whose first frame's CLIP features are not cached need the CLIP program: compiled during the first
    # clip's sampler run (Decomposer._run_sampler) instead of between two clips while the device waits (for clips of
    # the first clip's processing size; a clip of another size compiles its own when it comes).
    decomposer.warm_image_encoder = len(ready) > 1
    shared = dict(load_models_s=round(time.perf_counter() - s, 3), peak_memory_gb_after_load=peak_memory_gb(),
                  compile_cache=cache_dir, startup_s=startup)
    bar.update()

    def publish_and_count(out, write):
        try:
            return _publish_report(out, write)
        finally:
            bar.update()

    # The main thread reads and dispatches the clips one after the other; one writer thread takes each clip's result
    # (waits for it, copies it back) and writes its files (each clip's files encoded on its own pool). Taking a result
    # on the dispatching thread held the next clip back: a launch of the sampler returns only when its loop is done
    # on the device (its step count is a traced value), so the host, not the device, paced a batch (session 9).
    # At most IN_FLIGHT clips are dispatched and not yet taken (where launches do not wait, the main thread would
    # otherwise put every clip of a long batch on the device at once).
    # An interrupt (Ctrl-C) stops the writer from taking or publishing any clip it has not published yet.
    stop = threading.Event()

    def finish_and_publish(clip, finish, taken: threading.Event):
        """(None, report), or ((message, exit code) of the clip's own failure, None); a failure to write its files
        is raised. Returns a message, not the exception: its traceback would keep the clip's frames alive."""
        try:
            if stop.is_set():
                return ("interrupted before its result was taken", 1), None
            write = finish()
        except Exception as e:  # noqa: BLE001  (one clip's failure must not stop the batch)
            return _failure(e), None
        finally:
            taken.set()
        if stop.is_set():
            return ("interrupted before its files were written", 1), None
        bar.update()
        return None, publish_and_count(clip.out, write)

    with concurrent.futures.ThreadPoolExecutor(1) as writer:
        pending, taken, after = [], [], None
        try:
            for i, clip in enumerate(ready):
                bar.set_postfix_str(f"clip {i + 1}/{len(ready)}" if len(ready) > 1 else "clip")
                inputs, ahead = ahead, read_ahead(ready[i + 1]) if i + 1 < len(ready) else None
                if len(taken) >= IN_FLIGHT:
                    taken[-IN_FLIGHT].wait()
                try:
                    finish = start_clip(clip, decomposer, args, height, shared, inputs, after=after)
                except Exception as e:  # noqa: BLE001
                    failed.append((clip, *_failure(e)))
                    continue
                after = finish.pending
                taken.append(threading.Event())
                pending.append((clip, writer.submit(finish_and_publish, clip, finish, taken[-1])))
                del finish  # its closure holds the clip's frames: not while waiting for the next one
        except BaseException:
            stop.set()
            writer.shutdown(wait=False, cancel_futures=True)
            raise
        for clip, fut in pending:
            try:
                error, report = fut.result()
            except InputError as e:
                failed.append((clip, str(e), 2))
            except Exception as e:  # noqa: BLE001
                failed.append((clip, f"writing failed: {type(e).__name__}: {e}".splitlines()[0], 1))
            else:
                if error is None:
                    done.append((clip, report))
                else:
                    failed.append((clip, *error))
    bar.close()  # before any error line, so that line stays last
    return done


def _failure(e: Exception) -> tuple[str, int]:
    """One clip's failure as (one-line message, exit code: 2 for bad input, 1 for anything else); prints the
    traceback of anything but bad input."""
    if isinstance(e, InputError):
        return str(e), 2
    traceback.print_exception(e)
    return f"{type(e).__name__}: {e}".splitlines()[0], 1


def _publish_report(out, write):
    box = {}
    publish(out, lambda folder: box.update(report=write(folder)))
    return box["report"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--video", action="append", help="input video or frame folder (repeat for a batch)")
    p.add_argument("--masks", action="append", nargs="+", help="one mask video or frame folder per object")
    p.add_argument("--out", action="append", help="output folder: new, empty, or an earlier output (--overwrite)")
    p.add_argument("--manifest", help='JSON list of {"video": path, "masks": [paths], "out": folder}')
    p.add_argument("--overwrite", action="store_true", help="replace an earlier output of this tool in --out")
    p.add_argument("--model", choices=["wan", "tiny"], default="wan", help="tiny: random tiny models (smoke runs)")
    p.add_argument("--dit", "--base", dest="dit",
                   help="Casper DiT (Wan2.1-Fun-InP + Casper, `launch/convert.py --casper`; plain Fun-InP is the "
                        "paper's appendix-E ablation): omnijax checkpoint dir or original/diffusers weights")
    p.add_argument("--effect-lora", help="Effect Expert LoRA (.safetensors; omnijax, PEFT or kohya names)")
    p.add_argument("--quality-lora", help="Quality Expert LoRA")
    p.add_argument("--vae", help="Wan2.1 VAE (.pth, diffusers safetensors or omnijax dir)")
    p.add_argument("--umt5", help="umT5-XXL encoder")
    p.add_argument("--tokenizer", help="umT5 tokenizer directory")
    p.add_argument("--clip", help="CLIP ViT-H/14 vision tower")
    p.add_argument("--cache", default=os.path.expanduser("~/.cache/omnijax/conditioning"),
                   help="embedding cache directory")
    p.add_argument("--compile-cache", default=None, help="persistent compilation cache folder "
                   "(default $XDG_CACHE_HOME/omnijax/jax or ~/.cache/omnijax/jax)")
    p.add_argument("--no-compile-cache", action="store_true", help="compile everything afresh, keep nothing")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--tau", type=float, default=0.5, help="Effect Expert while sigma > tau, Quality Expert after")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--prompt", default="", help="text prompt (the paper uses none)")
    p.add_argument("--height", type=int, default=None, help=f"processing height (480; {TINY_HEIGHT} for tiny)")
    p.add_argument("--max-frames", type=int, default=None)
    p.add_argument("--dtype", choices=["bf16", "f32"], default="bf16")
    p.add_argument("--attention", default="auto",
                   help="attention backend: auto | cudnn | fa3 | xla (auto: fa3 on a single Hopper GPU)")
    args = p.parse_args(argv)
    try:
        clips = clips_from_args(args, p)
        done, failed = run(args, clips)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for clip, report in done:
        t = report["timings_s"]
        print(f"wrote {clip.out}: {len(clip.masks)} object layer(s) + background, {report['frames']} frames; "
              f"recomposition PSNR {', '.join(f'{v:.1f}' for v in report['recomposition_psnr_db'])} dB; "
              f"{t['total']:.1f}s (" + ", ".join(f"{k} {v:.2f}s" for k, v in t.items() if k != "total") +
              f"; models loaded once in {report['load_models_s']:.1f}s)")
    prefix = (lambda c: f"clip {c.video}: ") if len(clips) > 1 else (lambda c: "")
    for clip, msg, _ in failed:
        print(f"error: {prefix(clip)}{msg}", file=sys.stderr)
    if len(clips) > 1:
        print(f"{len(done)} of {len(clips)} clips written" + (f", {len(failed)} failed" if failed else ""),
              file=sys.stderr)
    return max((code for *_, code in failed), default=0)


if __name__ == "__main__":
    code = main()
    # Every file is written, renamed into place and closed by now (the writer pool has been joined); what is left
    # is the interpreter's teardown of JAX's device client and the models' buffers, about a second on the H200
    # host (docs/benchmarks.md), which a user waits for and which writes nothing.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
