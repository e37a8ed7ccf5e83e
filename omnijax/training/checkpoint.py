"""Training checkpoints with orbax: async, atomic (orbax writes a temporary directory and renames it once
complete), keeping the last N.

Layout of `<directory>/<step>/` (one orbax composite checkpoint per step):
  params/   the trainable variables only (those of the optimizer's `wrt` filter, e.g. nnx.LoRAParam), a flat
            {dotted NNX path: array} tree. The frozen base is never re-saved: it comes from the converted
            base checkpoint at every start.
  opt/      the whole nnx.Optimizer state (step counter, moments, schedule count), flat {path: array}.
  rng/      {"key": uint32 key data} of the run's base PRNG key.
  meta/     JSON: {"step", "data_state", "rng_impl", "extra"}; data_state is the input iterator's state, a
            JSON-able dict or bytes (stored as {"__bytes__": base64}).

Restoring reads every array straight into the placement of the target: the live (already sharded) model and
optimizer, or abstract ones whose leaves are jax.ShapeDtypeStruct with a sharding.
"""

from __future__ import annotations

import base64
import dataclasses
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from omnijax.checkpoint import CheckpointError
from omnijax.params import path_str


class TrainingCheckpointError(CheckpointError):
    """A training checkpoint does not fit the model/optimizer it is restored into, or the step does not exist."""


@dataclasses.dataclass
class Restored:
    """What `Checkpointer.restore` hands back besides the arrays it wrote into the model and optimizer."""

    step: int
    rng: jax.Array
    data_state: Any
    extra: dict


def _flat(state: nnx.State) -> dict[str, nnx.Variable]:
    return {path_str(p): v for p, v in nnx.to_flat_state(state)}


def _values(state: nnx.State) -> dict[str, jax.Array]:
    return {k: v.get_value() for k, v in _flat(state).items()}


def _abstract(x) -> jax.ShapeDtypeStruct:
    sharding = getattr(x, "sharding", None)
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)


def _encode_data_state(data_state):
    if isinstance(data_state, bytes | bytearray):
        return {"__bytes__": base64.b64encode(bytes(data_state)).decode("ascii")}
    return data_state


def _decode_data_state(data_state):
    if isinstance(data_state, dict) and set(data_state) == {"__bytes__"}:
        return base64.b64decode(data_state["__bytes__"])
    return data_state


def _key_parts(rng: jax.Array) -> tuple[np.ndarray, str | None]:
    if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):
        return jax.random.key_data(rng), str(jax.random.key_impl(rng))
    return rng, None


class Checkpointer:
    """Saves and restores the trainable state of a run.

    Args:
      directory: the run's checkpoint directory (created if missing).
      keep: how many most recent checkpoints to keep (None: all).
      async_save: write in a background thread; arrays are copied off the device before `save` returns, so
        the next (donating) train step may run at once.
      wrt: which model variables are saved and restored (the optimizer's `wrt`).
    """

    def __init__(self, directory: str | os.PathLike, *, keep: int | None = 3, async_save: bool = True,
                 wrt=nnx.LoRAParam):
        self.directory = os.path.abspath(os.fspath(directory))
        self.wrt = wrt
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save, create=True)
        # Handlers named up front so metadata and partial restores work on a fresh manager (a resumed run).
        handlers = {"params": ocp.StandardCheckpointHandler(), "opt": ocp.StandardCheckpointHandler(),
                    "rng": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()}
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)

    # --- queries
    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    # --- save
    def save(self, step: int, model: nnx.Module, optimizer: nnx.Optimizer, *, rng: jax.Array, data_state=None,
             extra: dict | None = None, force: bool = True) -> bool:
        """Starts saving checkpoint `step` (returns once the arrays are off the device when async).

        Args:
          step: the number of completed training steps (the checkpoint's name).
          model, optimizer: the live objects (e.g. `TrainStep.merge(state)`).
          rng: the run's base PRNG key (typed or raw uint32).
          data_state: the input iterator's state (JSON-able dict, or bytes).
          extra: small JSON-able dict (e.g. config name, metrics) stored with the metadata.
          force: save even if orbax's interval policy would skip this step.
        Returns:
          whether a save was started.
        """
        key_data, impl = _key_parts(rng)
        meta = {"step": int(step), "data_state": _encode_data_state(data_state), "rng_impl": impl,
                "extra": extra or {}}
        args = ocp.args.Composite(
            params=ocp.args.StandardSave(_values(nnx.state(model, self.wrt))),
            opt=ocp.args.StandardSave(_values(nnx.state(optimizer))),
            rng=ocp.args.StandardSave({"key": key_data}),
            meta=ocp.args.JsonSave(meta),
        )
        return self._manager.save(int(step), args=args, force=force)

    # --- restore
    def metadata(self, step: int | None = None) -> dict | None:
        """The JSON metadata {"step", "data_state", "rng_impl", "extra"} of checkpoint `step` (default: the latest),
        read without touching the arrays (e.g. to compare settings before a restore); None without checkpoints."""
        self._manager.wait_until_finished()
        step = self.latest_step() if step is None else step
        if step is None:
            return None
        return self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

    def _read(self, step: int, params_target: dict, opt_target: dict | None):
        meta = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        key_target = {"key": jax.ShapeDtypeStruct((2,) if meta["rng_impl"] is None else
                                                  self._key_shape(meta["rng_impl"]), jnp.uint32)}
        items = dict(params=ocp.args.StandardRestore(params_target), rng=ocp.args.StandardRestore(key_target))
        if opt_target is not None:
            items["opt"] = ocp.args.StandardRestore(opt_target)
        try:
            out = self._manager.restore(step, args=ocp.args.Composite(**items))
        except (ValueError, KeyError) as e:
            raise TrainingCheckpointError(f"checkpoint {self.directory}/{step} does not fit the target: {e}") from e
        return out, meta

    @staticmethod
    def _key_shape(impl: str) -> tuple[int, ...]:
        return tuple(jax.random.key_data(jax.random.key(0, impl=impl)).shape)

    def restore(self, model: nnx.Module, optimizer: nnx.Optimizer | None = None, *,
                step: int | None = None) -> Restored | None:
        """Writes checkpoint `step` (default: the latest) into the model's trainable variables and, if given,
        the optimizer; each array is read straight into the placement of the target's current value, or of
        its abstract value (jax.ShapeDtypeStruct with a sharding, see omnijax.sharding.abstract_sharded).

        Without an optimizer only the adapters are read (e.g. to sample with a training checkpoint).
        Returns None when the directory holds no checkpoint.
        Raises:
          CheckpointError: the checkpoint's arrays do not match the targets (names listed).
        """
        self._manager.wait_until_finished()
        step = self.latest_step() if step is None else step
        if step is None:
            return None
        if step not in self.all_steps():
            raise TrainingCheckpointError(f"no checkpoint for step {step} in {self.directory}; have {self.all_steps()}")
        targets = {"params": _flat(nnx.state(model, self.wrt))}
        if optimizer is not None:
            targets["opt"] = _flat(nnx.state(optimizer))
        for item, variables in targets.items():
            self._check_names(step, item, variables)
        abstract = {item: {k: _abstract(v.get_value()) for k, v in variables.items()}
                    for item, variables in targets.items()}
        out, meta = self._read(step, abstract["params"], abstract.get("opt"))
        for item, variables in targets.items():
            for k, var in variables.items():
                var.set_value(out[item][k])
        key = out["rng"]["key"]
        rng = key if meta["rng_impl"] is None else jax.random.wrap_key_data(key, impl=meta["rng_impl"])
        return Restored(step=int(meta["step"]), rng=rng, data_state=_decode_data_state(meta["data_state"]),
                        extra=meta.get("extra") or {})

    def _check_names(self, step: int, item: str, targets: dict) -> None:
        """Orbax errors on a structure mismatch are long; name the missing and unexpected leaves instead."""
        meta = self._manager.item_metadata(step)
        stored = meta[item] if meta is not None and item in meta else None
        if stored is None:
            return
        have, want = set(stored.keys()), set(targets)
        if have != want:
            raise TrainingCheckpointError(f"checkpoint {self.directory}/{step} item {item!r}: missing "
                                  f"{sorted(want - have)[:10]}, unexpected {sorted(have - want)[:10]}")

    def delete_from(self, step: int) -> list[int]:
        """Deletes the checkpoints of `step` and later (e.g. saved from a state later found wrecked), after any
        pending save is committed; returns the deleted steps."""
        self._manager.wait_until_finished()
        gone = [s for s in self.all_steps() if s >= step]
        for s in gone:
            self._manager.delete(s)
        self._manager.reload()
        return gone

    # --- lifecycle
    def wait(self) -> None:
        """Blocks until pending async saves are committed."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
