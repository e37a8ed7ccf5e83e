"""launch/parity.py on the 1.3B Fun-InP DiT with random weights written to disk: per-block error in f32 and bf16,
wall time and peak memory of the command.

  python benchmarks/bench_parity.py                 # H200: 1.3B Fun-InP dims, 81x480x832, f32 then bf16 (~5 min)
  python benchmarks/bench_parity.py --tiny          # CPU dry run: tiny DiT, 5x32x48
Writes $OUT/bench_parity.json (both reports, wall times) and $OUT/parity_{f32,bf16}.png.

The weights are diffusers' own random init of WanTransformer3DModel at the Fun-InP dims, saved as a diffusers
folder (save_pretrained: config.json + safetensors), which diffusers reads with from_pretrained and omnijax with
converters.load_wan_dit. (Original-format files take diffusers' single-file converter instead; the tests cover
that path.) Each dtype runs launch/parity.py in its own process, so peak-memory counters start from zero.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from benchmarks.common import emit  # noqa: E402
from tests.torch_refs import diffusers_wan  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FUN_INP_1P3B = dict(dim=1536, heads=12, layers=30, ffn=8960, text_dim=4096, image_dim=1280, freq_dim=256)
TINY = dict(dim=64, heads=2, layers=2, ffn=128, text_dim=32, image_dim=32, freq_dim=32)


def write_random_dit(path: str, dims: dict, device: str) -> float:
    """Random 1.3B Fun-InP (or tiny) weights as a diffusers folder (f32); returns the seconds it took."""
    t = time.perf_counter()
    torch.manual_seed(0)
    ref = diffusers_wan(i2v=True, device=device, **dims)
    ref.save_pretrained(path, safe_serialization=True, max_shard_size="20GB")
    del ref
    if device == "cuda":
        torch.cuda.empty_cache()
    return time.perf_counter() - t


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiny", action="store_true", help="tiny DiT on the CPU (dry run)")
    ap.add_argument("--size", default=None, help="FRAMESxHEIGHTxWIDTH (default 81x480x832, tiny: 5x32x48)")
    ap.add_argument("--workdir", default=None, help="where the random checkpoint goes (default: a temp dir)")
    args = ap.parse_args()
    device = "cpu" if args.tiny else "gpu"
    size = args.size or ("5x32x48" if args.tiny else "81x480x832")
    out_dir = os.environ.get("OUT") or tempfile.mkdtemp(prefix="bench_parity-")
    work = args.workdir or tempfile.mkdtemp(prefix="parity-ckpt-")
    ckpt = os.path.join(work, "Wan2.1-Fun-1.3B-InP-random")
    res = dict(date=str(datetime.date.today()), size=size, device=device, torch=torch.__version__,
               dims=TINY if args.tiny else FUN_INP_1P3B)
    res["write_weights_s"] = round(write_random_dit(ckpt, res["dims"], "cpu" if args.tiny else "cuda"), 1)
    for dtype in ("f32", "bf16"):
        report = os.path.join(out_dir, f"parity_{dtype}.json")
        t = time.perf_counter()
        proc = subprocess.run([sys.executable, os.path.join(ROOT, "launch", "parity.py"), "--kind", "wan_dit",
                               "--source", ckpt, "--dtype", dtype, "--size", size, "--device", device,
                               "--out", report], capture_output=True, text=True)
        wall = time.perf_counter() - t
        print(proc.stdout)
        if proc.returncode not in (0, 1):
            print(proc.stderr, file=sys.stderr)
            raise SystemExit(f"launch/parity.py --dtype {dtype} failed with status {proc.returncode}")
        with open(report) as f:
            rep = json.load(f)
        res[dtype] = dict(exit_status=proc.returncode, process_wall_s=round(wall, 1),
                          **{k: rep.get(k) for k in ("ok", "first_failure", "wall_s", "torch_s", "jax_load_s",
                                                     "jax_s", "torch_peak_gb", "jax_peak_gb", "host_peak_gb")},
                          output=rep["output"],
                          curve=[{k: r.get(k) for k in ("stage", "rel_l2", "max_abs", "cosine", "torch_bf16_rel_l2",
                                                        "tolerance")} for r in rep["stages"]])
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)
    emit("bench_parity", res)


if __name__ == "__main__":
    main()
