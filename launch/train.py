"""The one trainer: drives any task (tasks/__init__.py) chosen by `config.task`; nothing here is task-specific.

  python launch/train.py --config configs/effect_expert.py --workdir runs/effect [--config.key=value ...]
  python launch/train.py --config configs/effect_expert.py:runlocal --workdir /tmp/effect     # tiny, CPU
  python launch/train.py --config configs/effect_expert.py --workdir runs/effect --config.input.latent_cache=DIR

One readable loop (big_vision's train.py as the model): logging -> mesh -> input -> models (born sharded) ->
optimizer / restore -> compiled step -> loop (step; log; non-finite guard; checkpoint; preview) -> export.
The workdir holds checkpoints/ (LoRA params, optimizer state, step, data-iterator state, rng, the task's
signature and the chrono state: a rerun resumes exactly), metrics.jsonl + TensorBoard events, previews/*.png
and what the task exports.
"""

from __future__ import annotations

import functools
import os

import jax
import numpy as np
from absl import app, flags, logging
from flax import nnx
from ml_collections import config_flags

from launch import common  # noqa: F401  (sets XLA flags before jax initialises a backend)
from omnijax import sharding
from omnijax.io.atomic import atomic_write
from omnijax.training.checkpoint import Checkpointer
from omnijax.training.chrono import Chrono
from omnijax.training.metrics import MetricWriter
from omnijax.training.optim import make_optimizer
from omnijax.training.step import NonFiniteGuard, make_train_step
from tasks import SetupError, get_task

_CONFIG = config_flags.DEFINE_config_file("config", None, "training config file", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "run directory (checkpoints, metrics, previews, LoRA files)")
_DISTRIBUTED = flags.DEFINE_bool("distributed", False, "call jax.distributed.initialize() (multi-host runs)")

def train(config, workdir: str):
    """Runs (or resumes) the training job of `config` in `workdir`; returns the final train-step state."""
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
        models = task.build(config, mesh)
        model = models.trainable
        tx, schedule = make_optimizer(config)
        optimizer = nnx.Optimizer(model, tx, wrt=nnx.LoRAParam)
        n_lora = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.LoRAParam)))
        logging.info("task %s: %d LoRA params; %s", config.get("task", "omnimatte"), n_lora, models.signature)

        # ------------------------------------------------------------ restore
        ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), keep=config.keep_ckpt)
        rng = jax.random.key(config.seed)
        first_step, chrono_state = 0, None
        meta = ckpt.metadata()
        if meta is not None and meta["extra"].get("signature") != models.signature:  # before any array is read
            raise SetupError(f"{ckpt.directory} step {meta['step']} was trained with {meta['extra'].get('signature')}, "
                             f"this config gives {models.signature}: resume with the same settings or use a new "
                             "workdir")
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
        batch = next_batch(first_step)
        compiled = step_fn.compile(state, batch, jax.random.fold_in(rng, first_step))
        mem = compiled.memory_analysis()
        if mem is not None:
            logging.info("compiled step: temp %.2f GB, arguments %.2f GB",
                         getattr(mem, "temp_size_in_bytes", 0) / 2**30,
                         getattr(mem, "argument_size_in_bytes", 0) / 2**30)
        preview = task.make_preview(models, config)

        # ------------------------------------------------------------ loop
        chrono = Chrono(config.total_steps, examples_per_step=config.input.batch_size, first_step=first_step)
        if chrono_state:
            chrono.load_state(chrono_state)
        guard = NonFiniteGuard(config.loss.nonfinite_patience)
        os.makedirs(os.path.join(workdir, "previews"), exist_ok=True)
        with MetricWriter(workdir) as writer:
            for step in range(first_step + 1, config.total_steps + 1):
                if step > first_step + 1:
                    batch = next_batch(step - 1)
                state, metrics = step_fn(state, batch, jax.random.fold_in(rng, step))
                chrono.tick(step)
                try:
                    guard(step, metrics)
                except FloatingPointError as e:
                    ckpt.wait()
                    raise SystemExit(f"stopping: {e}. The last good checkpoint is step {ckpt.latest_step()} in "
                                     f"{ckpt.directory}; lower config.lr or check the data.") from e
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
                                  extra=dict(signature=models.signature, chrono=chrono.state_dict()))
                if step % config.evals.preview_steps == 0:
                    model, _ = step_fn.merge(state)
                    with chrono.paused():
                        preview(model, os.path.join(workdir, "previews", f"step_{step:07d}.png"))
        ckpt.close()

        # ------------------------------------------------------------ export
        model, _ = step_fn.merge(state)
        for path in task.export(model, config, workdir):
            logging.info("wrote %s", path)
    logging.info("done: %s", workdir)
    return state


def main(argv):
    del argv
    if _DISTRIBUTED.value:
        jax.distributed.initialize()
    if _CONFIG.value is None or _WORKDIR.value is None:
        raise app.UsageError("--config and --workdir are required")
    try:
        train(_CONFIG.value, _WORKDIR.value)
    except SetupError as e:
        raise SystemExit(f"error: {e}") from e


if __name__ == "__main__":
    app.run(main)
