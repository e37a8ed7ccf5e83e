"""The decomposition core: a video and object masks in, a clean background and one alpha matte per object out.

Axis letters: P sampler passes (batch), K objects, F pixel frames (4k+1), H/W pixels, T latent frames, h/w latent
grid, C channels.

Passes: with one object the sampler runs one pass (remove that object: background + its alpha). With K > 1
objects it runs K + 1 passes batched in one call: pass 0 removes the union of all objects and gives THE
background (and the union alpha), pass k removes object k alone and gives alpha_k. Each pass's condition y is
[4-channel latent mask of its removal region ; VAE latent of the full input video] (spec easyomnimatte.md §2).

The sampler (omnijax.sampling.dual_expert) is jitted once per shape; seed and tau are runtime values. Clips
longer than one 81-frame window use temporal multidiffusion (21-latent windows, 4-latent overlap).

A clip's stages (VAE encode, conditioning, sampler, one decode per video, the layers at the input size) are
dispatched one after another without waiting for results: the device runs them in order while the host traces,
lowers or loads the next stage's program (in a fresh process, seconds per stage). The sampler's launch is the
exception (it returns once the sampler has run: its loops' trip counts are runtime values), so on a clip's first
call the stages after it are compiled on a thread while it runs (`Decomposer._run_sampler`). `StageClock` times
each stage from the previous stage's result to its own.

`decompose_video` is the whole job on a video of any size and frame count: fit to the processing size (height,
width a multiple of 16) and to 4k+1 frames (ping-pong), run a `Decomposer`, resize back, recover each object's
foreground (eq. 2) and measure the recomposition PSNR. `start_decompose` is the same without waiting for the
result, so that a batch dispatches the next clip while the device still runs this one (the CLI,
launch/decompose.py; the trainer's preview calls `decompose_video`). A `Decomposer` keeps its compiled pieces,
and `Decomposer.set_experts` swaps in new adapter values without recompiling.
"""

from __future__ import annotations

import dataclasses
import functools
import queue
import threading
import time
import warnings
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from omnijax.io.video import to_unit_float
from omnijax.omnimatte.alpha import recomposition_psnr, recover_foreground, video_to_alpha
from omnijax.omnimatte.masks import condition_y, latent_mask, removal_mask
from omnijax.sampling.dual_expert import make_sampler
from omnijax.sampling.multidiffusion import TemporalWindows, repeat_for_windows, split_windows
from omnijax.sampling.schedules import inference_sigmas, switch_index


@dataclasses.dataclass(frozen=True)
class SamplerSettings:
    steps: int = 4
    tau: float = 0.5
    seed: int = 0
    shift: float = 5.0
    window: int = 21  # latent frames per multidiffusion window (81 pixel frames)
    overlap: int = 4
    dilation: int = 11


class ExpertPair(nnx.Module):
    """The Effect and Quality experts; they share one frozen base, which NNX keeps as one set of arrays."""

    def __init__(self, effect: nnx.Module, quality: nnx.Module):
        self.effect, self.quality = effect, quality


def jit_module_fn(module: nnx.Module, fn: Callable, **jit_kw) -> Callable:
    """jit(fn(module, *args)) with the module's arrays passed as an argument (not baked in as constants), named
    after `fn` (JAX's logs and report.json's jax_compile_by_program_s name programs so).
    The returned callable's `.lower(*args)` lowers the same program (e.g. to read its optimised HLO)."""
    graphdef, state = nnx.split(module)

    def program(state, *a):
        return fn(nnx.merge(graphdef, state), *a)

    program.__name__ = program.__qualname__ = getattr(fn, "__name__", "program")
    f = jax.jit(program, **jit_kw)

    def call(*a):
        return f(state, *a)

    call.lower = lambda *a: f.lower(state, *a)
    return call


def _abstract(x):
    """An argument as `jit(...).lower` must see it to build the program a call with `x` looks up: its type as jit
    sees it (a Python scalar or a weakly typed array is weakly typed: another program than a strong one), and an
    array committed to a device keeps its sharding (committed arguments are part of a program's key), an
    uncommitted array or a host value has none; abstract values pass through."""
    if isinstance(x, jax.ShapeDtypeStruct):
        return x
    aval = jax.typeof(x)
    sharding = x.sharding if isinstance(x, jax.Array) and x.committed else None
    return jax.ShapeDtypeStruct(aval.shape, aval.dtype, sharding=sharding, weak_type=aval.weak_type)


def _committed(tree) -> bool:
    return any((isinstance(x, jax.ShapeDtypeStruct) and x.sharding is not None)
               or (isinstance(x, jax.Array) and x.committed) for x in jax.tree.leaves(tree))


def _compile_outputs(lowered, committed: bool):
    """Compiles a lowered program; its outputs as abstract values, placed as a call's outputs are: committed to the
    device when an argument was, else uncommitted. Strongly typed (`Lowered.out_info` drops weak types; the
    Decomposer's programs return none). (Not `Compiled.out_info`: it fails on programs with host callbacks.)"""
    shardings = lowered.compile().output_shardings
    infos = jax.tree.leaves(lowered.out_info, is_leaf=lambda x: hasattr(x, "shape") and hasattr(x, "dtype"))
    shardings = jax.tree.leaves(shardings, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))
    return jax.tree.unflatten(lowered.out_tree, [jax.ShapeDtypeStruct(o.shape, o.dtype, sharding=sh if committed
                                                                      else None) for o, sh in zip(infos, shardings)])


def _compile_ahead(fn, *args):
    """Compiles (or loads from the persistent cache) the program `fn(*args)` runs, without running it, so that the
    call finds it in jit's caches; `args` may be abstract. Returns the call's abstract outputs, committed when an
    argument is. (A `jit_module_fn`'s own arrays are not looked at: in the Decomposer the decoder's latents come
    from its VAE's encoder, so they are committed whenever the VAE's arrays are.)"""
    return _compile_outputs(fn.lower(*jax.tree.map(_abstract, args)), _committed(args))


def sampler_passes(object_masks) -> np.ndarray:
    """[K, F, H, W] object masks -> [P, K, F, H, W] selection of objects each pass removes (see module doc)."""
    k = object_masks.shape[0]
    eye = np.eye(k, dtype=bool)
    return eye if k == 1 else np.concatenate([np.ones((1, k), bool), eye])


class StageClock:
    """Seconds per stage of work dispatched ahead: a thread waits for each stage's outputs in the order they were
    marked and records when they became ready, while the caller goes on dispatching later stages.

    A device runs its programs in dispatch order, so a stage's time is from the previous stage's result to its own;
    the host's tracing, lowering and program loading for a stage hide behind the device work of the stages before
    it instead of adding to it. `timings[name]` accumulates (a dict, e.g. launch/decompose.py's StageTimings).

    after: the clock of work dispatched before this one (the previous clip of a batch, still running when this
      clip's stages are dispatched): the first stage is then timed from the later of this clock's creation and the
      result of the last stage `after` had been given by then, not across the device time of the previous clip.
    """

    def __init__(self, timings: dict, *, after: StageClock | None = None):
        self.timings, self._last, self._error = timings, time.perf_counter(), None
        self._after = None if after is None else (after, after._marked)
        self._marked, self._recorded, self._ready_at = 0, 0, self._last
        self._recorded_cv = threading.Condition()
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._watch, name="stage-clock", daemon=True)
        self._thread.start()

    def mark(self, name: str, outputs) -> None:
        """`outputs` (any pytree of arrays) complete stage `name`."""
        self._marked += 1
        self._queue.put((name, outputs))

    def close(self, *, check: bool = True) -> None:
        """Waits until every marked stage is ready (or failed) and its time recorded; then raises the first stage's
        error (a failed device program), unless `check` is False (the caller is already raising one)."""
        self._queue.put(None)
        self._thread.join()
        if check and self._error is not None:
            raise self._error

    def ready_time(self, count: int) -> float:
        """Waits until the first `count` marked stages are recorded; the time the last of them was ready."""
        with self._recorded_cv:
            self._recorded_cv.wait_for(lambda: self._recorded >= count)
            return self._ready_at

    def _watch(self) -> None:
        while (item := self._queue.get()) is not None:
            name, outputs = item
            try:
                jax.block_until_ready(outputs)
            except Exception as e:  # noqa: BLE001  (raised by close(), in the caller's thread)
                self._error = self._error or e
            now = time.perf_counter()
            if self._after is not None:  # the first stage: from the previous clip's end (then let that clock go)
                self._last = max(self._last, self._after[0].ready_time(self._after[1]))
                self._after = None
            # A stage ready before the previous clip's end (outputs that need no device work, e.g. cached
            # embeddings) took no time of its own; the next stage is timed from that end.
            try:
                self.timings[name] = self.timings.get(name, 0.0) + max(0.0, now - self._last)
            except Exception as e:  # noqa: BLE001  (e.g. a timings dict that records more; never stop the clock)
                self._error = self._error or e
            self._last = max(self._last, now)
            with self._recorded_cv:
                self._recorded, self._ready_at = self._recorded + 1, self._last
                self._recorded_cv.notify_all()


class Decomposer:
    """Runs the models of one decomposition: VAE, conditioning, the two experts and the jitted sampler.

    Args:
      effect, quality: EasyOmnimatte experts (omnijax.omnimatte.branch) over the same base WanDiT.
      vae: WanVAE. conditioner: omnijax.conditioning.Conditioner (umT5 + CLIP through the embedding cache).
      attention_backend: for the DiT (omnijax.layers.attention; "auto": fa3 on a single Hopper GPU, else cuDNN).
      encode_frames_per_step, decode_frames_per_step: latent frames per step of the streamed VAE (more is faster
        and holds more memory; at 81x480x832 on an H100 decode takes 0.99 / 0.94 / 0.91 s at 1 / 2 / 4 frames per
        step with peaks 4.8 / 7.3 / 11.0 GB, docs/benchmarks.md).
      scan_blocks: run the experts' identical blocks as lax.scan loops (omnijax.layers.block_scan): the sampler
        traces and compiles one block per run instead of 60; False unrolls them (same values).
      warm_image_encoder: also compile the CLIP program while the first clip's sampler runs (see `_run_sampler`),
        for later clips whose first frame's features are not in the embedding cache (the CLI sets it for batches).
    """

    def __init__(self, effect, quality, vae, conditioner, *, attention_backend: str = "auto",
                 encode_frames_per_step: int = 2, decode_frames_per_step: int = 4, scan_blocks: bool = True,
                 warm_image_encoder: bool = False):
        self.vae, self.conditioner = vae, conditioner
        self.warm_image_encoder = warm_image_encoder
        self._warmed: set = set()  # the clip shapes whose later stages were compiled during a sampler run
        self.sampler_traces = 0  # times the sampler was traced: a recompile check for callers and tests
        self._graphdef, self._state = nnx.split(ExpertPair(effect, quality))
        dtype = effect.base.dtype

        def expert(name):
            def velocity(z, sigma, cond):
                if name == "effect":
                    self.sampler_traces += 1
                model = getattr(nnx.merge(self._graphdef, cond["params"]), name)
                t = jnp.full((z["background"].shape[0],), 1000.0 * sigma, jnp.float32)
                v_bg, v_alpha = model(z["background"].astype(dtype), z["alpha"].astype(dtype), t, cond["context"],
                                      cond["clip"], cond["y"], attention_backend=attention_backend,
                                      scan=scan_blocks)
                return {"background": v_bg, "alpha": v_alpha}
            return velocity

        self._sample = make_sampler(expert("effect"), expert("quality"))

        def vae_encode(m, v):  # unit-range video [F, H, W, 3] in, latent [1, T, h, w, 16] out
            return m.encode(v[None] * 2.0 - 1.0, frames_per_step=encode_frames_per_step)

        # Latents [P, T, h, w, 16] and a pass index in, that pass's decoded video [1, F, H, W, 3] in [-1, 1] out: one
        # program for the background and every alpha, fed straight from the sampler's output on the device.
        def vae_decode(m, z, i):
            return m.decode(jax.lax.dynamic_slice_in_dim(z, i, 1, 0), frames_per_step=decode_frames_per_step)

        self._encode, self._decode = jit_module_fn(vae, vae_encode), jit_module_fn(vae, vae_decode)
        # The glue between the models as a few compiled programs, not dozens of eager ops (each of which a new
        # process traces, and looks up in or adds to the compilation cache). Built per instance, so that each
        # Decomposer traces the module's mask and condition functions as they are when it first runs (a jit of the
        # same function object would reuse the first instance's trace).
        def conditions(latent, object_masks, context, clip, seed, *, select, dilation):
            return _conditions(latent, object_masks, context, clip, seed, select=select, dilation=dilation)

        self._conditions = jax.jit(conditions, static_argnames=("select", "dilation"))

        def to_unit(v):
            return (v[0] + 1.0) * 0.5

        def to_alpha(v):
            return video_to_alpha(v)[0]

        self._to_unit, self._to_alpha = jax.jit(to_unit), jax.jit(to_alpha)
        self._stack = jax.jit(jnp.stack)

    def set_experts(self, effect, quality) -> None:
        """Uses these experts' current values from now on (e.g. the adapters of a training step). They must have
        the structure of the experts given at construction; the compiled sampler is reused."""
        graphdef, state = nnx.split(ExpertPair(effect, quality))
        if graphdef != self._graphdef:
            raise ValueError("set_experts: the experts differ in structure from the Decomposer's")
        self._state = state

    def condition(self, video, first_frame_prompt: str = ""):
        """Text context [1, L, D] (empty prompt by default) and CLIP features [1, 257, D] of frame 0."""
        from omnijax.models.wan.umt5 import pad_text_context

        text = pad_text_context(self.conditioner.text([first_frame_prompt]))
        clip = self.conditioner.image(np.asarray(video[:1]) * 2.0 - 1.0)
        return jax.device_put(text), jax.device_put(clip)  # copies only (jnp.asarray compiles a program)

    def __call__(self, video, object_masks, settings: SamplerSettings = SamplerSettings(), *, prompt: str = "",
                 timings: dict | None = None, clock: StageClock | None = None):
        """Decomposes one clip at processing resolution.

        Every stage is dispatched without waiting for the one before (the device runs them in order), so the host
        prepares the sampler while the VAE encodes and the decoder while the sampler runs.

        Args:
          video: [F, H, W, 3] float in [0, 1], F = 4k+1, H and W multiples of 16.
          object_masks: [K, F, H, W] in {0, 1} (coarse object masks, no effects).
          settings: steps, tau, seed, multidiffusion layout, mask dilation.
          timings: optional dict that receives seconds per stage (`StageClock`); unused when `clock` is given.
          clock: a StageClock to mark the stages on and leave open (the caller marks later stages, closes it and
            finds the times in its dict); without one, the call waits for its stages and records them in `timings`.
        Returns:
          (background [F, H, W, 3], alphas [K, F, H, W]) as float32 jax arrays in [0, 1].
        """
        f, hh, ww, _ = video.shape
        k = object_masks.shape[0]
        if object_masks.shape[1:] != (f, hh, ww):
            raise ValueError(f"object masks {object_masks.shape} do not match the video {video.shape}")
        own_clock = clock is None
        clock = StageClock({} if timings is None else timings) if own_clock else clock
        try:
            # Copied to the device first: the copies run while the device finishes earlier work (the previous clip
            # of a batch), before condition() may wait for a CLIP embedding computed behind that work.
            video_dev, masks_dev = jax.device_put((np.asarray(video, np.float32), np.asarray(object_masks, np.float32)))
            context, clip = self.condition(video, prompt)
            clock.mark("encoders", (context, clip))
            latent = self._encode(video_dev)  # [1, T, h, w, 16]
            select = tuple(tuple(bool(v) for v in row) for row in sampler_passes(object_masks))  # [P, K]
            y, z, context, clip = self._conditions(latent, masks_dev, context, clip,
                                                   np.int32(settings.seed), select=select,
                                                   dilation=settings.dilation)
            clock.mark("vae_encode", y)

            p = len(select)
            cond = {"params": self._state, "y": y, "context": context, "clip": clip}
            windows = TemporalWindows(latent.shape[1], settings.window, settings.overlap)
            if windows.active:
                cond.update(y=split_windows(cond["y"], windows),
                            context=repeat_for_windows(cond["context"], windows),
                            clip=repeat_for_windows(cond["clip"], windows))
            else:
                windows = None
            sigmas = inference_sigmas(settings.steps, settings.shift)
            out = self._run_sampler(z, sigmas, switch_index(sigmas, settings.tau), cond, windows,
                                    passes=p, frame=(1, hh, ww, 3))
            clock.mark("sampler", out)

            # One latent video per decode call: the background and every alpha share one compiled decoder, and the
            # decoder's working memory is that of one video (81x480x832 with two objects in one call ran out of
            # memory on a 141 GB H200, docs/benchmarks.md). Each decoded RGB video is reduced (to [0, 1], or to one
            # alpha channel) by the next program, so only the reduced arrays stay.
            background = self._to_unit(self._decode(out["background"], np.int32(0)))
            alphas = self._stack(tuple(self._to_alpha(self._decode(out["alpha"], np.int32(i)))
                                       for i in (range(1, p) if p > 1 else range(1))))
            clock.mark("vae_decode", (background, alphas))
        except BaseException:
            if own_clock:
                clock.close(check=False)
            raise
        if own_clock:
            clock.close()
        assert alphas.shape[0] == k
        return background, alphas

    def _run_sampler(self, z, sigmas, k, cond, windows, *, passes: int, frame: tuple):
        """Calls the sampler. Its launch holds this thread until the sampler has run on the device (its loops' trip
        counts are runtime values), and in a new process the later stages' programs were then traced, lowered and
        loaded while the device waited. So on the first call for a clip's shapes the sampler is compiled first,
        and a thread compiles the decoder, the reductions after it and (warm_image_encoder) the CLIP program for
        frames of `frame`'s shape (this clip's: later clips of its processing size use it) while the sampler runs;
        this thread waits for it after the sampler."""
        key = (tuple((x.shape, str(x.dtype)) for x in jax.tree.leaves(z)), windows, passes, frame)
        if key in self._warmed:
            return self._sample(z, sigmas, k, cond, windows)
        out = _compile_outputs(self._sample.lower(z, sigmas, k, cond, windows), _committed((z, cond)))
        # Not a daemon, and joined through Ctrl-C: an interpreter that exits while XLA compiles on another thread
        # aborts (a C++ exception at shutdown) instead of raising KeyboardInterrupt.
        thread = threading.Thread(target=self._warm_later_stages, args=(out, passes, frame), name="omnijax-warm")
        thread.start()
        try:
            result = self._sample(z, sigmas, k, cond, windows)
        finally:
            _join(thread)
        self._warmed.add(key)  # (after a failure or an interrupt, the next call compiles ahead again)
        return result

    def _warm_later_stages(self, out, passes: int, frame: tuple) -> None:
        """Compiles the programs that run after the sampler on its abstract outputs `out` (see `_run_sampler`). Best
        effort: a program that fails here is compiled again by its call, which raises its own error."""
        try:
            # One decoder program for the background and the alphas (the sampler returns both latents in one shape).
            decoded = _compile_ahead(self._decode, out["background"], np.int32(0))
            _compile_ahead(self._to_unit, decoded)
            alpha = _compile_ahead(self._to_alpha, decoded)
            _compile_ahead(self._stack, (alpha,) * max(passes - 1, 1))
            encoder = getattr(self.conditioner, "image_encoder", None)
            if self.warm_image_encoder and encoder is not None:
                from omnijax.models.wan.clip import compile_encode

                compile_encode(encoder, frame)
        except Exception as e:  # noqa: BLE001  (see the docstring)
            warnings.warn(f"compiling the stages after the sampler ahead failed ({type(e).__name__}: {e}); they are "
                          f"compiled when called", RuntimeWarning, stacklevel=1)


def _join(thread: threading.Thread) -> None:
    """thread.join(), waited out through KeyboardInterrupt, which is raised once the thread has ended."""
    interrupted = None
    while thread.is_alive():
        try:
            thread.join()
        except KeyboardInterrupt as e:
            interrupted = e
    if interrupted is not None:
        raise interrupted


def _conditions(latent, object_masks, context, clip, seed, *, select, dilation):
    """Everything the sampler takes besides the weights, for P passes (`select`: [P][K] objects each removes):
    y [P, T, h, w, 20] (the pass's removal mask in latent form ; the video latent), the initial noise of both
    latents (background, alpha: split(key(seed))), and the text context and CLIP features repeated per pass."""
    masks = jnp.stack([removal_mask(object_masks[np.flatnonzero(row)], dilation=dilation) for row in select])
    p = len(select)
    y = condition_y(latent_mask(masks), jnp.broadcast_to(latent, (p, *latent.shape[1:])))
    key_bg, key_alpha = jax.random.split(jax.random.key(seed))
    shape = (p, *latent.shape[1:])
    z = {"background": jax.random.normal(key_bg, shape, jnp.float32),
         "alpha": jax.random.normal(key_alpha, shape, jnp.float32)}
    return y, z, jnp.repeat(context, p, 0), jnp.repeat(clip, p, 0)


def pingpong_indices(n: int, target: int) -> np.ndarray:
    """Frame indices 0..n-1 then time-reversed copies (ping-pong) up to `target` frames."""
    if n == 1:
        return np.zeros(target, int)
    period = np.concatenate([np.arange(n), np.arange(n - 2, 0, -1)])
    return period[np.arange(target) % len(period)]


def processing_size(h: int, w: int, height: int) -> tuple[int, int]:
    """(height, width) multiples of 16 keeping the aspect ratio."""
    ph = max(16, int(round(height / 16)) * 16)
    pw = max(16, int(round(w * ph / h / 16)) * 16)
    return ph, pw


def _resize(x, size, method="linear"):
    """Traceable: [F, H, W(, C)] -> [F, h, w(, C)] float32."""
    x = jnp.asarray(x, jnp.float32)
    if tuple(x.shape[1:3]) == tuple(size):
        return x
    return jax.image.resize(x, (x.shape[0], *size, *x.shape[3:]), method, antialias=True)


_resize_jit = jax.jit(_resize, static_argnames=("size", "method"))


def resize(x, size, method="linear"):
    """[F, H, W(, C)] float -> [F, h, w(, C)] float32 numpy; antialiased when shrinking (area-like, as the
    reference). One compiled program per shape (jax.image.resize eagerly is a dozen small ones)."""
    if tuple(x.shape[1:3]) == tuple(size):
        return np.asarray(x, np.float32)
    return np.asarray(_resize_jit(x, size=tuple(size), method=method))


def to_uint8(x):
    """Traceable: float in [0, 1] -> uint8 round(255 x), clipped; the same values as omnijax.io.video.to_uint8."""
    return jnp.clip(jnp.round(x.astype(jnp.float32) * 255.0), 0.0, 255.0).astype(jnp.uint8)


@functools.partial(jax.jit, static_argnames=("size", "frames", "uint8"))
def _layers_at(video, background, alphas, *, size, frames, uint8=False):
    """The layers at the input's `size` and first `frames` frames: background and alphas resized and clipped to
    [0, 1], each object's foreground (eq. 2) and its recomposition PSNR [K], in one compiled program (objects one
    after another, so the working memory beyond the outputs is one object's). uint8: the layers as uint8 (the PSNR
    still of the float layers)."""
    out = to_uint8 if uint8 else (lambda x: x)
    background, alphas = background[:frames], alphas[:, :frames]
    background = jnp.clip(_resize(background, size), 0.0, 1.0)

    def one(alpha):
        alpha = jnp.clip(_resize(alpha, size), 0.0, 1.0)
        fg = recover_foreground(video, alpha, background)
        return out(alpha), out(fg), recomposition_psnr(video, fg, alpha, background)

    alphas, fgs, psnr = jax.lax.map(one, alphas)
    return out(background), alphas, fgs, psnr


@dataclasses.dataclass
class Layers:
    """The result of `decompose_video`, at the input's size and frame count (floats in [0, 1]; with uint8=True the
    three layers are uint8, round(255 x)).

    background [F, H, W, 3]; alphas [K, F, H, W]; foregrounds [K, F, H, W, 3] (eq. 2);
    psnr: recomposition PSNR (dB) per object of alpha*F + (1-alpha)*B against the input;
    processing_size (h, w) and processing_frames (4k+1) the models ran at; timings: seconds per stage.
    """

    background: np.ndarray
    alphas: np.ndarray
    foregrounds: np.ndarray
    psnr: list[float]
    processing_size: tuple[int, int]
    processing_frames: int
    timings: dict


def decompose_video(decomposer: Decomposer, video, object_masks, settings: SamplerSettings = SamplerSettings(), *,
                    height: int = 480, prompt: str = "", timings: dict | None = None, uint8: bool = False) -> Layers:
    """Decomposes a video of any size and frame count into a background and one RGBA layer per object.

    Args:
      decomposer: the models (built once; reused across calls without recompiling for the same sizes).
      video: [F, H, W, 3] uint8, or float in [0, 1].
      object_masks: [K, F, H, W] uint8 (binarised at 240 by the mask preparation), or float in [0, 1].
      settings: sampler steps, tau, seed, multidiffusion layout, mask dilation.
      height: processing height (the width keeps the aspect ratio; both rounded to multiples of 16).
      uint8: return the layers as uint8, converted on the device (what files are written from: a quarter of the
        bytes to copy back, and no conversion on the host).
    Returns:
      Layers at the input's size and frame count.
    """
    return start_decompose(decomposer, video, object_masks, settings, height=height, prompt=prompt,
                           timings=timings, uint8=uint8).result()


class PendingLayers:
    """A clip whose stages are dispatched (`start_decompose`); `result()` waits for them and returns its Layers."""

    def __init__(self, layers, clock: StageClock, timings: dict, size: tuple[int, int], frames: int):
        self._layers, self.clock, self._timings, self._size, self._frames = layers, clock, timings, size, frames

    def result(self) -> Layers:
        """The clip's Layers on the host; raises the error of a stage that failed on the device."""
        try:
            self.clock.close()
            start = time.perf_counter()
            background, alphas, fgs, psnr = jax.device_get(self._layers)  # the copy to the host: postprocess
        finally:
            self._layers = None  # the device arrays go now, failed or not (a batch holds its pending clips)
        self._timings["postprocess"] = self._timings.get("postprocess", 0.0) + time.perf_counter() - start
        return Layers(background, alphas, fgs, [float(v) for v in psnr], self._size, self._frames, self._timings)


def start_decompose(decomposer: Decomposer, video, object_masks, settings: SamplerSettings = SamplerSettings(), *,
                    height: int = 480, prompt: str = "", timings: dict | None = None,
                    after: PendingLayers | None = None, uint8: bool = False) -> PendingLayers:
    """`decompose_video` without waiting: prepares the clip on the host and dispatches its stages, then returns.

    A batch dispatches clip i+1 before taking clip i's result, so that the host's work for the next clip (its
    resizing, transfers, dispatch) and for the last one (its copy back, its files) happens while the device runs.
    The first stage that needs a result on the host (an uncached CLIP embedding) waits for the device's earlier work.

    after: the previous clip's PendingLayers, still running: this clip's first stage is timed from its end
      (StageClock's `after`). Take the results in dispatch order.
    """
    timings = {} if timings is None else timings
    video, masks = to_unit_float(video), to_unit_float(object_masks)
    if video.ndim != 4 or video.shape[-1] != 3:
        raise ValueError(f"video must be [F, H, W, 3], got {video.shape}")
    n, h, w, _ = video.shape
    if masks.ndim != 4 or masks.shape[1:] != (n, h, w):
        raise ValueError(f"object masks {masks.shape} do not match the video: need [K, {n}, {h}, {w}]")
    ph, pw = processing_size(h, w, height)
    target = 4 * -(-(n - 1) // 4) + 1
    idx = pingpong_indices(n, target)
    small = resize(video, (ph, pw))[idx]
    small_masks = np.stack([resize(m, (ph, pw)) for m in masks])[:, idx]
    clock = StageClock(timings, after=None if after is None else after.clock)
    try:
        background, alphas = decomposer(small, small_masks, settings, prompt=prompt, timings=timings, clock=clock)
        layers = _layers_at(video, background, alphas, size=(h, w), frames=n, uint8=uint8)
        clock.mark("postprocess", layers)
        # The copy back is queued now, right behind this clip's work, so that it never waits behind programs
        # dispatched later (the next clip of a batch) when result() asks for it.
        for leaf in jax.tree.leaves(layers):
            leaf.copy_to_host_async()
    except BaseException:
        clock.close(check=False)
        raise
    return PendingLayers(layers, clock, timings, (ph, pw), target)
