"""When does a jitted call return to Python? A loop whose trip count is a traced value against a fixed one.

  python benchmarks/bench_dispatch.py

The dual-expert sampler (omnijax.sampling.dual_expert) runs `lax.fori_loop(0, k, ...)` with a traced switch index k,
so that another tau does not recompile. On a GPU such a loop is a while loop whose condition the host reads after
every iteration, so the call that launches it returns only when the loop is done on the device; a loop of fixed
length (or no loop) returns at once. launch/decompose.py therefore takes each clip's result on another thread than
the one dispatching the next clip (docs/benchmarks.md, session 9). Prints, for each form, the seconds until the call
returned and until its result was ready; writes $OUT/bench_dispatch.json.
"""

from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from benchmarks.common import emit  # noqa: E402


def _step(_, x):
    return jnp.tanh(x @ x) * 0.5


@jax.jit
def traced_count(x, n):
    return jax.lax.fori_loop(0, n, _step, x)


@jax.jit
def fixed_count(x):
    return jax.lax.fori_loop(0, STEPS, _step, x)


STEPS = 200


def timed(fn, *args) -> dict:
    jax.block_until_ready(fn(*args))  # compiled and warm
    start = time.perf_counter()
    out = fn(*args)
    returned = time.perf_counter() - start
    jax.block_until_ready(out)
    return {"returned_s": round(returned, 4), "ready_s": round(time.perf_counter() - start, 4)}


def main():
    n = 4096 if jax.devices()[0].platform == "gpu" else 256
    x = jax.random.normal(jax.random.key(0), (n, n), jnp.float32) / n ** 0.5
    result = {"device": jax.devices()[0].device_kind, "jax": jax.__version__, "steps": STEPS, "matrix": n,
              "traced_trip_count": timed(traced_count, x, jnp.int32(STEPS)),
              "fixed_trip_count": timed(fixed_count, x)}
    emit("bench_dispatch", result)


if __name__ == "__main__":
    main()
