"""omnijax.compile_cache: a second process reads the programs the first one compiled, small ones included."""

import json
import os
import subprocess
import sys
import textwrap

from omnijax import compile_cache

# Two small programs (each compiles in milliseconds: JAX's default 1 s floor would keep neither). The process
# prints JAX's own cache counters.
SCRIPT = textwrap.dedent("""
    import sys
    import jax, jax.numpy as jnp
    from jax import monitoring
    from omnijax import compile_cache
    counts = {"hits": 0, "misses": 0}
    def listen(event, **kw):
        if event == "/jax/compilation_cache/cache_hits": counts["hits"] += 1
        if event == "/jax/compilation_cache/cache_misses": counts["misses"] += 1
    monitoring.register_event_listener(listen)
    clock = compile_cache.CompileClock().start()
    compile_cache.enable(None if sys.argv[1] == "off" else sys.argv[1])
    x = jnp.arange(64.0).reshape(8, 8)
    jax.block_until_ready(jax.jit(lambda a: jnp.tanh(a @ a.T) + 1)(x))
    jax.block_until_ready(jax.jit(lambda a: jnp.cumsum(a, 1) * 3)(x))
    import json
    print(json.dumps(clock.totals()))
    print(counts["hits"], counts["misses"])
""")


def _run(arg, env):
    out = subprocess.run([sys.executable, "-c", SCRIPT, arg], capture_output=True, text=True, env=env, check=True)
    lines = out.stdout.strip().splitlines()
    hits, misses = (int(v) for v in lines[-1].split())
    clock = json.loads(lines[-2])
    # The CompileClock's counts are JAX's own events, seen by the script's independent listener too.
    assert (clock["cache_hits"], clock["cache_misses"]) == (hits, misses), clock
    assert clock["programs"] >= 2 and clock["trace"] > 0 and clock["compile_or_load"] > 0, clock
    assert (clock["cache_read"] > 0) == (hits > 0), clock
    return hits, misses


def test_second_process_reuses_the_cache(tmp_path):
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "xdg"), "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": os.pathsep.join(sys.path)}
    hits, first = _run("default", env)
    folder = str(tmp_path / "xdg" / "omnijax" / "jax")  # the default: $XDG_CACHE_HOME/omnijax/jax
    # Two jits plus the eager arange/reshape: every one compiled and written, however small.
    assert hits == 0 and first >= 2 and compile_cache.entries(folder) == first
    assert _run("default", env) == (first, 0)
    # --no-compile-cache: nothing read, nothing written.
    before = compile_cache.entries(folder)
    assert _run("off", env) == (0, 0) and compile_cache.entries(folder) == before


def test_default_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert compile_cache.default_dir() == os.path.join(str(tmp_path), "omnijax", "jax")
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert compile_cache.default_dir() == os.path.join(str(tmp_path), "home", ".cache", "omnijax", "jax")


def test_seconds_by_program():
    """programs(): each jitted program's trace / lower / compile seconds under its own name, the costliest first;
    a second call of the same shapes adds nothing, a new shape adds to the same name."""
    import jax
    import jax.numpy as jnp

    def omnijax_test_small(a):
        return a + 1

    def omnijax_test_large(a):
        for _ in range(60):  # a longer trace and a bigger program
            a = jnp.tanh(a @ a.T) * 0.5
        return a

    clock = compile_cache.CompileClock().start()
    x = jnp.ones((8, 8))
    jax.block_until_ready(jax.jit(omnijax_test_large)(x))
    small = jax.jit(omnijax_test_small)
    small(x)
    programs = clock.programs()
    # One row per program: JAX names its trace "omnijax_test_small" and its lowering "jit(omnijax_test_small)".
    assert set(programs["omnijax_test_small"]) == {"trace", "lower", "compile_or_load"}
    names = list(programs)
    assert names.index("omnijax_test_large") < names.index("omnijax_test_small")
    assert list(clock.programs(top=1)) == names[:1]
    small(x)
    assert clock.programs()["omnijax_test_small"] == programs["omnijax_test_small"]
    small(jnp.ones((4, 4)))
    again = clock.programs()["omnijax_test_small"]
    assert again["compile_or_load"] > programs["omnijax_test_small"]["compile_or_load"]
    assert again["trace"] > programs["omnijax_test_small"]["trace"]
