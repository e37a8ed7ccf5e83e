"""Tasks: what the one trainer (tasks/trainer.py, run by launch/train.py) trains, behind a protocol of six functions.

`config.task` names the task: a key of TASKS ("omnimatte") or a dotted module path, so a new task is a new
module plus a new config, with no change to the trainer. A task module binds a config to the library
(omnijax/), the data pipelines (data/) and the model loader (converters.registry); it is the layer that may
import all three, which the library itself never does.

A task module provides (batches are dicts of arrays; `config` is the job's ml_collections.ConfigDict):

  build(config, mesh) -> Models
      The models, parameters created already sharded on `mesh` (converters.registry.load). `Models.trainable`
      is the nnx.Module the optimizer trains: only its variables of the filter `Models.wrt` (nnx.LoRAParam, the
      adapters, unless the task says otherwise; nnx.Param trains every weight) get gradients, optimizer state and
      checkpoints. `Models.frozen` holds whatever else the task needs (encoders, conditioners).
      `Models.signature` is a small JSON-able dict of the settings that shape the adapters; it is stored with
      every checkpoint and a resume whose signature differs stops with a one-line error.
  input_pipeline(config, *, seed) -> iterable of host batches with get_state() / set_state() on its iterator
      (a grain DataLoader), this process's share of the global batch.
  make_batch(models, config, mesh) -> fn(host_batch, key) -> dict of global jax.Arrays
      Host batch -> the step's batch, placed batch-split over the mesh's ("data", "fsdp") axes; frozen
      encoders run here, outside the differentiated step. `key` is the step's data key.
  loss(model, batch, rng, *, config) -> scalar f32
      The objective of one step, differentiated with respect to the model's `Models.wrt` variables.
  make_preview(models, config) -> fn(model, path)
      Built once; each call writes one preview image of the model being trained to `path` (compiled pieces
      are reused between calls).
  export(model, config, workdir) -> list of paths
      Writes the trained result (e.g. LoRA files) into the workdir.
"""

from __future__ import annotations

import dataclasses
import importlib
from types import ModuleType
from typing import Any

from flax import nnx

TASKS = {"omnimatte": "tasks.omnimatte", "inpaint": "tasks.inpaint"}
PROTOCOL = ("build", "input_pipeline", "make_batch", "loss", "make_preview", "export")


class SetupError(ValueError):
    """A configuration problem the user must fix (the trainer prints it as one line)."""


@dataclasses.dataclass
class Models:
    """What a task's `build` returns (see the module docstring)."""

    trainable: nnx.Module
    frozen: dict[str, Any]
    signature: dict
    wrt: Any = nnx.LoRAParam  # the nnx filter of the variables trained (and checkpointed)


def get_task(name: str) -> ModuleType:
    """The task module of `config.task`: a TASKS key or a dotted module path; checked against PROTOCOL."""
    try:
        module = importlib.import_module(TASKS.get(name, name))
    except ModuleNotFoundError as e:
        raise SetupError(f"config.task={name!r}: no such task ({e}); known: {', '.join(TASKS)}") from e
    missing = [f for f in PROTOCOL if not callable(getattr(module, f, None))]
    if missing:
        raise SetupError(f"task module {module.__name__} lacks {', '.join(missing)} (see tasks/__init__.py)")
    return module
