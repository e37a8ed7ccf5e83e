"""Flux.1 text-to-image: one prompt -> one PNG.

  python launch/sample_flux.py --prompt "a red fox in the snow" --out fox.png \
      --dit /ckpt/flux1-dev.safetensors --vae /ckpt/ae.safetensors \
      --t5 /ckpt/FLUX.1-dev/text_encoder_2 --clip /ckpt/FLUX.1-dev/text_encoder \
      --t5-tokenizer /ckpt/FLUX.1-dev/tokenizer_2 --clip-tokenizer /ckpt/FLUX.1-dev/tokenizer
  python launch/sample_flux.py --prompt "a red fox" --out fox.png --model tiny     # random tiny models, CPU

Weights may be the original files (BFL or diffusers layout, detected) or omnijax checkpoint folders written by
launch/convert.py (kinds flux_dit, flux_vae, t5, clip_l). Stages run one after another and each model is released
when its stage ends: the T5/CLIP encoders are gone before the DiT is loaded, so the 12B DiT (23.8 GB in bf16) never
shares the card with T5-XXL (9.5 GB). Prompt embeddings go through the embedding cache (--cache). The progress bar
counts stages (the sampler is one compiled loop); the timing of each stage is printed at the end. The PNG is
written atomically.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from launch import common  # noqa: E402, F401  (sets XLA flags first)

DEFAULTS = {"tiny": dict(size=32, steps=4), "flux": dict(size=1024, steps=28)}


class InputError(ValueError):
    """Bad user input: printed as one line, exit code 2."""


def load(kind: str, source: str, dtype):
    """(config, model) of one kind from a path: the one place that loads weights (swap for a registry later)."""
    if not os.path.exists(source):
        raise InputError(f"--{kind} weights not found: {source}")
    from converters import registry

    return registry.load(kind, source, dtype=dtype, progress=True)


def text_encoders(args, dtype):
    """(t5, t5 tokenizer, clip, clip tokenizer) for --model tiny (random) or from the given paths."""
    from converters.tokenizer import build_tiny_tokenizer, load_tokenizer
    from omnijax.models.flux.pipeline import tiny_components

    if args.model == "tiny":
        tok_dir = os.path.join(args.cache or os.path.expanduser("~/.cache/omnijax"), "tiny_tokenizer")
        if not os.path.isdir(tok_dir):
            build_tiny_tokenizer(tok_dir)
        _, _, t5, clip = tiny_components(args.seed_models, dtype)
        tok = load_tokenizer(tok_dir)
        return t5, tok, clip, tok
    for name in ("t5", "clip", "t5_tokenizer", "clip_tokenizer"):
        if getattr(args, name) is None:
            raise InputError(f"--{name.replace('_', '-')} is required unless --model tiny")
    for name in ("t5_tokenizer", "clip_tokenizer"):
        if not os.path.isdir(getattr(args, name)):
            raise InputError(f"--{name.replace('_', '-')} must be a tokenizer directory: {getattr(args, name)}")
    return (load("t5", args.t5, dtype)[1], load_tokenizer(args.t5_tokenizer), load("clip_l", args.clip, dtype)[1],
            load_tokenizer(args.clip_tokenizer))


def encode(args, dtype):
    """Prompt -> (txt [1, S, D], y [1, V]); the encoders are local here, so they are freed on return."""
    from omnijax.conditioning import EmbeddingCache
    from omnijax.models.flux.pipeline import FluxConditioner

    t5, t5_tok, clip, clip_tok = text_encoders(args, dtype)
    cache = EmbeddingCache(args.cache) if args.cache else None
    return FluxConditioner(cache, t5, t5_tok, clip, clip_tok, args.max_length)([args.prompt])


def image_models(args, dtype):
    from omnijax.models.flux.pipeline import tiny_components

    if args.model == "tiny":
        dit, vae, _, _ = tiny_components(args.seed_models, dtype)
        return dit, vae
    for name in ("dit", "vae"):
        if getattr(args, name) is None:
            raise InputError(f"--{name} is required unless --model tiny")
    return load("flux_dit", args.dit, dtype)[1], load("flux_vae", args.vae, dtype)[1]


def run(args) -> dict:
    from converters import registry
    from omnijax.io.video import write_image
    from omnijax.models.flux.pipeline import decode_latents, latent_size, sample_latents, to_uint8

    dtype = registry.dtype_of(args.dtype)
    size = DEFAULTS[args.model]["size"]
    height, width = args.height or size, args.width or size
    steps = args.steps or DEFAULTS[args.model]["steps"]
    if steps < 1:
        raise InputError(f"--steps must be >= 1, got {steps}")
    if not args.out.lower().endswith(".png"):
        raise InputError(f"--out must name a .png file, got {args.out}")
    timings = {}
    stages = ["encode prompt", "load DiT + VAE", "sample", "decode", "write"]
    bar = tqdm(total=len(stages), desc="flux", unit="stage", file=sys.stderr)

    def timed(name, fn):
        bar.set_postfix_str(name)
        t = time.perf_counter()
        out = jax.block_until_ready(fn())
        timings[name] = time.perf_counter() - t
        bar.update()
        return out

    try:
        t0 = time.perf_counter()
        txt, y = timed("encode prompt", lambda: encode(args, dtype))
        gc.collect()  # the text encoders' device buffers go before the DiT arrives
        dit, vae = timed("load DiT + VAE", lambda: image_models(args, dtype))
        try:
            h, w = latent_size(vae.config, height, width)
        except ValueError as e:
            raise InputError(str(e)) from e
        packed = timed("sample", lambda: sample_latents(dit, jnp.asarray(txt, dtype), jnp.asarray(y, dtype), h=h,
                                                        w=w, num_steps=steps, guidance=args.guidance, seed=args.seed))
        images = timed("decode", lambda: decode_latents(vae, packed, h=h, w=w))
        timed("write", lambda: write_image(args.out, to_uint8(images[0])))
        timings["total"] = time.perf_counter() - t0
    finally:
        bar.close()
    return dict(out=os.path.abspath(args.out), size=[height, width], steps=steps, guidance=args.guidance,
                seed=args.seed, timings_s={k: round(v, 3) for k, v in timings.items()})


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--prompt", required=True)
    p.add_argument("--out", required=True, help="output .png (written atomically)")
    p.add_argument("--model", choices=["flux", "tiny"], default="flux", help="tiny: random tiny models (smoke runs)")
    p.add_argument("--dit", help="Flux DiT: flux1-dev.safetensors, diffusers transformer/ or omnijax dir")
    p.add_argument("--vae", help="Flux VAE: ae.safetensors, diffusers vae/ or omnijax dir")
    p.add_argument("--t5", help="T5-XXL encoder: transformers T5EncoderModel (text_encoder_2/) or omnijax dir")
    p.add_argument("--clip", help="CLIP-L text encoder: transformers CLIPTextModel (text_encoder/) or omnijax dir")
    p.add_argument("--t5-tokenizer", help="T5 tokenizer directory (tokenizer_2/)")
    p.add_argument("--clip-tokenizer", help="CLIP tokenizer directory (tokenizer/)")
    p.add_argument("--height", type=int, default=None, help="image height (1024; 32 for tiny)")
    p.add_argument("--width", type=int, default=None, help="image width (1024; 32 for tiny)")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (28; 4 for tiny; schnell: 4)")
    p.add_argument("--guidance", type=float, default=3.5, help="guidance strength (dev; ignored by schnell)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--seed-models", type=int, default=0, help=argparse.SUPPRESS)  # tiny random weights
    p.add_argument("--max-length", type=int, default=512, help="T5 tokens (512 dev; BFL uses 256 for schnell)")
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
    print(f"wrote {report['out']} ({report['size'][0]}x{report['size'][1]}, {report['steps']} steps) in "
          f"{t['total']:.1f}s (" + ", ".join(f"{k} {v:.2f}s" for k, v in t.items() if k != "total") + ")")
    return 0


if __name__ == "__main__":
    sys.exit(main())
