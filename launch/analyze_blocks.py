"""Block-wise effect association analysis of a Wan inpainting DiT (paper §3.2; spec easyomnimatte.md §6).

The data are the project's synthetic composites (data.synthetic.SyntheticOmnimatte, spec §5): procedural
foregrounds and backgrounds by default, or VideoMatte240K-style foregrounds (--fg-dir, fgr/ + pha/; its
--fg-split subfolder, held-out "test" clips by default, as in the paper's appendix C) and a folder of background
videos (--bg-dir). Samples go through the trainer's input pipeline (data.pipeline: keys, fit_to_latent); their
effect_mask (pseudo-shadow minus the dilated object) is the M^e of eq. 3-4.

Writes block_analysis.json (C_b per block, per-sample curves, the three-stage split, the Effect Expert's K, the
data source), block_analysis.png (the curve with the stages) and block_analysis_maps.png (per-stage mean S maps
of the first sample). With --emit-k the last stdout line is K alone, for scripts. Bad input (size, frames,
folders) ends with one "error: ..." line on stderr and exit status 2.

The base is probed with the conditioning of training and sampling: the umT5 embedding of the empty prompt and the
CLIP features of each sample's frame 0 (--umt5, --tokenizer, --clip; tiny random encoders with --model), on z_t,
the sample's own video latent noised to --sigma (omnijax/omnimatte/analysis.py says why).

  python launch/analyze_blocks.py --model tiny --layers 6 --out /tmp/analysis --emit-k   # random model, CPU
  python launch/analyze_blocks.py --dit /ckpt/omnijax/casper_1.3b --vae /ckpt/Wan2.1_VAE.pth \
      --umt5 /ckpt/models_t5_umt5-xxl-enc-bf16.pth --tokenizer /ckpt/google/umt5-xxl \
      --clip /ckpt/models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth \
      --fg-dir /data/VideoMatte240K_JPEG_HD --bg-dir /data/backgrounds --workers 12 \
      --samples 1000 --frames 81 --size 480x832 --out runs/analysis                 # the paper's setting
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

from converters import registry
from data.composite import CompositeConfig
from data.pipeline import latent_friendly, make_pipeline
from data.sources import VideoFolderSource, VideoMatteSource
from data.synthetic import SyntheticOmnimatte
from launch import common  # noqa: F401,I001  (sets XLA flags before jax initialises a backend)
from omnijax.io.atomic import atomic_path
from omnijax.io.video import VideoError
from omnijax.models.wan.variants import variant
from omnijax.omnimatte import analysis


def _args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="tiny", help="random model variant: tiny, 1.3b, 14b (the -inp form is used)")
    p.add_argument("--layers", type=int, default=None, help="override the number of blocks (random models)")
    p.add_argument("--dit", "--checkpoint", dest="dit", default=None,
                   help="DiT weights: a converted omnijax folder or the PyTorch files")
    p.add_argument("--umt5", default=None, help="umT5-XXL encoder (needed with --dit; random tiny with --model)")
    p.add_argument("--tokenizer", default=None, help="umT5 tokenizer directory (needed with --dit)")
    p.add_argument("--clip", default=None, help="CLIP ViT-H/14 vision tower (needed with --dit)")
    p.add_argument("--cache", default=None, help="conditioning embedding cache directory (omnijax/conditioning.py)")
    p.add_argument("--vae", default=None, help="Wan VAE: a converted omnijax folder or the .pth; default: a stand-in "
                                                "pooling encoder, meaningful for random-model smoke runs only")
    p.add_argument("--samples", type=int, default=8, help="synthetic videos to analyse (the paper: 1000)")
    p.add_argument("--frames", type=int, default=9, help="4k+1 pixel frames per sample")
    p.add_argument("--size", default="64x64", help="HxW in pixels (multiples of 16)")
    p.add_argument("--fg-dir", default=None, help="VideoMatte240K-style foregrounds (fgr/ + pha/ clips); "
                                                   "default: procedural foregrounds")
    p.add_argument("--fg-split", default="test", help="subfolder of --fg-dir used when it has no fgr/ itself")
    p.add_argument("--bg-dir", default=None, help="folder of background videos; default: procedural backgrounds")
    p.add_argument("--workers", type=int, default=0, help="processes generating samples ahead (grain); 0: inline")
    p.add_argument("--sigma", type=float, default=0.5, help="noise level of the probed step (t = 1000 sigma)")
    p.add_argument("--token-threshold", type=float, default=None,
                   help="binarise each token's effect fraction at this value; default: weigh tokens by it (exact)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--backend", default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    p.add_argument("--emit-k", action="store_true", help="print the Effect Expert's K as the last line")
    return p.parse_args(argv)


def _model(args):
    if args.dit:
        _, model = registry.load("wan_dit", args.dit, dtype=args.dtype, progress=True)
        _check_blocks(model.config.num_layers, args.dit)
        return model
    name = args.model if args.model.endswith(("-inp", "-i2v")) else f"{args.model}-inp"
    cfg = variant(name, **({} if args.layers is None else {"num_layers": args.layers}))
    _check_blocks(cfg.num_layers, f"--model {args.model}")  # before building: a 14B model takes a while
    return registry.load("wan_dit", "tiny", config=cfg, dtype=args.dtype, seed=args.seed)[1]


def _check_blocks(n, what):
    if n < 3:
        raise InputError(f"{what} has {n} blocks; the three-stage split needs at least 3 (random models: --layers)")


def _check_encoders(args):
    missing = [f"--{k}" for k in ("umt5", "tokenizer", "clip") if not getattr(args, k)]
    if args.dit and missing:
        raise InputError(f"--dit needs {', '.join(missing)}: the block analysis probes the base with the "
                         "conditioning it is trained and sampled with (empty-prompt umT5 embedding, CLIP of frame 0)")


def _conditioner(args):
    """The Conditioner of training and sampling: umT5 (+ tokenizer) and CLIP, tiny random ones for --model."""
    if args.dit:
        umt5 = registry.load("umt5", args.umt5, dtype=args.dtype, progress=True)[1]
        clip = registry.load("wan_clip", args.clip, dtype=args.dtype, progress=True)[1]
        tokenizer = args.tokenizer
    else:
        umt5 = registry.load("umt5", "tiny", dtype=args.dtype, seed=args.seed + 2)[1]
        clip = registry.load("wan_clip", "tiny", dtype=args.dtype, seed=args.seed + 3)[1]
        tokenizer = "tiny"
    return registry.conditioner(args.cache, text_encoder=umt5, image_encoder=clip, tokenizer=tokenizer)


def _encoder(args):
    if not args.vae:
        return analysis.pool_encoder(seed=args.seed)
    from omnijax.omnimatte.decompose import jit_module_fn

    _, vae = registry.load("wan_vae", args.vae, dtype=args.dtype, progress=True)
    encode = jit_module_fn(vae, lambda m, video: m.encode(video[None])[0])  # one compile per clip shape
    return lambda video: encode(jnp.asarray(video, jnp.float32))


class InputError(ValueError):
    """Bad command-line input: reported as one "error:" line, exit status 2."""


def dataset(args) -> SyntheticOmnimatte:
    """The synthetic dataset the analysis reads: args.samples composites at args.frames x args.size."""
    try:
        height, width = (int(v) for v in args.size.lower().split("x"))
    except ValueError:
        raise InputError(f"--size {args.size!r}: expected HxW, e.g. 480x832") from None
    if args.samples < 1:
        raise InputError(f"--samples {args.samples}: need at least one sample")
    try:
        fitted = latent_friendly(args.frames, height, width)
    except ValueError as e:
        raise InputError(f"--frames {args.frames} --size {args.size}: {e}") from None
    if fitted != (args.frames, height, width):
        f, h, w = fitted
        raise InputError(f"--frames {args.frames} --size {args.size}: frames must be 4k+1 and H, W multiples of 16 "
                         f"(the VAE's 4x8x8 compression and the 2x2 patches); e.g. --frames {f} --size {h}x{w}")
    fg = bg = None
    try:
        if args.fg_dir:
            if not os.path.isdir(args.fg_dir):
                raise InputError(f"--fg-dir {args.fg_dir}: no such folder")
            fg = VideoMatteSource(args.fg_dir, split=args.fg_split, seed=args.seed)
        if args.bg_dir:
            if not os.path.isdir(args.bg_dir):
                raise InputError(f"--bg-dir {args.bg_dir}: no such folder")
            bg = VideoFolderSource(args.bg_dir, seed=args.seed)
    except VideoError as e:
        raise InputError(str(e)) from None
    cfg = CompositeConfig(num_frames=args.frames, height=height, width=width)
    return SyntheticOmnimatte(cfg, foregrounds=fg, backgrounds=bg, seed=args.seed, length=args.samples)


def samples(ds, *, workers: int = 0):
    """The dataset's samples in order, as the trainer's pipeline prepares them (fit_to_latent), without the
    batch axis: dicts of video [F, H, W, 3], mask and effect_mask [F, H, W]."""
    if workers > 0:
        from absl import flags

        if not flags.FLAGS.is_parsed():  # grain's worker processes read absl flags; this CLI uses argparse
            flags.FLAGS.mark_as_parsed()
    batches = make_pipeline(ds, batch_size=1, shuffle=False, num_epochs=1, keys=("video", "mask", "effect_mask"),
                            shard=(0, 1), drop_remainder=False, num_workers=workers)
    for batch in batches:
        yield {k: v[0] for k, v in batch.items()}


def describe(args, ds) -> dict:
    """The "data" field of the report: enough to regenerate the exact samples."""
    return {"dataset": "data.synthetic.SyntheticOmnimatte", "seed": ds.seed, "samples": len(ds),
            "foregrounds": f"VideoMatte {ds.fg.root} ({len(ds.fg)} clips)" if args.fg_dir else "procedural",
            "backgrounds": f"{args.bg_dir} ({len(ds.bg)} clips)" if args.bg_dir else "procedural",
            "composite": dataclasses.asdict(ds.cfg)}


def _atomic(path, write):
    with atomic_path(path) as tmp:
        write(tmp)


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


def main(argv=None) -> int:
    args = _args(argv)
    try:
        ds = dataset(args)
        _check_encoders(args)  # before any model is read
        model = _model(args)
        condition = analysis.conditioning(_conditioner(args))
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    os.makedirs(args.out, exist_ok=True)
    res = analysis.analyze(model, samples(ds, workers=args.workers), _encoder(args), condition=condition,
                           sigma=args.sigma,
                           seed=args.seed, backend=args.backend, token_threshold=args.token_threshold,
                           progress=lambda i: print(f"sample {i + 1}/{len(ds)}", file=sys.stderr))
    report = {k: v for k, v in res.items() if k != "maps"}
    report.update(model=args.dit or args.model, num_blocks=len(res["contribution"]), frames=args.frames,
                  size=[ds.cfg.height, ds.cfg.width], data=describe(args, ds),
                  token_weights="fraction" if args.token_threshold is None else f">= {args.token_threshold}",
                  encoder="vae" if args.vae else "pool stand-in", device=jax.devices()[0].platform,
                  conditioning={"text": "umT5 embedding of the empty prompt", "image": "CLIP features of frame 0",
                                "umt5": args.umt5 or "tiny", "clip": args.clip or "tiny"})
    _atomic(os.path.join(args.out, "block_analysis.json"),
            lambda p: open(p, "w").write(json.dumps(report, indent=1)))
    _plots(res, args.out)
    print(json.dumps({k: report[k] for k in ("troughs", "stages", "effect_expert_k", "method")}))
    if args.emit_k:
        print(res["effect_expert_k"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
