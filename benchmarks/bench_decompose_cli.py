"""The decompose CLI as a user runs it, from command to files (issue 19): cold run, warm compile cache, a batch.

  python benchmarks/bench_decompose_cli.py            # GPU: 1.3B Fun-InP dims, 81x480x832 clips, 2 steps
  python benchmarks/bench_decompose_cli.py --tiny     # CPU dry run: tiny models, 9x64x112 clips

1. Writes random-weight checkpoints of the real sizes in the project's converted format (launch/convert.py's
   omnijax.json + orbax folders via omnijax.checkpoint.save_pretrained): the Wan2.1-Fun-InP 1.3B DiT, the Wan2.1
   VAE, the CLIP ViT-H/14 tower, and two LoRA files (Effect rank 128, Quality rank 64, omnijax names).
   umT5-XXL is not written: its only use is the empty prompt, whose embedding the CLI reads from the embedding
   cache (computed once per installation) and then never loads umT5; the bench seeds that cache entry (random
   [1, 4096]) and points --umt5/--tokenizer at tiny stand-ins that are never opened.
2. Makes example clips with data.example_clip (two objects each; `--objects 1` gives the CLI the first mask only).
3. Runs `launch/decompose.py` as a subprocess with a fresh compilation cache: run 1 (cold), run 2 (the same
   command, cache warm), then one process over 4 clips (--video ... x4). Each run's wall time from command to
   exit and the CLI's own report.json per clip: time per stage (read, encoders, vae_encode, sampler (compile
   included on a cold cache), vae_decode, postprocess, write, and each output file's writer), model loading, the
   start-up (imports and checks, the backend's start, and what happens before and after the CLI's own clock:
   interpreter start, exit), JAX's tracing / lowering / compiling-or-cache-loading seconds so far in the process,
   and the device's peak memory after each stage (peak so far).
Writes $OUT/bench_decompose_cli.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks.common import emit, save  # noqa: E402


def write_checkpoints(folder: str, tiny: bool) -> dict:
    """Random-weight checkpoints (real sizes unless tiny). Returns the CLI's model flags."""
    import jax.numpy as jnp
    from flax import nnx

    from converters import registry
    from omnijax.checkpoint import save_pretrained
    from omnijax.models.wan.clip import clip_variant
    from omnijax.models.wan.vae import vae_variant
    from omnijax.models.wan.variants import variant
    from omnijax.omnimatte.branch import EasyOmnimatte
    from omnijax.omnimatte.experts import effect_expert, quality_expert
    from omnijax.omnimatte.lora_io import save_lora

    dtype = "f32" if tiny else "bf16"
    configs = {"wan_dit": variant("tiny-inp" if tiny else "1.3b-inp"),
               "wan_vae": vae_variant("tiny" if tiny else "wan2.1"),
               "wan_clip": clip_variant("tiny" if tiny else "vit-h-14"), "umt5": None}
    flags, dit = {}, None
    for i, (kind, config) in enumerate(configs.items()):
        t = time.perf_counter()
        # umT5 is a tiny stand-in in both modes (see the module doc); it only has to exist.
        _, model = registry.load(kind, "tiny", dtype=dtype, seed=i, config=config)
        path = os.path.join(folder, kind)
        save_pretrained(path, model, kind)
        flags[{"wan_dit": "dit", "wan_vae": "vae", "wan_clip": "clip", "umt5": "umt5"}[kind]] = path
        print(f"wrote {kind} in {time.perf_counter() - t:.1f}s", file=sys.stderr)
        if kind == "wan_dit":
            dit = model
    n = dit.config.num_layers
    ranks = (4, 4) if tiny else (128, 64)
    experts = (("effect", effect_expert, ranks[0]), ("quality", quality_expert, ranks[1]))
    for i, (name, make, rank) in enumerate(experts):
        model = EasyOmnimatte(dit, make(n, rank=rank, alpha=float(rank)), rngs=nnx.Rngs(10 + i))
        # Non-zero B so the adapters do something (a fresh LoRA's B is zero).
        for _, ad in nnx.iter_graph(model.lora):
            if hasattr(ad, "lora_b"):
                ad.lora_b.set_value(jnp.full(ad.lora_b.get_value().shape, 1e-3, ad.lora_b.get_value().dtype))
        flags[f"{name}-lora"] = os.path.join(folder, f"{name}.safetensors")
        save_lora(flags[f"{name}-lora"], model)
    from converters.tokenizer import build_tiny_tokenizer

    flags["tokenizer"] = os.path.join(folder, "tokenizer")
    build_tiny_tokenizer(flags["tokenizer"])
    return flags, dit.config.text_dim


def seed_text_cache(cache: str, flags: dict, text_dim: int, dtype: str) -> None:
    """The empty-prompt entry and the umT5 identity alias, as a first real run would leave them."""
    import numpy as np

    from omnijax.conditioning import EmbeddingCache, remember_text_id, umt5_sources

    text_id = "bench-random-umt5"
    c = EmbeddingCache(cache)
    c.store("text", c.key("text", b"", text_id), np.random.default_rng(0).standard_normal((1, text_dim)).astype(
        np.float32))
    remember_text_id(cache, umt5_sources(flags["umt5"], flags["tokenizer"], dtype), text_id)


def run_cli(argv: list[str], env: dict) -> dict:
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "launch", "decompose.py"), *argv], env=env,
                          capture_output=True, text=True)
    wall = time.perf_counter() - t
    if proc.returncode:
        raise SystemExit(f"decompose failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    for line in proc.stderr.splitlines():  # the CLI's warnings (its progress bars are left out)
        if "warning" in line.lower():
            print(f"  cli: {line}", file=sys.stderr)
    outs = [argv[i + 1] for i, a in enumerate(argv) if a == "--out"]
    reports = []
    for out in outs:
        with open(os.path.join(out, "report.json")) as f:
            r = json.load(f)
        reports.append({k: r.get(k) for k in ("timings_s", "write_files_s", "peak_memory_gb_after_stage",
                                              "peak_memory_gb_after_load", "load_models_s", "load_split_s",
                                              "startup_s", "since_start_s", "jax_compile_s", "jax_compile_by_program_s",
                                              "programs_compiled_at_dispatch", "umt5_loaded", "frames", "size",
                                              "processing_size", "device")})
    # What no report sees: the interpreter's start before the CLI's first line, and the exit after its last report.
    outside = wall - max(r["since_start_s"] for r in reports)
    return {"wall_s": round(wall, 2), "clips": len(outs), "wall_per_clip_s": round(wall / len(outs), 2),
            "outside_reports_s": round(outside, 2), "reports": reports}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="tiny models and clips (CPU dry run)")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--objects", type=int, choices=[1, 2], default=2, help="objects per clip (masks given)")
    p.add_argument("--runs", default="first_run,second_run,batch", help="which runs, in order (comma list)")
    p.add_argument("--attention", default="auto", help="the CLI's --attention (auto: fa3 on a single Hopper GPU)")
    p.add_argument("--workdir", default=None, help="where checkpoints and clips go (default: a temporary folder); "
                                                    "one used before is reused")
    p.add_argument("--tag", default="", help="suffix of the output folders and the JSON (several calls, one workdir)")
    a = p.parse_args(argv)
    from data.example_clip import write_example

    work = a.workdir or tempfile.mkdtemp(prefix="bench_decompose_cli-")
    t = time.perf_counter()
    # A --workdir used before keeps its checkpoints, clips, embedding and compilation caches (e.g. to time a batch
    # with another version of the CLI on the same machine, its programs already compiled by the first call).
    made = os.path.join(work, "ckpt", "flags.json")
    if os.path.exists(made):
        with open(made) as f:
            flags, text_dim, tiny = json.load(f)
        if tiny != a.tiny:
            p.error(f"--workdir {work} holds {'tiny' if tiny else 'full-size'} checkpoints; this call asks for "
                    f"{'tiny' if a.tiny else 'full-size'} ones")
    else:
        flags, text_dim = write_checkpoints(os.path.join(work, "ckpt"), a.tiny)
    checkpoints_s = time.perf_counter() - t
    frames, h, w = (9, 64, 112) if a.tiny else (81, 480, 832)
    n_clips = a.batch if "batch" in a.runs.split(",") else 1
    clips = [c if os.path.exists(os.path.join(c, "input_video.mp4")) else write_example(c, frames, h, w, seed=i)
             for i, c in enumerate(os.path.join(work, f"clip{i}") for i in range(n_clips))]
    cache = os.path.join(work, "conditioning")
    dtype = "f32" if a.tiny else "bf16"
    if not os.path.exists(made):
        seed_text_cache(cache, flags, text_dim, dtype)
        with open(made, "w") as f:
            json.dump([flags, text_dim, a.tiny], f)
    path = os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")]))  # keep packages installed beside us
    env = {**os.environ, "XDG_CACHE_HOME": os.path.join(work, "xdg"), "PYTHONPATH": path}
    # --overwrite: a reused --workdir holds the folders of its earlier calls (ours: the CLI recognises them).
    common = ["--model", "wan", "--steps", str(a.steps), "--cache", cache, "--dtype", dtype, "--attention", a.attention,
              "--overwrite",
              *[x for k, v in flags.items() for x in (f"--{k}", v)]] + (["--height", str(h)] if a.tiny else [])

    tag = f"_{a.tag}" if a.tag else ""

    def clip_args(i, out):
        c = clips[i]
        masks = [os.path.join(c, f"mask_{k:02d}.mp4") for k in range(a.objects)]
        return ["--video", os.path.join(c, "input_video.mp4"), "--masks", *masks, "--out", out]

    result = {"date": datetime.date.today().isoformat(), "tiny": a.tiny, "tag": a.tag, "steps": a.steps,
              "attention": a.attention,
              "clip": f"{frames}x{h}x{w}, {a.objects} object(s)", "checkpoints_written_s": round(checkpoints_s, 1)}
    batch = [x for i in range(n_clips) for x in clip_args(i, os.path.join(work, f"out_batch{i}{tag}"))]
    runs = (("first_run", common + clip_args(0, os.path.join(work, f"out_first_run{tag}"))),
            ("second_run", common + clip_args(0, os.path.join(work, f"out_second_run{tag}"))),
            ("batch", common + batch))
    unknown = set(a.runs.split(",")) - {name for name, _ in runs}
    if unknown:
        p.error(f"--runs: unknown {sorted(unknown)}")
    for name, argv_cli in [r for r in runs if r[0] in a.runs.split(",")]:
        result[name] = run_cli(argv_cli, env)
        first = result[name]["reports"][0]
        files = sorted(first["write_files_s"].items(), key=lambda kv: -kv[1])[:3]
        st = first["startup_s"]
        print(f"{name}: {result[name]['wall_s']} s command to exit ({result[name]['clips']} clip(s)); start-up: "
              f"imports and checks {st['to_run']} s, backend {st['backend']} s, before and after the CLI's own "
              f"clock {result[name]['outside_reports_s']} s; first clip: load {first['load_models_s']} s "
              f"({first['load_split_s']}), "
              + ", ".join(f"{k} {v}" for k, v in first["timings_s"].items() if v is not None)
              + "; slowest writers: " + ", ".join(f"{f} {v}" for f, v in files)
              + "; JAX so far: " + ", ".join(f"{k} {v}" for k, v in first["jax_compile_s"].items()),
              file=sys.stderr, flush=True)
        save(f"bench_decompose_cli{tag}", result)  # a run cut off by a time limit keeps the runs before it
    emit(f"bench_decompose_cli{tag}", result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
