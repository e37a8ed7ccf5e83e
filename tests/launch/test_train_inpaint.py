"""The base-pretraining task through the one trainer (configs/inpaint_base.py:runlocal): every weight trains, the
export is a converted folder that registry.load reads back bit for bit, and the preview is written."""

import os

import numpy as np
import pytest
from flax import nnx

from configs import inpaint_base
from converters import registry
from omnijax.models.wan.variants import variant
from tasks.trainer import train
from tests.launch.runlocal import logged_losses, runlocal_config


def _flat(state):
    return {".".join(map(str, p)): np.asarray(v.get_value() if isinstance(v, nnx.Variable) else v)
            for p, v in nnx.to_flat_state(state)}


@pytest.mark.slow  # ~50 s on 2 CPU cores: model build, the full-weight step's compile, an eager preview
def test_inpaint_base_trains_every_weight_and_exports_a_loadable_base(tmp_path):
    config = runlocal_config(inpaint_base, total_steps=2, ckpt_steps=2, **{"evals.preview_steps": 2})
    workdir = str(tmp_path / "base")
    state = train(config, workdir)
    assert sorted(logged_losses(workdir)) == [1, 2]
    assert os.path.getsize(os.path.join(workdir, "previews", "step_0000002.png")) > 0

    trained = _flat(state[0])
    init = _flat(nnx.state(registry.load("wan_dit", "tiny", config=variant(config.model.variant), dtype="f32",
                                         seed=config.seed)[1], nnx.Param))
    assert trained.keys() == init.keys()
    # AdamW moves every weight on its first step: the whole base trains, not adapters only.
    moved = [k for k in init if not np.array_equal(init[k], trained[k])]
    assert len(moved) == len(init), sorted(set(init) - set(moved))[:5]

    _, loaded = registry.load("wan_dit", os.path.join(workdir, "base"), dtype="f32")
    got = _flat(nnx.state(loaded, nnx.Param))
    assert got.keys() == trained.keys()
    for k in got:
        np.testing.assert_array_equal(got[k], trained[k])
