"""Loading the decompose CLI's models, one fresh process per item (issue 19): how long each load takes.

  python benchmarks/bench_load.py --write /tmp/ckpts         # once: random weights of the real sizes (~3.4 GB)
  python benchmarks/bench_load.py /tmp/ckpts                 # each item 3 times, a fresh process each
  python benchmarks/bench_load.py /tmp/ckpts --profile DIR   # also a cProfile of each item's timed call in DIR

Each item runs `--repeats` times, one fresh process each; the first run warms the page cache and is not counted
(its numbers are printed). Items: `registry.load(kind, folder, dtype="bf16")` of the converted Wan2.1-Fun-InP
1.3B DiT, the Wan2.1 VAE and the CLIP ViT-H/14 tower, and `lora_io.expert_with_lora` of the Effect (rank 128) and
Quality (rank 64) LoRA files over the loaded DiT (the DiT's own load is not counted there). Each timed call ends
when every parameter is ready (`jax.block_until_ready`). Besides the wall time: the CPU seconds of all threads
(user, sys) and the minor page faults of the call. The checkpoints are those of benchmarks/bench_decompose_cli.py
(`write_checkpoints`).
Writes $OUT/bench_load.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

ITEMS = {"wan_dit": "wan_dit", "wan_vae": "wan_vae", "wan_clip": "wan_clip", "effect_lora": "effect.safetensors",
         "quality_lora": "quality.safetensors"}


def _worker(folder: str, item: str, profile: str | None) -> dict:
    """Runs in the fresh process: times one item's load."""
    import jax
    from flax import nnx

    from converters import registry
    from omnijax.omnimatte.experts import EXPERT_KINDS
    from omnijax.omnimatte.lora_io import expert_with_lora

    jax.devices()  # the backend's start is not the load's
    base = None
    if item.endswith("_lora"):
        base = registry.load("wan_dit", os.path.join(folder, "wan_dit"), dtype="bf16")[1]

    def call():
        if base is None:
            return registry.load(item, os.path.join(folder, ITEMS[item]), dtype="bf16")[1]
        name = item.removesuffix("_lora")
        return expert_with_lora(base, os.path.join(folder, ITEMS[item]), mask=EXPERT_KINDS[name].mask, name=name)

    prof = None
    if profile:
        import cProfile

        prof = cProfile.Profile()
        prof.enable()
    r0, t = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    model = call()
    jax.block_until_ready(nnx.state(model))
    seconds, r1 = time.perf_counter() - t, resource.getrusage(resource.RUSAGE_SELF)
    if prof is not None:
        prof.disable()
        prof.dump_stats(os.path.join(profile, f"{item}.prof"))
    n = len(jax.tree.leaves(nnx.state(model.lora if base is not None else model, nnx.Param)))
    # CPU seconds of all threads: on a shared machine less noisy than the wall time. Fresh memory's first touch
    # (minor page faults) is slow on this kind of VM, so the faults are counted too.
    return {"item": item, "seconds": round(seconds, 3), "arrays": n, "user_s": round(r1.ru_utime - r0.ru_utime, 2),
            "sys_s": round(r1.ru_stime - r0.ru_stime, 2), "page_faults": r1.ru_minflt - r0.ru_minflt}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("folder", nargs="?", default="/tmp/ckpts")
    p.add_argument("--write", action="store_true", help="write the checkpoints into FOLDER and exit")
    p.add_argument("--items", default=",".join(ITEMS))
    p.add_argument("--repeats", type=int, default=3, help="fresh processes per item; all but the first count")
    p.add_argument("--profile", default=None, help="folder for a cProfile of each item's last run")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        print(json.dumps(_worker(a.folder, a.worker, a.profile)))
        return 0
    if a.write:
        from benchmarks.bench_decompose_cli import write_checkpoints

        write_checkpoints(a.folder, tiny=False)
        return 0
    from benchmarks.common import emit

    if a.profile:
        os.makedirs(a.profile, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")]))}
    result = {"date": datetime.date.today().isoformat(), "folder": a.folder, "repeats": a.repeats, "seconds": {}}
    for item in a.items.split(","):
        runs = []
        for r in range(a.repeats):
            cmd = [sys.executable, os.path.abspath(__file__), a.folder, "--worker", item]
            if a.profile and r == a.repeats - 1:
                cmd += ["--profile", a.profile]
            out = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if out.returncode:
                raise SystemExit(f"{item} failed:\n{out.stderr[-3000:]}")
            runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
        result["seconds"][item] = [r["seconds"] for r in runs[1:] or runs]
        result.setdefault("runs", {})[item] = runs
        print(f"{item}: " + "; ".join(f"{r['seconds']:.2f} s (user {r['user_s']}, sys {r['sys_s']}, "
                                     f"{r['page_faults'] / 1e3:.0f}k faults)" for r in runs),
              file=sys.stderr, flush=True)
    emit("bench_load", result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
