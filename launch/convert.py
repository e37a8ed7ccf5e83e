"""Convert public PyTorch checkpoints into ready omnijax (Flax/orbax) checkpoints.

  python launch/convert.py --source /ckpt/Wan2.1-Fun-1.3B-InP --kind wan_dit --out /ckpt/omnijax/wan_dit_1.3b_inp

EasyOmnimatte's base is Casper (paper §4), a Fun-InP DiT plus Casper's weights (converters/casper.py):
  python launch/convert.py --kind wan_dit --source /ckpt/Wan2.1-Fun-1.3B-InP \
      --casper /ckpt/casper/wan2.1_1.3b_transformer.safetensors --out /ckpt/omnijax/casper_1.3b
  python launch/convert.py --kind wan_dit --source /ckpt/Wan2.1-Fun-14B-InP \
      --casper-lora /ckpt/casper/wan2.1_14b_lora.safetensors --out /ckpt/omnijax/casper_14b
The plain Fun-InP base (no --casper) is the paper's appendix-E ablation.

Sources: a .safetensors file, a directory of (sharded) safetensors, or a .pth (opened weights-only; other pickles
are refused). The key format (original Wan / VideoX-Fun, diffusers, ComfyUI-prefixed) is detected. The output
directory appears only once complete; restore it with `omnijax.checkpoint.load_pretrained(DIR)`.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from converters import registry
from launch import common  # noqa: F401  (sets XLA flags before jax initialises a backend)
from omnijax.io.atomic import unwritable


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--source", required=True, help="checkpoint file or directory")
    p.add_argument("--kind", required=True, choices=sorted(registry.MODEL_KINDS))
    p.add_argument("--out", required=True, help="output directory (written atomically)")
    p.add_argument("--param-dtype", default="bf16", choices=sorted(registry.DTYPES),
                   help="storage dtype of the weights (f32 islands stay f32)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    p.add_argument("--casper", help="wan_dit only: Casper's fine-tuned transformer file (1.3B, VideoX-Fun keys, "
                                    ".safetensors or .pth) replacing --source's weights")
    p.add_argument("--casper-lora",
                   help="wan_dit only: Casper's LoRA (14B, kohya/VideoX-Fun names) merged into --source")
    p.add_argument("--lora-weight", type=float, default=1.0, help="multiplier of --casper-lora (Casper uses 1.0)")
    args = p.parse_args(argv)
    casper = args.casper or args.casper_lora
    if casper and args.kind != "wan_dit":
        print(f"error: --casper / --casper-lora apply to --kind wan_dit, not {args.kind}", file=sys.stderr)
        return 2
    if os.path.exists(args.out) and not args.overwrite:
        print(f"error: {args.out} exists (pass --overwrite to replace it)", file=sys.stderr)
        return 2
    for path in (args.source, args.casper, args.casper_lora):
        if path and not os.path.exists(path):
            print(f"error: {path}: no such file or folder", file=sys.stderr)
            return 2
        if path and not os.access(path, os.R_OK):
            print(f"error: {path}: not readable", file=sys.stderr)
            return 2
    why = unwritable(args.out)
    if why:  # before minutes of reading weights
        print(f"error: --out {args.out}: {why}", file=sys.stderr)
        return 2
    t0 = time.time()
    try:
        out, config = registry.convert_to_folder(args.kind, args.source, args.out, param_dtype=args.param_dtype,
                                                 overwrite=args.overwrite, casper=args.casper,
                                                 casper_lora=args.casper_lora, lora_weight=args.lora_weight,
                                                 progress=True)
    except (ValueError, KeyError, FileNotFoundError) as e:  # ConversionError, CheckpointError, config inference
        msg = str(e.args[0] if isinstance(e, KeyError) and e.args else e)  # a KeyError's str() adds quotes
        print(f"error: {msg if args.source in msg else f'{args.source}: {msg}'}", file=sys.stderr)
        return 2
    print(f"wrote {out} ({args.kind}, {type(config).__name__}) in {time.time() - t0:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
