"""Check an omnijax model against its PyTorch reference on the same weights, block by block.

  python launch/parity.py --kind wan_dit --source /ckpt/Wan2.1-Fun-1.3B-InP --dtype bf16 --device gpu \
      --size 81x480x832 --out runs/parity/dit_bf16.json
  python launch/parity.py --kind wan_vae --source /ckpt/Wan2.1_VAE.pth --converted /ckpt/omnijax/vae \
      --size 17x256x256 --out vae.json

Builds the PyTorch reference (diffusers / transformers) from --source, loads the omnijax model from --converted
(a launch/convert.py folder) or from --source, feeds both the same seeded inputs and compares the hidden state
after every stage and the output (relative L2, max abs error, cosine). Tolerances (converters/parity): f32 rel. L2
<= 1e-5; bf16 within 2x PyTorch's own bf16-vs-f32 error at that stage. Prints a table, writes the JSON report
(atomically) and a PNG of the error per stage beside it. Exit status: 0 all within tolerance, 1 a stage over
tolerance (named on the last line), 2 bad input or a missing dependency.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

# The reference and JAX share one GPU: JAX must not grab 75 % of it before torch has run and released its memory.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

from converters import registry  # noqa: E402
from launch import common  # noqa: E402, F401  (sets XLA flags first)
from omnijax.io.atomic import atomic_write  # noqa: E402


def load_jax_model(kind: str, path: str, dtype):
    """(config, omnijax model) of `kind` from a converted folder or the PyTorch files (the model registry's job)."""
    return registry.load(kind, path, dtype=dtype, param_dtype=dtype)


def _write_json(path: str, report: dict):
    atomic_write(path, json.dumps(report, indent=1))


def _args(argv, kinds):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kind", required=True, choices=sorted(kinds))
    p.add_argument("--source", required=True, help="PyTorch-side checkpoint: file or folder")
    p.add_argument("--converted", default=None, help="omnijax folder (launch/convert.py) to test instead of --source")
    p.add_argument("--dtype", default="f32", choices=["f32", "bf16"])
    p.add_argument("--size", default=None, help="input size; per kind: " + "; ".join(
        f"{k}: {a.size_help}, default {a.default_size}" for k, a in sorted(kinds.items())))
    p.add_argument("--device", default="cpu", choices=["cpu", "gpu"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--f32-tol", type=float, default=None,
                   help="rel. L2 bound in f32 (default: the kind's, 1e-5; flux_dit 1e-4)")
    p.add_argument("--bf16-k", type=float, default=None, help="bf16 bound as a multiple of torch's own bf16 error")
    p.add_argument("--out", required=True, help="report .json (a .png of the per-stage error is written beside it)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    import converters
    from converters import parity

    kinds = parity.adapters()
    args = _args(argv, kinds)
    for path in (args.source, args.converted):
        if path is not None and not os.path.exists(path):
            print(f"error: not found: {path}", file=sys.stderr)
            return 2
    if args.size is not None:
        try:
            kinds[args.kind].parse_size(args.size)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    opts = {k: v for k, v in (("f32_tol", args.f32_tol), ("k", args.bf16_k)) if v is not None}
    t0 = time.perf_counter()
    try:
        report = parity.run_parity(args.kind, args.source, load_jax=load_jax_model, converted=args.converted,
                                   dtype=args.dtype, size=args.size, device=args.device, seed=args.seed,
                                   log=lambda s: print(s, file=sys.stderr), **opts)
    except parity.MissingReference as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (parity.ReferenceBuildError, converters.ConversionError, converters.CheckpointError, ValueError,
            FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    report["wall_s"] = round(time.perf_counter() - t0, 2)
    if args.converted:
        from omnijax.checkpoint import read_header

        report["converted_param_dtypes"] = read_header(args.converted).get("param_dtypes")
    png = os.path.splitext(args.out)[0] + ".png"
    report["plot"] = png
    _write_json(args.out, report)
    parity.plot(report, png)
    if args.dtype == "f32" and "bfloat16" in (report.get("converted_param_dtypes") or []):
        print("note: the converted folder stores bf16 weights, so f32 parity cannot hold; compare it with --dtype "
              "bf16, or convert with launch/convert.py --param-dtype f32")
    print(parity.summary_table(report))
    print(f"wall {report['wall_s']} s (torch {report['torch_s']} s, jax {report['jax_s']} s); report {args.out}")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
