"""The stages after the sampler compiled while the sampler runs (Decomposer._run_sampler): on a clip's first call the
decoder, the reductions after it and (warm_image_encoder) the CLIP program are traced, lowered and compiled on the
"omnijax-warm" thread, none of them on the calling thread, the sampler is traced once, and the layers are those of
a Decomposer that compiles each program when it is called."""

import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import monitoring

from converters import registry
from omnijax.omnimatte import decompose as decompose_mod
from omnijax.omnimatte.decompose import Decomposer, SamplerSettings, _compile_ahead, _join, start_decompose
from tests.omnimatte.helpers import experts, tiny_base

N, H, W = 9, 32, 64
SETTINGS = SamplerSettings(steps=2)
LATER = {"vae_decode", "to_unit", "to_alpha", "stack"}  # the decoder, the reductions after it


class Compiles:
    """(thread name, program name) of every program JAX traces, lowers or compiles while active; `steps` the same
    with the step ("trace", "lower", "compile")."""

    STEPS = {"/jax/core/compile/jaxpr_trace_duration": "trace",
             "/jax/core/compile/jaxpr_to_mlir_module_duration": "lower",
             "/jax/core/compile/backend_compile_duration": "compile"}

    def __init__(self):
        self.seen, self.steps, self._on = [], [], False
        monitoring.register_event_duration_secs_listener(self._record)

    def _record(self, event, seconds, *, fun_name=None, **_):
        if self._on and fun_name and event in self.STEPS:
            name = fun_name[4:-1] if fun_name.startswith("jit(") else fun_name
            self.seen.append((threading.current_thread().name, name))
            self.steps.append((threading.current_thread().name, name, self.STEPS[event]))

    def __enter__(self):
        self.seen.clear()
        self.steps.clear()
        self._on = True
        return self

    def __exit__(self, *exc):
        self._on = False

    def on(self, thread: str) -> set:
        return {name for t, name in self.seen if t == thread}


@pytest.fixture(scope="module")
def compiles():
    return Compiles()


def _clip(seed, k=2):
    rng = np.random.default_rng(seed)
    video = rng.integers(0, 256, (N, H, W, 3), dtype=np.uint8)
    masks = np.zeros((k, N, H, W), np.uint8)
    masks[0, :, 5:20, 10:30] = 255
    masks[-1, :, 18:30, 36:60] = 255
    return video, masks


def _decomposer(cache, *, committed=False, **kw):
    base, vae = tiny_base(), registry.load("wan_vae", "tiny", dtype="f32")[1]
    if committed:  # as converted checkpoints load: arrays committed to the device (then part of a program's key)
        for module in (base, vae):
            from flax import nnx

            nnx.update(module, jax.device_put(nnx.state(module), jax.devices()[0]))
    cond = registry.conditioner(cache, text_encoder=registry.load("umt5", "tiny", dtype="f32")[1],
                                image_encoder=registry.load("wan_clip", "tiny", dtype="f32")[1], tokenizer="tiny")
    return Decomposer(*experts(base), vae, cond, attention_backend="xla", **kw)


@pytest.mark.slow
@pytest.mark.parametrize("committed", [False, True], ids=["uncommitted", "committed"])
def test_later_stages_compile_while_the_sampler_runs(compiles, tmp_path, monkeypatch, committed):
    video, masks = _clip(0)
    dec = _decomposer(str(tmp_path), committed=committed)
    with compiles:
        got = start_decompose(dec, video, masks, SETTINGS, height=32).result()
    assert LATER <= compiles.on("omnijax-warm"), compiles.seen
    assert not LATER & compiles.on("MainThread"), compiles.seen
    # The sampler compiled ahead is the one its call runs: traced, lowered and compiled once, on the calling thread
    # (a placement that differs from the call's would lower and compile it again without tracing it again).
    assert dec.sampler_traces == 1
    assert sorted(step for _, name, step in compiles.steps if name == "run") == ["compile", "lower", "trace"]
    assert ("MainThread", "run") in compiles.seen and ("omnijax-warm", "run") not in compiles.seen

    # The same clip through a Decomposer whose warm-up fails: a warning, and every program compiled when called.
    def fail(*a, **k):
        raise RuntimeError("no")

    monkeypatch.setattr(decompose_mod, "_compile_ahead", fail)
    plain = _decomposer(str(tmp_path), committed=committed)
    with compiles, pytest.warns(RuntimeWarning, match="compiling the stages after the sampler ahead failed"):
        want = start_decompose(plain, video, masks, SETTINGS, height=32).result()
    assert LATER - {"stack"} <= compiles.on("MainThread")  # (jit(jnp.stack) is shared: compiled above)
    for name in ("background", "alphas", "foregrounds"):
        np.testing.assert_array_equal(getattr(got, name), getattr(want, name), err_msg=name)


@pytest.mark.slow
@pytest.mark.parametrize("warm", [True, False], ids=["warm_image_encoder", "off"])
def test_batch_compiles_clip_during_the_first_sampler_run(compiles, tmp_path, warm):
    """A batch whose first clip's CLIP features are cached: the CLIP program is first needed by clip 2; with
    warm_image_encoder it was compiled on the warm thread during clip 1's sampler, so clip 2 compiles nothing."""
    first, second = _clip(1, k=1), _clip(2, k=1)
    dec = _decomposer(str(tmp_path), warm_image_encoder=warm)
    dec.conditioner.image(np.asarray(first[0][:1], np.float32) / 255 * 2.0 - 1.0)  # clip 1's features, cached
    jax.clear_caches()  # the CLIP program that computed them is gone from this process's caches
    with compiles:
        start_decompose(dec, *first, SETTINGS, height=32).result()
    assert "clip_encode" not in compiles.on("MainThread")  # clip 1 took its features from the cache
    assert ("clip_encode" in compiles.on("omnijax-warm")) == warm
    with compiles:
        start_decompose(dec, *second, SETTINGS, height=32).result()
    assert compiles.on("MainThread") == (set() if warm else {"clip_encode"}), compiles.seen


@pytest.mark.parametrize("arg", [0, 1.5, np.int32(0), np.ones(3, np.float32), "weak array", "committed"])
def test_compile_ahead_builds_the_program_the_call_runs(compiles, arg):
    """Python scalars and weakly typed arrays are weakly typed to jit (another program than a strong value), and a
    committed array's placement is part of a program's key: compiled ahead, the call compiles nothing."""
    if isinstance(arg, str) and arg == "weak array":
        arg = jnp.asarray(2.0)
        assert arg.weak_type
    elif isinstance(arg, str):
        arg = jax.device_put(np.ones(3, np.float32), jax.devices()[1])
    f = jax.jit(lambda x: x * 3)
    _compile_ahead(f, arg)
    with compiles:
        f(arg)
    assert compiles.seen == []


def test_join_waits_out_an_interrupt():
    """A Ctrl-C while the main thread waits for the warm thread is raised only once that thread has ended (an
    interpreter exiting while XLA compiles on another thread aborts)."""

    class InterruptedOnce(threading.Thread):
        def __init__(self):
            super().__init__(target=time.sleep, args=(0.3,))
            self.joins = 0

        def join(self, timeout=None):
            self.joins += 1
            if self.joins == 1:
                raise KeyboardInterrupt
            super().join(timeout)

    thread = InterruptedOnce()
    thread.start()
    with pytest.raises(KeyboardInterrupt):
        _join(thread)
    assert not thread.is_alive() and thread.joins == 2
