"""Does DiffDecompose learn? A small Flux DiT trained from scratch on the procedural watermark subtask, then the
backgrounds it predicts on held-out composites measured against the trivial baseline (issue 18, GPU section).

  python3 benchmarks/learn_diffdecompose.py --workdir /tmp/learn18 --out $OUT/l18       # H200: about 4-5 min
  python3 benchmarks/learn_diffdecompose.py --opacity 0.4,0.8 --workdir /tmp/learn18o --out $OUT/l18o  # stronger
  python3 benchmarks/learn_diffdecompose.py --tiny --workdir /tmp/l18t --out /tmp/l18t/out  # CPU mechanics
  python3 benchmarks/learn_diffdecompose.py --markdown /tmp/l18/learn_diffdecompose.json  # the docs table

Stages (each skipped when --workdir already holds its result, so a rerun resumes):
  vae    a Flux VAE trained from scratch (omnijax.training.autoencoder.fit_autoencoder) on the composites,
         foregrounds and backgrounds of the first --vae-pool training samples; no published VAE can be downloaded.
         -> WORKDIR/vae (a converted folder), WORKDIR/vae_history.json
  train  tasks/trainer.py's `train` on configs/diffdecompose.py:learn (the "small" DiT, every weight trained,
         128x128 watermarks, batch 16), the trained VAE as model_init.vae. -> WORKDIR/train
  eval   N held-out samples (another data seed, so other procedural marks and backgrounds than training drew):
         background RMSE x256 (LOGO), masked RMSE x256 (inside the mark), PSNR of the predicted background vs the
         truth, beside the trivial baseline, the copy and the ceiling (COMPARE below); the foreground layer's
         RMSE / PSNR and its VAE ceiling. -> WORKDIR/eval.json, eval_sheet.npz
A workdir belongs to one setting (--opacity, --mark-size, sizes): use another workdir for another.
The text encoders are the tiny random stand-ins: with one subtask the prompt embedding is a constant input.

--out gets learn_diffdecompose.json (table, loss curve, settings, stage times), loss.png, sheet.png, log.txt.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

RESULT = "learn_diffdecompose.json"
HELD_OUT_SEED = 1_000_003  # the data seed of the evaluation; training draws from config.seed
LAYERS = ("background", "foreground")
# The comparisons of the predicted background (bg_*): the truth itself is the target; "baseline" = the composite
# (the trivial answer); "copy" = the composite through the VAE (what copying the composite's latent into the
# background segment gives: the trivial answer in the model's own latent space); "ceiling" = the true background
# through the VAE (no latent model decodes closer). At the paper's watermark opacity (<= 0.25) the composite is
# already within ~1/256 RMS of the background, so a latent model beats "baseline" only with a VAE better than that;
# beating "copy" (and the masked RMSE, inside the mark) shows that the mark was removed.
COMPARE = (("trained model", "bg"), ("baseline: the composite", "baseline_bg"),
           ("copy: the composite through the VAE", "copy_bg"), ("ceiling: true background through the VAE",
                                                                "ceiling_bg"))


class Log:
    """Prints and keeps every line (written to --out/log.txt)."""

    def __init__(self):
        self.lines = []

    def __call__(self, msg: str) -> None:
        line = f"[{time.strftime('%H:%M:%S')}] {msg}"
        print(line, flush=True)
        self.lines.append(line)


def learn_config(args, workdir: str):
    from configs import diffdecompose

    c = diffdecompose.get_config("learn,runlocal" if args.tiny else "learn")
    c.model_init.vae = os.path.join(workdir, "vae")
    if args.steps:
        c.total_steps = c.ckpt_steps = args.steps
        c.schedule.warmup_steps = min(c.schedule.warmup_steps, args.steps - 1)
    c.evals.preview_steps = c.total_steps + 1  # no trainer preview: the eval stage samples the same model
    if args.opacity:
        c.input.opacity = tuple(float(v) for v in args.opacity.split(","))
    if args.mark_size:
        c.input.watermark_size = tuple(float(v) for v in args.mark_size.split(","))
    if args.sampler_steps:
        c.sampler.steps = args.sampler_steps
    return c


# ------------------------------------------------------------------------------------------------ stages

def stage_vae(config, workdir: str, args, log) -> dict:
    import jax.numpy as jnp
    from flax import nnx

    from omnijax.checkpoint import save_pretrained
    from omnijax.models.flux.vae import FluxVAE, flux_vae_variant
    from omnijax.training.autoencoder import fit_autoencoder
    from tasks.diffdecompose import dataset

    path, hist_path = os.path.join(workdir, "vae"), os.path.join(workdir, "vae_history.json")
    if os.path.isfile(os.path.join(path, "omnijax.json")) and os.path.isfile(hist_path):
        log(f"vae: {path} exists, skipped")
        with open(hist_path) as f:
            return json.load(f)
    data = dataset(config, seed=config.seed)
    rng = np.random.default_rng(config.seed)
    # A pool of every image kind the DiT will see (generated once: drawing samples per step would bound the step
    # by the generator, ~3 ms a sample), from the training seed's first samples; in [-1, 1].
    t0 = time.perf_counter()
    pool = np.stack([data[i][k] for i in range(min(args.vae_pool, len(data)))
                     for k in ("composite", "foreground", "background")]) * 2.0 - 1.0
    log(f"vae: {len(pool)} training images in {time.perf_counter() - t0:.1f}s")

    def batches():
        while True:
            yield pool[rng.integers(len(pool), size=args.vae_batch)]

    vae = FluxVAE(flux_vae_variant(args.vae_variant), dtype=jnp.float32, param_dtype=jnp.float32,
                  rngs=nnx.Rngs(config.seed))
    t0 = time.perf_counter()
    history = fit_autoencoder(vae, batches(), steps=args.vae_steps, lr=args.vae_lr, seed=config.seed,
                              log_every=max(1, args.vae_steps // 10), log=log)
    save_pretrained(path, vae, "flux_vae", overwrite=True, trained_by="benchmarks/learn_diffdecompose.py")
    result = dict(history=history, variant=args.vae_variant, steps=args.vae_steps, batch=args.vae_batch,
                  pool=len(pool), seconds=round(time.perf_counter() - t0, 1))
    from omnijax.io.atomic import atomic_write

    atomic_write(hist_path, json.dumps(result, indent=1))
    return result


def stage_train(config, workdir: str, log) -> dict:
    from omnijax.training.checkpoint import Checkpointer

    wd = os.path.join(workdir, "train")
    ckpt_dir = os.path.join(wd, "checkpoints")
    done = False
    if os.path.isdir(ckpt_dir):
        ckpt = Checkpointer(ckpt_dir)
        done = ckpt.latest_step() == config.total_steps
        ckpt.close()
    if done:
        log(f"train: {wd} holds step {config.total_steps}, skipped")
    else:
        from tasks.trainer import train

        log(f"train: {config.total_steps} steps of batch {config.input.batch_size} in {wd}")
        train(config, wd)
    with open(os.path.join(wd, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return dict(curve=[[r["step"], r["loss"]] for r in rows],
                first_step_s=next((r["chrono/first_step_s"] for r in rows if "chrono/first_step_s" in r), None),
                step_s=next((r["chrono/step_s"] for r in reversed(rows) if "chrono/step_s" in r), None))


def stage_eval(config, workdir: str, args, log) -> tuple[dict, list]:
    """Mean metrics of the trained model on held-out samples and the sheet's rows; kept in WORKDIR/eval.json and
    eval_sheet.npz (reused when the checkpoint and the evaluation settings are the same)."""
    from omnijax.io.atomic import atomic_path, atomic_write

    key = dict(steps=int(config.total_steps), num_eval=args.num_eval, sampler_steps=int(config.sampler.steps),
               guidance=float(config.sampler.guidance), sheet_rows=args.sheet_rows)
    json_path, sheet_path = os.path.join(workdir, "eval.json"), os.path.join(workdir, "eval_sheet.npz")
    if os.path.isfile(json_path) and os.path.isfile(sheet_path):
        with open(json_path) as f:
            cached = json.load(f)
        if cached.get("key") == key:
            log(f"eval: {json_path} holds these settings, skipped")
            with np.load(sheet_path) as z:
                sheet = [list(zip(cached["labels"], z[f"row{i}"], strict=True)) for i in range(len(z.files))]
            return cached["eval"], sheet
    ev, sheet = _evaluate(config, workdir, args, log)
    with atomic_path(sheet_path) as tmp, open(tmp, "wb") as fh:
        np.savez(fh, **{f"row{i}": np.stack([t for _, t in row]) for i, row in enumerate(sheet)})
    atomic_write(json_path, json.dumps(dict(key=key, eval=ev, labels=[lab for lab, _ in sheet[0]]), indent=1))
    return ev, sheet


def _evaluate(config, workdir: str, args, log) -> tuple[dict, list]:
    import jax
    import jax.numpy as jnp

    from omnijax import sharding
    from omnijax.diffdecompose.sampling import Decomposer
    from omnijax.metrics.image import masked_rmse, psnr, rmse
    from omnijax.training.checkpoint import Checkpointer
    from tasks import diffdecompose as task

    mesh = sharding.make_mesh(dict(config.mesh), devices=jax.devices()[:1])
    with jax.set_mesh(mesh):
        models = task.build(config, mesh)
        ckpt = Checkpointer(os.path.join(workdir, "train", "checkpoints"), wrt=models.wrt)
        restored = ckpt.restore(models.trainable)
        ckpt.close()
        if restored is None:
            raise SystemExit("eval: no training checkpoint (run the train stage)")
        log(f"eval: restored step {restored.step}; {args.num_eval} held-out samples (data seed {HELD_OUT_SEED})")
        vae, f = models.frozen["vae"], models.frozen
        dec = Decomposer(models.trainable, vae, num_steps=int(config.sampler.steps),
                         guidance=float(config.sampler.guidance), mu_tokens=config.sampler.mu_tokens,
                         attention_backend=config.model.attention)
        data = task.dataset(config, seed=HELD_OUT_SEED, length=args.num_eval)
        round_trip = jax.jit(lambda v, x: (v.decode(v.encode(x * 2.0 - 1.0), tile=None) + 1.0) * 0.5)
        rows, sheet, t_sample = [], [], 0.0
        for start in range(0, args.num_eval, args.eval_batch):
            samples = [data[i] for i in range(start, min(start + args.eval_batch, args.num_eval))]
            comp = np.stack([s["composite"] for s in samples])
            sub = np.array([int(s["subtask"]) for s in samples])
            out = dec(comp, f["txt"][sub], f["y"][sub], seed=config.seed + start)
            t_sample += sum(out["timings"].values())
            ceil = {k: np.clip(np.asarray(round_trip(vae, jnp.asarray(np.stack([s[k] for s in samples])))), 0, 1)
                    for k in LAYERS + ("composite",)}
            for j, s in enumerate(samples):
                bg, fg = out["background"][j], out["foreground"][j]
                rows.append(dict(
                    bg_rmse=rmse(bg, s["background"]), bg_psnr=psnr(bg, s["background"]),
                    bg_masked_rmse=masked_rmse(bg, s["background"], s["mask"]),
                    baseline_bg_rmse=rmse(s["composite"], s["background"]),
                    baseline_bg_psnr=psnr(s["composite"], s["background"]),
                    baseline_bg_masked_rmse=masked_rmse(s["composite"], s["background"], s["mask"]),
                    copy_bg_rmse=rmse(ceil["composite"][j], s["background"]),
                    copy_bg_psnr=psnr(ceil["composite"][j], s["background"]),
                    copy_bg_masked_rmse=masked_rmse(ceil["composite"][j], s["background"], s["mask"]),
                    ceiling_bg_rmse=rmse(ceil["background"][j], s["background"]),
                    ceiling_bg_psnr=psnr(ceil["background"][j], s["background"]),
                    ceiling_bg_masked_rmse=masked_rmse(ceil["background"][j], s["background"], s["mask"]),
                    fg_rmse=rmse(fg, s["foreground"]), fg_psnr=psnr(fg, s["foreground"]),
                    ceiling_fg_rmse=rmse(ceil["foreground"][j], s["foreground"]),
                    ceiling_fg_psnr=psnr(ceil["foreground"][j], s["foreground"])))
                if len(sheet) < args.sheet_rows:
                    sheet.append([("composite", s["composite"]), ("bg pred", bg), ("bg truth", s["background"]),
                                  ("fg pred", fg), ("fg truth", s["foreground"])])
    # masked RMSE is NaN on a sample whose mark is empty: averaged over the samples where it is defined
    mean = {k: float(np.nanmean([r[k] for r in rows])) for k in rows[0]}
    beats = {k: int(sum(r["bg_rmse"] < r[f"{k}_bg_rmse"] for r in rows)) for k in ("baseline", "copy")}
    return dict(mean=mean, n=len(rows), beats=beats, step=restored.step,
                sample_s=round(t_sample, 1)), sheet


# ------------------------------------------------------------------------------------------------ outputs

def table(result: dict) -> str:
    """The markdown table of a result JSON (docs/benchmarks.md)."""
    m, e = result["eval"]["mean"], result["eval"]
    lines = [f"| background vs truth ({e['n']} held-out, mean) | RMSE x256 | masked RMSE x256 | PSNR dB |",
             "|---|---|---|---|"]
    for name, key in COMPARE:
        lines.append(f"| {name} | {m[key + '_rmse']:.2f} | {m[key + '_masked_rmse']:.2f} | {m[key + '_psnr']:.2f} |")
    lines.append(f"| foreground layer: model / VAE ceiling | {m['fg_rmse']:.2f} / {m['ceiling_fg_rmse']:.2f} | | "
                 f"{m['fg_psnr']:.2f} / {m['ceiling_fg_psnr']:.2f} |")
    t, s = result["train"], result["settings"]
    verdict = ", ".join(f"{k.replace('_', ' ')}: {'yes' if ok else 'no'}" for k, ok in result["verdict"].items())
    lines += ["", f"Verdict (means): {verdict}.",
              f"The model's background RMSE beats the baseline on {e['beats']['baseline']}/{e['n']} samples, "
              f"the copy on {e['beats']['copy']}/{e['n']}. "
              f"Loss (flow matching, mean of the first / last {t['window']} logged steps): {t['loss_first']:.4f} -> "
              f"{t['loss_last']:.4f}. {s['dit']} DiT ({s['dit_params'] / 1e6:.1f} M params) from scratch, "
              f"{s['steps']} steps of batch {s['batch']} at {s['size']}, opacity {s['opacity']}, "
              f"mark side {s.get('mark_size', 'paper (96, 128) at 512 px')}, "
              f"{s['sampler_steps']} sampler steps; "
              f"VAE {s['vae_variant']} {s['vae_steps']} steps. Stage times (s): "
              + ", ".join(f"{k} {sec}" for k, sec in result["stage_s"].items()) + f"; device: {result['device']}."]
    return "\n".join(lines)


def loss_plot(path: str, curve: list, vae_curve: list) -> None:
    """The loss curves (DiT flow matching, and the VAE's L1 + KL) as one PNG."""
    from benchmarks.common import plot_curves

    plot_curves(path, [("DiT flow-matching loss", {"DiT": curve}), ("VAE loss (L1 + KL)", {"VAE": vae_curve})])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", help="stage results (resumable)")
    p.add_argument("--out", help="the 4 output files")
    p.add_argument("--tiny", action="store_true", help="tiny models at 32x32 on CPU: mechanics only")
    p.add_argument("--steps", type=int, default=0, help="DiT training steps (0: the config's)")
    p.add_argument("--sampler-steps", type=int, default=0, help="Euler steps per decomposition (0: the config's)")
    p.add_argument("--vae-steps", type=int, default=0, help="VAE training steps (0: 1500, --tiny 2)")
    p.add_argument("--vae-batch", type=int, default=0, help="(0: 24, --tiny 3)")
    p.add_argument("--vae-lr", type=float, default=1e-3)
    p.add_argument("--vae-pool", type=int, default=0, help="training samples whose 3 images train the VAE "
                   "(0: 1024, --tiny 4)")
    p.add_argument("--vae-variant", default="tiny", help="omnijax.models.flux.vae variant row")
    p.add_argument("--opacity", default="", help="LO,HI: the marks' opacity range instead of the paper's "
                   "(0.1, 0.25), e.g. 0.4,0.8 for marks a latent model can beat the composite on")
    p.add_argument("--mark-size", default="", help="LO,HI: the watermark box's side in pixels at 512 px instead of "
                   "the paper's 96,128 (scaled to the 128 px images), e.g. 256,448 for marks over a quarter to "
                   "three quarters of the image")
    p.add_argument("--num-eval", type=int, default=0, help="held-out samples (0: 32, --tiny 2)")
    p.add_argument("--eval-batch", type=int, default=8)
    p.add_argument("--sheet-rows", type=int, default=6)
    p.add_argument("--markdown", metavar="JSON", help="print the result table of a result JSON and exit")
    args = p.parse_args(argv)
    if args.markdown:
        with open(args.markdown) as f:
            print(table(json.load(f)))
        return
    if not args.workdir or not args.out:
        p.error("--workdir and --out are required (or --markdown JSON)")
    args.vae_steps = args.vae_steps or (2 if args.tiny else 1500)
    args.vae_batch = args.vae_batch or (3 if args.tiny else 24)
    args.num_eval = args.num_eval or (2 if args.tiny else 32)
    args.vae_pool = args.vae_pool or (4 if args.tiny else 1024)
    for name in ("steps", "vae_steps", "vae_pool", "num_eval", "eval_batch"):
        if getattr(args, name) < (0 if name == "steps" else 1):
            p.error(f"--{name.replace('_', '-')} must be positive")
    for flag, value, top in (("opacity", args.opacity, 1), ("mark-size", args.mark_size, 512)):
        if value:
            try:
                lo, hi = (float(v) for v in value.split(","))
            except ValueError:
                p.error(f"--{flag} {value!r}: expected LO,HI (two numbers)")
            if not 0 < lo <= hi <= top:
                p.error(f"--{flag} {value!r}: need 0 < LO <= HI <= {top}")
    if args.vae_steps < 2 or args.steps == 1:  # (fit_autoencoder's and the trainer's warmup + cosine need 2)
        p.error("--vae-steps and --steps must be at least 2")

    import jax

    from omnijax.xla_flags import setup_xla_flags

    setup_xla_flags()  # before jax initialises a backend
    from omnijax.io.atomic import atomic_write
    from omnijax.io.video import write_image

    log = Log()
    workdir = os.path.abspath(args.workdir)
    os.makedirs(workdir, exist_ok=True)
    os.makedirs(args.out, exist_ok=True)
    config = learn_config(args, workdir)
    log(f"device: {jax.devices()[0].device_kind}; config learn{',runlocal' if args.tiny else ''}")
    times = {}
    t0 = time.perf_counter()
    vae = stage_vae(config, workdir, args, log)
    times["vae"] = round(time.perf_counter() - t0, 1)
    t0 = time.perf_counter()
    train = stage_train(config, workdir, log)
    times["train"] = round(time.perf_counter() - t0, 1)
    t0 = time.perf_counter()
    ev, sheet = stage_eval(config, workdir, args, log)
    times["eval"] = round(time.perf_counter() - t0, 1)

    losses = [l for _, l in train["curve"]]
    window = max(1, min(10, len(losses) // 4))
    train.update(window=window, loss_first=float(np.mean(losses[:window])), loss_last=float(np.mean(losses[-window:])))
    m = ev["mean"]
    verdict = dict(loss_fell=train["loss_last"] < train["loss_first"],
                   beats_baseline=m["bg_rmse"] < m["baseline_bg_rmse"], beats_copy=m["bg_rmse"] < m["copy_bg_rmse"],
                   beats_baseline_in_mark=m["bg_masked_rmse"] < m["baseline_bg_masked_rmse"],
                   baseline_reachable=m["ceiling_bg_rmse"] < m["baseline_bg_rmse"])
    from flax import nnx

    with open(os.path.join(workdir, "train", "dit", "omnijax.json")) as f:
        dit_cfg = json.load(f)["config"]
    abstract = nnx.eval_shape(lambda: task_dit(dit_cfg))
    result = dict(
        verdict=verdict, eval=ev, train=train, device=jax.devices()[0].device_kind,
        stage_s=times,  # this invocation's seconds per stage (near 0 for a stage the workdir already held)
        vae=dict(first=vae["history"][0], last=vae["history"][-1], seconds=vae["seconds"]),
        settings=dict(dit=config.model.dit_variant or "tiny", dit_config=dit_cfg,
                      dit_params=int(sum(x.size for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))),
                      steps=int(config.total_steps), batch=int(config.input.batch_size),
                      size=f"{config.input.width}x{config.input.height}", subtasks=list(config.input.subtasks),
                      opacity=list(config.input.opacity) or "paper (0.1, 0.25)",
                      mark_size=list(config.input.watermark_size) or "paper (96, 128) at 512 px",
                      lr=float(config.lr), sampler_steps=int(config.sampler.steps),
                      guidance=float(config.sampler.guidance), vae_variant=args.vae_variant,
                      vae_steps=args.vae_steps, vae_batch=args.vae_batch, vae_pool=args.vae_pool,
                      held_out_seed=HELD_OUT_SEED,
                      text="tiny random T5 / CLIP stand-ins: the prompt embedding is a constant input"))
    atomic_write(os.path.join(args.out, RESULT), json.dumps(result, indent=1, default=float))
    loss_plot(os.path.join(args.out, "loss.png"), train["curve"],
              [[r["step"], r["loss"]] for r in vae["history"]])
    from omnijax.diffdecompose.preview import labelled_sheet

    write_image(os.path.join(args.out, "sheet.png"), labelled_sheet(sheet))
    text = table(result)
    log("\n" + text)
    atomic_write(os.path.join(args.out, "log.txt"), "\n".join(log.lines) + "\n")


def task_dit(cfg: dict):
    from flax import nnx

    from omnijax.models.flux.dit import FluxDiT
    from omnijax.models.flux.variants import FluxConfig

    return FluxDiT(FluxConfig.from_dict(cfg), rngs=nnx.Rngs(0))


if __name__ == "__main__":
    main()
