"""Fill the conditioning cache: umT5 prompt embeddings and first-frame CLIP features (omnijax.conditioning).

  python launch/encode.py --cache /data/cond --prompts "a quiet street" "" \
      --video clips/*.mp4 --images still.png \
      --umt5 /ckpt/Wan2.1/models_t5_umt5-xxl-enc-bf16.pth --tokenizer /ckpt/Wan2.1/google/umt5-xxl \
      --clip /ckpt/Wan2.1/models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth
  python launch/encode.py --cache /tmp/cond --model tiny --prompts "a dog" --video clip.mp4   # random tiny encoders

Encoders are PyTorch-side checkpoints (converted on load) or omnijax checkpoints from launch/convert.py.
Entries already in the cache are skipped. DIR/encoders.json records the encoder identities, so a reader
without the models (Conditioner(text_id=..., image_id=...)) finds the same entries.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from converters import registry
from launch import common  # noqa: F401,I001  (sets XLA flags before jax initialises a backend)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cache", required=True, help="cache directory (created if missing)")
    p.add_argument("--prompts", nargs="*", default=[], help="prompts to encode ('' is the empty prompt)")
    p.add_argument("--prompts-file", help="a text file with one prompt per line")
    p.add_argument("--images", nargs="*", default=[], help="image files (their pixels are the CLIP input)")
    p.add_argument("--video", nargs="*", default=[], help="videos (their first frame is the CLIP input)")
    p.add_argument("--model", choices=["wan", "tiny"], default="wan", help="tiny: random tiny encoders (tests)")
    p.add_argument("--umt5", help="umT5 checkpoint (Wan .pth, transformers, or omnijax directory)")
    p.add_argument("--clip", help="CLIP checkpoint (Wan open-clip .pth, open_clip, transformers, or omnijax dir)")
    p.add_argument("--tokenizer", help="tokenizer directory (Wan: google/umt5-xxl)")
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--dtype", choices=["bf16", "f32"], default="bf16")
    args = p.parse_args(argv)

    from converters.tokenizer import build_tiny_tokenizer, load_tokenizer
    from omnijax.conditioning import Conditioner, EmbeddingCache, fill_cache

    prompts = list(args.prompts)
    if args.prompts_file:
        with open(args.prompts_file) as f:
            prompts += [line.rstrip("\n") for line in f]
    frames = [*args.images, *args.video]
    if not prompts and not frames:
        p.error("nothing to encode: give --prompts/--prompts-file and/or --images/--video")
    source = (lambda path: "tiny") if args.model == "tiny" else (lambda path: path)
    os.makedirs(args.cache, exist_ok=True)
    cond = Conditioner(EmbeddingCache(args.cache), max_length=args.max_length, batch_size=args.batch_size)
    t0 = time.time()
    try:
        if prompts:
            if args.model == "tiny":
                tok_dir = args.tokenizer or os.path.join(args.cache, "tiny_tokenizer")
                if not os.path.isdir(tok_dir):
                    build_tiny_tokenizer(tok_dir)
            elif not (args.umt5 and args.tokenizer):
                p.error("prompts need --umt5 and --tokenizer (or --model tiny)")
            else:
                tok_dir = args.tokenizer
            cond.text_encoder = registry.load("umt5", source(args.umt5), dtype=args.dtype, progress=True)[1]
            cond.tokenizer = load_tokenizer(tok_dir)
        if frames:
            if args.model != "tiny" and not args.clip:
                p.error("images/videos need --clip (or --model tiny)")
            cond.image_encoder = registry.load("wan_clip", source(args.clip), dtype=args.dtype, progress=True)[1]
        ids = fill_cache(cond, prompts, frames, text_source=args.umt5 or "tiny", image_source=args.clip or "tiny")
    except (ValueError, FileNotFoundError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(json.dumps({"cache": os.path.abspath(args.cache), "prompts": len(prompts), "frames": len(frames),
                      "seconds": round(time.time() - t0, 1), **{k: v["id"] for k, v in ids.items()}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
