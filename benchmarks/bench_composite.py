"""Composition throughput (CPU, one process): samples/s of the procedural source + compositor.

    python benchmarks/bench_composite.py [--small] [--samples N]

Times, per size, the procedural foreground, the procedural background and the compositor separately (median
over N samples after one warm-up sample) and prints one JSON object; writes it to $OUT/composite.json if $OUT
is set. Default sizes: 81x480x832 (Wan 480p) and 17x256x448; --small runs 9x64x64 only.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from data.composite import CompositeConfig, composite, sample_params  # noqa: E402
from data.procedural import ProceduralSource  # noqa: E402


def bench(f: int, h: int, w: int, n: int) -> dict:
    cfg = CompositeConfig(num_frames=f, height=h, width=w)
    fg, bg = ProceduralSource(0), ProceduralSource(1)
    times = {"foreground": [], "background": [], "composite": []}
    cpu = []
    for i in range(n + 1):
        c0 = time.process_time()
        t0 = time.perf_counter()
        rgb, alpha = fg.foreground(i, f, h, w)
        t1 = time.perf_counter()
        b = bg.background(i, f, h, w)
        t2 = time.perf_counter()
        composite(rgb, alpha, b, sample_params(np.random.default_rng(i), cfg), cfg)
        t3 = time.perf_counter()
        if i:
            cpu.append(time.process_time() - c0)  # the first sample pays imports and page faults
            times["foreground"].append(t1 - t0)
            times["background"].append(t2 - t1)
            times["composite"].append(t3 - t2)
    med = {k: float(np.median(v)) for k, v in times.items()}
    total = sum(med.values())
    # CPU seconds are reported beside wall seconds: on a shared machine the wall clock includes waiting.
    return {"size": f"{f}x{h}x{w}", "samples": n, "median_s": {**med, "total": total},
            "samples_per_s": 1.0 / total, "composite_only_samples_per_s": 1.0 / med["composite"],
            "cpu_s_per_sample": float(np.median(cpu)), "samples_per_cpu_s": 1.0 / float(np.median(cpu))}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--small", action="store_true")
    p.add_argument("--samples", type=int, default=3)
    a = p.parse_args()
    sizes = [(9, 64, 64)] if a.small else [(81, 480, 832), (17, 256, 448), (9, 64, 64)]
    res = {"bench": "composite", "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
           "load_avg_1m": os.getloadavg()[0],
           "results": [bench(*s, a.samples if s[0] > 9 else 10 * a.samples) for s in sizes]}
    print(json.dumps(res))
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "composite.json"), "w") as fh:
            json.dump(res, fh, indent=1)


if __name__ == "__main__":
    main()
