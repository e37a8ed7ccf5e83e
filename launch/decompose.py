"""Decompose a video into layers: per object an RGBA layer (the object with its shadows and reflections) and
one clean background.

  python launch/decompose.py --video clip.mp4 --masks obj0.mp4 obj1.mp4 --out layers/ \
      --base /ckpt/omnijax/wan_dit_1.3b_inp --effect-lora effect.safetensors --quality-lora quality.safetensors \
      --vae /ckpt/Wan2.1_VAE.pth --umt5 /ckpt/umt5.pth --tokenizer /ckpt/google/umt5-xxl --clip /ckpt/clip.pth
  python launch/decompose.py --video clip.mp4 --masks obj0/ --out layers/ --model tiny   # random tiny models

Videos and masks may be video files or frame folders. Masks are binarised at 240 and dilated 11x11 (as Casper).
Any size (processed at --height, width rounded to a multiple of 16; outputs at the input size) and any frame
count (padded to 4k+1 by ping-pong; outputs trimmed back). Output layout in --out:
  background.mp4                 the clean background
  object_K/rgba/00000.png ...    RGBA layer as a PNG sequence
  object_K/rgba.webm             RGBA layer as VP9 video with alpha
  object_K/alpha.mp4             the alpha matte as a grey video
  report.json                    recomposition PSNR per object, stage timings, settings
  preview.png                    contact sheet: input, alpha, foreground over a checkerboard, background
Everything is written to a temporary folder and moved into place at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from launch import common  # noqa: E402  (sets XLA flags first)

TINY_HEIGHT = 64


class InputError(ValueError):
    """Bad user input: printed as one line, exit code 2."""


def pingpong_indices(n: int, target: int) -> np.ndarray:
    """Frame indices 0..n-1 then time-reversed copies (ping-pong) up to `target` frames."""
    if n == 1:
        return np.zeros(target, int)
    period = np.concatenate([np.arange(n), np.arange(n - 2, 0, -1)])
    return period[np.arange(target) % len(period)]


def processing_size(h: int, w: int, height: int) -> tuple[int, int]:
    """(height, width) multiples of 16 keeping the aspect ratio."""
    ph = max(16, int(round(height / 16)) * 16)
    pw = max(16, int(round(w * ph / h / 16)) * 16)
    return ph, pw


def resize(x, size, method="linear"):
    """[F, H, W(, C)] float -> [F, h, w(, C)]; antialiased when shrinking (area-like, as the reference)."""
    shape = (x.shape[0], *size, *x.shape[3:])
    return np.asarray(jax.image.resize(jnp.asarray(x, jnp.float32), shape, method, antialias=True))


def read_inputs(video_path: str, mask_paths: list[str], max_frames: int | None):
    from omnijax.io.video import VideoError, read_mask, read_video

    try:
        video, fps = read_video(video_path, max_frames=max_frames)
        masks = [read_mask(p, max_frames=max_frames, threshold=None) for p in mask_paths]
    except (VideoError, OSError) as e:
        raise InputError(str(e)) from e
    for p, m in zip(mask_paths, masks):
        if m.shape[0] != video.shape[0]:
            raise InputError(f"mask {p} has {m.shape[0]} frames, the video {video_path} has {video.shape[0]}")
        if m.shape[1:] != video.shape[1:3]:
            raise InputError(f"mask {p} is {m.shape[2]}x{m.shape[1]}, the video is {video.shape[2]}x{video.shape[1]}")
        if not (m >= 240).any():
            raise InputError(f"mask {p} is empty (no pixel >= 240 in any frame)")
    return video, np.stack(masks), fps


def build_decomposer(args):
    from flax import nnx

    from omnijax.omnimatte.branch import EasyOmnimatte
    from omnijax.omnimatte.decompose import Decomposer
    from omnijax.omnimatte.experts import effect_expert, quality_expert
    from omnijax.omnimatte.lora_io import expert_from_lora, load_lora

    dtype = common.DTYPES[args.dtype]
    if args.model == "tiny":
        base, vae, umt5, clip = common.tiny_models(args.seed, jnp.float32)
        cond = common.conditioner(args.cache, text_encoder=umt5, image_encoder=clip, tiny=True)
        effect = EasyOmnimatte(base, effect_expert(base.config.num_layers, rank=4, alpha=4.0), rngs=nnx.Rngs(1))
        quality = EasyOmnimatte(base, quality_expert(base.config.num_layers, rank=4, alpha=4.0), rngs=nnx.Rngs(2))
    else:
        missing = [f"--{n.replace('_', '-')}" for n in ("base", "effect_lora", "quality_lora", "vae", "umt5",
                                                         "tokenizer", "clip") if not getattr(args, n)]
        if missing:
            raise InputError(f"missing {', '.join(missing)} (or use --model tiny)")
        for n in ("base", "effect_lora", "quality_lora", "vae", "umt5", "tokenizer", "clip"):
            if not os.path.exists(getattr(args, n)):
                raise InputError(f"--{n.replace('_', '-')} {getattr(args, n)}: no such file or directory")
        _, base = common.load_model("wan_dit", args.base, dtype)
        _, vae = common.load_model("wan_vae", args.vae, dtype)
        _, umt5 = common.load_model("umt5", args.umt5, dtype)
        _, clip = common.load_model("wan_clip", args.clip, dtype)
        cond = common.conditioner(args.cache, text_encoder=umt5, image_encoder=clip, tokenizer_dir=args.tokenizer)
        effect = EasyOmnimatte(base, expert_from_lora(args.effect_lora, mask="B", name="effect"), rngs=nnx.Rngs(1))
        quality = EasyOmnimatte(base, expert_from_lora(args.quality_lora, mask="C", name="quality"),
                                rngs=nnx.Rngs(2))
        load_lora(args.effect_lora, effect)
        load_lora(args.quality_lora, quality)
    return Decomposer(effect, quality, vae, cond, attention_backend=args.attention)


def write_outputs(tmp, video, background, alphas, foregrounds, fps):
    from omnijax.io.video import write_frames, write_image, write_rgba_video, write_video
    from omnijax.omnimatte.preview import contact_sheet

    to8 = lambda x: (np.clip(x, 0, 1) * 255).round().astype(np.uint8)
    write_video(os.path.join(tmp, "background.mp4"), to8(background), fps)
    for k, (a, fg) in enumerate(zip(alphas, foregrounds)):
        d = os.path.join(tmp, f"object_{k}")
        os.makedirs(d)
        rgba = to8(np.concatenate([fg, a[..., None]], -1))
        write_frames(os.path.join(d, "rgba"), rgba)
        write_rgba_video(os.path.join(d, "rgba.webm"), rgba, fps)
        write_video(os.path.join(d, "alpha.mp4"), to8(np.repeat(a[..., None], 3, -1)), fps)
    write_image(os.path.join(tmp, "preview.png"), contact_sheet(video, alphas, foregrounds, background))


def run(args) -> dict:
    from omnijax.omnimatte.alpha import recomposition_psnr, recover_foreground
    from omnijax.omnimatte.decompose import SamplerSettings

    timings = {}
    t0 = time.perf_counter()
    stages = ["read", "load models", "decompose", "postprocess", "write"]
    bar = tqdm(total=len(stages), desc="decompose", unit="stage", file=sys.stderr)

    def stage(name):
        bar.set_postfix_str(name)
        return time.perf_counter()

    try:
        s = stage("read")
        video8, masks8, fps = read_inputs(args.video, args.masks, args.max_frames)
        n, h, w, _ = video8.shape
        video = video8.astype(np.float32) / 255.0
        height = args.height or (TINY_HEIGHT if args.model == "tiny" else 480)
        ph, pw = processing_size(h, w, height)
        target = 4 * -(-(n - 1) // 4) + 1
        idx = pingpong_indices(n, target)
        small = resize(video, (ph, pw))[idx]
        small_masks = np.stack([resize(m.astype(np.float32) / 255.0, (ph, pw)) for m in masks8])[:, idx]
        timings["read"] = time.perf_counter() - s
        bar.update()

        s = stage("load models")
        decomposer = build_decomposer(args)
        timings["load_models"] = time.perf_counter() - s
        bar.update()

        stage("decompose")
        settings = SamplerSettings(steps=args.steps, tau=args.tau, seed=args.seed)
        background, alphas = decomposer(small, small_masks, settings, prompt=args.prompt, timings=timings)
        bar.update()

        s = stage("postprocess")
        background = np.clip(resize(background[:n], (h, w)), 0, 1)
        alphas = np.stack([np.clip(resize(a[:n], (h, w)), 0, 1) for a in alphas])
        fgs = np.stack([np.asarray(recover_foreground(video, a, background)) for a in alphas])
        psnrs = [float(recomposition_psnr(video, fg, a, background)) for fg, a in zip(fgs, alphas)]
        timings["postprocess"] = time.perf_counter() - s
        bar.update()

        s = stage("write")
        parent = os.path.dirname(os.path.abspath(args.out))
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=os.path.basename(os.path.abspath(args.out)) + ".tmp-", dir=parent)
        try:
            write_outputs(tmp, video, background, alphas, fgs, fps)
            timings["write"] = time.perf_counter() - s
            timings["total"] = time.perf_counter() - t0
            report = dict(
                video=os.path.abspath(args.video), masks=[os.path.abspath(m) for m in args.masks], frames=n,
                size=[h, w], fps=fps, processing_size=[ph, pw], processing_frames=target,
                settings=dict(steps=args.steps, tau=args.tau, seed=args.seed, model=args.model, prompt=args.prompt),
                recomposition_psnr_db=psnrs, timings_s={k: round(v, 3) for k, v in timings.items()},
                device=str(jax.devices()[0].device_kind))
            with open(os.path.join(tmp, "report.json"), "w") as f:
                json.dump(report, f, indent=1)
            if os.path.exists(args.out):
                shutil.rmtree(args.out)
            os.replace(tmp, args.out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        bar.update()
    finally:
        bar.close()  # before any error line, so that line stays last
    return report


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--video", required=True)
    p.add_argument("--masks", required=True, nargs="+", help="one mask video or frame folder per object")
    p.add_argument("--out", required=True, help="output folder (replaced if it exists)")
    p.add_argument("--model", choices=["wan", "tiny"], default="wan", help="tiny: random tiny models (smoke runs)")
    p.add_argument("--base", help="Wan2.1-Fun-InP DiT: omnijax checkpoint dir or original/diffusers weights")
    p.add_argument("--effect-lora", help="Effect Expert LoRA (.safetensors; omnijax, PEFT or kohya names)")
    p.add_argument("--quality-lora", help="Quality Expert LoRA")
    p.add_argument("--vae", help="Wan2.1 VAE (.pth, diffusers safetensors or omnijax dir)")
    p.add_argument("--umt5", help="umT5-XXL encoder")
    p.add_argument("--tokenizer", help="umT5 tokenizer directory")
    p.add_argument("--clip", help="CLIP ViT-H/14 vision tower")
    p.add_argument("--cache", default=os.path.expanduser("~/.cache/omnijax/conditioning"),
                   help="embedding cache directory")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--tau", type=float, default=0.5, help="Effect Expert while sigma > tau, Quality Expert after")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--prompt", default="", help="text prompt (the paper uses none)")
    p.add_argument("--height", type=int, default=None, help=f"processing height (480; {TINY_HEIGHT} for tiny)")
    p.add_argument("--max-frames", type=int, default=None)
    p.add_argument("--dtype", choices=sorted(common.DTYPES), default="bf16")
    p.add_argument("--attention", default="auto", help="attention backend: auto | cudnn | xla")
    args = p.parse_args(argv)
    try:
        report = run(args)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    t = report["timings_s"]
    print(f"wrote {args.out}: {len(args.masks)} object layer(s) + background, {report['frames']} frames; "
          f"recomposition PSNR {', '.join(f'{v:.1f}' for v in report['recomposition_psnr_db'])} dB; "
          f"total {t['total']:.1f}s (" + ", ".join(f"{k} {v:.2f}s" for k, v in t.items() if k != "total") + ")")
    return 0


if __name__ == "__main__":
    sys.exit(main())
