"""The one training loop: drives any task (tasks/__init__.py) chosen by `config.task`; nothing here is
task-specific. launch/train.py is its command (flags, logs, exit codes); benchmarks and tests call `train` directly.

One readable loop (big_vision's train.py as the model): logging -> mesh -> input -> models (born sharded) ->
optimizer / restore -> compiled step -> loop (step; log; non-finite guard; checkpoint; preview) -> export.
The workdir holds checkpoints/ (the trained params, i.e. the task's Models.wrt: the LoRA adapters or every weight;
optimizer state, step, data-iterator state, rng, the task's signature and the chrono state: a rerun resumes
exactly), metrics.jsonl + TensorBoard events, previews/*.png and what the task exports.

`check_config` runs before any model is built (numbers in range, model files present, the workdir writable). A
resume must have the checkpoint's signature (expert kind, rank, targets, base size); other changed settings (lr,
total_steps, ...) are logged and take effect. When the non-finite guard stops a run, the checkpoints saved from the
state that went bad are deleted, so a rerun (with a lower lr) resumes from a good one.
"""

from __future__ import annotations

import functools
import json
import math
import os
import time

import jax
import numpy as np
from absl import logging
from flax import nnx

from omnijax import sharding
from omnijax.io.atomic import atomic_write, unwritable
from omnijax.io.sheet import title_file
from omnijax.training.checkpoint import Checkpointer
from omnijax.training.chrono import Chrono
from omnijax.training.metrics import MetricWriter
from omnijax.training.optim import make_optimizer
from omnijax.training.step import NonFiniteGuard, make_train_step
from tasks import SetupError, get_task

# Settings a resume may change (logged); any other change of a checkpoint's config is also only logged, but the
# task's signature (expert kind, rank, targets, base) must match or the resume stops.
_POSITIVE_INTS = ("total_steps", "log_steps", "ckpt_steps", "input.batch_size", "evals.preview_steps",
                  "loss.nonfinite_patience")


def _get(config, dotted: str):
    node = config
    for part in dotted.split("."):
        if node is None or part not in node:
            return None
        node = node[part]
    return node


def check_config(config, workdir: str) -> None:
    """Checks before any model is built: numbers in range, the model files exist, the workdir is writable."""
    for key in _POSITIVE_INTS:
        v = _get(config, key)
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
            raise SetupError(f"config.{key} = {v!r}: must be an integer >= 1")
    keep = config.get("keep_ckpt")
    if keep is not None and (not isinstance(keep, int) or keep < 1):
        raise SetupError(f"config.keep_ckpt = {keep!r}: must be an integer >= 1 (or None: keep all)")
    lr = config.get("lr")
    if not isinstance(lr, int | float) or not math.isfinite(lr) or lr <= 0:
        raise SetupError(f"config.lr = {lr!r}: must be a finite number > 0")
    for name, src in dict(config.get("model_init") or {}).items():
        if isinstance(src, str) and src and src != "tiny" and not os.path.exists(src):
            raise SetupError(f"config.model_init.{name} = {src!r}: no such file or folder")
        if isinstance(src, str) and src and src != "tiny" and not os.access(src, os.R_OK):
            raise SetupError(f"config.model_init.{name} = {src!r}: not readable")
    workdir = os.path.abspath(workdir)
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise SetupError(f"--workdir {workdir}: exists and is not a folder")
    why = unwritable(os.path.join(workdir, "checkpoints"))
    if why:
        raise SetupError(f"--workdir {workdir}: {why}")


def _flat_config(config) -> dict:
    """The config as {dotted key: JSON value}, stored with each checkpoint so a resume can say what changed."""
    out = {}

    def walk(prefix, node):
        for k, v in node.items():
            if isinstance(v, dict):
                walk(f"{prefix}{k}.", v)
            else:
                out[prefix + k] = v
    walk("", json.loads(config.to_json_best_effort()))
    return out


def _signature(models, model) -> dict:
    # The base the adapters sit on, by size: a resume onto another base (1.3B vs 14B) must stop, whatever the task.
    n_base = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Not(models.wrt))))
    return dict(models.signature, base_params=int(n_base))


def train(config, workdir: str):
    """Runs (or resumes) the training job of `config` in `workdir`; returns the final train-step state."""
    check_config(config, workdir)
    task = get_task(config.get("task", "omnimatte"))

    # ---------------------------------------------------------------- logging
    os.makedirs(workdir, exist_ok=True)
    atomic_write(os.path.join(workdir, "config.json"), config.to_json_best_effort(indent=1))
    logging.info("devices: %s", jax.devices())

    # ---------------------------------------------------------------- mesh
    sizes = dict(config.mesh)
    # A fully specified mesh (no -1) takes the first prod(sizes) devices, e.g. runlocal's single device.
    n = int(np.prod(list(sizes.values())))
    devices = jax.devices()[:n] if -1 not in sizes.values() and n <= jax.device_count() else None
    mesh = sharding.make_mesh(sizes, devices=devices)
    logging.info("mesh: %s", dict(mesh.shape))
    with jax.set_mesh(mesh):
        # ------------------------------------------------------------ input
        data_iter = iter(task.input_pipeline(config, seed=config.seed))

        # ------------------------------------------------------------ models (born sharded) and optimizer
        logging.info("building the models...")
        t0 = time.perf_counter()
        models = task.build(config, mesh)
        model = models.trainable
        signature = _signature(models, model)
        tx, schedule = make_optimizer(config)
        optimizer = nnx.Optimizer(model, tx, wrt=models.wrt)
        n_trained = sum(x.size for x in jax.tree.leaves(nnx.state(model, models.wrt)))
        logging.info("task %s: built in %.1fs, %d trained params; %s", config.get("task", "omnimatte"),
                     time.perf_counter() - t0, n_trained, signature)

        # ------------------------------------------------------------ restore
        ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), keep=config.keep_ckpt, wrt=models.wrt)
        rng = jax.random.key(config.seed)
        first_step, chrono_state = 0, None
        meta = ckpt.metadata()
        if meta is not None:  # before any array is read
            old = meta["extra"].get("signature") or {}
            # A checkpoint from before a signature key existed is compared on the keys it has.
            if {k: v for k, v in signature.items() if k in old} != old:
                raise SetupError(f"{ckpt.directory} step {meta['step']} was trained with {old}, this config gives "
                                 f"{signature}: resume with the same settings or use a new workdir")
            before, now = meta["extra"].get("config") or {}, _flat_config(config)
            changed = [f"{k} {before.get(k)!r} -> {now.get(k)!r}" for k in sorted(set(before) | set(now))
                       if before.get(k) != now.get(k)]
            if changed and before:  # (a checkpoint from before configs were stored has nothing to compare)
                logging.warning("resuming step %d with changed settings: %s", meta["step"], "; ".join(changed))
        restored = ckpt.restore(model, optimizer)
        if restored is not None:
            first_step, rng, chrono_state = restored.step, restored.rng, restored.extra.get("chrono")
            data_iter.set_state(restored.data_state)
            logging.info("resumed from step %d", first_step)

        # ------------------------------------------------------------ compiled step
        make_batch = task.make_batch(models, config, mesh)

        def next_batch(step):
            return make_batch(next(data_iter), jax.random.fold_in(jax.random.fold_in(rng, step), 1))

        step_fn, state = make_train_step(model, optimizer, functools.partial(task.loss, config=config))
        preview = task.make_preview(models, config)
        # The chrono starts before the compile: "first step (compile)" is the first batch, compile and step.
        chrono = Chrono(config.total_steps, examples_per_step=config.input.batch_size, first_step=first_step)
        batch = next_batch(first_step)
        logging.info("compiling the train step...")
        t0 = time.perf_counter()
        compiled = step_fn.compile(state, batch, jax.random.fold_in(rng, first_step))
        mem = compiled.memory_analysis()
        logging.info("compiled the train step in %.1fs%s", time.perf_counter() - t0, "" if mem is None else
                     f": temp {getattr(mem, 'temp_size_in_bytes', 0) / 2**30:.2f} GB, arguments "
                     f"{getattr(mem, 'argument_size_in_bytes', 0) / 2**30:.2f} GB")

        # ------------------------------------------------------------ loop
        if chrono_state:
            chrono.load_state(chrono_state)
        guard = NonFiniteGuard(config.loss.nonfinite_patience)

        def check(step, metrics):
            try:
                guard(step, metrics)
            except FloatingPointError as e:
                # The state these steps started from is wrecked: drop every checkpoint saved from it.
                gone = ckpt.delete_from(max(guard.first_bad_step - 1, 0))
                last = ckpt.latest_step()
                kept = (f"the last good checkpoint is step {last} in {ckpt.directory}" if last is not None else
                        f"no good checkpoint is left in {ckpt.directory} (a rerun starts at step 0)")
                dropped = f" (deleted checkpoint(s) {gone}, saved from that state)" if gone else ""
                raise SystemExit(f"stopping: {e}; {kept}{dropped}. Rerun with a lower --config.lr (it takes "
                                 "effect on resume) or check the data.") from e

        os.makedirs(os.path.join(workdir, "previews"), exist_ok=True)
        pending = None  # (step, metrics) not yet read by the guard
        with MetricWriter(workdir) as writer:
            for step in range(first_step + 1, config.total_steps + 1):
                if step > first_step + 1:
                    batch = next_batch(step - 1)
                state, metrics = step_fn(state, batch, jax.random.fold_in(rng, step))
                if step == first_step + 1:
                    jax.block_until_ready(metrics)  # the first tick must include the step, not just its dispatch
                # The guard reads the previous step's flags while this one runs: reading this step's would leave the
                # device idle between steps (the host's dispatch of the next step, ~11 ms of a 292 ms DiffDecompose
                # step on an H200). The step itself already keeps a non-finite update out of the state; the guard
                # only counts such steps, so it stops a bad run one step later, before any checkpoint or log.
                if pending is not None:
                    check(*pending)
                pending = (step, metrics)
                chrono.tick(step)
                sync = (step % config.log_steps == 0 or step % config.ckpt_steps == 0
                        or step % config.evals.preview_steps == 0 or step == config.total_steps)
                if sync:
                    check(*pending)
                    pending = None
                if step % config.log_steps == 0 or step == config.total_steps:
                    m = {k: float(v) for k, v in metrics.items()}
                    m.update(lr=float(schedule(step - 1)), **chrono.metrics())
                    writer.write(step, m)
                    logging.info("step %d/%d loss %.5f grad_norm %.4f %s", step, config.total_steps, m["loss"],
                                 m["grad_norm"], chrono.summary())
                if step % config.ckpt_steps == 0 or step == config.total_steps:
                    model, optimizer = step_fn.merge(state)
                    with chrono.paused():
                        ckpt.save(step, model, optimizer, rng=rng, data_state=data_iter.get_state(),
                                  extra=dict(signature=signature, chrono=chrono.state_dict(),
                                             config=_flat_config(config)))
                if step % config.evals.preview_steps == 0:
                    model, _ = step_fn.merge(state)
                    path = os.path.join(workdir, "previews", f"step_{step:07d}.png")
                    logging.info("writing preview %s...", path)
                    with chrono.paused():
                        t0 = time.perf_counter()
                        preview(model, path)
                        if os.path.isfile(path):  # which step and how far the training had got
                            title_file(path, f"step {step}/{config.total_steps}   loss {float(metrics['loss']):.5f}"
                                             f"   ({config.get('task', 'omnimatte')})")
                    logging.info("wrote preview in %.1fs", time.perf_counter() - t0)
        ckpt.close()

        # ------------------------------------------------------------ export
        model, _ = step_fn.merge(state)
        logging.info("exporting...")
        for path in task.export(model, config, workdir):
            logging.info("wrote %s", path)
    logging.info("done: %s", workdir)
    return state
