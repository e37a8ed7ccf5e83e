"""DiffDecompose: one alpha-composited image -> its background and foreground layers.

  python launch/decompose_image.py --image composite.png --out DIR --blend watermark \
      --dit /ckpt/flux1-dev.safetensors --vae /ckpt/ae.safetensors \
      --lora runs/dd/lora_diffdecompose_omnijax.safetensors \
      --t5 /ckpt/FLUX.1-dev/text_encoder_2 --clip /ckpt/FLUX.1-dev/text_encoder \
      --t5-tokenizer /ckpt/FLUX.1-dev/tokenizer_2 --clip-tokenizer /ckpt/FLUX.1-dev/tokenizer
  python launch/decompose_image.py --image composite.png --out DIR --model tiny      # random tiny models, CPU

DIR (written atomically: built in a temporary sibling, then renamed; an existing non-empty DIR is an error, never
deleted) holds background.png, foreground.png (the RGB foreground layer of the README's DiffDecompose section:
a·F + (1 − a)·N over the subtask's neutral colour N, black except for X-ray where it is white), preview.png (a
labelled sheet: input, foreground, background) and report.json (prompt, sizes, settings, timings by stage).
The image is processed at --size (default 512 for Flux, as the paper trains; 64 for tiny) and the layers are
resized back to the input's size. The prompt is --prompt, else the paper's template for --blend (the template and
descriptions stored in the LoRA file when it has them). The foreground position ids and LoRA switches are those
stored in the LoRA file (omnijax format), else --fg-ids. Models load one stage at a time; T5/CLIP are released
before the DiT loads.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from launch import common  # noqa: E402,F401  (sets XLA flags first)
from omnijax.io.atomic import unwritable  # noqa: E402


class InputError(ValueError):
    """Bad user input: printed as one line, exit code 2."""


def read_image(path: str) -> np.ndarray:
    """RGB float32 [H, W, 3] in [0, 1]; an alpha channel is dropped (the composite is an opaque image)."""
    from PIL import Image, UnidentifiedImageError

    if not os.path.isfile(path):
        raise InputError(f"--image not found: {path}")
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"), np.float32) / 255.0
    except (UnidentifiedImageError, OSError) as e:
        raise InputError(f"--image {path} is not a readable image ({e.__class__.__name__})") from None


def parse_size(text: str) -> tuple[int, int]:
    """"512" or "WxH" -> (height, width), multiples of 16."""
    w, _, h = text.partition("x")
    try:
        height, width = (int(h), int(w)) if h else (int(w), int(w))
    except ValueError:
        raise InputError(f"--size must be N or WxH, got {text!r}") from None
    if height <= 0 or width <= 0 or height % 16 or width % 16:
        raise InputError(f"--size {width}x{height}: both sides must be positive multiples of 16")
    return height, width


def lora_metadata(args):
    """(ICDSettings, stored prompt block or None) from the --lora file's header (else --fg-ids)."""
    from omnijax.diffdecompose.lora_io import read_extra
    from omnijax.diffdecompose.model import ICDSettings
    from omnijax.omnimatte.lora_io import LoRAFileError

    extra = {}
    if args.lora:
        try:
            extra = read_extra(args.lora)
        except LoRAFileError as e:
            raise InputError(str(e)) from None
    icd = ICDSettings.from_dict(extra["icd"]) if "icd" in extra else ICDSettings(fg_ids=args.fg_ids)
    return icd, extra.get("prompt")


def load_lora(args, config):
    from omnijax.models.flux.lora_files import load_flux_lora
    from omnijax.omnimatte.lora_io import LoRAFileError

    if not args.lora:
        return None
    try:
        return load_flux_lora(args.lora, config)
    except LoRAFileError as e:
        raise InputError(str(e)) from None


def text_encoders(args):
    from converters import registry
    from converters.tokenizer import build_tiny_tokenizer, load_tokenizer

    if args.model == "tiny":
        tok_dir = os.path.join(args.cache or os.path.expanduser("~/.cache/omnijax"), "tiny_tokenizer")
        if not os.path.isdir(tok_dir):
            build_tiny_tokenizer(tok_dir)
        tok = load_tokenizer(tok_dir)
        return (registry.load("t5", "tiny", dtype=args.dtype, seed=2)[1], tok,
                registry.load("clip_l", "tiny", dtype=args.dtype, seed=3)[1], tok)
    return (registry.load("t5", args.t5, dtype=args.dtype)[1], load_tokenizer(args.t5_tokenizer),
            registry.load("clip_l", args.clip, dtype=args.dtype)[1], load_tokenizer(args.clip_tokenizer))


def encode_prompt(args, prompt: str):
    from omnijax.conditioning import EmbeddingCache
    from omnijax.models.flux.pipeline import FluxConditioner

    t5, t5_tok, clip, clip_tok = text_encoders(args)
    cache = EmbeddingCache(args.cache) if args.cache else None
    return FluxConditioner(cache, t5, t5_tok, clip, clip_tok, args.max_length)([prompt])


def image_models(args):
    from converters import registry

    if args.model == "tiny":
        return (registry.load("flux_dit", "tiny", dtype=args.dtype, seed=0)[1],
                registry.load("flux_vae", "tiny", dtype=args.dtype, seed=1)[1])
    return (registry.load("flux_dit", args.dit, dtype=args.dtype, progress=True)[1],
            registry.load("flux_vae", args.vae, dtype=args.dtype)[1])


def check_model_args(args):
    """Every weight path is given and exists (checked before anything loads)."""
    if args.model == "tiny":
        return
    for name in ("dit", "vae", "t5", "clip", "t5_tokenizer", "clip_tokenizer"):
        value = getattr(args, name)
        if value is None:
            raise InputError(f"--{name.replace('_', '-')} is required unless --model tiny")
        if not os.path.exists(value):
            raise InputError(f"--{name.replace('_', '-')} not found: {value}")


def check_out(out: str):
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise InputError(f"--out {out} exists and is not an empty folder (nothing is overwritten)")
    why = unwritable(out)
    if why:
        raise InputError(f"--out {out}: {why}")


def run(args) -> dict:
    from data.alphablend import PROMPT_TEMPLATE, SUBTASKS, build_prompt, resize_image
    from omnijax.diffdecompose.model import DiffDecomposer
    from omnijax.diffdecompose.preview import labelled_sheet
    from omnijax.diffdecompose.sampling import Decomposer
    from omnijax.io.atomic import atomic_path
    from omnijax.io.video import write_image

    check_out(args.out)
    image = read_image(args.image)
    height, width = parse_size(args.size or ("64" if args.model == "tiny" else "512"))
    steps = args.steps or (4 if args.model == "tiny" else 28)
    if steps < 1:
        raise InputError(f"--steps must be >= 1, got {steps}")
    if args.blend not in SUBTASKS:
        raise InputError(f"--blend must be one of {', '.join(SUBTASKS)}, got {args.blend!r}")
    if args.lora and not os.path.isfile(args.lora):
        raise InputError(f"--lora not found: {args.lora}")
    check_model_args(args)
    timings = {}

    def timed(name, fn):
        t = time.perf_counter()
        out = jax.block_until_ready(fn())
        timings[name] = round(time.perf_counter() - t, 3)
        return out

    t0 = time.perf_counter()
    icd, stored_prompt = lora_metadata(args)
    prompt = args.prompt
    if prompt is None:
        block = stored_prompt or {}
        desc = {k: tuple(v) for k, v in dict(block.get("descriptions", {})).items()}
        prompt = build_prompt(args.blend, block.get("template", PROMPT_TEMPLATE), desc)
    # The text encoders are built, used and dropped inside this stage, before the DiT arrives.
    txt, y = timed("encode_prompt", lambda: encode_prompt(args, prompt))
    gc.collect()
    dit, vae = timed("load_dit_vae", lambda: image_models(args))
    lora = timed("load_lora", lambda: load_lora(args, dit.config))
    if txt.shape[-1] != dit.config.context_in_dim or y.shape[-1] != dit.config.vec_in_dim:
        raise InputError(f"the text encoders give {txt.shape[-1]}/{y.shape[-1]} wide embeddings, the DiT expects "
                         f"{dit.config.context_in_dim}/{dit.config.vec_in_dim}")
    model = DiffDecomposer(dit, lora, icd)
    dec = Decomposer(model, vae, num_steps=steps, guidance=args.guidance, mu_tokens=args.mu_tokens)
    work = resize_image(image, height, width)
    out = dec(work[None], txt, y, seed=args.seed)
    timings.update({k.removesuffix("_s"): round(v, 3) for k, v in out["timings"].items()})
    H, W = image.shape[:2]
    fg, bg = (resize_image(out[k][0], H, W) if (H, W) != (height, width) else out[k][0]
              for k in ("foreground", "background"))
    report = dict(image=os.path.abspath(args.image), prompt=prompt, blend=args.blend, input_size=[H, W],
                  processed_size=[height, width], steps=steps, guidance=args.guidance, seed=args.seed,
                  model=args.model, lora=args.lora, icd=icd.to_dict(), mu_tokens=args.mu_tokens,
                  foreground_layer="RGB a*F + (1 - a)*N over the subtask's neutral colour N (README, DiffDecompose)")
    with atomic_path(args.out, directory=True) as tmp:
        t = time.perf_counter()
        write_image(os.path.join(tmp, "background.png"), bg)
        write_image(os.path.join(tmp, "foreground.png"), fg)
        write_image(os.path.join(tmp, "preview.png"), labelled_sheet([[("input", image), ("foreground", fg),
                                                                         ("background", bg)]]))
        timings["write"] = round(time.perf_counter() - t, 3)
        timings["total"] = round(time.perf_counter() - t0, 3)
        report["timings_s"] = timings
        with open(os.path.join(tmp, "report.json"), "w") as f:
            json.dump(report, f, indent=1)
    return report


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--image", required=True, help="the composite (any image Pillow reads)")
    p.add_argument("--out", required=True, help="output folder (must not exist or be empty)")
    p.add_argument("--prompt", default=None, help="text prompt (default: the paper's template for --blend)")
    p.add_argument("--blend", default="watermark", help="subtask / blending type: flare, occlusion, watermark, "
                   "glassware, cell, xray")
    p.add_argument("--model", choices=["flux", "tiny"], default="flux", help="tiny: random tiny models (smoke runs)")
    p.add_argument("--dit", help="Flux DiT: flux1-dev.safetensors, diffusers transformer/ or omnijax dir")
    p.add_argument("--vae", help="Flux VAE: ae.safetensors, diffusers vae/ or omnijax dir")
    p.add_argument("--t5", help="T5-XXL encoder (text_encoder_2/) or omnijax dir")
    p.add_argument("--clip", help="CLIP-L text encoder (text_encoder/) or omnijax dir")
    p.add_argument("--t5-tokenizer", help="T5 tokenizer directory (tokenizer_2/)")
    p.add_argument("--clip-tokenizer", help="CLIP tokenizer directory (tokenizer/)")
    p.add_argument("--lora", help="the trained DiffDecompose LoRA (launch/train.py export; any Flux LoRA format)")
    p.add_argument("--fg-ids", choices=["panel", "axis0"], default="panel",
                   help="foreground position ids when the LoRA file does not record them")
    p.add_argument("--size", default=None, help="processing size N or WxH, multiples of 16 (512; 64 for tiny)")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (28; 4 for tiny)")
    p.add_argument("--guidance", type=float, default=3.5, help="guidance strength (dev; ignored by schnell)")
    p.add_argument("--mu-tokens", choices=["layer", "both"], default="layer",
                   help="time-shift mu from one layer's tokens (default) or both layers'")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-length", type=int, default=512, help="T5 tokens (512 dev)")
    p.add_argument("--cache", default=os.path.expanduser("~/.cache/omnijax/conditioning"),
                   help="embedding cache directory ('' to disable)")
    p.add_argument("--dtype", choices=["bf16", "f32"], default="bf16")
    args = p.parse_args(argv)
    try:
        report = run(args)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    t = report["timings_s"]
    print(f"wrote {os.path.abspath(args.out)} ({report['processed_size'][1]}x{report['processed_size'][0]}, "
          f"{report['steps']} steps) in {t['total']:.1f}s (" +
          ", ".join(f"{k} {v:.2f}s" for k, v in t.items() if k != "total") + ")")
    return 0


if __name__ == "__main__":
    sys.exit(main())
