"""Does it learn? A small omnimatte model trained from scratch, then measured on held-out composites (issue #20).

Stages (each skipped when its output is already in --workdir, so a rerun resumes; an interrupted trainer stage
resumes from its own checkpoint):
  vae      a "small" Wan VAE trained from scratch (omnijax.training.autoencoder) on the procedural composites'
           videos, backgrounds and alphas; the tiny umT5 / CLIP stand-ins saved beside it (fixed random encoders:
           the empty prompt's embedding is a constant, the image features random projections of frame 0)
  base     the "small-inp" Wan Fun-InP DiT pretrained to inpaint the background (configs/inpaint_base.py,
           tasks/inpaint.py) through tasks/trainer.py's train()
  analysis launch/analyze_blocks.py on the pretrained base (its K against round(L/3))
  effect   configs/effect_expert.py:base=small through the same trainer
  quality  configs/quality_expert.py:base=small
  effect_k a second Effect Expert with the analysis' K, only when it differs from round(L/3)
  eval     held-out procedural composites (a seed no stage trains on): alpha MAE and IoU, shadow recall,
           background PSNR inside the removed region, recomposition PSNR (omnijax/metrics/matte.py) for the
           mask-as-alpha baseline, the Quality Expert alone (tau = 1), the Effect Expert alone (tau = 0), the
           dual-expert sampler at tau = 0.5 (and with the analysis' K)

  python3 benchmarks/learn_omnimatte.py --workdir /tmp/learn20 --out $OUT/l20          # GPU, ~10 min on one H200
  (in two device calls on one warm machine: --stage vae,base --vae-seconds 170, then the same without --stage)
  python3 benchmarks/learn_omnimatte.py --tiny --workdir /tmp/l20t --out /tmp/l20t/out  # CPU mechanics
  python3 benchmarks/learn_omnimatte.py --markdown $OUT/l20/learn_omnimatte.json        # the docs table

--out gets learn_omnimatte.json (table, loss curves, settings, stage times), learning_curves.png,
learning_sheet.png and learn_omnimatte.log. Every stage runs in this process (one JAX start-up, one device).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

EVAL_SEED = 900_001  # training, the VAE and the analysis draw from seed 0; no stage ever uses this one
STAGES = ("vae", "base", "analysis", "effect", "quality", "effect_k", "eval")
# (name, tau, effect expert) rows of the table after the mask baseline; tau = 1: the Quality Expert runs every
# step, tau = 0: the Effect Expert does (omnijax.sampling.schedules.switch_index).
ROWS = (("Quality Expert alone (tau=1)", 1.0, "effect"), ("Effect Expert alone (tau=0)", 0.0, "effect"),
        ("dual experts, tau=0.5", 0.5, "effect"))
VAE_ROW = "ceiling: true alpha and background through the VAE"
METRICS = ("alpha_mae", "alpha_iou", "shadow_recall", "bg_psnr_masked", "recomp_psnr")


def settings(args) -> dict:
    """The sizes and step counts of a run (--tiny: CPU mechanics; else the GPU defaults, overridable by flag)."""
    tiny = args.tiny
    s = dict(frames=9 if tiny else 17, height=32 if tiny else 128, width=32 if tiny else 128,
             dit="tiny-inp" if tiny else "small-inp", vae="tiny" if tiny else "small",
             vae_steps=2 if tiny else 4000, vae_seconds=None, vae_lr=2e-4, vae_batch=1 if tiny else 3,
             kl_weight=1e-3,
             vae_crop=(9, 32, 32) if tiny else (9, 64, 64), vae_pool=2 if tiny else 192,
             base_steps=2 if tiny else 2500, base_lr=5e-4, base_batch=1 if tiny else 8,
             expert_steps=2 if tiny else 1000, expert_lr=1e-3, expert_batch=1 if tiny else 4,
             eval_clips=1 if tiny else 20, sampler_steps=1 if tiny else 8, analysis_samples=1 if tiny else 32,
             workers=0 if tiny else max(0, min(12, (os.cpu_count() or 2) - 4)), sheet_clips=1 if tiny else 4)
    for k in s:
        v = getattr(args, k, None)
        if v is not None:
            s[k] = v
    return s


class Log:
    """Prints and appends to the run's log file."""

    def __init__(self, path):
        self.path = path
        os.makedirs(os.path.dirname(path), exist_ok=True)

    def __call__(self, msg: str):
        print(msg, flush=True)
        with open(self.path, "a") as f:
            f.write(msg + "\n")


# ---------------------------------------------------------------------------------------------- stages

def composites(s, *, seed: int):
    from data.composite import CompositeConfig
    from data.synthetic import SyntheticOmnimatte

    return SyntheticOmnimatte(CompositeConfig(num_frames=s["frames"], height=s["height"], width=s["width"]),
                              seed=seed)


def stage_vae(s, wd, log) -> dict:
    """Trains the VAE; saves it, umT5 and CLIP (tiny stand-ins) as converted folders every later stage loads."""
    import jax.numpy as jnp
    from flax import nnx

    from converters import registry
    from data.pipeline import make_pipeline
    from omnijax.checkpoint import save_pretrained
    from omnijax.models.wan.vae import WanVAE, vae_variant
    from omnijax.training.autoencoder import fit_autoencoder

    for name, kind, seed in (("umt5", "umt5", 2), ("clip", "wan_clip", 3)):
        if not os.path.isdir(os.path.join(wd, name)):
            save_pretrained(os.path.join(wd, name), registry.load(kind, "tiny", dtype="f32", seed=seed)[1], kind,
                            source="tiny random stand-in (no published encoder can be downloaded)")
    vae = WanVAE(vae_variant(s["vae"]), dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(1))
    # A pool of composites made once, then random crops of it: made per step, the composites bounded the step
    # (about 11 steps/s on the H200 with the host shared, 2026-11-29), and the VAE needs many more steps than clips.
    pipe = make_pipeline(composites(s, seed=0), batch_size=1, seed=0, keys=("video", "background", "alpha"),
                         num_threads=0 if s["workers"] else 2, num_workers=s["workers"])
    t0, pool, it = time.perf_counter(), [], iter(pipe)
    for _ in range(s["vae_pool"]):
        # Each composite gives three clips: the video, its background and its alpha as a grey video.
        b = next(it)
        pool += [b["video"][0], b["background"][0], np.repeat(b["alpha"][0][..., None], 3, -1)]
    pool = np.stack(pool).astype(np.float32) * 2.0 - 1.0
    log(f"vae: a pool of {s['vae_pool']} composites ({len(pool)} clips) in {time.perf_counter() - t0:.1f}s")

    crop_f, crop_h, crop_w = s["vae_crop"]
    rng = np.random.default_rng(0)

    def batches():
        # The VAE is convolutional (its attention is per frame), so it trains on random crops: a quarter of the
        # pixels and half the frames cost an eighth of the full clip's step.
        while True:
            x = pool[rng.integers(0, len(pool), s["vae_batch"] * 3)]
            f0 = int(rng.integers(0, x.shape[1] - crop_f + 1))
            y0, x0 = (int(rng.integers(0, n - c + 1)) for n, c in zip(x.shape[2:4], (crop_h, crop_w)))
            yield x[:, f0:f0 + crop_f, y0:y0 + crop_h, x0:x0 + crop_w]

    history = fit_autoencoder(vae, batches(), steps=s["vae_steps"], lr=s["vae_lr"], kl_weight=s["kl_weight"],
                              log_every=max(1, s["vae_steps"] // 50), log=log, max_seconds=s["vae_seconds"])
    save_pretrained(os.path.join(wd, "vae"), vae, "wan_vae", overwrite=True,
                    source="benchmarks/learn_omnimatte.py (trained from scratch)")
    return dict(curve=[[h["step"], h["loss"]] for h in history], final=history[-1])


def _models(wd) -> dict:
    return dict(vae=os.path.join(wd, "vae"), umt5=os.path.join(wd, "umt5"), clip=os.path.join(wd, "clip"),
                tokenizer="tiny")


def _train(config_file: str, arg: str, overrides: dict, workdir: str, log) -> list:
    """tasks/trainer.py's train() on `config_file:arg` with `overrides` ({dotted key: value}); its loss curve."""
    import importlib
    import logging as pylogging

    from absl import logging

    from configs.common import override
    from tasks.trainer import train

    config = importlib.import_module(config_file).get_config(arg)
    with config.unlocked():
        override(config, overrides)
    log(f"training {config_file}:{arg} in {workdir}: " + ", ".join(f"{k}={v}" for k, v in overrides.items()))
    os.makedirs(workdir, exist_ok=True)
    handler = pylogging.FileHandler(os.path.join(workdir, "train.log"))  # every line of this stage, as the CLI
    handler.setFormatter(logging.PythonFormatter())
    for h in pylogging.getLogger().handlers:  # the console: this project's lines and every library's warnings
        h.addFilter(_console_filter)
    pylogging.getLogger().addHandler(handler)
    try:
        train(config, workdir)
    finally:
        pylogging.getLogger().removeHandler(handler)
        handler.close()
    return _curve(workdir)


def _console_filter(record) -> bool:
    return record.levelno >= 30 or os.path.abspath(record.pathname).startswith(ROOT + os.sep)


def _curve(workdir) -> list:
    path = os.path.join(workdir, "metrics.jsonl")
    rows = [json.loads(line) for line in open(path)] if os.path.isfile(path) else []
    return [[r["step"], r["loss"]] for r in rows if "loss" in r]


def _common_overrides(s, wd, *, steps, lr, batch) -> dict:
    o = {f"model_init.{k}": v for k, v in _models(wd).items()}
    o.update({"total_steps": steps, "lr": lr, "input.batch_size": batch, "input.frames": s["frames"],
              "input.height": s["height"], "input.width": s["width"], "model.variant": s["dit"],
              "input.num_workers": s["workers"], "schedule.warmup_steps": max(1, min(100, steps // 20))})
    # Reader threads: inside each worker process when there are workers (grain), else in this process.
    o["input.num_threads"] = 2 if s["workers"] else 0 if s["tiny"] else 8
    if s["tiny"]:
        o.update({"model.attention": "xla", "ckpt_steps": steps})
    return o


def stage_base(s, wd, log) -> dict:
    o = _common_overrides(s, wd, steps=s["base_steps"], lr=s["base_lr"], batch=s["base_batch"])
    if s["tiny"]:
        o["sampler.steps"] = 1
    return dict(curve=_train("configs.inpaint_base", "base=small", o, os.path.join(wd, "base"), log))


def stage_analysis(s, wd, log) -> dict:
    """launch/analyze_blocks.py run as a user runs it (its own process), on the trained base; reads its report."""
    out = os.path.join(wd, "analysis")
    m = _models(wd)
    argv = ["--dit", os.path.join(wd, "base", "base"), "--vae", m["vae"], "--umt5", m["umt5"], "--clip", m["clip"],
            "--tokenizer", "tiny", "--samples", str(s["analysis_samples"]), "--frames", str(s["frames"]),
            "--size", f"{s['height']}x{s['width']}", "--out", out]
    if s["tiny"]:
        argv += ["--backend", "xla"]
    path = os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")]))  # keep packages installed beside us
    if subprocess.run([sys.executable, os.path.join(ROOT, "launch", "analyze_blocks.py"), *argv],
                      env={**os.environ, "PYTHONPATH": path}).returncode != 0:
        raise RuntimeError("the block analysis failed (see above)")
    with open(os.path.join(out, "block_analysis.json")) as f:
        res = json.load(f)
    n = res["num_blocks"]
    log(f"block analysis: K = {res['effect_expert_k']} (round(L/3) = {max(1, round(n / 3))} of {n} blocks)")
    return dict(k=int(res["effect_expert_k"]), num_blocks=n, default_k=max(1, round(n / 3)),
                stages=res["stages"], contribution=res["contribution"])


def stage_expert(s, wd, log, name: str, *, analysis: str = "") -> dict:
    o = _common_overrides(s, wd, steps=s["expert_steps"], lr=s["expert_lr"], batch=s["expert_batch"])
    o["model_init.dit"] = os.path.join(wd, "base", "base")
    if s["tiny"]:
        o.update({"lora.rank": 4, "lora.alpha": 4.0})
    if analysis:
        o["expert.analysis"] = analysis
    run = "effect_k" if analysis else name
    return dict(curve=_train(f"configs.{name}_expert", "base=small", o, os.path.join(wd, run), log))


def lora_path(wd, run, name):
    return os.path.join(wd, run, f"lora_{name}_omnijax.safetensors")


# ---------------------------------------------------------------------------------------------- evaluation

def clip_metrics(alpha, bg, recomp, gt) -> dict:
    """One clip's row (omnijax/metrics/matte.py); `gt` a composite sample, `recomp` a PSNR or None."""
    from omnijax.metrics import matte

    region = gt["alpha"] > 0.1  # where the layer hides or darkens the background
    row = dict(alpha_mae=matte.alpha_mae(alpha, gt["alpha"]), alpha_iou=matte.alpha_iou(alpha, gt["alpha"]),
                shadow_recall=matte.effect_recall(alpha, gt["effect_mask"]),
                bg_psnr_masked=matte.masked_psnr(bg, gt["background"], region),
                recomp_psnr=float("nan") if recomp is None else recomp)
    return {k: None if math.isnan(v) else float(v) for k, v in row.items()}  # JSON has no NaN


def _mean(rows) -> dict:
    out = {}
    for k in METRICS:
        v = np.asarray([r[k] for r in rows], np.float64)
        out[k] = None if np.all(np.isnan(v)) else float(np.nanmean(v))
    return out


def vae_round_trip(wd):
    """fn(video [F, H, W, 3] in [0, 1]) -> its reconstruction in [-1, 1] by the stage-vae VAE (posterior mean)."""
    import jax.numpy as jnp

    from converters import registry
    from omnijax.omnimatte.decompose import jit_module_fn

    vae = registry.load("wan_vae", _models(wd)["vae"], dtype="f32")[1]
    run = jit_module_fn(vae, lambda m, v: m.decode(m.encode(v)))
    return lambda video: np.asarray(run(jnp.asarray(video, jnp.float32)[None] * 2.0 - 1.0))[0]


def decomposer(wd, effect_run: str):
    from flax import nnx

    from converters import registry
    from omnijax.omnimatte.branch import EasyOmnimatte
    from omnijax.omnimatte.decompose import Decomposer
    from omnijax.omnimatte.experts import EXPERT_KINDS
    from omnijax.omnimatte.lora_io import expert_from_lora, load_lora

    m = _models(wd)
    load = lambda kind, src: registry.load(kind, src, dtype="f32")[1]
    base = load("wan_dit", os.path.join(wd, "base", "base"))
    cond = registry.conditioner(None, text_encoder=load("umt5", m["umt5"]), image_encoder=load("wan_clip", m["clip"]),
                                tokenizer="tiny")
    experts = []
    for i, (name, run) in enumerate((("effect", effect_run), ("quality", "quality"))):
        path = lora_path(wd, run, name)
        expert = EasyOmnimatte(base, expert_from_lora(path, mask=EXPERT_KINDS[name].mask, name=name),
                               rngs=nnx.Rngs(i + 1))
        load_lora(path, expert)
        experts.append(expert)
    return Decomposer(*experts, load("wan_vae", m["vae"]), cond)


def stage_eval(s, wd, log, *, k_run: bool) -> dict:
    from omnijax.omnimatte.alpha import video_to_alpha
    from omnijax.omnimatte.decompose import SamplerSettings, decompose_video

    data = composites(s, seed=EVAL_SEED)
    clips = [data[i] for i in range(s["eval_clips"])]
    rows = [("mask as alpha (no model)", None, None)] + list(ROWS)
    if k_run:
        rows.append(("dual, tau=0.5, Effect K from analysis", 0.5, "effect_k"))
    rows.append((VAE_ROW, None, None))
    per_row = {name: [] for name, _, _ in rows}
    sheet = []
    decs = {}
    round_trip = vae_round_trip(wd)
    for i, gt in enumerate(clips):
        per_row[rows[0][0]].append(clip_metrics(gt["mask"], gt["video"], None, gt))
        # The ceiling of every latent model here: the true alpha and background through the trained VAE.
        # (decoded as the sampler decodes: the alpha is video_to_alpha of the decoded grey video)
        per_row[VAE_ROW].append(clip_metrics(
            np.asarray(video_to_alpha(round_trip(np.repeat(gt["alpha"][..., None], 3, -1)))),
            np.clip((round_trip(gt["background"]) + 1.0) * 0.5, 0.0, 1.0), None, gt))
        for name, tau, run in rows[1:-1]:
            if run not in decs:
                decs[run] = decomposer(wd, run)
            layers = decompose_video(decs[run], gt["video"], gt["mask"][None],
                                     SamplerSettings(steps=s["sampler_steps"], tau=tau, seed=i), height=s["height"])
            per_row[name].append(clip_metrics(layers.alphas[0], layers.background, layers.psnr[0], gt))
            if tau == 0.5 and run == "effect" and i < s["sheet_clips"]:
                sheet.append((gt, layers.alphas[0], layers.background))
        log(f"eval clip {i + 1}/{len(clips)}: " + "; ".join(
            f"{n.split(' (')[0]} mae {r[-1]['alpha_mae']:.3f}" for n, r in per_row.items()))
    table = [dict(row=name, **_mean(per_row[name])) for name, _, _ in rows]
    return dict(table=table, per_clip=per_row, sheet=sheet, clips=len(clips))


# ---------------------------------------------------------------------------------------------- outputs

def write_sheet(path, sheet):
    from omnijax.io.sheet import label_rows
    from omnijax.io.video import write_image

    rows, names = [], []
    for c, (gt, alpha, bg) in enumerate(sheet):
        idx = np.linspace(0, gt["video"].shape[0] - 1, 4).round().astype(int)
        grey = lambda a, idx=idx: np.repeat(np.asarray(a)[idx][..., None], 3, -1)
        for label, r in (("input", gt["video"][idx]), ("alpha (dual)", grey(alpha)),
                         ("true alpha", grey(gt["alpha"])), ("background", np.asarray(bg)[idx])):
            rows.append(np.concatenate(list(r), axis=1))
            names.append(f"#{c} {label}")
    img = (np.clip(np.concatenate(rows, axis=0), 0, 1) * 255).round().astype(np.uint8)
    write_image(path, label_rows(img, names))


def write_curves(path, stages):
    from benchmarks.common import plot_curves

    curve = lambda n: (stages.get(n) or {}).get("curve") or []
    plot_curves(path, [("VAE (L1 + KL)", {"vae": curve("vae")}),
                       ("inpainting base (flow matching)", {"base": curve("base")}),
                       ("experts (alpha flow matching)", {n: curve(n) for n in ("effect", "quality", "effect_k")})])


def markdown(result: dict) -> str:
    """The docs table from learn_omnimatte.json (numbers never typed by hand)."""
    fmt = lambda v, d: "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{d}f}"
    lines = ["| row | alpha MAE ↓ | alpha IoU ↑ | shadow recall ↑ | bg PSNR in region (dB) ↑ | recomp. PSNR (dB) ↑ |",
             "|---|---|---|---|---|---|"]
    for r in result["table"]:
        lines.append(f"| {r['row']} | {fmt(r['alpha_mae'], 4)} | {fmt(r['alpha_iou'], 3)} | "
                     f"{fmt(r['shadow_recall'], 3)} | {fmt(r['bg_psnr_masked'], 2)} | {fmt(r['recomp_psnr'], 2)} |")
    st = result.get("stage_seconds", {})
    lines.append("")
    lines.append("Stage wall times: " + ", ".join(f"{k} {v:.0f} s" for k, v in st.items()) +
                 f"; device: {result.get('device', '?')}; {result.get('eval_clips', '?')} held-out clips.")
    a = result.get("analysis")
    if a:
        lines.append(f"Block analysis: K = {a['k']} of {a['num_blocks']} blocks (round(L/3) = {a['default_k']}).")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- driver

def _args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", help="checkpoints and stage outputs (a rerun resumes from them)")
    p.add_argument("--out", help="the report: learn_omnimatte.json, learning_curves.png, learning_sheet.png, log")
    p.add_argument("--stage", default="all", help=f"all, or a comma list of {', '.join(STAGES)}")
    p.add_argument("--tiny", action="store_true", help="tiny models, a few steps: mechanics on a CPU")
    p.add_argument("--markdown", metavar="JSON", help="print the docs table of a learn_omnimatte.json and exit")
    for k, t in (("frames", int), ("height", int), ("width", int), ("vae_steps", int), ("vae_seconds", float),
                 ("vae_lr", float), ("base_steps", int), ("base_lr", float), ("expert_steps", int),
                 ("expert_lr", float), ("eval_clips", int), ("sampler_steps", int), ("workers", int),
                 ("analysis_samples", int), ("vae_pool", int)):
        p.add_argument("--" + k.replace("_", "-"), dest=k, type=t, default=None, help="(default: see settings())")
    a = p.parse_args(argv)
    if a.frames is not None and (a.frames < 9 or a.frames % 4 != 1):
        p.error(f"--frames {a.frames}: the Wan VAE takes 4k+1 frames, at least 9 (its training crops)")
    for name in ("height", "width"):
        v = getattr(a, name)
        if v is not None and (v < 64 or v % 16):
            p.error(f"--{name} {v}: a multiple of 16, at least 64 (VAE /8, patch 2; the VAE trains on 64 px crops)")
    if not a.markdown and not (a.workdir and a.out):
        p.error("--workdir and --out are required (or --markdown JSON)")
    return a


def main(argv=None) -> int:
    args = _args(argv)
    if args.markdown:
        with open(args.markdown) as f:
            print(markdown(json.load(f)))
        return 0
    want = STAGES if args.stage == "all" else tuple(x.strip() for x in args.stage.split(","))
    bad = [x for x in want if x not in STAGES]
    if bad:
        print(f"error: unknown stage(s) {bad}; known: {', '.join(STAGES)}", file=sys.stderr)
        return 2
    from absl import flags, logging

    if not flags.FLAGS.is_parsed():  # grain's worker processes read absl flags
        flags.FLAGS(sys.argv[:1])
    logging.use_absl_handler()
    logging.set_verbosity(logging.INFO)
    from omnijax.xla_flags import setup_xla_flags

    setup_xla_flags()  # before jax initialises a backend
    import jax

    from omnijax.io.atomic import atomic_write

    s = settings(args)
    s["tiny"] = args.tiny
    wd, out = os.path.abspath(args.workdir), os.path.abspath(args.out)
    os.makedirs(wd, exist_ok=True)
    os.makedirs(out, exist_ok=True)
    log = Log(os.path.join(out, "learn_omnimatte.log"))
    record_path = os.path.join(wd, "stages.json")
    record = json.load(open(record_path)) if os.path.isfile(record_path) else {}
    device = f"{jax.device_count()} x {jax.devices()[0].device_kind}"
    log(f"learn_omnimatte: device {device}; settings {json.dumps(s)}")

    done = dict(vae=lambda: os.path.isfile(os.path.join(wd, "vae", "omnijax.json")),
                base=lambda: os.path.isfile(os.path.join(wd, "base", "base", "omnijax.json")),
                analysis=lambda: "analysis" in record,
                effect=lambda: os.path.isfile(lora_path(wd, "effect", "effect")),
                quality=lambda: os.path.isfile(lora_path(wd, "quality", "quality")),
                effect_k=lambda: os.path.isfile(lora_path(wd, "effect_k", "effect")),
                eval=lambda: False)
    k_differs = lambda: "analysis" in record and record["analysis"]["k"] != record["analysis"]["default_k"]
    run = dict(vae=lambda: stage_vae(s, wd, log), base=lambda: stage_base(s, wd, log),
               analysis=lambda: stage_analysis(s, wd, log), effect=lambda: stage_expert(s, wd, log, "effect"),
               quality=lambda: stage_expert(s, wd, log, "quality"),
               effect_k=lambda: stage_expert(s, wd, log, "effect", analysis=os.path.join(
                   wd, "analysis", "block_analysis.json")),
               eval=lambda: stage_eval(s, wd, log, k_run=os.path.isfile(lora_path(wd, "effect_k", "effect"))))
    ev = None
    for name in STAGES:
        if name not in want:
            continue
        if name == "analysis" and s["tiny"]:
            log("analysis: skipped (the tiny DiT has 2 blocks; the three-stage split needs 3)")
            continue
        if name == "effect_k" and not k_differs():
            log("effect_k: skipped (the analysis' K equals round(L/3), or no analysis)")
            continue
        if done[name]():
            log(f"{name}: output exists in {wd}, skipped")
            continue
        t0 = time.perf_counter()
        res = run[name]()
        secs = time.perf_counter() - t0
        log(f"stage {name}: {secs:.1f} s wall")
        if name == "eval":
            ev = res
            res = {k: v for k, v in res.items() if k not in ("sheet", "per_clip")}
        record[name] = dict(res, seconds=round(secs, 1))
        atomic_write(record_path, json.dumps(record, indent=1))

    if ev is None:
        return 0
    for name, r in (("table", ev["table"]),):
        log(name + ":\n" + json.dumps(r, indent=1))
    result = dict(issue=20, device=device, settings=s, eval_seed=EVAL_SEED, eval_clips=ev["clips"],
                  table=ev["table"], per_clip=ev["per_clip"], analysis=record.get("analysis"),
                  stage_seconds={k: v["seconds"] for k, v in record.items() if "seconds" in v},
                  curves={k: v.get("curve") for k, v in record.items() if v.get("curve")})
    atomic_write(os.path.join(out, "learn_omnimatte.json"), json.dumps(result, indent=1, default=float))
    write_curves(os.path.join(out, "learning_curves.png"), record)
    write_sheet(os.path.join(out, "learning_sheet.png"), ev["sheet"])
    log(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
