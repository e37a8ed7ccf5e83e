"""Convert public PyTorch checkpoints into ready omnijax (Flax/orbax) checkpoints.

  python launch/convert.py --source /ckpt/Wan2.1-Fun-1.3B-InP --kind wan_dit --out /ckpt/omnijax/wan_dit_1.3b_inp

Sources: a .safetensors file, a directory of (sharded) safetensors, or a .pth (opened weights-only; other pickles
are refused). The key format (original Wan / VideoX-Fun, diffusers, ComfyUI-prefixed) is detected. The output
directory appears only once complete; restore it with `omnijax.checkpoint.load_pretrained(DIR)`.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import converters
from converters import registry
from omnijax.checkpoint import save_pretrained


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--source", required=True, help="checkpoint file or directory")
    p.add_argument("--kind", required=True, choices=sorted(registry.MODEL_KINDS))
    p.add_argument("--out", required=True, help="output directory (written atomically)")
    p.add_argument("--param-dtype", default="bf16", choices=sorted(registry.DTYPES),
                   help="storage dtype of the weights (f32 islands stay f32)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    args = p.parse_args(argv)
    if os.path.exists(args.out) and not args.overwrite:
        print(f"error: {args.out} exists (pass --overwrite to replace it)", file=sys.stderr)
        return 2
    t0 = time.time()
    try:
        config, model = registry.load(args.kind, args.source, dtype=args.param_dtype, progress=True)
    except (converters.ConversionError, converters.CheckpointError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    out = save_pretrained(args.out, model, args.kind, overwrite=args.overwrite, source=os.path.abspath(args.source))
    print(f"wrote {out} ({args.kind}, {type(config).__name__}) in {time.time() - t0:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
