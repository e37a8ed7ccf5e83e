"""config.train_base: one trainer step changes the DiT's own weights (every weight trains, as for a model trained from
scratch); without it only the LoRA adapters change and the base stays bit-identical."""

import jax
import numpy as np
import pytest
from flax import nnx

from configs import diffdecompose
from omnijax import sharding
from omnijax.training.optim import make_optimizer
from omnijax.training.step import make_train_step
from tasks import diffdecompose as task


def _base_and_lora(model):
    base = {k: np.array(v) for k, v in nnx.to_flat_state(nnx.state(model.dit, nnx.Param))
            if not isinstance(v, nnx.LoRAParam)}
    lora = {k: np.array(v) for k, v in nnx.to_flat_state(nnx.state(model.lora, nnx.LoRAParam))}
    return base, lora


@pytest.mark.parametrize("train_base", [True, False])
def test_train_base_trains_the_base_weights(train_base):
    config = diffdecompose.get_config("learn,runlocal")
    config.train_base = train_base
    config.schedule = dict(warmup_steps=0, decay_type="constant")  # the first step moves the weights
    config.input.num_threads = 0
    mesh = sharding.make_mesh(dict(config.mesh), devices=jax.devices()[:1])
    with jax.set_mesh(mesh):
        models = task.build(config, mesh)
        model = models.trainable
        base0, lora0 = _base_and_lora(model)
        optimizer = nnx.Optimizer(model, make_optimizer(config)[0], wrt=models.wrt)
        step_fn, state = make_train_step(model, optimizer, lambda m, b, r: task.loss(m, b, r, config=config))
        batch = task.make_batch(models, config, mesh)(next(iter(task.input_pipeline(config, seed=0))),
                                                      jax.random.key(1))
        state, metrics = step_fn(state, batch, jax.random.key(2))
        assert float(metrics["finite"]) == 1.0
        base1, lora1 = _base_and_lora(step_fn.merge(state)[0])
    assert base0.keys() == base1.keys() and len(base0) > 20
    changed = [k for k in base0 if not np.array_equal(base0[k], base1[k])]
    lora_changed = [k for k in lora0 if not np.array_equal(lora0[k], lora1[k])]
    assert lora_changed  # the adapters train either way
    if train_base:
        # Every kernel of the DiT moves (Adam's first step is ~lr * sign(grad) wherever the gradient is nonzero).
        kernels = [k for k in base0 if k[-1] == "kernel"]
        assert kernels and set(kernels) <= set(changed)
    else:
        assert changed == []
    assert models.wrt is (nnx.Param if train_base else nnx.LoRAParam)


def test_dit_variant_needs_a_random_dit(tmp_path):
    from tasks import SetupError

    config = diffdecompose.get_config("learn,runlocal")
    config.model_init.dit = str(tmp_path)  # a converted folder brings its own size: a size row cannot apply
    mesh = sharding.make_mesh(dict(config.mesh), devices=jax.devices()[:1])
    with jax.set_mesh(mesh), pytest.raises(SetupError, match="dit_variant"):
        task.build(config, mesh)
