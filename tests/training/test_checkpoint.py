"""Checkpoint stop-and-resume is exact; keep-N; only LoRA, optimizer, rng and iterator state are stored."""

import json
import os

import jax
import numpy as np
import pytest
from flax import nnx

from omnijax import sharding as S
from omnijax.params import flat_params
from omnijax.training.checkpoint import Checkpointer, CheckpointError
from omnijax.training.step import make_train_step
from tests.training.lora_model import RULES, TinyLoRANet, build, make_batch, regression_loss

TOTAL = 6


class CountingIterator:
    """A stand-in input pipeline whose position must survive a restart (state is a JSON-able dict)."""

    def __init__(self, seed: int):
        self.seed, self.pos = seed, 0

    def __next__(self):
        batch = make_batch(self.seed * 1000 + self.pos)
        self.pos += 1
        return batch

    def get_state(self):
        return {"seed": self.seed, "pos": self.pos}

    def set_state(self, state):
        self.seed, self.pos = state["seed"], state["pos"]


def _train(mesh, workdir, *, stop_at=None, resume=False):
    """Runs to TOTAL steps (or stops after `stop_at`), checkpointing every step; returns (losses by step, lora)."""
    with jax.set_mesh(mesh):
        model, opt = build(mesh)
        if resume:  # scramble the adapters: the restore must overwrite them
            for v in flat_params(model, nnx.LoRAParam).values():
                v.set_value(v.get_value() + 1.0)
        data = CountingIterator(seed=7)
        rng = jax.random.key(11)
        first = 0
        ckpt = Checkpointer(workdir, keep=2)
        if resume:
            restored = ckpt.restore(model, opt)
            first, rng = restored.step, restored.rng
            data.set_state(restored.data_state)
            assert restored.extra == {"note": "tiny"}
        step, state = make_train_step(model, opt, regression_loss)
        losses = {}
        for i in range(first, TOTAL if stop_at is None else stop_at):
            state, metrics = step(state, S.host_to_global(next(data), mesh), jax.random.fold_in(rng, i))
            losses[i + 1] = float(metrics["loss"])
            # Save after every step so an async write overlaps the next (donating) step.
            ckpt.save(i + 1, *step.merge(state), rng=rng, data_state=data.get_state(), extra={"note": "tiny"})
        ckpt.close()
        model, _ = step.merge(state)
        return losses, {k: np.asarray(v.get_value()) for k, v in flat_params(model, nnx.LoRAParam).items()}


@pytest.fixture(scope="module")
def mesh():
    return S.make_mesh({"data": 2, "fsdp": 4})


def test_resume_is_exact(tmp_path, mesh):
    full_losses, full_lora = _train(mesh, tmp_path / "full")
    part_losses, _ = _train(mesh, tmp_path / "part", stop_at=3)
    resumed_losses, resumed_lora = _train(mesh, tmp_path / "part", resume=True)
    assert sorted(part_losses) == [1, 2, 3] and sorted(resumed_losses) == [4, 5, 6]
    assert {**part_losses, **resumed_losses} == full_losses  # bit-identical floats
    for k in full_lora:
        assert resumed_lora[k].tobytes() == full_lora[k].tobytes(), k
    assert Checkpointer(tmp_path / "full").all_steps() == [5, 6]  # keep=2


def test_checkpoint_contents(tmp_path, mesh):
    with jax.set_mesh(mesh):
        model, opt = build(mesh)
        ckpt = Checkpointer(tmp_path, keep=None, async_save=False)
        ckpt.save(4, model, opt, rng=jax.random.key(3), data_state=b"\x00grain-state\xff")
        ckpt.close()
        meta = json.loads((tmp_path / "4" / "meta" / "metadata").read_text())
        assert meta["step"] == 4 and "__bytes__" in meta["data_state"]
        stored = Checkpointer(tmp_path)._manager.item_metadata(4)
        assert set(stored["params"].keys()) == {"fc1.lora.lora_a", "fc1.lora.lora_b", "fc2.lora.lora_a",
                                                "fc2.lora.lora_b"}  # no frozen base
        model2, opt2 = build(mesh, seed=2)
        restored = Checkpointer(tmp_path).restore(model2, opt2)
    assert restored.data_state == b"\x00grain-state\xff"
    assert restored.step == 4
    np.testing.assert_array_equal(jax.random.key_data(restored.rng), jax.random.key_data(jax.random.key(3)))
    assert model2.fc1.lora.lora_a[...].sharding.spec == jax.sharding.PartitionSpec("fsdp", None)
    np.testing.assert_array_equal(np.asarray(model2.fc1.lora.lora_a[...]), np.asarray(model.fc1.lora.lora_a[...]))
    # The base of model2 keeps its own (different seed) values: restore never touches it.
    assert not np.array_equal(np.asarray(model2.fc1.kernel[...]), np.asarray(model.fc1.kernel[...]))


def test_restore_errors(tmp_path, mesh):
    with jax.set_mesh(mesh):
        assert Checkpointer(tmp_path / "empty").restore(*build(mesh)) is None
        model, opt = build(mesh)
        with Checkpointer(tmp_path / "a", async_save=False) as ckpt:
            ckpt.save(1, model, opt, rng=jax.random.key(0))
        with pytest.raises(CheckpointError, match="no checkpoint for step 2"):
            Checkpointer(tmp_path / "a").restore(model, opt, step=2)
        other = nnx.Optimizer(model, opt.tx, wrt=nnx.LoRAParam)
        del model.fc2.lora  # a different adapter layout than the one saved
        with pytest.raises(CheckpointError, match=r"missing \[\], unexpected \['fc2.lora.lora_a'"):
            Checkpointer(tmp_path / "a").restore(model, other)
    assert os.path.isdir(tmp_path / "a" / "1")


def test_restore_adapters_into_abstract_sharded_model(tmp_path, mesh):
    """Only the adapters, read straight into the shards named by the rules; the base stays abstract."""
    with jax.set_mesh(mesh):
        model, opt = build(mesh, seed=4)
        with Checkpointer(tmp_path, async_save=False) as ckpt:
            ckpt.save(2, model, opt, rng=jax.random.key(0))
    abstract, shardings = S.abstract_sharded(lambda: TinyLoRANet(rngs=nnx.Rngs(0)), RULES, mesh, print_fn=None)
    restored = Checkpointer(tmp_path).restore(abstract)
    assert restored.step == 2
    for path, var in flat_params(abstract, nnx.LoRAParam).items():
        value = var.get_value()
        assert isinstance(value, jax.Array) and value.sharding.is_equivalent_to(shardings[path], value.ndim)
        want = flat_params(model, nnx.LoRAParam)[path].get_value()
        np.testing.assert_array_equal(np.asarray(value), np.asarray(want))
    assert isinstance(abstract.fc1.kernel.get_value(), jax.ShapeDtypeStruct)
