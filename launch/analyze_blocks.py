"""Block-wise effect association analysis of a Wan inpainting DiT (paper §3.2; spec easyomnimatte.md §6).

Writes block_analysis.json (C_b per block, per-sample curves, the three-stage split, the Effect Expert's K),
block_analysis.png (the curve with the stages) and block_analysis_maps.png (per-stage mean S maps of the
first sample). With --emit-k the last stdout line is K alone, for scripts.

  python launch/analyze_blocks.py --model tiny --out /tmp/analysis --emit-k          # random tiny model, CPU
  python launch/analyze_blocks.py --checkpoint /ckpt/Wan2.1-Fun-1.3B-InP --vae /ckpt/Wan2.1_VAE.pth \
      --samples 1000 --frames 81 --size 480x832 --out runs/analysis                 # the paper's setting
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from omnijax.models.wan.dit import WanDiT  # noqa: E402
from omnijax.models.wan.variants import variant  # noqa: E402
from omnijax.omnimatte import analysis  # noqa: E402


def _args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="tiny", help="random model variant: tiny, 1.3b, 14b (the -inp form is used)")
    p.add_argument("--layers", type=int, default=None, help="override the number of blocks (random models)")
    p.add_argument("--checkpoint", default=None, help="real DiT weights (converters.load_wan_dit)")
    p.add_argument("--vae", default=None, help="Wan VAE weights (converters.load_wan_vae); default: a stand-in "
                                                "pooling encoder, meaningful for random-model smoke runs only")
    p.add_argument("--samples", type=int, default=8)
    p.add_argument("--frames", type=int, default=9, help="4k+1 pixel frames per sample")
    p.add_argument("--size", default="64x64", help="HxW in pixels (multiples of 16)")
    p.add_argument("--sigma", type=float, default=0.5, help="noise level of the probed step (t = 1000 sigma)")
    p.add_argument("--token-threshold", type=float, default=0.5, help="effect fraction that makes a token count")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--backend", default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    p.add_argument("--emit-k", action="store_true", help="print the Effect Expert's K as the last line")
    return p.parse_args(argv)


def _model(args):
    dtype = jnp.dtype(args.dtype)
    if args.checkpoint:
        from converters import load_wan_dit

        _, model = load_wan_dit(args.checkpoint, dtype=dtype, param_dtype=dtype)
        return model
    name = args.model if args.model.endswith(("-inp", "-i2v")) else f"{args.model}-inp"
    cfg = variant(name, **({} if args.layers is None else {"num_layers": args.layers}))
    return WanDiT(cfg, dtype=dtype, param_dtype=dtype, rngs=nnx.Rngs(args.seed))


def _encoder(args):
    if not args.vae:
        return analysis.pool_encoder(seed=args.seed)
    from converters import load_wan_vae

    _, vae = load_wan_vae(args.vae)
    return lambda video: vae.encode(video[None])[0]


def _samples(args, height, width):
    # The procedural dataset of the `data` package (spec §5) is the intended source; until it is wired in here,
    # the analysis uses its own small built-in generator (moving disk with a cast shadow).
    return analysis.toy_effect_samples(args.samples, frames=args.frames, height=height, width=width, seed=args.seed)


def _atomic(path, write):
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-", suffix=os.path.splitext(path)[1])
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _plots(res, out):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    c = np.asarray(res["contribution"])
    fig, ax = plt.subplots(figsize=(8, 3.2))
    for (a, b), colour in zip(res["stages"], ("#dde8f5", "#f7e3c9", "#e0f0dc")):
        ax.axvspan(a - 0.5, b - 0.5, color=colour)
    for curve in res["per_sample"][:50]:
        ax.plot(curve, color="0.75", lw=0.6)
    ax.plot(c, "o-", color="C3", lw=2, label="mean $C_b$")
    ax.set_xlabel("block b")
    ax.set_ylabel("contribution $C_b$")
    ax.set_title(f"effect association ({res['num_samples']} videos); Effect Expert K = {res['effect_expert_k']}")
    ax.legend(loc="upper right")
    fig.tight_layout()
    _atomic(os.path.join(out, "block_analysis.png"), lambda p: fig.savefig(p, dpi=120, format="png"))
    plt.close(fig)
    if res["maps"]:
        maps = res["maps"][0]  # [blocks, T, h, w]
        mid = maps.shape[1] // 2
        fig, axes = plt.subplots(1, 3, figsize=(9, 3))
        for i, ((a, b), ax) in enumerate(zip(res["stages"], axes)):
            ax.imshow(maps[a:b, mid].mean(0), cmap="magma")
            ax.set_title(f"stage {i + 1}: blocks {a}-{b - 1}")
            ax.axis("off")
        fig.tight_layout()
        _atomic(os.path.join(out, "block_analysis_maps.png"), lambda p: fig.savefig(p, dpi=120, format="png"))
        plt.close(fig)


def main(argv=None):
    args = _args(argv)
    height, width = (int(v) for v in args.size.lower().split("x"))
    os.makedirs(args.out, exist_ok=True)
    model = _model(args)
    res = analysis.analyze(model, _samples(args, height, width), _encoder(args), sigma=args.sigma, seed=args.seed,
                           backend=args.backend, token_threshold=args.token_threshold,
                           progress=lambda i: print(f"sample {i + 1}/{args.samples}", file=sys.stderr))
    report = {k: v for k, v in res.items() if k != "maps"}
    report.update(model=args.checkpoint or args.model, num_blocks=len(res["contribution"]), frames=args.frames,
                  size=[height, width], data="builtin toy generator", encoder="vae" if args.vae else "pool stand-in",
                  device=jax.devices()[0].platform)
    _atomic(os.path.join(args.out, "block_analysis.json"),
            lambda p: open(p, "w").write(json.dumps(report, indent=1)))
    _plots(res, args.out)
    print(json.dumps({k: report[k] for k in ("troughs", "stages", "effect_expert_k", "method")}))
    if args.emit_k:
        print(res["effect_expert_k"])


if __name__ == "__main__":
    main()
