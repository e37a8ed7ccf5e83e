"""Decompose a video into layers: per object an RGBA layer (the object with its shadows and reflections) and
one clean background.

  python launch/decompose.py --video clip.mp4 --masks obj0.mp4 obj1.mp4 --out layers/ \
      --dit /ckpt/omnijax/wan_dit_1.3b_inp --effect-lora effect.safetensors --quality-lora quality.safetensors \
      --vae /ckpt/Wan2.1_VAE.pth --umt5 /ckpt/umt5.pth --tokenizer /ckpt/google/umt5-xxl --clip /ckpt/clip.pth
  python launch/decompose.py --video clip.mp4 --masks obj0/ --out layers/ --model tiny   # random tiny models

Videos and masks may be video files or frame folders. The work is omnijax.omnimatte.decompose.decompose_video
(any size: processed at --height, width rounded to a multiple of 16, outputs at the input size; any frame count:
padded to 4k+1 by ping-pong, outputs trimmed back; masks binarised at 240 and dilated 11x11 as Casper); this file
parses arguments, reads, writes and reports. Model flags take what converters.registry.load takes (a converted
folder, the original files); --model tiny uses random tiny models. Output layout in --out:
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
import sys
import time

import jax
import numpy as np
from tqdm.auto import tqdm

from launch import common  # noqa: F401  (sets XLA flags first)

TINY_HEIGHT = 64
MODEL_FLAGS = (("dit", "wan_dit"), ("vae", "wan_vae"), ("umt5", "umt5"), ("clip", "wan_clip"))


class InputError(ValueError):
    """Bad user input: printed as one line, exit code 2."""


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
        if not (m >= 240).any():  # omnijax.omnimatte.masks.BINARY_THRESHOLD
            raise InputError(f"mask {p} is empty (no pixel >= 240 in any frame)")
    return video, np.stack(masks), fps


def build_decomposer(args):
    from flax import nnx

    from converters import registry
    from omnijax.omnimatte.branch import EasyOmnimatte
    from omnijax.omnimatte.decompose import Decomposer
    from omnijax.omnimatte.experts import EXPERT_KINDS
    from omnijax.omnimatte.lora_io import expert_from_lora, load_lora

    tiny = args.model == "tiny"
    if not tiny:
        names = [n for n, _ in MODEL_FLAGS] + ["effect_lora", "quality_lora", "tokenizer"]
        missing = [f"--{n.replace('_', '-')}" for n in names if not getattr(args, n)]
        if missing:
            raise InputError(f"missing {', '.join(missing)} (or use --model tiny)")
        for n in names:
            if not os.path.exists(getattr(args, n)):
                raise InputError(f"--{n.replace('_', '-')} {getattr(args, n)}: no such file or directory")
    dtype = "f32" if tiny else args.dtype
    models = {name: registry.load(kind, "tiny" if tiny else getattr(args, name), dtype=dtype, seed=args.seed + i,
                                  progress=True)[1]
              for i, (name, kind) in enumerate(MODEL_FLAGS)}
    cond = registry.conditioner(args.cache, text_encoder=models["umt5"], image_encoder=models["clip"],
                                tokenizer="tiny" if tiny else args.tokenizer)
    experts = []
    for i, name in enumerate(("effect", "quality")):
        kind = EXPERT_KINDS[name]
        if tiny:
            expert = kind.config(models["dit"].config.num_layers, rank=4, alpha=4.0)
        else:
            expert = expert_from_lora(getattr(args, f"{name}_lora"), mask=kind.mask, name=name)
        experts.append(EasyOmnimatte(models["dit"], expert, rngs=nnx.Rngs(i + 1)))
        if not tiny:
            load_lora(getattr(args, f"{name}_lora"), experts[-1])
    return Decomposer(*experts, models["vae"], cond, attention_backend=args.attention)


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
    from omnijax.io.atomic import atomic_path
    from omnijax.omnimatte.decompose import SamplerSettings, decompose_video

    timings = {}
    t0 = time.perf_counter()
    bar = tqdm(total=4, desc="decompose", unit="stage", file=sys.stderr)

    def stage(name):
        bar.set_postfix_str(name)
        return time.perf_counter()

    try:
        s = stage("read")
        video8, masks8, fps = read_inputs(args.video, args.masks, args.max_frames)
        n, h, w, _ = video8.shape
        timings["read"] = time.perf_counter() - s
        bar.update()

        s = stage("load models")
        decomposer = build_decomposer(args)
        timings["load_models"] = time.perf_counter() - s
        bar.update()

        stage("decompose")
        settings = SamplerSettings(steps=args.steps, tau=args.tau, seed=args.seed)
        height = args.height or (TINY_HEIGHT if args.model == "tiny" else 480)
        layers = decompose_video(decomposer, video8, masks8, settings, height=height, prompt=args.prompt,
                                 timings=timings)
        bar.update()

        s = stage("write")
        with atomic_path(args.out, directory=True) as tmp:
            write_outputs(tmp, video8.astype(np.float32) / 255.0, layers.background, layers.alphas,
                          layers.foregrounds, fps)
            timings["write"] = time.perf_counter() - s
            timings["total"] = time.perf_counter() - t0
            report = dict(
                video=os.path.abspath(args.video), masks=[os.path.abspath(m) for m in args.masks], frames=n,
                size=[h, w], fps=fps, processing_size=list(layers.processing_size),
                processing_frames=layers.processing_frames,
                settings=dict(steps=args.steps, tau=args.tau, seed=args.seed, model=args.model, prompt=args.prompt),
                recomposition_psnr_db=layers.psnr, timings_s={k: round(v, 3) for k, v in timings.items()},
                device=str(jax.devices()[0].device_kind))
            with open(os.path.join(tmp, "report.json"), "w") as f:
                json.dump(report, f, indent=1)
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
    p.add_argument("--dit", "--base", dest="dit",
                   help="Wan2.1-Fun-InP DiT: omnijax checkpoint dir or original/diffusers weights")
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
    p.add_argument("--dtype", choices=["bf16", "f32"], default="bf16")
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
