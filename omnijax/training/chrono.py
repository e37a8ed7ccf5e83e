"""Training-progress clock: step time without the compile step, ETA, throughput per device.

Usage in the loop (call `tick` after the step's result is ready, e.g. after reading the loss):

    chrono = Chrono(total_steps, examples_per_step=global_batch, first_step=restored_step)
    for step in range(first_step + 1, total_steps + 1):
        ...train...
        chrono.tick(step)
        with chrono.paused():   # checkpoints and sample previews do not count as step time
            ckpt.save(...)
        if time_to_log: writer.write(step, **chrono.metrics())
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable

import jax


class Chrono:
    """Measures training speed.

    Args:
      total_steps: the step number the run ends at.
      examples_per_step: global batch size (examples consumed per step).
      first_step: the step the run (re)starts from (0, or the restored checkpoint's step).
      num_devices: devices sharing the work (default: all of them).
      clock: seconds as a float (tests inject a fake one).
    """

    def __init__(self, total_steps: int, *, examples_per_step: int, first_step: int = 0,
                 num_devices: int | None = None, clock: Callable[[], float] = time.perf_counter):
        self.total_steps = int(total_steps)
        self.examples_per_step = examples_per_step
        self.num_devices = jax.device_count() if num_devices is None else num_devices
        self.clock = clock
        self.first_step = self.last_step = int(first_step)
        self.first_step_s: float | None = None  # the first step's time: compile + run
        self._measured_s = 0.0  # time of the steps after the first
        self._measured_steps = 0
        self._last = clock()
        self._paused_s = 0.0
        self._pause_start: float | None = None

    def tick(self, step: int) -> None:
        """Marks `step` as done (steps may be skipped between ticks, e.g. when ticking only at log time)."""
        now = self.clock()
        elapsed = now - self._last - self._paused_s
        self._last, self._paused_s = now, 0.0
        n = int(step) - self.last_step
        if n <= 0:
            raise ValueError(f"chrono: step {step} is not after the last tick {self.last_step}")
        if self.first_step_s is None:
            # The first tick after (re)start includes compilation; it must not bias step time or ETA. When it
            # covers several steps (ticking only at log time) they are all left out of the mean.
            self.first_step_s = elapsed
        else:
            self._measured_s += elapsed
            self._measured_steps += n
        self.last_step = int(step)

    def state_dict(self) -> dict:
        """The measured step time (JSON-able), checkpointed so a resumed run keeps its mean and ETA."""
        return {"measured_s": self._measured_s, "measured_steps": self._measured_steps}

    def load_state(self, state: dict) -> None:
        self._measured_s = float(state["measured_s"])
        self._measured_steps = int(state["measured_steps"])

    @contextlib.contextmanager
    def paused(self):
        """Time inside the block (checkpointing, evaluation) is excluded from step time."""
        start = self.clock()
        try:
            yield
        finally:
            self._paused_s += self.clock() - start

    @property
    def step_time(self) -> float | None:
        """Mean seconds per step, compile step excluded (None until two steps have been ticked)."""
        return self._measured_s / self._measured_steps if self._measured_steps else None

    @property
    def eta_s(self) -> float | None:
        t = self.step_time
        return None if t is None else t * max(self.total_steps - self.last_step, 0)

    @property
    def examples_per_s_per_device(self) -> float | None:
        t = self.step_time
        return None if t is None else self.examples_per_step / t / self.num_devices

    @property
    def progress(self) -> float:
        return self.last_step / self.total_steps if self.total_steps else 1.0

    def metrics(self) -> dict[str, float]:
        """Scalars for the metric writer (those known so far)."""
        out = {"chrono/progress": self.progress}
        if self.first_step_s is not None:
            out["chrono/first_step_s"] = self.first_step_s
        if self.step_time is not None:
            out.update({"chrono/step_s": self.step_time, "chrono/eta_h": self.eta_s / 3600,
                        "chrono/examples_per_s_per_device": self.examples_per_s_per_device})
        return out

    def summary(self) -> str:
        """One line for the console: step, progress, step time, throughput and ETA."""
        if self.step_time is None:
            first = "" if self.first_step_s is None else f", first step (compile) {self.first_step_s:.1f}s"
            return f"step {self.last_step}/{self.total_steps}{first}"
        eta = self.eta_s
        return (f"step {self.last_step}/{self.total_steps} ({100 * self.progress:.1f}%), {self.step_time:.3f}s/step, "
                f"{self.examples_per_s_per_device:.2f} ex/s/device, "
                f"ETA {int(eta // 3600)}h{int(eta % 3600 // 60):02d}m")
