"""Metric writing on process 0: a JSONL file plus TensorBoard event files (tensorboardX; clu needs TensorFlow).

Files under the writer's directory:
  metrics.jsonl   one JSON object per `write` call: {"step": int, "loss": float, ...}, appended (a resumed run
                  continues the same file); flushed at every write so a crash loses nothing.
  tb/             TensorBoard event files (scalars under the same names).
Other processes write nothing. The writer flushes and closes on `close()`, on leaving a `with` block and at
interpreter exit.
"""

from __future__ import annotations

import atexit
import json
import math
import os
from collections.abc import Mapping

import jax
import numpy as np


def _scalar(name: str, value) -> float | int | bool:
    arr = np.asarray(jax.device_get(value))
    if arr.size != 1:
        raise ValueError(f"metric {name!r} is not a scalar (shape {arr.shape})")
    item = arr.reshape(()).item()
    if isinstance(item, bool | int):
        return item
    return float(item)


def _json_number(x):
    # JSON has no NaN/Infinity; keep the line parseable by strict readers and still visible.
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    return x


class MetricWriter:
    """Writes scalar metrics for a step.

    Args:
      directory: where metrics.jsonl and tb/ go (created on process 0).
      tensorboard: also write TensorBoard event files.
      process_index: override jax.process_index() (tests).
    """

    def __init__(self, directory: str | os.PathLike, *, tensorboard: bool = True, jsonl_name: str = "metrics.jsonl",
                 process_index: int | None = None):
        self.active = (jax.process_index() if process_index is None else process_index) == 0
        self.directory = os.fspath(directory)
        self._file = None
        self._tb = None
        if not self.active:
            return
        os.makedirs(self.directory, exist_ok=True)
        self.jsonl_path = os.path.join(self.directory, jsonl_name)
        self._file = open(self.jsonl_path, "a", encoding="utf-8")  # noqa: SIM115 (closed in close())
        if tensorboard:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(logdir=os.path.join(self.directory, "tb"))
        atexit.register(self.close)

    def write(self, step: int, metrics: Mapping[str, object] | None = None, **scalars) -> None:
        """Records scalars (jax/numpy 0-d arrays or Python numbers) for `step`."""
        if not self.active:
            return
        values = {k: _scalar(k, v) for k, v in {**(metrics or {}), **scalars}.items()}
        if "step" in values:
            raise ValueError("'step' is the writer's own field; pass it as the step argument")
        line = {"step": int(step), **{k: _json_number(v) for k, v in values.items()}}
        self._file.write(json.dumps(line, allow_nan=False) + "\n")
        self._file.flush()
        if self._tb is not None:
            for k, v in values.items():
                self._tb.add_scalar(k, float(v), global_step=int(step))

    def flush(self) -> None:
        if self._file is not None:
            self._file.flush()
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """All records of a metrics.jsonl file, in order."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
